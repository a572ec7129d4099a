//! The run config: typed sections, unknown keys rejected, `--set` overrides
//! merged before validation, one `validate` that explains every bad combination.

use serde::{Deserialize, Serialize};
use sigma_data::DataConfig;

use crate::error::{Result, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KCompression {
    /// K heads have `qk_head_dim` dimensions.
    None,
    /// K is computed (and would be cached) at `k_dim`; a learned projection
    /// shared by the K heads maps it to `qk_head_dim` before RoPE and the dot product.
    Projected,
    /// q and k both live in `k_dim`: the dot product itself is smaller.
    Native,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_init_std() -> f64 {
    0.02
}
fn default_kc() -> KCompression {
    KCompression::None
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub num_layers: usize,
    pub ffn_dim: usize,
    pub num_q_heads: usize,
    pub num_k_heads: usize,
    pub num_v_heads: usize,
    pub qk_head_dim: usize,
    pub v_head_dim: usize,
    /// Width of the augmented-query MLP; 0 turns AugQ off.
    #[serde(default)]
    pub aug_q_dim: usize,
    #[serde(default = "default_kc")]
    pub k_compression: KCompression,
    /// Per-head K dimension when `k_compression` is not "none".
    #[serde(default)]
    pub k_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

impl ModelConfig {
    /// Dimension of the q·k dot product.
    pub fn dot_dim(&self) -> usize {
        match self.k_compression {
            KCompression::Native => self.k_dim.unwrap_or(self.qk_head_dim),
            _ => self.qk_head_dim,
        }
    }
    /// Per-head dimension of K as computed from x (what a KV cache stores).
    pub fn k_cache_dim(&self) -> usize {
        match self.k_compression {
            KCompression::None => self.qk_head_dim,
            _ => self.k_dim.unwrap_or(self.qk_head_dim),
        }
    }

    /// Check the model's sizes and their combinations; each error names the
    /// key and the rule.
    pub fn validate(&self) -> Result<()> {
        self.validate_sizes()?;
        self.validate_heads()?;
        self.validate_k_compression()?;
        self.validate_floats()
    }

    /// Every count positive and within [`MAX_MODEL_DIM`] (or the layer and
    /// vocabulary bounds), and the parameter count representable: nothing
    /// is allocated or counted for a model sigma could never hold.
    fn validate_sizes(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(TrainError::config(format!("model.{field}"), msg));
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("d_model", self.d_model, MAX_MODEL_DIM),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("ffn_dim", self.ffn_dim, MAX_MODEL_DIM),
            ("num_q_heads", self.num_q_heads, MAX_MODEL_DIM),
            ("num_k_heads", self.num_k_heads, MAX_MODEL_DIM),
            ("num_v_heads", self.num_v_heads, MAX_MODEL_DIM),
            ("qk_head_dim", self.qk_head_dim, MAX_MODEL_DIM),
            ("v_head_dim", self.v_head_dim, MAX_MODEL_DIM),
        ] {
            if v == 0 {
                return bad(name, "must be positive".into());
            }
            if v > max {
                return bad(name, format!("{v} is larger than sigma supports ({max})"));
            }
        }
        if self.aug_q_dim > MAX_MODEL_DIM {
            let msg = format!(
                "{} is larger than sigma supports ({MAX_MODEL_DIM})",
                self.aug_q_dim
            );
            return bad("aug_q_dim", msg);
        }
        match self.param_count() {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            n => bad(
                "d_model",
                format!(
                    "the model would have {} parameters, more than sigma supports ({MAX_PARAMS}); check d_model, num_layers, ffn_dim, vocab_size and the head sizes",
                    n.map_or("more than 2^64".to_string(), |n| n.to_string())
                ),
            ),
        }
    }

    /// Parameters of the whole model, in checked arithmetic (None: more than
    /// `u64` holds). The same count `sigma model summary` prints.
    pub fn param_count(&self) -> Option<u64> {
        let u = |x: usize| x as u64;
        let (d, nq, nk, nv) = (
            u(self.d_model),
            u(self.num_q_heads),
            u(self.num_k_heads),
            u(self.num_v_heads),
        );
        let (dd, dk, dv) = (u(self.dot_dim()), u(self.k_cache_dim()), u(self.v_head_dim));
        let (f, a) = (u(self.ffn_dim), u(self.aug_q_dim));
        let mul = |x: u64, y: u64| x.checked_mul(y);
        let q = mul(nq, dd)?;
        let mut layer = mul(q, d)?
            .checked_add(mul(mul(nk, dk)?, d)?)?
            .checked_add(mul(mul(nv, dv)?, d)?)?
            .checked_add(mul(d, mul(nq, dv)?)?)?
            .checked_add(mul(3, mul(f, d)?)?)?
            .checked_add(mul(2, d)?)?
            .checked_add(mul(3, mul(a, q)?)?)?;
        if self.k_compression == KCompression::Projected {
            layer = layer.checked_add(mul(dd, dk)?)?;
        }
        let embed = mul(u(self.vocab_size), d)?;
        let heads = if self.tie_embeddings { 1 } else { 2 };
        mul(layer, u(self.num_layers))?
            .checked_add(mul(heads, embed)?)?
            .checked_add(d)
    }

    /// Query heads in contiguous groups per K and per V head, the K and V
    /// groups nested; RoPE needs an even dimension.
    fn validate_heads(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(TrainError::config(format!("model.{field}"), msg));
        if !self.num_q_heads.is_multiple_of(self.num_k_heads) {
            return bad(
                "num_k_heads",
                format!(
                    "num_q_heads ({}) must be divisible by num_k_heads ({}): each K head serves a contiguous group of query heads",
                    self.num_q_heads, self.num_k_heads
                ),
            );
        }
        if !self.num_q_heads.is_multiple_of(self.num_v_heads) {
            return bad(
                "num_v_heads",
                format!(
                    "num_q_heads ({}) must be divisible by num_v_heads ({}): each V head serves a contiguous group of query heads",
                    self.num_q_heads, self.num_v_heads
                ),
            );
        }
        if !self.num_v_heads.is_multiple_of(self.num_k_heads)
            && !self.num_k_heads.is_multiple_of(self.num_v_heads)
        {
            return bad(
                "num_k_heads",
                format!(
                    "one of num_k_heads ({}) and num_v_heads ({}) must divide the other so K and V groups nest",
                    self.num_k_heads, self.num_v_heads
                ),
            );
        }
        if !self.qk_head_dim.is_multiple_of(2) {
            return bad(
                "qk_head_dim",
                format!("must be even for RoPE, got {}", self.qk_head_dim),
            );
        }
        Ok(())
    }

    /// `k_dim` present exactly when K is compressed, and what each reading needs.
    fn validate_k_compression(&self) -> Result<()> {
        let bad = |msg: String| Err(TrainError::config("model.k_dim", msg));
        match (self.k_compression, self.k_dim) {
            (KCompression::None, Some(d)) if d != self.qk_head_dim => bad(format!("is {d} but k_compression is \"none\"; set k_compression = \"projected\" or \"native\", or drop k_dim")),
            (KCompression::None, _) => Ok(()),
            (_, None) => bad("required when k_compression is \"projected\" or \"native\"".into()),
            (_, Some(0)) => bad("must be positive".into()),
            (KCompression::Projected, Some(d)) if d >= self.qk_head_dim => {
                bad(format!("{d} must be smaller than qk_head_dim ({}) to compress K", self.qk_head_dim))
            }
            (KCompression::Native, Some(d)) if d % 2 != 0 => bad(format!("must be even for RoPE, got {d}")),
            (KCompression::Native, Some(d)) if d > MAX_MODEL_DIM => {
                bad(format!("{d} is larger than sigma supports ({MAX_MODEL_DIM})"))
            }
            _ => Ok(()),
        }
    }

    // `!(x > 0.0)` on purpose: NaN fails it, where `x <= 0.0` would let NaN through.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate_floats(&self) -> Result<()> {
        for (name, v) in [
            ("rope_theta", self.rope_theta),
            ("norm_eps", self.norm_eps),
            ("init_std", self.init_std),
        ] {
            if !(v > 0.0) {
                return Err(TrainError::config(
                    format!("model.{name}"),
                    format!("must be positive, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// The largest width, head count or head dimension sigma accepts.
pub const MAX_MODEL_DIM: usize = 1 << 20;
/// The most layers sigma accepts.
pub const MAX_LAYERS: usize = 1 << 14;
/// Largest `train.micro_batch_size` and `train.grad_accum_steps` (a step's
/// pipeline schedule holds two passes per micro-batch and stage).
pub const MAX_BATCH_COUNT: usize = 1 << 16;
/// The largest vocabulary: token ids are 32-bit in the data pipeline.
pub const MAX_VOCAB: usize = u32::MAX as usize;
/// The most parameters sigma accepts (10^13: past any model that fits the
/// machines it runs on, well inside the counters' range).
pub const MAX_PARAMS: u64 = 10_000_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    Skip,
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 compute on GPU, fp32 on CPU.
    Auto,
    Fp32,
    Bf16,
    /// bf16, with the block linears in FP8 as `[fp8]` says (docs/precision.md).
    Fp8,
}

fn one() -> usize {
    1
}
fn d_log() -> u64 {
    10
}
fn d_eval_steps() -> u64 {
    4
}
fn d_seed() -> u64 {
    1234
}
fn d_nan() -> NanPolicy {
    NanPolicy::Skip
}
fn d_device() -> DeviceChoice {
    DeviceChoice::Auto
}
fn d_prec() -> Precision {
    Precision::Auto
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: u64,
    pub micro_batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Validation every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Validation micro-batches per domain.
    #[serde(default = "d_eval_steps")]
    pub eval_steps: u64,
    #[serde(default = "d_log")]
    pub log_every: u64,
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Linear batch-size ramp: accumulation steps grow from `batch_ramp_start_accum`
    /// to `grad_accum_steps` over this many steps (0: no ramp).
    #[serde(default)]
    pub batch_ramp_steps: u64,
    #[serde(default = "one")]
    pub batch_ramp_start_accum: usize,
    #[serde(default = "d_nan")]
    pub nan_policy: NanPolicy,
    #[serde(default = "d_device")]
    pub device: DeviceChoice,
    #[serde(default = "d_prec")]
    pub precision: Precision,
    /// Intra-op CPU threads (fixed for bit-reproducible CPU runs); default: all cores.
    #[serde(default)]
    pub cpu_threads: Option<usize>,
    /// Output head and loss in chunks of this many tokens (0: the whole
    /// micro-batch at once): the logits of one chunk exist at a time, and
    /// backward recomputes each chunk's logits. One device or pipeline
    /// stages; the vocabulary-parallel head of tp > 1 is not chunked.
    #[serde(default)]
    pub loss_chunk_tokens: usize,
    /// Mixed precision: each matmul's weight gradient is added into the
    /// fp32 gradient buffer inside backward (on GPU by one GEMM with fp32
    /// output) instead of returning in bf16 and being added after. No
    /// effect in fp32.
    #[serde(default = "default_true")]
    pub fused_weight_grad: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Wsd,
    Constant,
}

fn d_wd() -> f64 {
    0.1
}
fn d_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn d_eps_adam() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_sched() -> Schedule {
    Schedule::Cosine
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "d_sched")]
    pub schedule: Schedule,
    /// Final decay length of the WSD schedule (warmup, stable, decay).
    #[serde(default)]
    pub decay_steps: u64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Apply weight decay to RMSNorm weights too (default: no).
    #[serde(default)]
    pub decay_norms: bool,
    /// Apply weight decay to the embedding (and untied output head) too (default: no).
    #[serde(default)]
    pub decay_embeddings: bool,
    #[serde(default = "d_betas")]
    pub betas: [f64; 2],
    #[serde(default = "d_eps_adam")]
    pub eps: f64,
    /// Clip the global gradient norm to this value (0: off).
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    #[serde(default = "one")]
    pub dp: usize,
    /// Context-parallel ranks: each sequence split over a ring of `cp` ranks
    /// (docs/context-parallel.md).
    #[serde(default = "one")]
    pub cp: usize,
    /// Tensor-parallel ranks (Megatron-style, docs/parallelism.md).
    #[serde(default = "one")]
    pub tp: usize,
    /// Sequence parallelism within the tensor-parallel group (default: on when tp > 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_parallel: Option<bool>,
    /// Pipeline stages (docs/parallelism.md).
    #[serde(default = "one")]
    pub pp: usize,
    /// "1f1b" or "interleaved" (several chunks of layers per rank).
    #[serde(default = "d_pp_schedule")]
    pub pp_schedule: PpSchedule,
    /// Chunks of layers per rank with the interleaved schedule (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_virtual_stages: Option<usize>,
    /// Layers of every virtual stage, in order (default: balanced, counting the output head's work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub zero: u8,
    /// Size of a data-parallel gradient bucket in MB (10^6 bytes of fp32 gradient).
    #[serde(default = "d_bucket_mb")]
    pub bucket_mb: f64,
    /// Start each bucket's reduction during backward (false: all after backward).
    #[serde(default = "default_true")]
    pub overlap_grad_reduce: bool,
    /// Overlap tensor-parallel collectives of backward with the weight-gradient
    /// GEMMs of the segment before them (needs `train.fused_weight_grad`).
    #[serde(default = "default_true")]
    pub tp_comm_overlap: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PpSchedule {
    #[serde(rename = "1f1b")]
    OneFOneB,
    #[serde(rename = "interleaved")]
    Interleaved,
}

fn d_pp_schedule() -> PpSchedule {
    PpSchedule::OneFOneB
}

fn d_bucket_mb() -> f64 {
    128.0
}

impl ParallelConfig {
    /// Chunks of layers per pipeline rank.
    pub fn virtual_stages(&self) -> usize {
        match self.pp_schedule {
            PpSchedule::OneFOneB => 1,
            PpSchedule::Interleaved => self.pp_virtual_stages.unwrap_or(2),
        }
    }

    /// Sequence parallelism in effect (on by default when tp > 1).
    pub fn sequence_parallel(&self) -> bool {
        self.tp > 1 && self.sequence_parallel.unwrap_or(true)
    }
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            dp: 1,
            cp: 1,
            tp: 1,
            sequence_parallel: None,
            pp: 1,
            pp_schedule: PpSchedule::OneFOneB,
            pp_virtual_stages: None,
            pp_layers: None,
            zero: 0,
            bucket_mb: d_bucket_mb(),
            overlap_grad_reduce: true,
            tp_comm_overlap: true,
        }
    }
}

fn d_keep() -> usize {
    3
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub every_steps: u64,
    #[serde(default)]
    pub every_minutes: f64,
    #[serde(default = "d_keep")]
    pub keep_last: usize,
    #[serde(default)]
    pub keep_every: u64,
    #[serde(default, rename = "async")]
    pub async_save: bool,
    /// Copy each committed checkpoint to this object-store URL (s3://, gs://, az://, file://).
    #[serde(default)]
    pub upload: Option<String>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: None,
            every_steps: 0,
            every_minutes: 0.0,
            keep_last: d_keep(),
            keep_every: 0,
            async_save: false,
            upload: None,
        }
    }
}

fn d_out() -> String {
    "runs/train".into()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "d_out")]
    pub output_dir: String,
    #[serde(default = "default_true")]
    pub tensorboard: bool,
    /// Peak FLOP/s of one device for MFU; default: from the table of known GPUs.
    #[serde(default)]
    pub peak_flops: Option<f64>,
    /// Write loss.png next to the metrics at the end.
    #[serde(default = "default_true")]
    pub plot: bool,
    /// Record every pipeline action of steps 2-4 (forward, backward, send,
    /// receive, optimizer) as a Chrome/Perfetto trace, `trace-rank<r>.json`.
    #[serde(default)]
    pub trace: bool,
    /// Profile steps 2-4 with libtorch's profiler: time per category
    /// (matmuls, attention, norms, loss, optimizer, communication, host),
    /// printed and written to `profile-rank<r>.json`.
    #[serde(default)]
    pub profile: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            output_dir: d_out(),
            tensorboard: true,
            peak_flops: None,
            plot: true,
            trace: false,
            profile: false,
        }
    }
}

