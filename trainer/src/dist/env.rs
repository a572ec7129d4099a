//! Where this process sits in the job: the job-layout variables
//! (torchrun-style, SLURM, sigma's own) interpreted, each read through
//! `sigma_data::env`, the one module that reads the environment.

use crate::error::{Result, TrainError};

/// torchrun / Kubeflow PyTorchJob style.
pub const RANK: &str = "RANK";
pub const LOCAL_RANK: &str = "LOCAL_RANK";
pub const WORLD_SIZE: &str = "WORLD_SIZE";
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
pub const MASTER_ADDR: &str = "MASTER_ADDR";
pub const MASTER_PORT: &str = "MASTER_PORT";
/// SLURM (`srun sigma train ...`).
pub const SLURM_PROCID: &str = "SLURM_PROCID";
pub const SLURM_NTASKS: &str = "SLURM_NTASKS";
pub const SLURM_LOCALID: &str = "SLURM_LOCALID";
pub const SLURM_NTASKS_PER_NODE: &str = "SLURM_NTASKS_PER_NODE";
pub const SLURM_JOB_NODELIST: &str = "SLURM_JOB_NODELIST";
/// Under SLURM without MASTER_PORT, the port comes from the job id
/// (`port_for_job`), so jobs sharing a node do not collide.
pub const SLURM_JOB_ID: &str = "SLURM_JOB_ID";
/// The rendezvous port when nothing else chooses one (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;
/// Ports derived from a job id lie in `PORT_BASE .. PORT_BASE + PORT_SPAN`
/// (20000-29499): below Linux's ephemeral range (32768-60999 by default,
/// `/proc/sys/net/ipv4/ip_local_port_range`, where the kernel picks the local
/// port of every outgoing connection, so a listener there may find its port
/// taken), below Kubernetes' NodePort range (30000-32767), and below
/// `DEFAULT_PORT`.
pub const PORT_BASE: u16 = 20000;
pub const PORT_SPAN: u16 = 9500;

/// The rendezvous port of SLURM job `id`: two jobs on one node get the same
/// one only when their ids differ by a multiple of `PORT_SPAN`.
pub fn port_for_job(id: u64) -> u16 {
    PORT_BASE + (id % u64::from(PORT_SPAN)) as u16
}

/// The rendezvous port from the environment: `MASTER_PORT`, else (under
/// SLURM) `port_for_job(SLURM_JOB_ID)`, else `DEFAULT_PORT`. `sigma train`
/// started by `srun` and `sigma launch` without `--master-port` both take it.
pub fn master_port(get: &dyn Fn(&str) -> Option<String>) -> Result<u16> {
    if let Some(p) = get(MASTER_PORT) {
        return match p.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(TrainError::config(
                "environment MASTER_PORT",
                format!("{p:?} is not a port (1-65535)"),
            )),
        };
    }
    Ok(match var(get, SLURM_JOB_ID)? {
        Some(id) => port_for_job(id as u64),
        None => DEFAULT_PORT,
    })
}
/// sigma's own variables of the job (listed with the others in `sigma_data::env`):
/// the job secret every rendezvous connection must present; set by `sigma
/// launch` when it hosts the rendezvous store itself; set by `sigma launch`:
/// how many times the job has been restarted (0 at first; each attempt uses
/// a namespace of its own in the store); seconds any wait on a peer may take
/// before it is an error (default 300); fault injection for tests
/// (`RANK:STEP` makes that rank abort, like a crash, when it starts that step).
pub use sigma_data::env::{
    DIST_TIMEOUT_S as TIMEOUT_S, FAULT_ABORT, JOB_SECRET, RESTART_COUNT, STORE_HOSTED,
};

