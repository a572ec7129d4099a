//! The arguments of `sigma bench decode`, `sigma bench fused` and `sigma bench fp8`, and the
//! checks on them that need no device.

use anyhow::{bail, Result};

use crate::device::DeviceArg;

/// The most timed steps a bench takes per case (it keeps each step's time
/// for the median).
pub const MAX_STEPS: usize = 1_000_000;

/// The most heads of each kind, and the widest head, `bench decode` takes.
pub const MAX_HEADS: i64 = 1024;

/// `--steps`: 1 to [`MAX_STEPS`].
fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 || steps > MAX_STEPS {
        bail!("--steps {steps}: must be 1 to {MAX_STEPS}");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct FusedArgs {
    /// Timed runs per case (the median is reported), after 5 warm-up runs.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Where to run (auto: a GPU when one is usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

impl FusedArgs {
    pub fn validate(&self) -> Result<()> {
        check_steps(self.steps)
    }
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
    /// Where to run (auto: a GPU when one is usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Card peak memory bandwidth in GB/s, for the fraction reached (H100 SXM: 3350);
    /// with --model, instead of the table by GPU name or a measured copy.
    #[arg(long)]
    pub peak_gbps: Option<f64>,
    /// Check the decode kernel against an fp32 reference on many shapes (with
    /// padding masks), by its tuned plan and by every candidate plan (one split,
    /// combine folded, combine kernel), instead of timing; exits non-zero past the tolerance.
    #[arg(long)]
    pub check: bool,
    /// Time whole-model decoding of this config's model (random weights)
    /// against its GQA counterpart (`--gqa-kv` K and V heads, all else equal):
    /// tokens/s, ms per step and the share of the memory bound (weights + cache
    /// bytes read per step / bandwidth) at each --batch and --context.
    #[arg(long, value_name = "CONFIG")]
    pub model: Option<String>,
    /// With --model on a GPU: after timing each case, profile 5 of its
    /// graph steps with libtorch's profiler and print where the device
    /// time goes (kernel categories, the top kernels with their counts, and
    /// what each kernel adds to the step's chain: its end after the end of
    /// the kernel before it, by that pair of kernels).
    #[arg(long, requires = "model")]
    pub profile: bool,
    /// Attention timing on a GPU: each call launched from the host between
    /// CUDA events (the host's launch work counts, as in an eager decoding
    /// step) instead of 16 calls recorded in a CUDA graph and replayed.
    #[arg(long, conflicts_with_all = ["model", "check"])]
    pub eager: bool,
}

impl DecodeArgs {
    /// Head counts, steps, head dimension, batch sizes, context lengths and
    /// the peak bandwidth.
    pub fn validate(&self) -> Result<()> {
        // --model takes its heads from the config (and checks --gqa-kv against them).
        let heads = if self.model.is_some() {
            vec![]
        } else {
            vec![
                ("--n-k", self.n_k),
                ("--n-v", self.n_v),
                ("--gqa-kv", self.gqa_kv),
            ]
        };
        if self.model.is_none() && !(1..=MAX_HEADS).contains(&self.n_q) {
            bail!("--n-q {}: must be 1 to {MAX_HEADS}", self.n_q);
        }
        if let Some(p) = self.peak_gbps.filter(|p| !(p.is_finite() && *p > 0.0)) {
            bail!("--peak-gbps {p}: must be a positive number of GB/s");
        }
        for (name, n) in heads {
            if n <= 0 || self.n_q % n != 0 {
                bail!("{name} {n}: must divide --n-q {}", self.n_q);
            }
        }
        check_steps(self.steps)?;
        if !(1..=MAX_HEADS).contains(&self.head_dim) {
            bail!("--head-dim {}: must be 1 to {MAX_HEADS}", self.head_dim);
        }
        if let Some(&b) = self.batch.iter().chain(&self.context).find(|&&n| n <= 0) {
            bail!("--batch and --context must be positive, got {b}");
        }
        Ok(())
    }
}