/// What one FP8 scale covers (docs/precision.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fp8Recipe {
    /// One scale per tensor, from its amax.
    Tensorwise,
    /// One scale per row of each GEMM operand (along the contraction).
    Rowwise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fp8Format {
    /// 4 exponent, 3 mantissa bits; largest value 448.
    E4m3,
    /// 5 exponent, 2 mantissa bits; largest value 57344.
    E5m2,
}

/// Where the weight-gradient GEMM of an FP8 linear runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightGrad {
    Fp8,
    /// bf16 operands, accumulated in fp32 into the gradient buffer (as in bf16 runs).
    Bf16,
}

fn d_recipe() -> Fp8Recipe {
    Fp8Recipe::Tensorwise
}
fn d_e4m3() -> Fp8Format {
    Fp8Format::E4m3
}
fn d_wgrad() -> WeightGrad {
    WeightGrad::Fp8
}

/// The largest `fp8.margin`: past it most of e4m3's range goes unused.
pub const MAX_FP8_MARGIN: u32 = 8;

/// `[fp8]`: how `train.precision = "fp8"` runs (docs/precision.md).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fp8Config {
    #[serde(default = "d_recipe")]
    pub recipe: Fp8Recipe,
    /// Scales are `2^margin` below what the amax allows (headroom).
    #[serde(default)]
    pub margin: u32,
    /// Format of the forward operands (activations and weights): e4m3 only.
    #[serde(default = "d_e4m3")]
    pub forward_format: Fp8Format,
    /// Format of the output gradients; default e5m2 for tensorwise, e4m3 for rowwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_format: Option<Fp8Format>,
    #[serde(default = "d_wgrad")]
    pub weight_grad: WeightGrad,
    /// The forward GEMM accumulates in the tensor cores' fast mode
    /// (`_scaled_mm`'s `use_fast_accum`: partial sums kept at lower
    /// precision, as torchao's recipes do for the forward); the gradients'
    /// GEMMs never do. Off by default: on an H100 it gained nothing
    /// measurable on SIGMA-1.5B and its loss after 300 steps was 2.3 %
    /// worse than bf16's (0.4 % better without it; docs/precision.md).
    #[serde(default)]
    pub fast_accum: bool,
    /// The first this many blocks keep bf16 linears.
    #[serde(default = "one")]
    pub bf16_first_layers: usize,
    /// The last this many blocks keep bf16 linears.
    #[serde(default = "one")]
    pub bf16_last_layers: usize,
    /// Quantise and dequantise with the same scales, then multiply in fp32
    /// (no FP8 hardware needed): a test and debug mode, slower than bf16.
    #[serde(default)]
    pub emulate: bool,
}