/// Abort this process if the fault-injection variable names this rank and step.
pub fn maybe_inject_fault(rank: usize, step: u64) {
    if let Some(v) = sigma_data::env::var(FAULT_ABORT) {
        if v.split_once(':')
            .map(|(r, s)| (r.parse::<usize>().ok(), s.parse::<u64>().ok()))
            == Some((Some(rank), Some(step)))
        {
            eprintln!("{FAULT_ABORT}: rank {rank} aborting at step {step}");
            std::process::abort();
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub secret: String,
    /// True when this process must host the store (rank 0, unless a launcher does).
    pub host_store: bool,
    pub timeout_s: u64,
    /// Attempt of a job restarted by `sigma launch --max-restarts` (0: the first).
    pub restart_count: usize,
}

impl DistEnv {
    /// Key prefix of this attempt in the rendezvous store.
    pub fn store_namespace(&self) -> String {
        format!("attempt{}/", self.restart_count)
    }
}

fn var(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            TrainError::config(
                format!("environment {name}"),
                format!("{v:?} is not a non-negative integer"),
            )
        }),
    }
}

/// A positive number of seconds from environment variable `name` (or `default`).
pub fn secs_var(name: &str, default: f64) -> Result<f64> {
    match sigma_data::env::var(name) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<f64>() {
            Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
            _ => Err(TrainError::config(
                format!("environment {name}"),
                format!("{v:?} is not a positive number of seconds"),
            )),
        },
    }
}

/// First host of a SLURM node list: `node[001-004,007]` -> `node001`, `a,b` -> `a`.
pub fn first_slurm_host(list: &str) -> String {
    let first = match list.find('[') {
        Some(open) if list[..open].find(',').is_none() => {
            let inner = &list[open + 1
                ..list[open..]
                    .find(']')
                    .map(|c| open + c)
                    .unwrap_or(list.len())];
            let first_range = inner.split(',').next().unwrap_or("");
            format!(
                "{}{}",
                &list[..open],
                first_range.split('-').next().unwrap_or("")
            )
        }
        _ => list.split(',').next().unwrap_or(list).to_string(),
    };
    first.trim().to_string()
}

