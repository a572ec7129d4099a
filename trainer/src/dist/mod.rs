//! The distributed runtime: where a process sits in the job (env), the
//! rendezvous store, and collectives.

pub mod bench;
pub mod collectives;
pub mod env;
pub mod nccl;
pub mod store;

use std::time::Duration;

pub use collectives::{Collectives, StoreCollectives};
pub use env::DistEnv;
pub use store::{StoreClient, StoreServer};

use crate::error::Result;

/// A joined job: the store server (on the process that hosts it) and the
/// data-parallel collectives.
pub struct Job {
    pub env: DistEnv,
    _server: Option<StoreServer>,
    pub dp: Box<dyn Collectives>,
}

impl Job {
    /// Rendezvous through the store at MASTER_ADDR:MASTER_PORT (hosting it on
    /// rank 0 unless a launcher does) and set up the collectives: NCCL on
    /// `cuda_device` when given, else the CPU store backend.
    pub fn join(env: DistEnv, cuda_device: Option<usize>) -> Result<Job> {
        let (server, mut store) = rendezvous(&env)?;
        let t = Duration::from_secs(env.timeout_s);
        store.barrier("join", env.world)?;
        let dp: Box<dyn Collectives> = match cuda_device {
            Some(d) => Box::new(nccl::NcclCollectives::new(
                &mut store, "dp", env.rank, env.world, d, t,
            )?),
            None => Box::new(StoreCollectives::new(store, "dp", env.rank, env.world, t)),
        };
        Ok(Job {
            env,
            _server: server,
            dp,
        })
    }
}

/// Host the store if this process must, and connect to it as this rank.
pub fn rendezvous(env: &DistEnv) -> Result<(Option<StoreServer>, StoreClient)> {
    let server = if env.host_store {
        Some(StoreServer::start(
            &format!("0.0.0.0:{}", env.master_port),
            &env.secret,
        )?)
    } else {
        None
    };
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    let store = StoreClient::connect(
        &addr,
        &env.secret,
        env.rank as u32,
        Duration::from_secs(env.timeout_s),
    )?;
    Ok((server, store))
}