impl Default for Fp8Config {
    fn default() -> Self {
        Fp8Config {
            recipe: d_recipe(),
            margin: 0,
            forward_format: d_e4m3(),
            grad_format: None,
            weight_grad: d_wgrad(),
            fast_accum: false,
            bf16_first_layers: 1,
            bf16_last_layers: 1,
            emulate: false,
        }
    }
}

impl Fp8Config {
    /// The gradient format: as given, else the recipe's (e5m2 for
    /// tensorwise, e4m3 for rowwise).
    pub fn grad_format(&self) -> Fp8Format {
        self.grad_format.unwrap_or(match self.recipe {
            Fp8Recipe::Tensorwise => Fp8Format::E5m2,
            Fp8Recipe::Rowwise => Fp8Format::E4m3,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// With `train.precision = "fp8"` (filled with its defaults then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8: Option<Fp8Config>,
}

/// Apply `section.key=value` (value parsed as TOML, else taken as a string).
pub fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<()> {
    let (path, raw) = spec
        .split_once('=')
        .ok_or_else(|| TrainError::config("--set", format!("`{spec}` is not section.key=value")))?;
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = path.trim().split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(TrainError::config(
            "--set",
            format!("`{path}` must be section.key"),
        ));
    }
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| {
                TrainError::config("--set", format!("`{p}` in `{path}` is not a section"))
            })?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// The text of config file `path`.
pub fn read_config(path: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| TrainError::config(path, format!("cannot read the config file: {e}")))
}

/// Where a value at `path` came from: the `--set` that wrote it (or a table
/// above it), else the config file.
fn origin(path: &str, file: &str, overrides: &[String]) -> String {
    let hit = overrides.iter().rev().find(|o| {
        let key = o.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
        !key.is_empty()
            && (path == key
                || path.starts_with(&format!("{key}."))
                || path.starts_with(&format!("{key}[")))
    });
    match hit {
        Some(o) => format!("from --set {o}"),
        None => format!("in {file}"),
    }
}

/// Every float in the document must be finite (TOML allows `inf` and `nan`).
fn check_finite(v: &toml::Value, path: &str, file: &str, overrides: &[String]) -> Result<()> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Err(TrainError::config(
            path,
            format!(
                "{f} is not a finite number ({})",
                origin(path, file, overrides)
            ),
        )),
        toml::Value::Table(t) => {
            for (k, x) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                check_finite(x, &p, file, overrides)?;
            }
            Ok(())
        }
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_finite(x, &format!("{path}[{i}]"), file, overrides)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The TOML document of `text` with the overrides applied, every float
/// checked for finiteness.
pub fn parse_doc(file: &str, text: &str, overrides: &[String]) -> Result<toml::Value> {
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| TrainError::config(file, e.to_string()))?;
    for o in overrides {
        apply_override(&mut doc, o)?;
    }
    let doc = toml::Value::Table(doc);
    check_finite(&doc, "", file, overrides)?;
    Ok(doc)
}