impl DistEnv {
    /// Read the process environment. Single-process runs (nothing set) get world 1.
    pub fn from_env() -> Result<DistEnv> {
        DistEnv::from_lookup(&sigma_data::env::var)
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<DistEnv> {
        let (rank, world, local_rank, local_world, default_addr, slurm) =
            if let Some(r) = var(get, RANK)? {
                let w = var(get, WORLD_SIZE)?.ok_or_else(|| {
                    TrainError::config(
                        "environment WORLD_SIZE",
                        "RANK is set but WORLD_SIZE is not",
                    )
                })?;
                (
                    r,
                    w,
                    var(get, LOCAL_RANK)?.unwrap_or(r),
                    var(get, LOCAL_WORLD_SIZE)?.unwrap_or(w),
                    None,
                    false,
                )
            } else if let Some(r) = var(get, SLURM_PROCID)? {
                let w = var(get, SLURM_NTASKS)?.ok_or_else(|| {
                    TrainError::config(
                        "environment SLURM_NTASKS",
                        "SLURM_PROCID is set but SLURM_NTASKS is not",
                    )
                })?;
                let lw = get(SLURM_NTASKS_PER_NODE)
                    .and_then(|v| v.split('(').next().and_then(|n| n.parse().ok()))
                    .unwrap_or(w);
                (
                    r,
                    w,
                    var(get, SLURM_LOCALID)?.unwrap_or(0),
                    lw,
                    get(SLURM_JOB_NODELIST).map(|l| first_slurm_host(&l)),
                    true,
                )
            } else {
                (0, 1, 0, 1, None, false)
            };
        if rank >= world {
            return Err(TrainError::config(
                "environment RANK",
                format!("rank {rank} is not below the world size {world}"),
            ));
        }
        let master_addr = get(MASTER_ADDR)
            .or(default_addr)
            .unwrap_or_else(|| "127.0.0.1".into());
        // The job id chooses the port only for processes SLURM started
        // (a launcher's ranks are given MASTER_PORT).
        let master_port = if slurm || get(MASTER_PORT).is_some() {
            master_port(get)?
        } else {
            DEFAULT_PORT
        };
        let secret = get(JOB_SECRET).unwrap_or_default();
        if world > 1 && secret.is_empty() {
            return Err(TrainError::config(
                format!("environment {JOB_SECRET}"),
                "not set: every process of a multi-process job needs the same job secret (sigma launch sets one; with srun or torchrun, export one)",
            ));
        }
        Ok(DistEnv {
            rank,
            local_rank,
            world,
            local_world,
            master_addr,
            master_port,
            secret,
            host_store: rank == 0 && get(STORE_HOSTED).is_none(),
            timeout_s: var(get, TIMEOUT_S)?.unwrap_or(300) as u64,
            restart_count: var(get, RESTART_COUNT)?.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(&|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_single_process() {
        let e = env(&[]).expect("environment");
        assert_eq!((e.rank, e.world), (0, 1));
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "h0"),
            ("MASTER_PORT", "1234"),
            ("SIGMA_JOB_SECRET", "x"),
        ])
        .expect("environment");
        assert_eq!(
            (
                e.rank,
                e.local_rank,
                e.world,
                e.master_addr.as_str(),
                e.master_port,
                e.host_store
            ),
            (3, 1, 4, "h0", 1234, false)
        );
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[012-013]"),
            ("SLURM_JOB_ID", "123456"),
            ("SIGMA_JOB_SECRET", "x"),
        ])
        .expect("environment");
        // The port comes from the job id when MASTER_PORT is not set.
        assert_eq!(e.master_port, 20000 + (123456 % 9500) as u16);
        assert_eq!(
            (
                e.rank,
                e.world,
                e.local_world,
                e.master_addr.as_str(),
                e.host_store
            ),
            (0, 8, 4, "gpu012", true)
        );
        assert!(env(&[("RANK", "0"), ("WORLD_SIZE", "2")])
            .expect_err("refused")
            .to_string()
            .contains("SIGMA_JOB_SECRET"));
        assert!(env(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("SIGMA_JOB_SECRET", "x")
        ])
        .expect_err("refused")
        .to_string()
        .contains("rank 2"));
        assert_eq!(first_slurm_host("a1,b2"), "a1");
        assert_eq!(first_slurm_host("node[7,9-10]"), "node7");
    }

    #[test]
    fn derived_ports_stay_below_the_ephemeral_range_and_master_port_wins() {
        // Every job id, and the ids around a wrap of the span.
        let (lo, hi) = (PORT_BASE, PORT_BASE + PORT_SPAN - 1);
        for id in (0..200_000u64).chain(u64::MAX - 20_000..=u64::MAX) {
            let p = port_for_job(id);
            assert!((lo..=hi).contains(&p), "job {id}: port {p}");
            // Linux's default ephemeral range, Kubernetes' NodePorts, torchrun's default.
            assert!(p < 30000 && p != DEFAULT_PORT, "job {id}: port {p}");
        }
        assert_ne!(port_for_job(41), port_for_job(42));
        let port_of = |pairs: &[(&str, &str)]| {
            let m: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            master_port(&|k| m.get(k).cloned())
        };
        assert_eq!(port_of(&[]).expect("environment"), DEFAULT_PORT);
        assert_eq!(
            port_of(&[("SLURM_JOB_ID", "12")]).expect("environment"),
            20012
        );
        assert_eq!(
            port_of(&[("SLURM_JOB_ID", "12"), ("MASTER_PORT", "4242")]).expect("environment"),
            4242
        );
        for bad in ["0", "65536", "x", ""] {
            let e = port_of(&[("MASTER_PORT", bad)])
                .expect_err("refused")
                .to_string();
            assert!(e.contains("MASTER_PORT") && e.contains("not a port"), "{e}");
        }
        // torchrun-style ranks inside a SLURM job keep the default unless told.
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("SLURM_JOB_ID", "12")])
            .expect("environment");
        assert_eq!(e.master_port, DEFAULT_PORT);
    }
}
