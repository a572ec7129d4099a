//! The distributed runtime: where a process sits in the job (env), the
//! rendezvous store, and collectives.

pub mod abort;
pub mod bench;
pub mod buckets;
pub mod collectives;
pub mod env;
pub mod liveness;
pub mod nccl;
pub mod store;

use std::time::Duration;

pub use collectives::{Collectives, StoreCollectives};
pub use env::DistEnv;
use liveness::Liveness;
pub use store::{StoreClient, StoreServer};

use crate::error::Result;

/// A joined job: the store server (on the process that hosts it), a control
/// connection to it, the liveness watcher and the data-parallel collectives.
pub struct Job {
    pub env: DistEnv,
    _server: Option<StoreServer>,
    pub store: StoreClient,
    liveness: Liveness,
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
        let liveness = Liveness::start(&env)?;
        let control = connect(&env)?;
        let dp: Box<dyn Collectives> = match cuda_device {
            Some(d) => Box::new(nccl::NcclCollectives::new(
                &mut store, "dp", env.rank, env.world, d, t,
            )?),
            None => Box::new(StoreCollectives::new(store, "dp", env.rank, env.world, t)),
        };
        Ok(Job {
            env,
            _server: server,
            store: control,
            liveness,
            dp,
        })
    }

    /// End the job cleanly: stop heartbeats (a finished rank is not a lost
    /// one), meet every rank, and keep the store up on its host until every
    /// rank is past the meeting.
    pub fn finish(&mut self) -> Result<()> {
        self.liveness.stop();
        self.dp.barrier()?;
        let n = self.store.add("job/finished", 1)?;
        if self._server.is_some() {
            let deadline = std::time::Instant::now() + Duration::from_secs(self.env.timeout_s);
            let mut n = n;
            while (n as usize) < self.env.world && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                n = self.store.add("job/finished", 0)?;
            }
        }
        Ok(())
    }
}

/// A new connection to the job's store, as this rank.
pub fn connect(env: &DistEnv) -> Result<StoreClient> {
    StoreClient::connect_in(
        &format!("{}:{}", env.master_addr, env.master_port),
        &env.secret,
        env.rank as u32,
        Duration::from_secs(env.timeout_s),
        &env.store_namespace(),
    )
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
    Ok((server, connect(env)?))
}