/// Deserialize `v` (found at `at`, "" for the whole document); an error names
/// the key and where its value came from (the file or a `--set`).
pub fn typed<T: serde::de::DeserializeOwned>(
    v: toml::Value,
    at: &str,
    file: &str,
    overrides: &[String],
) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (at.is_empty(), inner.as_str()) {
            (true, p) => p.to_string(),
            (false, "" | ".") => at.to_string(),
            (false, p) => format!("{at}.{p}"),
        };
        let msg = e.inner().message().to_string();
        // An unknown key is reported at its table: name the key itself, so
        // that a `--set` that wrote it is found.
        let path = match unknown_field(&msg) {
            Some(k) if path.is_empty() || path == "." => k.to_string(),
            // serde_path_to_error may already end the path with the key.
            Some(k) if path == k || path.ends_with(&format!(".{k}")) => path,
            Some(k) => format!("{path}.{k}"),
            None => path,
        };
        if path.is_empty() || path == "." {
            TrainError::config(file, msg)
        } else {
            let from = origin(&path, file, overrides);
            TrainError::config(path, format!("{msg} ({from})"))
        }
    })
}

/// The key of serde's "unknown field `KEY`, expected ..." message.
fn unknown_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("unknown field `")?.split('`').next()
}

impl RunConfig {
    pub fn parse(file: &str, text: &str, overrides: &[String]) -> Result<RunConfig> {
        let doc = parse_doc(file, text, overrides)?;
        let mut cfg: RunConfig = typed(doc, "", file, overrides)?;
        cfg.validate()?;
        if cfg.train.precision == Precision::Fp8 {
            // Record what runs: the section and its gradient format explicit.
            let f = cfg.fp8.get_or_insert_with(Fp8Config::default);
            f.grad_format = Some(f.grad_format());
        }
        Ok(cfg)
    }

