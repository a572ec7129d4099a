//! The distributed runtime: where a process sits in the job (env), the
//! rendezvous store, and collectives.

pub mod abort;
pub mod bench;
pub mod buckets;
pub mod collectives;
pub mod env;
pub mod links;
pub mod liveness;
pub mod mesh;
pub mod nccl;
pub mod store;

use std::time::Duration;

pub use collectives::{Collectives, StoreCollectives};
pub use env::DistEnv;
pub use links::Links;
use liveness::Liveness;
pub use mesh::{Coords, GroupKind, GroupSpec, MeshDims};
pub use store::{StoreClient, StoreServer};

use crate::error::Result;

/// A joined job: the store server (on the process that hosts it), a control
/// connection to it, the liveness watcher and the process groups of the mesh:
/// data-parallel, tensor-parallel, the replica groups of K/V heads shared by
/// several tensor-parallel ranks (by size), and for pipelines the group of
/// the stages, the group of the two ends sharing a tied embedding, and the
/// channels of the virtual edges.
pub struct Job {
    pub env: DistEnv,
    _server: Option<StoreServer>,
    pub store: StoreClient,
    liveness: Liveness,
    pub dims: MeshDims,
    pub coords: Coords,
    pub dp: Box<dyn Collectives>,
    pub tp: Option<Box<dyn Collectives>>,
    /// The context-parallel ring (cp > 1); the trainer moves it into the
    /// engine's `Ring`.
    pub cp: Option<Box<dyn Collectives>>,
    pub replicas: Vec<(usize, Box<dyn Collectives>)>,
    /// All stages of this rank's pipeline (pp > 1).
    pub pp: Option<Box<dyn Collectives>>,
    /// The first and last stage, which both hold a tied embedding (pp > 1, tied).
    pub tied: Option<Box<dyn Collectives>>,
    pub links: Links,
    /// `finish` met every rank: the job ended cleanly.
    finished: bool,
    /// Bounds the teardown (set by `drop`; declared last, so it is dropped
    /// after every communicator).
    teardown: Option<TeardownLimit>,
}

/// How long tearing a job's communicators down may take before the process
/// ends without finishing it (NCCL's teardown can wait on peers).
const TEARDOWN_LIMIT: Duration = Duration::from_secs(60);

