//! `sigma bench decode`: attention time of one decoding step against a KV
//! cache, DiffQKV (sigma's decode path, K and V read per group) against GQA
//! through libtorch's SDPA, at several batch sizes and context lengths.

use anyhow::{bail, Result};
use clap::Subcommand;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Attention time per decoding step: DiffQKV decode path vs GQA (SDPA).
    Decode(DecodeArgs),
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
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median seconds of `f` over `steps` runs (after warm-up).
fn median_time(d: Device, steps: usize, f: &dyn Fn() -> Tensor) -> f64 {
    for _ in 0..5 {
        let _ = f();
    }
    sync(d);
    let mut t: Vec<f64> = (0..steps)
        .map(|_| {
            let s = std::time::Instant::now();
            let _ = f();
            sync(d);
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let BenchCommand::Decode(a) = cmd;
    for (name, n) in [("--n-k", a.n_k), ("--n-v", a.n_v), ("--gqa-kv", a.gqa_kv)] {
        if n <= 0 || a.n_q % n != 0 {
            bail!("{name} {n}: must divide --n-q {}", a.n_q);
        }
    }
    if a.steps == 0 || a.head_dim <= 0 {
        bail!("--steps and --head-dim must be positive");
    }
    let device = crate::eval_cmd::device(&a.device)?;
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let elt = kind.elt_size_in_bytes() as f64;
    let d = a.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    println!(
        "decode attention, one new token per sequence: DiffQKV {}/{}/{} (sigma's decode path) vs GQA {}/{}/{} (SDPA), head dim {d}, {:?} on {}",
        a.n_q, a.n_k, a.n_v, a.n_q, a.gqa_kv, a.gqa_kv, kind,
        match device { Device::Cuda(i) => crate_gpu_name(i), _ => "cpu".into() }
    );
    println!(
        "{:>6} {:>8} {:>12} {:>12} {:>9} {:>12} {:>12}{}",
        "batch",
        "context",
        "DiffQKV ms",
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
            let ours = median_time(device, a.steps, &|| {
                sigma_trainer::generate::decode_attention(&q, &k, &v, None, scale)
            });
            let gqa = median_time(device, a.steps, &|| {
                Tensor::scaled_dot_product_attention::<Tensor>(
                    &q, &gk, &gv, None, 0.0, false, scale, true,
                )
            });
            let bytes_ours = (b * s * d * (a.n_k + a.n_v)) as f64 * elt;
            let bytes_gqa = (b * s * d * 2 * a.gqa_kv) as f64 * elt;
            let (bw_o, bw_g) = (bytes_ours / ours / 1e9, bytes_gqa / gqa / 1e9);
            println!(
                "{b:>6} {s:>8} {:>12.4} {:>12.4} {:>8.1}% {:>12.0} {:>12.0}{}",
                ours * 1e3,
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

fn crate_gpu_name(i: usize) -> String {
    sigma_trainer::metrics::gpu_name(i).unwrap_or_else(|| format!("cuda:{i}"))
}
