//! The SIGMA model, written once, for the parameters one device holds. It
//! knows nothing about communication or about how the model is cut: it is
//! given its parameters (every one with the block this rank holds, from
//! `parallel/`) and computes with its own heads; the engine runs its pieces
//! as segments and does the communication at their boundaries.
//!
//! - `key.rs`: the typed parameter key and the declaration of the
//!   embedding, final norm and head; `block.rs`: the block (its weights,
//!   parts and wiring); `ops.rs`: the operations it is written in;
//! - `lse.rs`: attention that returns its log-sum-exp, the merge of partial
//!   results and their backward (context parallelism's pieces);
//! - `params.rs`: the flat parameter buffer; `summary.rs`: counts, FLOPs
//!   and the memory a run needs; `fp8.rs`: which weights multiply in FP8
//!   (`train.precision = "fp8"`) and their FP8 copies.
//!
//! [`Model`] is the structure and the weights; [`Fwd`] computes with them
//! under an execution context ([`Exec`]: where weight gradients go, whether
//! the weights are frozen), which callers pass in per run.

pub mod block;
pub mod decl;
pub mod fp8;
pub mod key;
pub mod lse;
pub mod ops;
pub mod params;
pub mod positions;
pub mod summary;

use std::cell::RefCell;
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use block::LayerWeight;
use key::ParamKey;
use params::{ParamId, ParamKind, ParamSpec, Params};

pub use block::sdpa_calls_on_this_thread;
pub use ops::frozen_merged_calls_on_this_thread;

/// Heads this rank computes with (all of them on one device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

/// How a model is initialised: the seed, which parameters decay, where it
/// lives and whether matmuls run in bf16.
#[derive(Clone, Copy, Debug)]
pub struct ModelInit {
    pub seed: u64,
    /// RMSNorm gains get weight decay too.
    pub decay_norms: bool,
    /// The embedding (and untied output head) gets weight decay too.
    pub decay_embeddings: bool,
    pub device: Device,
    /// bf16 matmuls (mixed precision).
    pub mixed: bool,
}

impl ModelInit {
    /// fp32 on the CPU, norms and embeddings not decayed.
    pub fn cpu(seed: u64) -> ModelInit {
        ModelInit {
            seed,
            decay_norms: false,
            decay_embeddings: false,
            device: Device::Cpu,
            mixed: false,
        }
    }

    /// Whether parameters of `kind` receive weight decay (they come first in
    /// the flat buffer and are drawn first).
    pub fn decays(&self, kind: ParamKind) -> bool {
        match kind {
            ParamKind::Norm => self.decay_norms,
            ParamKind::Embedding => self.decay_embeddings,
            ParamKind::Linear | ParamKind::ResidualOut => true,
        }
    }
}

/// What one rank holds of the model: every parameter in model order, each
/// with the block this rank has of it (`parallel/` decides), which of them
/// it holds, and the heads it computes with.
#[derive(Clone, Debug)]
pub struct Share {
    pub specs: Vec<ParamSpec>,
    pub held: Vec<bool>,
    pub heads: Heads,
}

impl Share {
    /// The whole model on one device.
    pub fn whole(c: &ModelConfig) -> Share {
        let specs = params::whole_specs(c);
        Share {
            held: vec![true; specs.len()],
            specs,
            heads: Heads {
                q: c.num_q_heads,
                k: c.num_k_heads,
                v: c.num_v_heads,
            },
        }
    }

