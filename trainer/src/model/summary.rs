//! `sigma model summary`: parameters by component, training FLOPs per token
//! and KV-cache bytes per token.
//!
//! FLOPs convention (Megatron's): a matmul of an m x k by k x n costs 2mkn;
//! training is forward + backward = 3x forward. Per token:
//! `6 * N_matmul + 3 * L * n_q * (dot_dim + v_head_dim) * T`, where `N_matmul`
//! counts every weight used in a matmul (the output projection counts even
//! when tied to the embedding; the embedding lookup does not) and the
//! attention term is `6 * L * n_q * (dot_dim + v_head_dim) * T` halved for
//! causal masking (a query sees on average T/2 keys). DiffQKV enters through
//! the K/V projection sizes; AugQ through its three matmuls (it adds no
//! attention or cache cost).

use std::fmt;

use crate::config::ModelConfig;
use crate::model::key::declare;

pub struct Summary {
    pub components: Vec<(&'static str, i64)>,
    pub params: i64,
    pub matmul_params: i64,
    pub flops_per_token: f64,
    pub attention_flops_per_token: f64,
    pub kv_cache_bytes_per_token: i64,
    pub seq_len: usize,
}

pub fn summarize(c: &ModelConfig, seq_len: usize) -> Summary {
    let mut components: Vec<(&'static str, i64)> = Vec::new();
    let mut matmul = 0;
    for (key, decl) in declare(c) {
        let (comp, n) = (key.component(), decl.shape.iter().product::<i64>());
        match components.iter_mut().find(|(k, _)| *k == comp) {
            Some(e) => e.1 += n,
            None => components.push((comp, n)),
        }
        if key.is_matmul(&decl) {
            matmul += n;
        }
    }
    let head = (c.vocab_size * c.d_model) as i64;
    if c.tie_embeddings {
        matmul += head;
    }
    let params = components.iter().map(|c| c.1).sum();
    let attn = 3.0
        * c.num_layers as f64
        * c.num_q_heads as f64
        * (c.dot_dim() + c.v_head_dim) as f64
        * seq_len as f64;
    Summary {
        components,
        params,
        matmul_params: matmul,
        flops_per_token: 6.0 * matmul as f64 + attn,
        attention_flops_per_token: attn,
        kv_cache_bytes_per_token: (c.num_layers
            * (c.num_k_heads * c.k_cache_dim() + c.num_v_heads * c.v_head_dim)
            * 2) as i64,
        seq_len,
    }
}

/// A count in K / M / B / T.
pub fn h(n: f64) -> String {
    match n {
        n if n >= 1e12 => format!("{:.2} T", n / 1e12),
        n if n >= 1e9 => format!("{:.3} B", n / 1e9),
        n if n >= 1e6 => format!("{:.2} M", n / 1e6),
        n if n >= 1e3 => format!("{:.1} K", n / 1e3),
        n => format!("{n}"),
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "parameters by component:")?;
        for (k, n) in &self.components {
            writeln!(
                f,
                "  {k:<32} {:>12} ({:>5.1} %)",
                h(*n as f64),
                100.0 * *n as f64 / self.params as f64
            )?;
        }
        writeln!(
            f,
            "  {:<32} {:>12} ({})",
            "total",
            h(self.params as f64),
            self.params
        )?;
        writeln!(
            f,
            "matmul parameters (incl. output head): {}",
            h(self.matmul_params as f64)
        )?;
        writeln!(
            f,
            "training FLOPs per token at seq_len {}: {}FLOP (attention {}FLOP); Megatron convention, causal attention halved",
            self.seq_len,
            h(self.flops_per_token),
            h(self.attention_flops_per_token)
        )?;
        writeln!(
            f,
            "KV cache per token (bf16, all layers): {} bytes",
            self.kv_cache_bytes_per_token
        )
    }
}

/// Memory a training run needs by formula (bytes), for out-of-memory hints.
/// Weights, gradient and AdamW moments are exact; activations are an estimate
/// of what backward keeps per token and layer (matmul inputs and outputs in
/// the compute dtype, norm and residual tensors in fp32) and the output
/// head's logits with their fp32 log-softmax. Attention is assumed to run in
/// a fused kernel (no T x T scores kept).
#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    /// fp32 weights, gradient, AdamW moments, the bf16 working copy and the
    /// FP8 copies (`fp8_copies` of it).
    pub state: f64,
    /// The FP8 forms of the weights that multiply in FP8 (each weight and
    /// its transpose, a byte an element; `train.precision = "fp8"`).
    pub fp8_copies: f64,
    pub activations: f64,
    pub logits: f64,
    /// What the output head in chunks of [`SUGGESTED_LOSS_CHUNK_TOKENS`]
    /// would save, where this rank computes the whole head at once on one
    /// device's worth of logits (0 otherwise).
    pub head_chunk_saving: f64,
}