    pub fn load(path: &str, overrides: &[String]) -> Result<RunConfig> {
        RunConfig::parse(path, &read_config(path)?, overrides)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Check every section's fields and their combinations (the layout's
    /// against the model: `parallel::Layout::check`); each error names the
    /// key and the rule.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.data.validate()?;
        self.validate_train()?;
        self.validate_optim()?;
        self.validate_parallel()?;
        self.validate_checkpoint()?;
        self.validate_metrics()?;
        self.validate_fp8()
    }

    /// The FP8 settings of this run: `[fp8]` (or its defaults) when
    /// `train.precision = "fp8"`, else None.
    pub fn fp8(&self) -> Option<Fp8Config> {
        (self.train.precision == Precision::Fp8).then(|| self.fp8.clone().unwrap_or_default())
    }

    /// `[fp8]`'s fields and, in an FP8 run, that some block stays in FP8.
    /// What the device and the shapes allow is checked when the model is
    /// built (`model::fp8`).
    fn validate_fp8(&self) -> Result<()> {
        let Some(f) = &self.fp8 else {
            return Ok(());
        };
        if f.forward_format != Fp8Format::E4m3 {
            return Err(TrainError::config(
                "fp8.forward_format",
                "only \"e4m3\": the forward operands need its 3 mantissa bits (e5m2 has 2; it is for gradients, fp8.grad_format)",
            ));
        }
        if f.margin > MAX_FP8_MARGIN {
            return Err(TrainError::config(
                "fp8.margin",
                format!(
                    "{} is more than {MAX_FP8_MARGIN}: each unit halves the scale, leaving that much of the format's range unused",
                    f.margin
                ),
            ));
        }
        let (first, last, n) = (
            f.bf16_first_layers,
            f.bf16_last_layers,
            self.model.num_layers,
        );
        if self.train.precision == Precision::Fp8 && first.saturating_add(last) >= n {
            return Err(TrainError::config(
                "fp8.bf16_first_layers",
                format!(
                    "bf16_first_layers ({first}) + bf16_last_layers ({last}) cover all {n} layers (model.num_layers): no block would run in FP8; lower them, or set train.precision = \"bf16\""
                ),
            ));
        }
        Ok(())
    }