/// While alive, a thread that ends the process if the teardown outlasts
/// `TEARDOWN_LIMIT`: with status 0 after a clean finish (everything the run
/// writes is written by then), 1 otherwise.
struct TeardownLimit(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl TeardownLimit {
    fn start(rank: usize, clean: bool) -> TeardownLimit {
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let spawned = std::thread::Builder::new()
            .name("sigma-teardown".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + TEARDOWN_LIMIT;
                while !d.load(Ordering::SeqCst) {
                    if std::time::Instant::now() > deadline {
                        eprintln!(
                            "sigma: rank {rank}: tearing down the communicators took over {} s; exiting without finishing it{}",
                            TEARDOWN_LIMIT.as_secs(),
                            if clean { " (the run itself had finished)" } else { "" }
                        );
                        signal_hook::low_level::exit(if clean { 0 } else { 1 });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        if spawned.is_err() {
            // No thread, no limit: the teardown runs unbounded, as it would anyway.
            done.store(true, Ordering::SeqCst);
        }
        TeardownLimit(done)
    }
}

impl Drop for TeardownLimit {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Job {
    /// Communicators are torn down in one order on every rank (pipeline
    /// channels by ascending edge, activations first; the tied ends; the
    /// pipeline group; the replica groups in `replica_sizes` order; the
    /// tensor-parallel group; then, as a field, the data-parallel group), so
    /// teardowns that wait on peers never wait in a cycle, and within
    /// `TEARDOWN_LIMIT`.
    fn drop(&mut self) {
        self.teardown = Some(TeardownLimit::start(self.env.rank, self.finished));
        let links = std::mem::take(&mut self.links);
        for (_, c) in links.act.into_iter().chain(links.grad) {
            drop(c);
        }
        drop(self.tied.take());
        drop(self.pp.take());
        for (_, c) in self.replicas.drain(..) {
            drop(c);
        }
        drop(self.tp.take());
    }
}

/// What the pipeline needs from the job's groups.
#[derive(Clone, Copy, Debug)]
pub struct PipelineGroups {
    /// Chunks per rank.
    pub v: usize,
    /// The embedding is tied to the output head.
    pub tied: bool,
}

impl Job {
    /// Rendezvous through the store at MASTER_ADDR:MASTER_PORT (hosting it on
    /// rank 0 unless a launcher does) and set up the groups of `dims`: NCCL on
    /// `cuda_device` when given, else the CPU store backend. `replica_sizes`:
    /// sizes of the groups of consecutive tensor-parallel ranks that share K/V
    /// heads. Every rank creates its groups in the same order (data, tensor,
    /// replicas, pipeline, tied ends, then edges by stage), so communicator
    /// set-ups never wait on each other in a cycle.
    pub fn join(
        env: DistEnv,
        cuda_device: Option<usize>,
        dims: MeshDims,
        replica_sizes: &[usize],
        pipeline: PipelineGroups,
    ) -> Result<Job> {
        dims.check(env.world)?;
        let (server, mut store) = rendezvous(&env)?;
        let t = Duration::from_secs(env.timeout_s);
        store.barrier("join", env.world)?;
        let liveness = Liveness::start(&env)?;
        let control = connect(&env)?;
        let c = dims.coords(env.rank);
        let group = |store: &mut StoreClient,
                     name: String,
                     rank: usize,
                     size: usize|
         -> Result<Box<dyn Collectives>> {
            Ok(match cuda_device {
                Some(d) => Box::new(nccl::NcclCollectives::new(store, &name, rank, size, d, t)?),
                None => Box::new(StoreCollectives::new(connect(&env)?, &name, rank, size, t)),
            })
        };
        let (mut dp, mut tp, mut cp, mut replicas) = (None, None, None, Vec::new());
        let (mut pp, mut tied, mut links) = (None, None, Links::default());
        for g in dims.groups_of(env.rank, replica_sizes, pipeline.v, pipeline.tied) {
            let comm = group(&mut store, g.name.clone(), g.rank, g.size())?;
            match g.kind {
                GroupKind::Dp => dp = Some(comm),
                GroupKind::Tp => tp = Some(comm),
                GroupKind::Cp => cp = Some(comm),
                GroupKind::Replicas(size) => replicas.push((size, comm)),
                GroupKind::Pp => pp = Some(comm),
                GroupKind::Tied => tied = Some(comm),
                GroupKind::EdgeAct(s) => {
                    links.act.insert(s, comm);
                }
                GroupKind::EdgeGrad(s) => {
                    links.grad.insert(s, comm);
                }
            }
        }
        let dp = dp.expect("every rank is in a data-parallel group");
        Ok(Job {
            env,
            _server: server,
            store: control,
            liveness,
            dims,
            coords: c,
            dp,
            tp,
            cp,
            replicas,
            pp,
            tied,
            links,
            finished: false,
            teardown: None,
        })
    }

    /// The data-parallel group and the tensor-parallel group (if any), borrowed together.
    pub fn groups(&mut self) -> (&mut dyn Collectives, Option<&mut dyn Collectives>) {
        (
            self.dp.as_mut(),
            self.tp.as_mut().map(|c| c.as_mut() as &mut dyn Collectives),
        )
    }

    /// What a pipeline step needs of the job: this rank's stage, its
    /// tensor-parallel group and its links to the neighbouring stages.
    pub fn pipeline_parts(&mut self) -> (usize, Option<&mut dyn Collectives>, &mut Links) {
        (
            self.coords.pp,
            self.tp.as_mut().map(|c| c.as_mut() as &mut dyn Collectives),
            &mut self.links,
        )
    }

    /// End the job cleanly: stop heartbeats (a finished rank is not a lost
    /// one), meet every rank, and keep the store up on its host until every
    /// rank is past the meeting.
    pub fn finish(&mut self) -> Result<()> {
        self.liveness.stop();
        self.store.barrier("finish", self.env.world)?;
        let n = self.store.add("job/finished", 1)?;
        if self._server.is_some() {
            let deadline = std::time::Instant::now() + Duration::from_secs(self.env.timeout_s);
            let mut n = n;
            while (n as usize) < self.env.world && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                n = self.store.add("job/finished", 0)?;
            }
        }
        self.finished = true;
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