/// The `train.loss_chunk_tokens` an out-of-memory error suggests: SIGMA-1.5B
/// at micro-batch 4 fits an 80 GB H100 with it (docs/benchmarks.md).
pub const SUGGESTED_LOSS_CHUNK_TOKENS: usize = 4096;

pub struct MemoryInputs {
    pub seq_len: usize,
    pub micro_batch_size: usize,
    pub activation_checkpointing: bool,
    /// bf16 matmuls (2-byte activations) or fp32.
    pub mixed: bool,
    /// ZeRO-1 shards of the AdamW moments (1: none).
    pub optimizer_shards: usize,
    /// Parameters this rank holds (its tensor- and pipeline-parallel share).
    pub params: i64,
    /// Tensor-parallel ranks sharing each layer's activations.
    pub tp: usize,
    /// Layers this rank runs.
    pub layers: usize,
    /// Micro-batches whose activations this rank keeps at once (pipeline warm-up).
    pub in_flight: usize,
    /// This rank computes the output head and the loss.
    pub head: bool,
    /// `train.loss_chunk_tokens` (0: the head's logits all at once).
    pub loss_chunk_tokens: usize,
    /// Parameters of this rank that multiply in FP8 (0 unless
    /// `train.precision = "fp8"`): each keeps an FP8 copy and its transpose.
    pub fp8_params: i64,
}

pub fn memory_estimate(c: &ModelConfig, m: &MemoryInputs) -> MemoryEstimate {
    let n = m.params as f64;
    // fp32 weights and gradient, AdamW's two moments, and in mixed precision
    // the bf16 working copy of the weights.
    let work = if m.mixed { 2.0 } else { 0.0 };
    let fp8_copies = 2.0 * m.fp8_params as f64;
    let state = n * (4.0 + 4.0 + work + 8.0 / m.optimizer_shards.max(1) as f64) + fp8_copies;
    let tokens = (m.micro_batch_size * m.seq_len) as f64;
    let (ec, ef) = (if m.mixed { 2.0 } else { 4.0 }, 4.0);
    let d = c.d_model as f64;
    let q = (c.num_q_heads * c.dot_dim()) as f64;
    let kv = (c.num_k_heads.max(c.num_v_heads) * (c.dot_dim() + c.v_head_dim)) as f64;
    let o = (c.num_q_heads * c.v_head_dim) as f64;
    let per_layer_token = ef * 6.0 * d
        + ec * (4.0 * d
            + 3.0 * q
            + 4.0 * c.aug_q_dim as f64
            + 2.0 * kv
            + 2.0 * o
            + 4.0 * c.ffn_dim as f64);
    let (layers, tp) = (m.layers as f64, m.tp.max(1) as f64);
    let kept = m.in_flight.max(1) as f64;
    let activations = if m.activation_checkpointing {
        tokens * (kept * layers * ef * d + per_layer_token) / tp
    } else {
        tokens * kept * layers * per_layer_token / tp
    };
    let head_tokens = match m.loss_chunk_tokens {
        0 => tokens,
        n => tokens.min(n as f64),
    };
    let per_token = c.vocab_size as f64 / tp * (ec + 3.0 * 4.0);
    let logits = if m.head { head_tokens * per_token } else { 0.0 };
    // The chunked head exists on one device's logits only (config refuses it under tp).
    let chunked = tokens.min(SUGGESTED_LOSS_CHUNK_TOKENS as f64) * per_token;
    let head_chunk_saving = if m.head && m.tp <= 1 && m.loss_chunk_tokens == 0 {
        (logits - chunked).max(0.0)
    } else {
        0.0
    };
    MemoryEstimate {
        state,
        fp8_copies,
        activations,
        logits,
        head_chunk_saving,
    }
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.state + self.activations + self.logits
    }

    /// The estimate and what to change, for an out-of-memory error.
    pub fn advice(&self) -> String {
        let what = if self.state > self.activations + self.logits {
            "Most of it is the model's own state: split the model (parallel.tp, parallel.pp), \
             shard the optimizer (parallel.zero = 1 over more data-parallel ranks) or train a smaller model"
        } else {
            "Most of it is activations: lower train.micro_batch_size (raise train.grad_accum_steps \
             to keep the batch), set train.activation_checkpointing = true, or shorten data.seq_len"
        };
        let g = |x: f64| format!("{:.1} GB", x / 1e9);
        let head = if self.head_chunk_saving > 0.05 * self.total() {
            format!(
                ". The output head holds its logits for the whole micro-batch at once: \
                 train.loss_chunk_tokens = {SUGGESTED_LOSS_CHUNK_TOKENS} computes them in chunks \
                 and saves about {}",
                g(self.head_chunk_saving)
            )
        } else {
            String::new()
        };
        format!("{self}. {what}{head}")
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |x: f64| format!("{:.2} GB", x / 1e9);
        let fp8 = if self.fp8_copies > 0.0 {
            format!(", of which FP8 weight copies {}", g(self.fp8_copies))
        } else {
            String::new()
        };
        write!(
            f,
            "By formula this rank needs about {}: weights, gradient and AdamW moments (and the bf16 working copy) {}{fp8}, activations {}, output logits {}",
            g(self.total()),
            g(self.state),
            g(self.activations),
            g(self.logits)
        )
    }
}