    fn validate_train(&self) -> Result<()> {
        let t = &self.train;
        if t.steps == 0 || t.micro_batch_size == 0 || t.grad_accum_steps == 0 {
            return Err(TrainError::config(
                "train",
                "steps, micro_batch_size and grad_accum_steps must be positive",
            ));
        }
        for (key, n) in [
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.grad_accum_steps", t.grad_accum_steps),
        ] {
            if n > MAX_BATCH_COUNT {
                return Err(TrainError::config(
                    key,
                    format!("{n} is larger than sigma supports ({MAX_BATCH_COUNT})"),
                ));
            }
        }
        if t.batch_ramp_steps > 0
            && (t.batch_ramp_start_accum == 0 || t.batch_ramp_start_accum > t.grad_accum_steps)
        {
            return Err(TrainError::config(
                "train.batch_ramp_start_accum",
                format!(
                    "must be in 1..={} (train.grad_accum_steps)",
                    t.grad_accum_steps
                ),
            ));
        }
        if t.cpu_threads == Some(0) {
            return Err(TrainError::config(
                "train.cpu_threads",
                "must be at least 1 (or left out: all cores)",
            ));
        }
        if t.eval_steps == 0 && t.eval_every > 0 {
            return Err(TrainError::config(
                "train.eval_steps",
                format!(
                    "is 0, so the validation every {} steps (train.eval_every) would score nothing; set eval_steps >= 1 or eval_every = 0",
                    t.eval_every
                ),
            ));
        }
        Ok(())
    }

