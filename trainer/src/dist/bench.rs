//! `sigma dist bench-allreduce`: all-reduce bus bandwidth by message size,
//! through sigma's collective layer and through plain NCCL calls on the same
//! buffers (median of 5 alternating trials per size). Run it as a job:
//! `sigma launch --nproc-per-node N -- dist bench-allreduce`.

use tch::{Device, Kind, Tensor};

use super::collectives::Collectives;
use super::nccl::NcclCollectives;
use super::DistEnv;
use crate::error::{Result, TrainError};

pub struct Row {
    pub bytes: usize,
    pub sigma_busbw: f64,
    pub plain_busbw: f64,
}

/// Bus bandwidth convention of nccl-tests for all-reduce: bytes * 2 (n - 1) / n / time.
fn busbw(bytes: usize, world: usize, seconds: f64) -> f64 {
    bytes as f64 * 2.0 * (world as f64 - 1.0) / world as f64 / seconds
}

/// Trials per message size; each times `iters` calls.
const TRIALS: usize = 5;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench_allreduce(sizes: &[usize], iters: usize) -> Result<Vec<Row>> {
    let env = DistEnv::from_env()?;
    if env.world < 2 {
        return Err(TrainError::input(
            "dist bench-allreduce",
            "needs at least 2 ranks: run it under `sigma launch --nproc-per-node N`",
        ));
    }
    if !tch::Cuda::is_available() {
        return Err(TrainError::input("dist bench-allreduce", "needs CUDA GPUs"));
    }
    let t = std::time::Duration::from_secs(env.timeout_s);
    let (_server, mut store) = super::rendezvous(&env)?;
    let mut c = NcclCollectives::new(&mut store, "bench", env.rank, env.world, env.local_rank, t)?;
    let dev = Device::Cuda(env.local_rank);
    let mut rows = Vec::new();
    for &bytes in sizes {
        let n = (bytes / 2).max(1) as i64;
        let mut x = Tensor::ones([n], (Kind::BFloat16, dev));
        // Alternate the two ways over several trials and keep each one's
        // median, so a hiccup of the machine does not decide a row.
        c.sigma_all_reduce_seconds(&mut x, 5)?;
        c.plain_all_reduce_seconds(&mut x, 5)?;
        let (mut sig, mut plain) = (Vec::new(), Vec::new());
        for _ in 0..TRIALS {
            sig.push(c.sigma_all_reduce_seconds(&mut x, iters)?);
            plain.push(c.plain_all_reduce_seconds(&mut x, iters)?);
        }
        let (sigma_s, plain_s) = (median(&mut sig), median(&mut plain));
        rows.push(Row {
            bytes: n as usize * 2,
            sigma_busbw: busbw(n as usize * 2, env.world, sigma_s),
            plain_busbw: busbw(n as usize * 2, env.world, plain_s),
        });
    }
    c.barrier()?;
    Ok(if env.rank == 0 { rows } else { Vec::new() })
}