    /// Elements this rank holds.
    pub fn held_numel(&self) -> i64 {
        self.specs
            .iter()
            .zip(&self.held)
            .filter(|(_, &h)| h)
            .map(|(s, _)| s.numel())
            .sum()
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    pub params: Params,
    /// The parameters this rank holds, by key.
    ids: HashMap<ParamKey, ParamId>,
    /// Heads this rank computes with.
    pub heads: Heads,
    /// dtype of matmul inputs (BFloat16 for mixed precision, else the parameter dtype).
    pub compute: Kind,
    /// RoPE tables by (positions, dim, dtype), on the model's device.
    rope: RefCell<RopeTables>,
    /// FP8 copies of the weights that multiply in FP8 (`Model::enable_fp8`).
    fp8: Option<fp8::Fp8Weights>,
}

/// `[cos, cos]` and `[-sin, sin]` tables by (positions, dim, dtype).
type RopeTables = HashMap<(i64, i64, Kind), (Tensor, Tensor)>;

/// Tokens per chunk of the output head without gradients (validation,
/// `sigma eval`) when `train.loss_chunk_tokens` is 0: the logits of one chunk
/// at a time, at no cost (nothing is kept for a backward pass).
pub const EVAL_LOSS_CHUNK_TOKENS: usize = 8192;

/// Where matmul weight gradients go in backward: added straight into the
/// flat fp32 gradient buffer (on GPU one GEMM with fp32 output that
/// accumulates into it) instead of returning in bf16 through the working
/// copy. The queue is where the engine has those GEMMs put off, to run
/// them while a tensor-parallel collective is under way.
pub struct GradSink {
    pub buffer: Tensor,
    pub queue: crate::kernels::fused::WgradQueue,
}

impl GradSink {
    /// A sink into `buffer` (the flat gradient, laid out like `model`'s
    /// parameters) when the model keeps a working copy (mixed precision),
    /// where those gradients would otherwise be bf16; None otherwise.
    pub fn new(model: &Model, buffer: &Tensor) -> Option<GradSink> {
        assert!(
            buffer.kind() == model.params.flat.kind() && buffer.size()[0] >= model.params.numel(),
            "gradient sink: a flat buffer of the parameters' dtype and length"
        );
        model.params.has_work_copy().then(|| GradSink {
            buffer: buffer.shallow_clone(),
            queue: crate::kernels::fused::WgradQueue::new(),
        })
    }

    /// Whether `grads` is the sink's memory.
    pub fn is(&self, grads: &Tensor) -> bool {
        self.buffer.data_ptr() == grads.data_ptr()
    }
}

/// The execution context of a forward pass, beyond the weights.
#[derive(Clone, Copy, Default)]
pub struct Exec<'a> {
    /// Matmul weight gradients go here (None: through autograd).
    pub sink: Option<&'a GradSink>,
    /// The weights do not change and nothing is differentiated (evaluation,
    /// generation): matmuls that read one input may read adjacent working
    /// weights as one. Training leaves it false: a checkpointed segment's
    /// forward (under `no_grad`) must compute what its recompute (with
    /// gradients) computes.
    pub frozen: bool,
    /// Where the tokens of a sequence sit (None: positions `0..t`).
    pub pieces: Option<Pieces>,
}

/// The local sequence of `t` tokens is two equal pieces of a longer one cut
/// into `2 n` pieces: piece `i` and piece `2 n - 1 - i` (context
/// parallelism's head-tail split, docs/context-parallel.md). The model uses
/// it for positions only (RoPE); which tokens it was given is the caller's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pieces {
    pub n: usize,
    pub i: usize,
}

impl Pieces {
    /// The global piece numbers of the two local pieces, in local order.
    pub fn ids(self) -> [usize; 2] {
        [self.i, 2 * self.n - 1 - self.i]
    }

    /// The first position of each local half of a local sequence of `t` tokens.
    pub fn starts(self, t: i64) -> [i64; 2] {
        self.ids().map(|p| p as i64 * (t / 2))
    }

    /// This device's two pieces (along dim 1) of `whole`, a `[b, total, ..]`
    /// sequence of `total` tokens, side by side.
    pub fn select(self, whole: &Tensor, total: i64) -> Tensor {
        let c = total / (2 * self.n as i64);
        let parts: Vec<Tensor> = self
            .ids()
            .iter()
            .map(|&p| whole.narrow(1, p as i64 * c, c))
            .collect();
        Tensor::cat(&parts, 1)
    }
}

/// The model computing under an execution context (derefs to the model).
#[derive(Clone, Copy)]
pub struct Fwd<'a> {
    pub m: &'a Model,
    pub exec: Exec<'a>,
}

impl std::ops::Deref for Fwd<'_> {
    type Target = Model;
    fn deref(&self) -> &Model {
        self.m
    }
}

impl Model {
    /// The whole model on one device, initialised from `init`.
    pub fn new(cfg: &ModelConfig, init: &ModelInit) -> Model {
        Model::from_share(cfg, Share::whole(cfg), init)
    }