    // Negated comparisons on purpose, as in `ModelConfig::validate`: NaN fails them.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate_optim(&self) -> Result<()> {
        let o = &self.optim;
        if !(o.lr > 0.0) || o.min_lr < 0.0 || o.min_lr > o.lr {
            return Err(TrainError::config(
                "optim.lr",
                format!("need 0 <= min_lr ({}) <= lr ({}), lr > 0", o.min_lr, o.lr),
            ));
        }
        for (field, v, what) in [
            ("optim.weight_decay", o.weight_decay, ">= 0"),
            (
                "optim.grad_clip",
                o.grad_clip,
                ">= 0 (0 turns clipping off)",
            ),
        ] {
            if !(v >= 0.0) {
                return Err(TrainError::config(
                    field,
                    format!("must be {what}, got {v}"),
                ));
            }
        }
        if !(o.eps > 0.0) {
            return Err(TrainError::config(
                "optim.eps",
                format!("must be positive, got {}", o.eps),
            ));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(TrainError::config(
                "optim.betas",
                format!("each beta must be in [0, 1), got {:?}", o.betas),
            ));
        }
        if o.schedule == Schedule::Wsd && o.decay_steps == 0 {
            return Err(TrainError::config(
                "optim.decay_steps",
                "required (> 0) for schedule = \"wsd\"",
            ));
        }
        Ok(())
    }

    // Negated comparisons on purpose, as in `ModelConfig::validate`: NaN fails them.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate_parallel(&self) -> Result<()> {
        let p = &self.parallel;
        for (field, v) in [
            ("parallel.dp", p.dp),
            ("parallel.cp", p.cp),
            ("parallel.tp", p.tp),
            ("parallel.pp", p.pp),
        ] {
            if v == 0 {
                return Err(TrainError::config(field, "must be positive"));
            }
        }
        match (p.pp_schedule, p.pp_virtual_stages) {
            (PpSchedule::OneFOneB, Some(v)) if v != 1 => {
                return Err(TrainError::config(
                    "parallel.pp_virtual_stages",
                    format!(
                        "{v} needs pp_schedule = \"interleaved\" (1f1b runs one chunk per rank)"
                    ),
                ))
            }
            (PpSchedule::Interleaved, Some(v)) if v < 2 => {
                return Err(TrainError::config(
                    "parallel.pp_virtual_stages",
                    format!("{v}: the interleaved schedule needs at least 2 chunks per rank"),
                ))
            }
            _ => {}
        }
        if p.sequence_parallel == Some(true) && p.tp == 1 {
            return Err(TrainError::config(
                "parallel.sequence_parallel",
                "needs tensor parallelism (parallel.tp > 1)",
            ));
        }
        if !(p.bucket_mb > 0.0) {
            return Err(TrainError::config(
                "parallel.bucket_mb",
                format!("must be positive, got {}", p.bucket_mb),
            ));
        }
        if p.zero > 1 {
            return Err(TrainError::config(
                "parallel.zero",
                format!(
                    "{} is not supported: 0 (off) or 1 (sharded optimizer state)",
                    p.zero
                ),
            ));
        }
        Ok(())
    }

    // Negated comparison on purpose, as in `ModelConfig::validate`: NaN fails it.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate_checkpoint(&self) -> Result<()> {
        let ck = &self.checkpoint;
        if ck.keep_last == 0 {
            return Err(TrainError::config(
                "checkpoint.keep_last",
                "must be at least 1 (the newest checkpoint is always kept)",
            ));
        }
        if ck.dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(TrainError::config(
                "checkpoint.dir",
                "is empty; name a directory, or leave it out for <metrics.output_dir>/checkpoints",
            ));
        }
        if ck.upload.as_deref().is_some_and(|u| u.trim().is_empty()) {
            return Err(TrainError::config(
                "checkpoint.upload",
                "is empty; give an object-store URL (s3://, gs://, az://, file://) or leave it out",
            ));
        }
        if !(ck.every_minutes >= 0.0) {
            return Err(TrainError::config(
                "checkpoint.every_minutes",
                format!("must be >= 0, got {}", ck.every_minutes),
            ));
        }
        Ok(())
    }

    // Negated comparison on purpose, as in `ModelConfig::validate`: NaN fails it.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate_metrics(&self) -> Result<()> {
        if self.metrics.output_dir.trim().is_empty() {
            return Err(TrainError::config(
                "metrics.output_dir",
                "is empty; name the run's directory (e.g. runs/NAME): it receives config.toml and metrics.jsonl",
            ));
        }
        if let Some(p) = self.metrics.peak_flops {
            if !(p > 0.0) {
                return Err(TrainError::config(
                    "metrics.peak_flops",
                    format!("must be positive (FLOP/s of one device), got {p}"),
                ));
            }
        }
        Ok(())
    }

    /// Checkpoints are scheduled (every N steps or every M minutes).
    pub fn checkpointing(&self) -> bool {
        self.checkpoint.every_steps > 0 || self.checkpoint.every_minutes > 0.0
    }

    /// Accumulation steps at `step` (0-based), following the ramp.
    pub fn accum_steps_at(&self, step: u64) -> usize {
        let t = &self.train;
        if t.batch_ramp_steps == 0 || step >= t.batch_ramp_steps {
            return t.grad_accum_steps;
        }
        let (a, b) = (t.batch_ramp_start_accum as f64, t.grad_accum_steps as f64);
        (a + (b - a) * step as f64 / t.batch_ramp_steps as f64).floor() as usize
    }
}

/// Visit every leaf of a JSON object tree with its path (keys joined by `sep`).
pub fn flatten_json(
    prefix: &str,
    sep: &str,
    v: &serde_json::Value,
    leaf: &mut dyn FnMut(&str, &serde_json::Value),
) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}{sep}{k}")
                };
                flatten_json(&key, sep, x, leaf);
            }
        }
        x => leaf(prefix, x),
    }
}