/// Bytes of memory this machine has available for new allocations (Linux's
/// `MemAvailable`), if known.
pub fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuse to build what needs `need` bytes of host memory (`what`, for the
/// message) on a machine with less available: a clear error before the
/// allocation instead of the kernel's out-of-memory kill.
pub fn check_host_memory(need: f64, what: &str) -> crate::error::Result<()> {
    match host_memory_available() {
        Some(have) if need > have as f64 => Err(crate::error::TrainError::config(
            "model",
            format!(
                "{what} needs about {:.1} GB of host memory; this machine has {:.1} GB available: choose a smaller model (model.*) or a machine with more memory",
                need / 1e9,
                have as f64 / 1e9
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KCompression;

    /// SIGMA-1.5B's shape (configs/sigma-1.5b.toml).
    fn sigma_1_5b() -> ModelConfig {
        ModelConfig {
            vocab_size: 128_256,
            d_model: 2048,
            num_layers: 26,
            ffn_dim: 6144,
            num_q_heads: 32,
            num_k_heads: 4,
            num_v_heads: 16,
            qk_head_dim: 64,
            v_head_dim: 64,
            aug_q_dim: 3072,
            k_compression: KCompression::None,
            k_dim: None,
            rope_theta: 50_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            init_std: 0.02,
        }
    }

    fn inputs(
        micro_batch_size: usize,
        tp: usize,
        head: bool,
        loss_chunk_tokens: usize,
    ) -> MemoryInputs {
        MemoryInputs {
            seq_len: 4096,
            micro_batch_size,
            activation_checkpointing: false,
            mixed: true,
            optimizer_shards: 1,
            params: 2_020_000_000 / tp as i64,
            tp,
            layers: 26,
            in_flight: 1,
            head,
            loss_chunk_tokens,
            fp8_params: 0,
        }
    }

    /// SIGMA-1.5B's parameters and training FLOPs per token, against the
    /// arithmetic written out here (every MFU figure divides by them).
    #[test]
    fn sigma_1_5b_parameters_and_flops_match_the_arithmetic() {
        let c = sigma_1_5b();
        let d = 2048i64;
        // Per block: q_proj (32 x 64 rows), k_proj (4 x 64), v_proj (16 x 64),
        // o_proj, SwiGLU (3 x 6144), AugQ (3 x 3072 by the 2048-wide q0), 2 norms.
        let matmul_per_layer =
            32 * 64 * d + 4 * 64 * d + 16 * 64 * d + d * 32 * 64 + 3 * 6144 * d + 3 * 3072 * 2048;
        assert_eq!(matmul_per_layer, 67_633_152);
        let per_layer = matmul_per_layer + 2 * d;
        let embedding = 128_256 * d;
        let params = 26 * per_layer + embedding + d;
        assert_eq!(params, 2_021_238_784);
        let s = summarize(&c, 4096);
        assert_eq!(s.params, params);
        assert_eq!(c.param_count(), Some(params as u64));
        // The tied head counts as a matmul; the embedding lookup does not.
        assert_eq!(s.matmul_params, 26 * matmul_per_layer + embedding);
        // 6 x matmul parameters + causal attention: 3 x 26 layers x 32 heads x (64 + 64) x 4096.
        let attention = 3.0 * 26.0 * 32.0 * 128.0 * 4096.0;
        assert_eq!(s.attention_flops_per_token, attention);
        let want = 6.0 * 2_021_130_240.0 + attention;
        assert_eq!(s.flops_per_token, want);
        assert!((want - 13.4354e9).abs() < 1e5, "{want}");
    }

    /// The checked count of config validation is the count of the declared
    /// weights, for every shape of the model (AugQ, K compression, untied).
    #[test]
    fn the_checked_parameter_count_equals_the_declared_weights() {
        let base = sigma_1_5b();
        let variants = [
            base.clone(),
            ModelConfig {
                aug_q_dim: 0,
                tie_embeddings: false,
                ..base.clone()
            },
            ModelConfig {
                k_compression: KCompression::Projected,
                k_dim: Some(32),
                ..base.clone()
            },
            ModelConfig {
                k_compression: KCompression::Native,
                k_dim: Some(32),
                num_k_heads: 8,
                ..base.clone()
            },
        ];
        for c in variants {
            assert_eq!(
                c.param_count(),
                Some(summarize(&c, 1).params as u64),
                "{c:?}"
            );
        }
        // Within every per-key bound, yet past the parameter bound...
        let huge = ModelConfig {
            vocab_size: 4_000_000_000,
            d_model: 1 << 20,
            ..base.clone()
        };
        assert!(huge
            .param_count()
            .is_some_and(|n| n > crate::config::MAX_PARAMS));
        let e = huge.validate().unwrap_err().to_string();
        assert!(e.contains("parameters, more than sigma supports"), "{e}");
        // ... or past what 64 bits count: refused, not wrapped.
        let wrapping = ModelConfig {
            d_model: 1 << 20,
            num_q_heads: 1 << 20,
            qk_head_dim: 1 << 20,
            aug_q_dim: 1 << 20,
            num_layers: 1 << 14,
            ..base
        };
        assert_eq!(wrapping.param_count(), None);
        let e = wrapping.validate().unwrap_err().to_string();
        assert!(e.contains("more than 2^64"), "{e}");
    }

    /// In FP8 the estimate counts the FP8 forms of the weights that
    /// multiply in FP8 (each and its transpose, a byte an element): for
    /// SIGMA-1.5B with the default first and last blocks in bf16, the
    /// matmul weights of 24 blocks (67,633,152 each, the arithmetic of the
    /// test above), 3.25 GB; other parameters (embedding, norms) have none.
    #[test]
    fn the_memory_estimate_counts_the_fp8_copies_of_the_fp8_weights() {
        let c = sigma_1_5b();
        let plan = crate::model::fp8::Fp8Plan::new(
            &crate::config::Fp8Config::default(),
            c.num_layers,
            crate::kernels::fp8::Gemm::Emulated,
        );
        let n = plan.params_in_fp8(&crate::model::Share::whole(&c));
        assert_eq!(n, 24 * 67_633_152);
        let bf16 = memory_estimate(&c, &inputs(4, 1, true, 0));
        let fp8 = memory_estimate(
            &c,
            &MemoryInputs {
                fp8_params: n,
                ..inputs(4, 1, true, 0)
            },
        );
        assert_eq!(fp8.fp8_copies, 2.0 * n as f64);
        assert_eq!(fp8.state - bf16.state, 2.0 * n as f64);
        assert!(
            fp8.to_string()
                .contains("of which FP8 weight copies 3.25 GB"),
            "{fp8}"
        );
        assert!(!bf16.to_string().contains("FP8"), "{bf16}");
    }

    /// SIGMA-1.5B at micro-batch 4 without checkpointing runs out of memory on
    /// an 80 GB card with the whole head (docs/benchmarks.md): the advice
    /// names `train.loss_chunk_tokens` and what it saves, (16,384 - 4,096)
    /// tokens x 128,256 logits x 14 bytes = 22.1 GB; not where the head is
    /// already chunked, vocabulary-parallel, or on another pipeline stage.
    #[test]
    fn out_of_memory_advice_names_the_chunked_head_where_it_would_help() {
        let c = sigma_1_5b();
        let e = memory_estimate(&c, &inputs(4, 1, true, 0));
        let want = (16_384.0 - 4_096.0) * 128_256.0 * 14.0;
        assert!(
            (e.head_chunk_saving - want).abs() < 1.0,
            "{}",
            e.head_chunk_saving
        );
        let a = e.advice();
        assert!(
            a.contains("train.loss_chunk_tokens = 4096") && a.contains("saves about 22.1 GB"),
            "{a}"
        );
        for (what, m) in [
            ("already chunked", inputs(4, 1, true, 4096)),
            ("vocabulary-parallel head", inputs(4, 2, true, 0)),
            ("no head on this rank", inputs(4, 1, false, 0)),
            ("one chunk's worth of tokens", inputs(1, 1, true, 0)),
        ] {
            let a = memory_estimate(&c, &m).advice();
            assert!(!a.contains("loss_chunk_tokens"), "{what}: {a}");
        }
    }
}