    /// This rank's share (`parallel::Layout::share`), initialised from the
    /// same draws as the whole model (each rank keeps its blocks).
    pub fn from_share(cfg: &ModelConfig, share: Share, init: &ModelInit) -> Model {
        let Share { specs, held, heads } = share;
        let keys: Vec<ParamKey> = specs.iter().map(|s| s.key).collect();
        let draws = params::Init {
            seed: init.seed,
            std: cfg.init_std,
            num_layers: cfg.num_layers,
        };
        let (params, ids) = Params::new(
            specs,
            |i, _| held[i],
            |s| init.decays(s.kind),
            draws,
            init.device,
        );
        let ids = keys
            .into_iter()
            .zip(ids)
            .filter_map(|(k, id)| id.map(|id| (k, id)))
            .collect();
        Model {
            cfg: cfg.clone(),
            params,
            ids,
            heads,
            compute: if init.mixed {
                Kind::BFloat16
            } else {
                Kind::Float
            },
            rope: RefCell::new(HashMap::new()),
            fp8: None,
        }
    }

    /// Run the matmuls of the weights `plan` names in FP8 (`model::fp8`),
    /// after checking their shapes (`tokens`: of a micro-batch); the model
    /// must keep a bf16 working copy (mixed precision).
    pub fn enable_fp8(&mut self, plan: fp8::Fp8Plan, tokens: i64) -> crate::error::Result<()> {
        assert!(
            self.params.has_work_copy(),
            "FP8 matmuls need the bf16 working copy"
        );
        plan.check_shapes(&self.params, tokens)?;
        self.fp8 = Some(fp8::Fp8Weights::new(plan, &self.params));
        Ok(())
    }

    /// The FP8 weights, when the model has them.
    pub fn fp8(&self) -> Option<&fp8::Fp8Weights> {
        self.fp8.as_ref()
    }

    /// Whether parameter `id` multiplies in FP8.
    pub fn is_fp8(&self, id: ParamId) -> bool {
        self.fp8.as_ref().is_some_and(|f| f.covers(id))
    }

    /// The same model in float64 (tests: references and finite differences).
    pub fn to_double(mut self) -> Model {
        let flat = self.params.flat.to_kind(Kind::Double);
        self.params.replace_flat(flat);
        self.params.enable_work_copy(Kind::Double);
        self.compute = Kind::Double;
        self
    }

    /// The handle of parameter `key`, if this rank holds it.
    pub fn try_id(&self, key: ParamKey) -> Option<ParamId> {
        self.ids.get(&key).copied()
    }

    /// The handle of parameter `key`, which this rank must hold.
    pub fn id(&self, key: ParamKey) -> ParamId {
        match self.try_id(key) {
            Some(id) => id,
            None => panic!("{} is not on this pipeline stage", key.name()),
        }
    }

    /// Weight `w` of block `l`, if this rank holds it (the config may not
    /// have it: AugQ, K compression's up-projection).
    pub fn try_lid(&self, l: usize, w: LayerWeight) -> Option<ParamId> {
        self.try_id(ParamKey::Layer(l, w))
    }

    /// Weight `w` of block `l`, which this rank must hold.
    pub fn lid(&self, l: usize, w: LayerWeight) -> ParamId {
        self.id(ParamKey::Layer(l, w))
    }

    /// The output projection: the embedding when tied.
    pub fn head_key(&self) -> ParamKey {
        if self.cfg.tie_embeddings {
            ParamKey::Embed
        } else {
            ParamKey::LmHead
        }
    }

    /// Whether this rank holds block `l`.
    pub fn holds_layer(&self, l: usize) -> bool {
        self.try_id(ParamKey::Layer(l, LayerWeight::AttnNorm))
            .is_some()
    }

    /// The parameters of block `l` this rank holds that part `part` reads
    /// (every one of the block when `part` is None), in model order.
    pub fn layer_params(&self, l: usize, part: Option<block::Part>) -> Vec<ParamId> {
        LayerWeight::ALL
            .iter()
            .filter(|w| part.is_none_or(|p| w.part() == p))
            .filter_map(|&w| self.try_id(ParamKey::Layer(l, w)))
            .collect()
    }

    pub fn p(&self, id: ParamId) -> &Tensor {
        self.params.tensor(id)
    }

