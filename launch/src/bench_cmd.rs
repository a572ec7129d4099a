//! `sigma bench decode`: one decoding step's attention against a KV cache,
//! DiffQKV (sigma's decode kernel on a GPU, and its tensor-operation path)
//! against GQA through libtorch's SDPA, at several batch sizes and context
//! lengths; `--check` compares the kernel with an fp32 reference on many
//! shapes; `--model` times whole-model decoding (bench_model.rs).
//! `sigma bench fused`: the fused training operations (bench_fused.rs);
//! `sigma bench fp8`: the FP8 linear layer (bench_fp8.rs).

use anyhow::{bail, Result};
use clap::Subcommand;
use sigma_trainer::infer::generate::{decode_attention, decode_attention_ops};
use sigma_trainer::kernels::decode;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decoding speed: attention per step (DiffQKV kernel and tensor path vs GQA through SDPA),
    /// the kernel's accuracy (--check) or whole-model tokens/s (--model).
    Decode(DecodeArgs),
    /// The fused bf16 training operations on a GPU (SwiGLU, RoPE, cross-entropy,
    /// RMSNorm and add + RMSNorm kernels, fp32 weight-gradient GEMM): checked
    /// against fp32 and timed against tensor operations.
    Fused(FusedArgs),
    /// The FP8 linear layer (train.precision = "fp8") on a GPU: _scaled_mm against its
    /// emulation and fp32, timed against bf16 (bench_fp8.rs).
    Fp8(FusedArgs),
}

#[derive(clap::Args)]
pub struct FusedArgs {
    /// Timed runs per case (the median is reported), after 5 warm-up runs.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// "auto", "cpu" or "cuda".
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batch: Vec<i64>,
    /// Context lengths (cached tokens; comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4096,16384,32768,65536")]
    pub context: Vec<i64>,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    pub n_q: i64,
    /// DiffQKV key heads.
    #[arg(long, default_value_t = 4)]
    pub n_k: i64,
    /// DiffQKV value heads.
    #[arg(long, default_value_t = 16)]
    pub n_v: i64,
    /// Head dimension (q, k and v).
    #[arg(long, default_value_t = 64)]
    pub head_dim: i64,
    /// Key and value heads of the GQA baseline.
    #[arg(long, default_value_t = 16)]
    pub gqa_kv: i64,
    /// Timed steps per case (the median is reported), after 5 warm-up steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// "auto", "cpu" or "cuda".
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Card peak memory bandwidth in GB/s, for the fraction reached (H100 SXM: 3350).
    #[arg(long)]
    pub peak_gbps: Option<f64>,
    /// Check the decode kernel against an fp32 reference on many shapes (with
    /// padding masks) instead of timing; exits non-zero past the tolerance.
    #[arg(long)]
    pub check: bool,
    /// Time whole-model decoding of this config's model (random weights)
    /// against its GQA counterpart (`--gqa-kv` K and V heads, all else equal).
    #[arg(long, value_name = "CONFIG")]
    pub model: Option<String>,
}

