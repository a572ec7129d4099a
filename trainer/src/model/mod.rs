//! The SIGMA model, written once, for the parameters one device holds. It
//! knows nothing about communication: under tensor parallelism it is given
//! its blocks of the weights (tp.rs) and computes with its own heads; the
//! engine (engine.rs) runs its pieces as segments and does the communication
//! at their boundaries.
//!
//! DiffQKV attention: `num_q_heads` query heads, `num_k_heads` key heads and
//! `num_v_heads` value heads with contiguous groups, `k_head(i) = i / (n_q / n_k)`,
//! `v_head(i) = i / (n_q / n_v)`. Training repeats the smaller of K and V so both
//! have `max(n_k, n_v)` heads (the composition of contiguous groups is again
//! contiguous, so the mapping is unchanged) and runs grouped-query SDPA.
//! AugQ: `q = W_down(silu(W_gate q0) * W_up q0)` on the whole projected query.
//! K compression: see `KCompression`. Mixed precision: parameters stay fp32;
//! matmuls run in the compute dtype (bf16 on GPU) on a working copy of the
//! weights that the trainer refreshes once per change of them (`Params::weight`;
//! without one, each matmul casts its weight), each norm's output is cast once
//! for the matmuls that read it; norms, residual stream and the loss run in
//! fp32. (tch's autocast cannot select bf16, hence explicit casts.)

pub mod params;
pub mod summary;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::config::{KCompression, ModelConfig};
use crate::model::params::{ParamId, ParamKind, ParamSpec, Params};
use crate::parallel::pipeline::PipelinePlan;
use crate::parallel::tp::TpPlan;

/// Handles to the parameters of one attention layer.
#[derive(Clone, Debug)]
pub struct AttnIds {
    pub norm: ParamId,
    pub q_proj: ParamId,
    /// AugQ: gate, up, down.
    pub aug_q: Option<[ParamId; 3]>,
    pub k_proj: ParamId,
    /// K compression, "projected" reading.
    pub k_up: Option<ParamId>,
    pub v_proj: ParamId,
    pub o_proj: ParamId,
}

#[derive(Clone, Debug)]
pub struct FfnIds {
    pub norm: ParamId,
    pub gate: ParamId,
    pub up: ParamId,
    pub down: ParamId,
}

#[derive(Clone, Debug)]
pub struct LayerIds {
    pub attn: AttnIds,
    pub ffn: FfnIds,
}

impl LayerIds {
    pub fn all(&self) -> Vec<ParamId> {
        let a = &self.attn;
        let mut v = vec![a.norm, a.q_proj];
        v.extend(a.aug_q.iter().flatten());
        v.push(a.k_proj);
        v.extend(a.k_up);
        v.extend([a.v_proj, a.o_proj]);
        let f = &self.ffn;
        v.extend([f.norm, f.gate, f.up, f.down]);
        v
    }
}

/// Handles to the parameters this rank holds (under pipeline parallelism,
/// those of its stages).
#[derive(Clone, Debug)]
pub struct ModelIds {
    pub embed: Option<ParamId>,
    pub layers: Vec<Option<LayerIds>>,
    pub final_norm: Option<ParamId>,
    /// The output projection: the embedding when tied.
    pub head: Option<ParamId>,
}

impl ModelIds {
    /// Layer `l`, which this rank's stages must hold.
    pub fn layer(&self, l: usize) -> &LayerIds {
        match &self.layers[l] {
            Some(ids) => ids,
            None => panic!("layer {l} is not on this pipeline stage"),
        }
    }
}