    /// Parameter `id` as a matmul weight: its working copy in the compute
    /// dtype when the trainer keeps one, else the parameter (cast at use).
    pub fn w(&self, id: ParamId) -> &Tensor {
        self.params.weight(id)
    }

    /// The model computing under `exec`.
    pub fn fwd<'a>(&'a self, exec: Exec<'a>) -> Fwd<'a> {
        Fwd { m: self, exec }
    }

    /// The model computing with frozen weights (evaluation, generation).
    pub fn frozen(&self) -> Fwd<'_> {
        self.fwd(Exec {
            sink: None,
            frozen: true,
            pieces: None,
        })
    }

    /// The model computing with nothing special: gradients through autograd,
    /// weights not frozen (tests, references).
    pub fn plain(&self) -> Fwd<'_> {
        self.fwd(Exec::default())
    }
}

impl Fwd<'_> {
    /// Token ids [b, t] -> hidden states [b, t, d] (parameter dtype): the
    /// whole embedding (under tensor parallelism the plan looks up the rows
    /// a rank holds: `parallel::tp`).
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        let w = self.p(self.id(ParamKey::Embed));
        Tensor::embedding(w, tokens, -1, false, false)
    }

    /// Output projection of normalised states: [b, t, d] -> logits of this
    /// rank's vocabulary rows [b, t, rows] (parameter dtype).
    pub fn head_logits(&self, h: &Tensor) -> Tensor {
        self.linear(h, self.id(self.head_key()))
            .to_kind(self.params.flat.kind())
    }

    /// The final norm into the compute dtype.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm_in(x, self.id(ParamKey::FinalNorm))
    }

    /// Final norm and output projection: [b, t, d] -> logits [b, t, vocab] (parameter dtype).
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.head_logits(&self.final_norm(x))
    }

    /// `head_loss_sum` over chunks of `chunk` tokens (0 or at least all the
    /// tokens: one piece). Without gradients only the current chunk's logits
    /// exist; with gradients every chunk keeps its graph, so training chunks
    /// through the engine instead.
    pub fn head_loss_sum_chunked(&self, x: &Tensor, targets: &Tensor, chunk: usize) -> Tensor {
        let n = x.size()[0] * x.size()[1];
        if chunk == 0 || n <= chunk as i64 {
            return self.head_loss_sum(x, targets);
        }
        let d = x.size()[2];
        let (xf, tf) = (x.reshape([1, n, d]), targets.reshape([1, n]));
        let mut total: Option<Tensor> = None;
        for (s, len) in chunks(n, chunk as i64) {
            let l = self.head_loss_sum(&xf.narrow(1, s, len), &tf.narrow(1, s, len));
            total = Some(match total {
                Some(t) => t + l,
                None => l,
            });
        }
        total.expect("at least one chunk")
    }

    /// Sum of next-token cross-entropy over all positions of `x`, in one
    /// piece (the engine's chunked backward calls it per chunk). On a GPU in
    /// bf16, cross-entropy over the bf16 logits by the training kernels
    /// (`kernels::training::cross_entropy_sum`: no fp32 copy of the logits,
    /// no log-softmax kept for backward, the gradient written in bf16 in one
    /// pass); elsewhere libtorch's cross-entropy over the logits in the
    /// parameter dtype.
    pub fn head_loss_sum(&self, x: &Tensor, targets: &Tensor) -> Tensor {
        let h = self.final_norm(x);
        let logits = self.linear(&h, self.id(self.head_key()));
        let v = logits.size()[2];
        let (logits, targets) = (logits.reshape([-1, v]), targets.reshape([-1]));
        if let Some(loss) = crate::kernels::training::cross_entropy_sum(&logits, &targets, -100) {
            return loss;
        }
        logits
            .to_kind(self.params.flat.kind())
            .cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, -100, 0.0)
    }

    /// Whole forward without segments: token ids [b, t] -> logits (tests, eval).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let mut x = self.embed(tokens);
        for l in 0..self.cfg.num_layers {
            x = self.block(l, &x);
        }
        self.logits(&x)
    }
}

/// (start, length) of consecutive pieces of `chunk` over `0..n` (the last may be shorter).
pub fn chunks(n: i64, chunk: i64) -> Vec<(i64, i64)> {
    (0..n)
        .step_by(chunk.max(1) as usize)
        .map(|s| (s, chunk.min(n - s)))
        .collect()
}
