//! `sigma dist bench-allreduce`: all-reduce bus bandwidth by message size,
//! through sigma's collective layer and through plain NCCL calls on the same
//! buffers. Run it as a job: `sigma launch --nproc-per-node N -- dist bench-allreduce`.

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

pub fn bench_allreduce(sizes: &[usize], iters: usize) -> Result<Vec<Row>> {
    let env = DistEnv::from_env()?;
    if env.world < 2 {
        return Err(TrainError::Other("bench-allreduce needs at least 2 ranks: run it under `sigma launch --nproc-per-node N`".into()));
    }
    if !tch::Cuda::is_available() {
        return Err(TrainError::Other("bench-allreduce needs CUDA GPUs".into()));
    }
    let t = std::time::Duration::from_secs(env.timeout_s);
    let (_server, mut store) = super::rendezvous(&env)?;
    let mut c = NcclCollectives::new(&mut store, "bench", env.rank, env.world, env.local_rank, t)?;
    let dev = Device::Cuda(env.local_rank);
    let mut rows = Vec::new();
    for &bytes in sizes {
        let n = (bytes / 2).max(1) as i64;
        let mut x = Tensor::ones([n], (Kind::BFloat16, dev));
        c.sigma_all_reduce_seconds(&mut x, 3)?;
        let sigma_s = c.sigma_all_reduce_seconds(&mut x, iters)?;
        c.plain_all_reduce_seconds(&mut x, 3)?;
        let plain_s = c.plain_all_reduce_seconds(&mut x, iters)?;
        rows.push(Row {
            bytes: n as usize * 2,
            sigma_busbw: busbw(n as usize * 2, env.world, sigma_s),
            plain_busbw: busbw(n as usize * 2, env.world, plain_s),
        });
    }
    c.barrier()?;
    Ok(if env.rank == 0 { rows } else { Vec::new() })
}