pub(crate) fn held<T>(v: Option<T>, what: &str) -> T {
    match v {
        Some(x) => x,
        None => panic!("{what} is not on this pipeline stage"),
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    /// This rank's share of the model (everything, without tensor parallelism).
    pub plan: TpPlan,
    /// The layers this rank runs (all of them, without pipeline parallelism).
    pub pipe: PipelinePlan,
    pub params: Params,
    pub ids: ModelIds,
    /// dtype of matmul inputs (BFloat16 for mixed precision, else the parameter dtype).
    pub compute: Kind,
    /// `train.loss_chunk_tokens`: the output head and loss in chunks of this
    /// many tokens in training (0: all at once); see the engine's head segment.
    pub loss_chunk_tokens: usize,
    /// The flat fp32 gradient buffer that matmul weight gradients are added
    /// into during backward (see [`Model::set_grad_sink`]); None: they
    /// return through autograd.
    grad_sink: Option<Tensor>,
    /// With the grad sink: where the engine has the matmuls' weight-gradient
    /// GEMMs put off during a segment's backward, to run them while a
    /// tensor-parallel collective is under way (`parallel.tp_comm_overlap`).
    /// Every graph that points at it is made by this model's forward and
    /// differentiated, or dropped, before the model.
    wgrad_queue: Option<crate::kernels::fused::WgradQueue>,
    /// `parallel.tp_comm_overlap`: overlap the backward collectives of
    /// tensor parallelism with weight-gradient GEMMs (needs the grad sink).
    pub tp_comm_overlap: bool,
    /// Loaded for evaluation or generation (`eval::load`): the weights do not
    /// change and nothing is differentiated, so matmuls that read one input
    /// may read adjacent working weights as one (`linear_merged`). Training
    /// leaves it false: a checkpointed segment's forward (under `no_grad`)
    /// must compute what its recompute (with gradients) computes.
    pub frozen: bool,
    /// RoPE tables by (positions, dim, dtype), on the model's device.
    rope: RefCell<RopeTables>,
}

/// `[cos, cos]` and `[-sin, sin]` tables by (positions, dim, dtype).
type RopeTables = HashMap<(i64, i64, Kind), (Tensor, Tensor)>;

/// Tokens per chunk of the output head without gradients (validation,
/// `sigma eval`) when `train.loss_chunk_tokens` is 0: the logits of one chunk
/// at a time, at no cost (nothing is kept for a backward pass).
pub const EVAL_LOSS_CHUNK_TOKENS: usize = 8192;

/// The parameters of a config (held whole), named after the module tree.
pub fn param_specs(c: &ModelConfig) -> Vec<ParamSpec> {
    TpPlan::single(c).param_specs(c)
}

/// Handles by name (the module tree's), for the parameters this rank holds.
fn model_ids(c: &ModelConfig, specs: &[ParamSpec], ids: &[Option<ParamId>]) -> ModelIds {
    let by_name: std::collections::HashMap<&str, ParamId> = specs
        .iter()
        .zip(ids)
        .filter_map(|(s, id)| id.map(|id| (s.name.as_str(), id)))
        .collect();
    let get = |n: &str| by_name.get(n).copied();
    let must = |n: String| match get(&n) {
        Some(id) => id,
        None => panic!("parameter {n} missing from a layer this rank holds"),
    };
    let layers = (0..c.num_layers)
        .map(|l| {
            let p = |n: &str| format!("layers.{l}.{n}.weight");
            get(&p("attn_norm"))?;
            Some(LayerIds {
                attn: AttnIds {
                    norm: must(p("attn_norm")),
                    q_proj: must(p("attn.q_proj")),
                    aug_q: (c.aug_q_dim > 0).then(|| {
                        [
                            must(p("attn.aug_q.gate")),
                            must(p("attn.aug_q.up")),
                            must(p("attn.aug_q.down")),
                        ]
                    }),
                    k_proj: must(p("attn.k_proj")),
                    k_up: (c.k_compression == KCompression::Projected)
                        .then(|| must(p("attn.k_up"))),
                    v_proj: must(p("attn.v_proj")),
                    o_proj: must(p("attn.o_proj")),
                },
                ffn: FfnIds {
                    norm: must(p("ffn_norm")),
                    gate: must(p("ffn.gate")),
                    up: must(p("ffn.up")),
                    down: must(p("ffn.down")),
                },
            })
        })
        .collect();
    let embed = get("embed.weight");
    ModelIds {
        embed,
        layers,
        final_norm: get("final_norm.weight"),
        head: if c.tie_embeddings {
            embed
        } else {
            get("lm_head.weight")
        },
    }
}

/// Whether a rank running `pipe`'s stages holds parameter `name`, and whether
/// it is the tied embedding held by both ends of the pipeline.
fn on_stage(c: &ModelConfig, pipe: &PipelinePlan, name: &str) -> (bool, bool) {
    let tied_across = pipe.pp > 1 && c.tie_embeddings;
    match name {
        "embed.weight" => (
            pipe.first() || (pipe.last() && c.tie_embeddings),
            tied_across,
        ),
        "final_norm.weight" | "lm_head.weight" => (pipe.last(), false),
        n => {
            let layer = n
                .strip_prefix("layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            (layer.is_some_and(|l| pipe.holds_layer(l)), false)
        }
    }
}

/// The parameters a rank holds under `plan` and `pipe` (its blocks, its stages).
pub fn held_specs(c: &ModelConfig, plan: &TpPlan, pipe: &PipelinePlan) -> Vec<ParamSpec> {
    plan.param_specs(c)
        .into_iter()
        .filter(|s| on_stage(c, pipe, &s.name).0)
        .collect()
}

impl Model {
    /// Build and initialise the whole model on one device (seeded, on CPU, then moved).
    /// `mixed`: bf16 matmuls.
    pub fn new(
        cfg: &ModelConfig,
        seed: u64,
        decay_norms: bool,
        decay_embeddings: bool,
        device: Device,
        mixed: bool,
    ) -> Model {
        Model::with_plan(
            cfg,
            TpPlan::single(cfg),
            PipelinePlan::single(cfg),
            seed,
            decay_norms,
            decay_embeddings,
            device,
            mixed,
        )
    }

    /// This rank's share under `plan` and `pipe`, initialised from the same
    /// draws as the whole model (each rank keeps its blocks).
    #[allow(clippy::too_many_arguments)]
    pub fn with_plan(
        cfg: &ModelConfig,
        plan: TpPlan,
        pipe: PipelinePlan,
        seed: u64,
        decay_norms: bool,
        decay_embeddings: bool,
        device: Device,
        mixed: bool,
    ) -> Model {
        let decayed = |s: &ParamSpec| match s.kind {
            ParamKind::Norm => decay_norms,
            ParamKind::Embedding => decay_embeddings,
            _ => true,
        };
        let mut specs = plan.param_specs(cfg);
        for s in &mut specs {
            let (_, tied) = on_stage(cfg, &pipe, &s.name);
            s.pp_tied = tied;
            // The first stage writes the tied embedding into checkpoints.
            s.writer &= !tied || pipe.first();
        }
        let names = specs.clone();
        let (params, ids) = Params::new(
            specs,
            |s| on_stage(cfg, &pipe, &s.name).0,
            decayed,
            seed,
            cfg.init_std,
            cfg.num_layers,
            device,
        );
        Model {
            cfg: cfg.clone(),
            plan,
            pipe,
            ids: model_ids(cfg, &names, &ids),
            params,
            compute: if mixed { Kind::BFloat16 } else { Kind::Float },
            loss_chunk_tokens: 0,
            grad_sink: None,
            wgrad_queue: None,
            tp_comm_overlap: true,
            frozen: false,
            rope: RefCell::new(HashMap::new()),
        }
    }

    /// The same model in float64 (tests: references and finite differences).
    pub fn to_double(mut self) -> Model {
        let flat = self.params.flat.to_kind(Kind::Double);
        self.params.replace_flat(flat);
        self.params.enable_work_copy(Kind::Double);
        self.compute = Kind::Double;
        self
    }

    pub fn p(&self, id: ParamId) -> &Tensor {
        self.params.tensor(id)
    }

    /// Parameter `id` as a matmul weight: its working copy in the compute
    /// dtype when the trainer keeps one, else the parameter (cast at use).
    pub fn w(&self, id: ParamId) -> &Tensor {
        self.params.weight(id)
    }

    /// Add the weight gradients of the matmuls into `grads` (the flat
    /// gradient buffer, laid out like the parameters) inside backward, one
    /// GEMM accumulating in fp32 on GPU, instead of returning bf16 gradients
    /// through the working copy for the engine to add. Only with a working
    /// copy (mixed precision), where those gradients would otherwise be
    /// bf16; None (or no working copy): the plain path.
    pub fn set_grad_sink(&mut self, grads: Option<Tensor>) {
        if let Some(g) = &grads {
            assert!(
                g.kind() == self.params.flat.kind() && g.size()[0] >= self.params.numel(),
                "gradient sink: a flat buffer of the parameters' dtype and length"
            );
        }
        self.grad_sink = grads.filter(|_| self.params.has_work_copy());
        self.wgrad_queue = self
            .grad_sink
            .as_ref()
            .map(|_| crate::kernels::fused::WgradQueue::new());
    }

    /// The queue of put-off weight-gradient GEMMs, when the engine may use
    /// one: with the grad sink, `tp_comm_overlap` and tensor parallelism.
    pub fn wgrad_queue(&self) -> Option<&crate::kernels::fused::WgradQueue> {
        self.wgrad_queue
            .as_ref()
            .filter(|_| self.tp_comm_overlap && self.plan.tp > 1)
    }

    /// Whether matmul weight gradients go straight into the gradient buffer.
    pub fn fused_weight_grad(&self) -> bool {
        self.grad_sink.is_some()
    }

    /// Whether `grads` is where the matmul weight gradients go: the sink's
    /// memory, or any buffer when there is no sink.
    pub fn grad_sink_is(&self, grads: &Tensor) -> bool {
        self.grad_sink
            .as_ref()
            .is_none_or(|g| g.data_ptr() == grads.data_ptr())
    }

    /// `x` times parameter `id` (a matmul weight [out, in]): [.., in] -> [.., out].
    pub fn linear(&self, x: &Tensor, id: ParamId) -> Tensor {
        let w = self.w(id);
        match &self.grad_sink {
            Some(g) if x.kind() == w.kind() => {
                let (o, n) = (self.params.offsets[id.0], self.params.specs[id.0].numel());
                let main = g.narrow(0, o, n).view(w.size().as_slice());
                crate::kernels::fused::linear_accum(x, w, &main, self.wgrad_queue.as_ref())
            }
            _ => self.mm(x, w),
        }
    }

    /// `x` times two weights that read it, as one matmul [.., rows_a + rows_b]
    /// (their working copies, and gradients in the sink, are contiguous):
    /// only with a working copy and `b` right after `a` in the parameter
    /// layout. With the gradient sink the matmul adds its weight gradient
    /// there; without one only in a `frozen` model under `no_grad`
    /// (evaluation, generation): the merged view of the working copy is not
    /// a leaf that autograd would give gradients to.
    fn linear_merged(&self, x: &Tensor, a: ParamId, b: ParamId) -> Option<Tensor> {
        if self.grad_sink.is_none() && (!self.frozen || crate::kernels::fused::grad_enabled()) {
            return None;
        }
        let (w, o) = self.params.merged_weight(a, b)?;
        if x.kind() != w.kind() {
            return None;
        }
        let Some(g) = self.grad_sink.as_ref() else {
            MERGED_CALLS.with(|c| c.set(c.get() + 1));
            return Some(x.linear::<Tensor>(&w, None));
        };
        let main = g.narrow(0, o, w.numel() as i64).view(w.size().as_slice());
        Some(crate::kernels::fused::linear_accum(
            x,
            &w,
            &main,
            self.wgrad_queue.as_ref(),
        ))
    }

    /// `silu(x gate^T) * (x up^T)`, SwiGLU's and AugQ's gating: one matmul by
    /// both weights and the fused SwiGLU (crate::kernels::training) where
    /// `linear_merged` applies, else two matmuls and the tensor form.
    pub fn gated(&self, x: &Tensor, gate: ParamId, up: ParamId) -> Tensor {
        match self.linear_merged(x, gate, up) {
            Some(gu) => crate::kernels::training::swiglu(&gu),
            None => self.linear(x, gate).silu() * self.linear(x, up),
        }
    }

    pub(crate) fn mm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        if x.kind() == self.compute && w.kind() == self.compute {
            x.linear::<Tensor>(w, None)
        } else {
            x.to_kind(self.compute)
                .linear::<Tensor>(&w.to_kind(self.compute), None)
        }
    }

    /// RMSNorm in the parameter dtype (fp32): libtorch's `rms_norm`, one
    /// fused kernel forward and backward on GPU (it needs the input and the
    /// weight in one dtype).
    pub fn rms_norm(&self, x: &Tensor, w: ParamId) -> Tensor {
        let w = self.p(w);
        x.to_kind(w.kind())
            .rms_norm([w.size()[0]], Some(w), self.cfg.norm_eps)
    }

    /// `rms_norm` cast to the compute dtype: the input of the matmuls that
    /// follow, cast once for all of them. An fp32 stream into bf16 on GPU:
    /// one kernel each way (crate::kernels::training::rms_norm_bf16).
    pub fn norm_in(&self, x: &Tensor, w: ParamId) -> Tensor {
        if self.compute == Kind::BFloat16 && x.kind() == Kind::Float {
            if let Some(y) = crate::kernels::training::rms_norm_bf16(x, self.p(w), self.cfg.norm_eps) {
                return y;
            }
        }
        self.rms_norm(x, w).to_kind(self.compute)
    }

    /// The residual add `x + y` (fp32 stream, branch output in the compute
    /// dtype) and `norm_in` of the sum with weight `w`: (sum, normalised).
    /// On a GPU in bf16 one kernel each way (crate::kernels::training::
    /// add_rms_norm_bf16), else the two tensor operations.
    pub fn add_norm_in(&self, x: &Tensor, y: &Tensor, w: ParamId) -> (Tensor, Tensor) {
        if self.compute == Kind::BFloat16 && x.kind() == Kind::Float {
            if let Some(r) =
                crate::kernels::training::add_rms_norm_bf16(x, y, self.p(w), self.cfg.norm_eps)
            {
                return r;
            }
        }
        let s = x + y;
        let h = self.norm_in(&s, w);
        (s, h)
    }

    /// RoPE tables [t, dim] for positions 0..t (angles computed in f64), in
    /// the layout of `rope_at`: `[cos, cos]` and `[-sin, sin]` over the two
    /// halves of a head; made once per dtype: no cast per call.
    fn rope_tables(&self, t: i64, dim: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
        let mut cache = self.rope.borrow_mut();
        let (c, s) = cache.entry((t, dim, kind)).or_insert_with(|| {
            let opts = (Kind::Double, Device::Cpu);
            let inv = (Tensor::arange_start_step(0, dim, 2, opts) / dim as f64
                * -(self.cfg.rope_theta.ln()))
            .exp();
            let ang = Tensor::arange(t, opts).unsqueeze(1) * inv.unsqueeze(0);
            let (cos, sin) = (ang.cos(), ang.sin());
            let on = |x: Tensor| x.to_kind(kind).to_device(device);
            (
                on(Tensor::cat(&[&cos, &cos], 1)),
                on(Tensor::cat(&[&(-&sin), &sin], 1)),
            )
        });
        (c.shallow_clone(), s.shallow_clone())
    }

    /// Rotary embedding of [b, t, h, dim] (token-major, as projections give
    /// it) at positions `start..start + t`, rotating the two halves of each
    /// head: `x * [cos, cos] + swap_halves(x) * [-sin, sin]`, which is
    /// `[x1 cos - x2 sin, x2 cos + x1 sin]` to the bit, in four contiguous
    /// kernels (the swap is one flip) instead of strided halves and a `cat`;
    /// on a GPU in bf16 one kernel each way (`train_kernels::rope`, fp32
    /// math: the tensor form's roundings of the products are not made).
    /// The table covers a power-of-two length (each angle is computed on its
    /// own, so a longer table holds the same values): decoding one position
    /// after another reuses a few tables instead of making one per length.
    pub fn rope_at(&self, x: &Tensor, start: i64) -> Tensor {
        let size = x.size();
        let (b, t, h, dim) = (size[0], size[1], size[2], size[3]);
        let len = ((start + t) as u64).next_power_of_two() as i64;
        let (cos, sin) = self.rope_tables(len, dim, x.device(), x.kind());
        if let Some(y) = crate::kernels::training::rope(x, &cos, &sin, start) {
            return y;
        }
        let (cos, sin) = (
            cos.narrow(0, start, t).unsqueeze(1),
            sin.narrow(0, start, t).unsqueeze(1),
        );
        let swapped = x
            .reshape([b, t, h, 2, dim / 2])
            .flip([3])
            .view([b, t, h, dim]);
        x * cos + swapped * sin
    }

    /// Token ids [b, t] -> hidden states [b, t, d] (parameter dtype). Under
    /// tensor parallelism, the rows this rank holds: other tokens give zeros
    /// (the ranks' outputs sum to the lookup).
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        let w = self.p(held(self.ids.embed, "the embedding"));
        if self.plan.tp == 1 {
            return Tensor::embedding(w, tokens, -1, false, false);
        }
        let (first, rows) = self.plan.vocab_rows(&self.cfg);
        let local = tokens - first;
        let mine = local.ge(0).logical_and(&local.lt(rows));
        let e = Tensor::embedding(w, &local.clamp(0, rows - 1), -1, false, false);
        e * mine.unsqueeze(-1).to_kind(w.kind())
    }

    /// The projected query q0 of this rank's heads: [b, t, q_heads * dot_dim].
    pub fn q0(&self, l: usize, h: &Tensor) -> Tensor {
        self.linear(h, self.ids.layer(l).attn.q_proj)
    }

    /// AugQ on a whole projected query [b, t, n_q * dot_dim]; under tensor
    /// parallelism this rank's share of the AugQ width, a partial sum.
    pub fn aug_q(&self, l: usize, q0: &Tensor) -> Tensor {
        let [gate, up, down] = self.ids.layer(l).attn.aug_q.expect("AugQ is on");
        self.linear(&self.gated(q0, gate, up), down)
    }

    /// Query features [b, t, heads * dot_dim] -> heads with RoPE: [b, heads, t, dot_dim].
    pub fn query_heads(&self, q: &Tensor) -> Tensor {
        self.query_heads_at(q, 0)
    }

    /// `query_heads` for positions `start..start + t` (decoding).
    pub fn query_heads_at(&self, q: &Tensor, start: i64) -> Tensor {
        let (b, t, dd) = (q.size()[0], q.size()[1], self.cfg.dot_dim() as i64);
        self.rope_at(&q.view([b, t, -1, dd]), start).transpose(1, 2)
    }

    /// This rank's query heads after projection, AugQ, head split and RoPE:
    /// [b, q_heads, t, dot_dim]. (With AugQ under tensor parallelism the
    /// engine runs `q0`, `aug_q` and `query_heads` with communication between.)
    pub fn queries(&self, l: usize, h: &Tensor) -> Tensor {
        self.queries_at(l, h, 0)
    }

    /// `queries` for positions `start..start + t` (decoding).
    pub fn queries_at(&self, l: usize, h: &Tensor, start: i64) -> Tensor {
        let q0 = self.q0(l, h);
        let q = if self.cfg.aug_q_dim > 0 {
            self.aug_q(l, &q0)
        } else {
            q0
        };
        self.query_heads_at(&q, start)
    }

    /// Key heads after projection, optional up-projection and RoPE: [b, k_heads, t, dot_dim].
    pub fn keys(&self, l: usize, h: &Tensor) -> Tensor {
        self.keys_from_raw(l, &self.keys_raw(l, h), 0)
    }

    /// Key heads as computed from `h`, what a KV cache stores under the
    /// projected reading: [b, t, k_heads, k_cache_dim], before any
    /// up-projection and RoPE.
    pub fn keys_raw(&self, l: usize, h: &Tensor) -> Tensor {
        let (b, t) = (h.size()[0], h.size()[1]);
        self.linear(h, self.ids.layer(l).attn.k_proj).view([
            b,
            t,
            self.plan.k_heads as i64,
            self.cfg.k_cache_dim() as i64,
        ])
    }

    /// Raw keys [b, t, k_heads, k_cache_dim] at positions `start..start + t`
    /// -> keys for the dot product [b, k_heads, t, dot_dim]: the projected
    /// reading's up-projection, then RoPE.
    pub fn keys_from_raw(&self, l: usize, k: &Tensor, start: i64) -> Tensor {
        let k = match self.ids.layer(l).attn.k_up {
            Some(up) => self.linear(k, up),
            None => k.shallow_clone(),
        };
        self.rope_at(&k, start).transpose(1, 2)
    }

    /// Value heads: [b, v_heads, t, v_head_dim].
    pub fn values(&self, l: usize, h: &Tensor) -> Tensor {
        let (b, t) = (h.size()[0], h.size()[1]);
        let v = self.linear(h, self.ids.layer(l).attn.v_proj);
        v.view([b, t, self.plan.v_heads as i64, self.cfg.v_head_dim as i64])
            .transpose(1, 2)
    }

    /// Causal DiffQKV attention of this rank's heads and its o_proj block:
    /// [b, t, d] (a partial sum under tensor parallelism).
    pub fn attend(&self, l: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        self.attend_with(l, q, k, v, None)
    }

    /// `attend` under an explicit boolean mask [b or 1, 1, t, t] (true: may
    /// attend) instead of the causal one: prefill of left-padded prompts.
    pub fn attend_masked(
        &self,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Tensor {
        self.attend_with(l, q, k, v, Some(mask))
    }

    fn attend_with(
        &self,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, t) = (q.size()[0], q.size()[2]);
        let (nq, nk, nv) = (
            self.plan.q_heads as i64,
            self.plan.k_heads as i64,
            self.plan.v_heads as i64,
        );
        let (mut k, mut v) = (k.shallow_clone(), v.shallow_clone());
        if nk < nv {
            k = k.repeat_interleave_self_int(nv / nk, 1, None);
        } else if nv < nk {
            v = v.repeat_interleave_self_int(nk / nv, 1, None);
        }
        let kv_heads = nk.max(nv);
        // SDPA's fused backends (cuDNN, flash, efficient) need the head
        // dimension to be the fastest; any other layout silently runs the
        // O(t^2) math path (in fp32 for bf16 inputs).
        let sdpa = |t: Tensor| {
            let t = t.to_kind(self.compute);
            if t.stride().last() == Some(&1) {
                t
            } else {
                t.contiguous()
            }
        };
        let (q, k, v) = (sdpa(q.shallow_clone()), sdpa(k), sdpa(v));
        let scale = 1.0 / (self.cfg.dot_dim() as f64).sqrt();
        note_sdpa_backend(&q, &k, &v, mask, scale, nq != kv_heads);
        let o = Tensor::scaled_dot_product_attention::<&Tensor>(
            &q,
            &k,
            &v,
            mask,
            0.0,
            mask.is_none(),
            scale,
            nq != kv_heads,
        );
        let o = o
            .transpose(1, 2)
            .reshape([b, t, nq * self.cfg.v_head_dim as i64]);
        self.linear(&o, self.ids.layer(l).attn.o_proj)
    }

    /// DiffQKV attention of layer `l` on normalised input `h` [b, t, d] -> [b, t, d].
    pub fn attention(&self, l: usize, h: &Tensor) -> Tensor {
        let q = self.queries(l, h);
        let k = self.keys(l, h);
        let v = self.values(l, h);
        self.attend(l, &q, &k, &v)
    }

    /// SwiGLU of this rank's share of the hidden width (a partial sum under
    /// tensor parallelism).
    pub fn ffn(&self, l: usize, h: &Tensor) -> Tensor {
        let f = &self.ids.layer(l).ffn;
        self.linear(&self.gated(h, f.gate, f.up), f.down)
    }

    /// Transformer block `l`: pre-norm attention and SwiGLU FFN with residuals.
    pub fn block(&self, l: usize, x: &Tensor) -> Tensor {
        let ids = &self.ids.layer(l);
        let a = self.attention(l, &self.norm_in(x, ids.attn.norm));
        let (x, h) = self.add_norm_in(x, &a, ids.ffn.norm);
        &x + self.ffn(l, &h)
    }

    /// Output projection of normalised states: [b, t, d] -> logits of this
    /// rank's vocabulary rows [b, t, rows] (parameter dtype).
    pub fn head_logits(&self, h: &Tensor) -> Tensor {
        self.linear(h, held(self.ids.head, "the output head"))
            .to_kind(self.params.flat.kind())
    }

    /// Final norm and output projection: [b, t, d] -> logits [b, t, vocab] (parameter dtype).
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.head_logits(&self.norm_in(x, held(self.ids.final_norm, "the final norm")))
    }

    /// Sum of next-token cross-entropy over all positions: the head segment.
    pub fn head_loss_sum(&self, x: &Tensor, targets: &Tensor) -> Tensor {
        self.head_loss_sum_chunked(x, targets, 0)
    }

    /// `head_loss_sum` over chunks of `chunk` tokens (0 or at least all the
    /// tokens: one piece, exactly `head_loss_sum`). Without gradients only the
    /// current chunk's logits exist; with gradients every chunk keeps its
    /// graph, so training chunks through the engine instead.
    pub fn head_loss_sum_chunked(&self, x: &Tensor, targets: &Tensor, chunk: usize) -> Tensor {
        let n = x.size()[0] * x.size()[1];
        if chunk == 0 || n <= chunk as i64 {
            return self.head_loss_sum_whole(x, targets);
        }
        let d = x.size()[2];
        let (xf, tf) = (x.reshape([1, n, d]), targets.reshape([1, n]));
        let mut total: Option<Tensor> = None;
        for (s, len) in chunks(n, chunk as i64) {
            let l = self.head_loss_sum_whole(&xf.narrow(1, s, len), &tf.narrow(1, s, len));
            total = Some(match total {
                Some(t) => t + l,
                None => l,
            });
        }
        total.expect("at least one chunk")
    }

    /// The loss of `x` in one piece (the engine's chunked backward calls it
    /// per chunk). On a GPU in bf16, cross-entropy over the bf16 logits by
    /// the training kernels (`train_kernels::cross_entropy_sum`: no fp32
    /// copy of the logits, no log-softmax kept for backward, the gradient
    /// written in bf16 in one pass); elsewhere libtorch's cross-entropy over
    /// the logits in the parameter dtype.
    pub fn head_loss_sum_whole(&self, x: &Tensor, targets: &Tensor) -> Tensor {
        let h = self.norm_in(x, held(self.ids.final_norm, "the final norm"));
        let logits = self.linear(&h, held(self.ids.head, "the output head"));
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

thread_local! {
    /// Attention calls on this thread, and how many of them SDPA ran on its
    /// math path.
    static SDPA_CALLS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// Merged gate/up matmuls of a frozen model on this thread.
    static MERGED_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Gate/up pairs that a frozen model ran as one matmul on this thread so far.
pub fn frozen_merged_calls_on_this_thread() -> u64 {
    MERGED_CALLS.with(|c| c.get())
}

/// (attention calls, of which on SDPA's math path) on this thread so far.
pub fn sdpa_calls_on_this_thread() -> (u64, u64) {
    SDPA_CALLS.with(|c| c.get())
}

/// Ask libtorch which SDPA backend these inputs get (a host-side check, no
/// device work), count it, and warn once per process when a causal
/// attention on a GPU would run the math path: O(t^2) memory and, for bf16
/// inputs, fp32 matmuls, many times slower than cuDNN or flash. A layout
/// whose head dimension is not the fastest, unequal key and value head
/// counts or an unsupported head size send it there.
fn note_sdpa_backend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    gqa: bool,
) {
    const MATH: i64 = 0; // libtorch's SDPBackend::math
    let choice =
        Tensor::f_internal_fused_sdp_choice(q, k, v, mask, 0.0, mask.is_none(), scale, gqa)
            .unwrap_or(-1);
    SDPA_CALLS.with(|c| {
        let (n, m) = c.get();
        c.set((n + 1, m + u64::from(choice == MATH)));
    });
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if choice == MATH
        && mask.is_none()
        && q.device().is_cuda()
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        let d = |t: &Tensor| format!("{:?} strides {:?} {:?}", t.size(), t.stride(), t.kind());
        eprintln!(
            "warning: attention runs on SDPA's math path (O(t^2) memory, fp32 matmuls for bf16), far slower than a fused backend: q {}, k {}, v {}",
            d(q),
            d(k),
            d(v)
        );
    }
}
