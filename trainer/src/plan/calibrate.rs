//! `sigma plan calibrate`: measure on this machine's first GPU what the
//! plan's model runs on, and return a calibration with every measured value
//! sourced to this measurement (the command, the date, the commit given):
//! bf16 GEMM throughput for four weight widths, causal attention (SDPA,
//! forward and backward) at head dimensions 64 and 128, the fused AdamW
//! update and the bf16 copy's refresh per parameter, the card's memory.
//! What one process cannot measure (collectives between GPUs and nodes) and
//! what only a training run shows (the engine's overheads, the rate of the
//! elementwise work around the matmuls) are taken from a base calibration,
//! each such value's source saying so.
//!
//! It needs a CUDA GPU and refuses without one. It has not been run yet
//! (docs/plan.md): the sessions that wrote it had no GPU.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::plan::calib::{AttentionRate, Calibration, GemmRate, Param};

/// Tokens of the measured GEMMs and of the measured attention (2 x 4096).
const TOKENS: i64 = 16384;
/// Elements of the optimizer and copy measurements.
const ELEMS: i64 = 64 << 20;

/// What the measurements came from, for every source.
pub struct Origin {
    /// The commit of the binary that measured (`git rev-parse --short HEAD`).
    pub commit: String,
    /// The date, as the user's clock gives it.
    pub date: String,
}

/// Median seconds of `f` over `n` runs after 3 warm-up runs, the device
/// synchronised around each.
fn seconds(n: usize, f: &mut dyn FnMut()) -> f64 {
    let sync = || tch::Cuda::synchronize(0);
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            sync();
            let s = std::time::Instant::now();
            f();
            sync();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Measure, starting from `base` for what is not measured.
pub fn calibrate(base: &Calibration, origin: &Origin) -> Result<Calibration> {
    if !tch::Cuda::is_available() {
        return Err(TrainError::input(
            "sigma plan calibrate",
            "measures GEMM, attention, optimizer and memory rates on a CUDA GPU, and libtorch sees none on this machine: run it on the GPU machine the plan is for",
        ));
    }
    let dev = Device::Cuda(0);
    let src = |what: &str| {
        format!(
            "measured by `sigma plan calibrate` on {} ({}, commit {}): {what}",
            crate::train::metrics::gpu_name(0).unwrap_or_else(|| "cuda:0".into()),
            origin.date,
            origin.commit
        )
    };
    let mut c = base.clone();
    c.gpu = crate::train::metrics::gpu_name(0).unwrap_or_else(|| "cuda:0".into());
    c.made_by = src("GEMM, attention, AdamW, copy, memory; the rest from the base calibration");
    c.compute.gemm = gemm_rates(dev, &src);
    c.compute.attention = [64, 128]
        .iter()
        .map(|&d| attention_rate(dev, d, &src))
        .collect();
    let (adam, refresh) = optimizer_rates(dev);
    c.compute.optimizer_ps_per_param = Param {
        value: adam,
        source: src("fused AdamW over 64 Mi fp32 elements, per element"),
    };
    c.compute.work_copy_ps_per_param = Param {
        value: refresh,
        source: src("fp32 -> bf16 copy of 64 Mi elements, per element"),
    };
    if let Some(mib) = memory_mib() {
        c.memory.capacity_mib = Param {
            value: mib,
            source: src("nvidia-smi's memory.total"),
        };
    }
    for p in [
        &mut c.memory.cuda_context_mib,
        &mut c.memory.fragmentation,
        &mut c.memory.nccl_mib_per_communicator,
        &mut c.compute.elementwise_gbps,
        &mut c.compute.host_ms_per_step,
        &mut c.network.nvlink_gather_gbps,
        &mut c.network.tp_collective_us,
        &mut c.network.nvlink_latency_us,
        &mut c.network.nvlink_p2p_gbps,
        &mut c.network.internode_gbps,
        &mut c.network.internode_latency_us,
        &mut c.network.tp_overlap,
        &mut c.network.dp_overlap,
    ] {
        p.source = format!("not measured by calibrate (base calibration): {}", p.source);
    }
    Ok(c)
}

/// bf16 `x w^T` with `TOKENS` rows for weights of smaller side 1024, 2048,
/// 4096 and 8192 (the last standing for any larger).
fn gemm_rates(dev: Device, src: &dyn Fn(&str) -> String) -> Vec<GemmRate> {
    [
        (1024, 4096, 1024),
        (2048, 4096, 2048),
        (4096, 4096, 4096),
        (8192, 8192, 0),
    ]
    .iter()
    .map(|&(n, k, up_to)| {
        let x = Tensor::randn([TOKENS, k], (Kind::BFloat16, dev));
        let w = Tensor::randn([n, k], (Kind::BFloat16, dev));
        let s = seconds(20, &mut || {
            let _ = x.linear::<Tensor>(&w, None);
        });
        let tflops = 2.0 * (TOKENS * n * k) as f64 / s / 1e12;
        GemmRate {
            up_to,
            tflops,
            source: src(&format!(
                "[{TOKENS} x {k}] x [{k} x {n}] bf16, median of 20"
            )),
        }
    })
    .collect()
}

/// Causal SDPA forward and backward, batch 2 x 4096, 32 query and 16
/// key/value heads of dimension `dim`, FLOPs as `sigma model summary` counts them.
fn attention_rate(dev: Device, dim: i64, src: &dyn Fn(&str) -> String) -> AttentionRate {
    let (b, t) = (2, 4096);
    let mk = |h: i64| Tensor::randn([b, h, t, dim], (Kind::BFloat16, dev)).set_requires_grad(true);
    let (q, k, v) = (mk(32), mk(16), mk(16));
    let scale = 1.0 / (dim as f64).sqrt();
    let s = seconds(10, &mut || {
        let o = crate::kernels::sdpa::attention(&q, &k, &v, None, true, scale, true);
        o.sum(Kind::Float).backward();
    });
    // Per token: 3 x heads x (q.k width + v width) x sequence (causal halved).
    let flops = 3.0 * 32.0 * (2 * dim) as f64 * t as f64 * (b * t) as f64;
    AttentionRate {
        head_dim: dim as usize,
        tflops: flops / s / 1e12,
        source: src(&format!(
            "SDPA causal fwd+bwd, [{b}, 32/16 heads, {t}, {dim}] bf16, median of 10"
        )),
    }
}

/// Picoseconds per element of the fused AdamW update and of the bf16 refresh.
fn optimizer_rates(dev: Device) -> (f64, f64) {
    let mk = || Tensor::randn([ELEMS], (Kind::Float, dev));
    let (p, g, m, v) = (mk(), mk(), mk().abs(), mk().abs());
    let step = Tensor::from(1.0f32).to_device(dev);
    let args = crate::kernels::fused::AdamWArgs {
        lr: 1e-4,
        betas: [0.9, 0.95],
        weight_decay: 0.1,
        eps: 1e-8,
    };
    let adam = seconds(10, &mut || {
        let r = crate::kernels::fused::adamw(
            &[p.shallow_clone()],
            &[g.shallow_clone()],
            &[m.shallow_clone()],
            &[v.shallow_clone()],
            &step,
            args,
        );
        if let Err(e) = r {
            panic!("fused AdamW failed while calibrating: {e}");
        }
    });
    let mut w = Tensor::zeros([ELEMS], (Kind::BFloat16, dev));
    let copy = seconds(10, &mut || {
        w.copy_(&p);
    });
    (adam / ELEMS as f64 * 1e12, copy / ELEMS as f64 * 1e12)
}

/// The card's memory in MiB, as nvidia-smi reports it.
fn memory_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.total",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