pub(crate) fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median seconds of `f` over `steps` runs (after 5 warm-up runs): on a GPU
/// the device time between CUDA events recorded on libtorch's stream around
/// each run, on the CPU the host clock.
pub(crate) fn median_time(
    d: Device,
    steps: usize,
    f: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    sync(d);
    let timer = match d {
        Device::Cuda(i) => Some(decode::StreamTimer::new(i).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let mut t = Vec::with_capacity(steps);
    for _ in 0..steps {
        match &timer {
            Some(timer) => {
                timer.start().map_err(anyhow::Error::msg)?;
                f()?;
                t.push(timer.stop_ms().map_err(anyhow::Error::msg)? / 1e3);
            }
            None => {
                let s = std::time::Instant::now();
                f()?;
                t.push(s.elapsed().as_secs_f64());
            }
        }
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let a = match cmd {
        BenchCommand::Decode(a) => a,
        BenchCommand::Fused(f) => {
            if f.steps == 0 {
                bail!("--steps must be positive");
            }
            return crate::bench_fused::run(crate::eval_cmd::device(&f.device)?, f.steps);
        }
        BenchCommand::Fp8(f) if f.steps > 0 => {
            return crate::bench_fp8::run(crate::eval_cmd::device(&f.device)?, f.steps)
        }
        BenchCommand::Fp8(_) => bail!("--steps must be positive"),
    };
    // --model takes its heads from the config (and checks --gqa-kv against them).
    let heads = if a.model.is_some() {
        vec![]
    } else {
        vec![("--n-k", a.n_k), ("--n-v", a.n_v), ("--gqa-kv", a.gqa_kv)]
    };
    for (name, n) in heads {
        if n <= 0 || a.n_q % n != 0 {
            bail!("{name} {n}: must divide --n-q {}", a.n_q);
        }
    }
    if a.steps == 0 || a.head_dim <= 0 {
        bail!("--steps and --head-dim must be positive");
    }
    if let Some(&b) = a.batch.iter().chain(&a.context).find(|&&n| n <= 0) {
        bail!("--batch and --context must be positive, got {b}");
    }
    let device = crate::eval_cmd::device(&a.device)?;
    if a.check {
        return check(device);
    }
    if let Some(cfg) = &a.model {
        return crate::bench_model::run(&a, cfg, device);
    }
    attention(&a, device)
}

pub(crate) fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => {
            sigma_trainer::train::metrics::gpu_name(i).unwrap_or_else(|| format!("cuda:{i}"))
        }
        _ => "cpu".into(),
    }
}

/// Where the kernel is used, "(kernel)"; where not, why.
fn kernel_note(q: &Tensor, k: &Tensor, v: &Tensor) -> String {
    match decode::decode_kernel_available(q, k, v) {
        Ok(()) => "the fused decode kernel".into(),
        Err(why) => format!("tensor operations (the kernel does not run: {why})"),
    }
}

fn attention(a: &DecodeArgs, device: Device) -> Result<()> {
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let elt = kind.elt_size_in_bytes() as f64;
    let d = a.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let probe = |n: i64| Tensor::zeros([1, n, 1, d], (kind, device));
    println!(
        "decode attention, one new token per sequence: DiffQKV {}/{}/{} vs GQA {}/{}/{} (SDPA), head dim {d}, {kind:?} on {}",
        a.n_q, a.n_k, a.n_v, a.n_q, a.gqa_kv, a.gqa_kv, device_name(device)
    );
    println!(
        "DiffQKV runs through {}; \"ops\" is its tensor-operation path",
        kernel_note(&probe(a.n_q), &probe(a.n_k), &probe(a.n_v))
    );
    println!(
        "{:>6} {:>8} {:>12} {:>9} {:>9} {:>9} {:>12} {:>12}{}",
        "batch",
        "context",
        "DiffQKV ms",
        "ops ms",
        "GQA ms",
        "saving",
        "DiffQKV GB/s",
        "GQA GB/s",
        if a.peak_gbps.is_some() {
            "  of peak (DiffQKV, GQA)"
        } else {
            ""
        }
    );
    for &b in &a.batch {
        for &s in &a.context {
            let opts = (kind, device);
            let q = Tensor::randn([b, a.n_q, 1, d], opts);
            let alloc = || -> Result<(Tensor, Tensor, Tensor, Tensor)> {
                Ok((
                    Tensor::f_randn([b, a.n_k, s, d], opts)?,
                    Tensor::f_randn([b, a.n_v, s, d], opts)?,
                    Tensor::f_randn([b, a.gqa_kv, s, d], opts)?,
                    Tensor::f_randn([b, a.gqa_kv, s, d], opts)?,
                ))
            };
            let Ok((k, v, gk, gv)) = alloc() else {
                println!("{b:>6} {s:>8}  (does not fit in memory: skipped)");
                continue;
            };
            if device.is_cuda() {
                if let Err(why) = decode::decode_kernel_available(&q, &k, &v) {
                    println!("{b:>6} {s:>8}  (the kernel does not run here: {why}; timing the tensor path)");
                }
            }
            let ours = median_time(device, a.steps, &mut || {
                let _ = decode_attention(&q, &k, &v, None, scale)?;
                Ok(())
            })?;
            let ops = median_time(device, a.steps, &mut || {
                let _ = decode_attention_ops(&q, &k, &v, None, scale);
                Ok(())
            })?;
            let gqa = median_time(device, a.steps, &mut || {
                let _ = Tensor::f_scaled_dot_product_attention::<Tensor>(
                    &q, &gk, &gv, None, 0.0, false, scale, true,
                )?;
                Ok(())
            })?;
            let bytes_ours = (b * s * d * (a.n_k + a.n_v)) as f64 * elt;
            let bytes_gqa = (b * s * d * 2 * a.gqa_kv) as f64 * elt;
            let (bw_o, bw_g) = (bytes_ours / ours / 1e9, bytes_gqa / gqa / 1e9);
            println!(
                "{b:>6} {s:>8} {:>12.4} {:>9.4} {:>9.4} {:>8.1}% {:>12.0} {:>12.0}{}",
                ours * 1e3,
                ops * 1e3,
                gqa * 1e3,
                100.0 * (1.0 - ours / gqa),
                bw_o,
                bw_g,
                a.peak_gbps
                    .map(|p| format!("  {:.0} %, {:.0} %", 100.0 * bw_o / p, 100.0 * bw_g / p))
                    .unwrap_or_default()
            );
        }
    }
    println!(
        "bound: the DiffQKV cache is {:.1} % smaller than GQA's ({} vs {} elements per token per layer)",
        100.0 * (1.0 - (a.n_k + a.n_v) as f64 / (2 * a.gqa_kv) as f64),
        (a.n_k + a.n_v) * d,
        2 * a.gqa_kv * d
    );
    Ok(())
}

/// The largest absolute difference between two tensors, in f64.
fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The kernel against an fp32 reference (the tensor path on the same bf16
/// values upcast) and, for scale, the bf16 tensor path against the same
/// reference: shapes of every kind sigma produces, left-padding masks,
/// contexts that are and are not a multiple of the chunk, K and V read
/// through a larger cache (as decoding does).
fn check(device: Device) -> Result<()> {
    if !device.is_cuda() {
        bail!("--check compares the GPU decode kernel with its reference: it needs --device cuda (or auto on a GPU machine)");
    }
    // bf16 output rounding is at most 2^-9 of a value: 1 % of the largest
    // output is five times that, and far below what a lost row or chunk costs.
    const TOLERANCE: f64 = 1e-2;
    println!(
        "decode kernel vs fp32 reference on {} (bf16 operands; errors relative to the largest |output|, tolerance {TOLERANCE})",
        device_name(device)
    );
    println!(
        "{:<24} {:>5} {:>7} {:>6} {:>10} {:>12} {:>12}",
        "n_q/n_k/n_v d_k/d_v", "batch", "context", "masked", "max |out|", "kernel err", "ops err"
    );
    // (n_q, n_k, n_v, d_k, d_v, batch, len, masked)
    type Case = (i64, i64, i64, i64, i64, i64, i64, bool);
    let cases: &[Case] = &[
        (32, 4, 16, 64, 64, 1, 1, false),
        (32, 4, 16, 64, 64, 2, 100, true),
        (32, 4, 16, 64, 64, 16, 4096, false),
        (32, 4, 16, 64, 64, 3, 5000, true),
        (32, 4, 16, 64, 64, 1, 65536, false),
        (32, 1, 16, 64, 64, 2, 777, true),
        (8, 8, 2, 64, 64, 4, 1500, true),
        (32, 4, 16, 32, 64, 2, 2049, false),
        (32, 4, 16, 16, 64, 2, 333, true),
        (16, 16, 16, 128, 128, 2, 1024, false),
        (32, 16, 16, 64, 64, 8, 8192, false),
        (64, 4, 2, 64, 64, 2, 3000, true),
        (8, 2, 4, 8, 8, 3, 700, true),
        (8, 2, 4, 256, 256, 2, 1100, false),
        (12, 3, 6, 64, 64, 2, 999, true),
    ];
    let mut worst: f64 = 0.0;
    let opts = (Kind::BFloat16, device);
    for &(nq, nk, nv, dk, dv, b, len, masked) in cases {
        let cap = len + 37; // read through a larger cache, as decoding does
        let q = Tensor::randn([b, nq, 1, dk], opts);
        let k = Tensor::randn([b, nk, cap, dk], opts).narrow(2, 0, len);
        let v = Tensor::randn([b, nv, cap, dv], opts).narrow(2, 0, len);
        // Left padding: sequence i has its first (i * len / (b + 1)) slots masked.
        let valid = Tensor::ones([b, cap], (Kind::Bool, device));
        if masked {
            for i in 0..b {
                let pad = i * len / (b + 1);
                let _ = valid.get(i).narrow(0, 0, pad).fill_(0);
            }
        }
        let valid = valid.narrow(1, 0, len);
        let m = masked.then_some(&valid);
        let scale = 1.0 / (dk as f64).sqrt();
        let kernel =
            match decode::decode_attention(&q, &k, &v, m, scale)? {
                Some(o) => o,
                None => bail!(
                "the kernel did not run for n_q {nq}, n_k {nk}, n_v {nv}, d_k {dk}, d_v {dv}: {}",
                decode::decode_kernel_available(&q, &k, &v).err().unwrap_or_default()
            ),
            };
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let reference = decode_attention_ops(&f(&q), &f(&k), &f(&v), m, scale);
        let ops = decode_attention_ops(&q, &k, &v, m, scale);
        let top = reference.abs().max().double_value(&[]);
        let (ek, eo) = (
            max_abs(&kernel, &reference) / top,
            max_abs(&ops, &reference) / top,
        );
        worst = worst.max(if ek.is_nan() { f64::INFINITY } else { ek });
        println!(
            "{:<24} {b:>5} {len:>7} {:>6} {top:>10.3e} {ek:>12.2e} {eo:>12.2e}",
            format!("{nq}/{nk}/{nv} {dk}/{dv}"),
            if masked { "yes" } else { "no" }
        );
    }
    if worst > TOLERANCE {
        bail!(
            "the decode kernel is off by {worst:.3e} of the largest output (tolerance {TOLERANCE})"
        );
    }
    println!("decode kernel check passed: largest relative error {worst:.2e}");
    Ok(())
}
