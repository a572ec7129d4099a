//! The transformer block, defined once: its weights ([`LayerWeight`], each
//! declared with its shape, decay class and tensor-parallel split), its
//! parts ([`Part`], each a function of the model), and how values flow
//! between the parts ([`wiring`]). Three runners walk the same wiring:
//! [`Fwd::block`] (one device: a whole block, one autograd segment), the
//! engine (a part per segment, with the collectives the tensor-parallel plan
//! puts on the edges) and generation (which caches keys and values at the
//! `Qkv` part and attends against the cache at `Attend`).
//!
//! DiffQKV attention: `num_q_heads` query heads, `num_k_heads` key heads and
//! `num_v_heads` value heads with contiguous groups, `k_head(i) = i / (n_q / n_k)`,
//! `v_head(i) = i / (n_q / n_v)`. Training repeats the smaller of K and V so both
//! have `max(n_k, n_v)` heads (the composition of contiguous groups is again
//! contiguous, so the mapping is unchanged) and runs grouped-query SDPA.
//! AugQ: `q = W_down(silu(W_gate q0) * W_up q0)` on the whole projected query.
//! K compression: see `KCompression`.
//!
//! To add a weight to the block: a [`LayerWeight`] variant, its row in
//! `ALL`, `declare`, `path`, `component` and `part`, and its use in the
//! part's function below. Nothing else names it: checkpoints, the
//! summary, the optimizer, buckets and the tensor-parallel plan read the
//! declaration.

use std::cell::Cell;

use tch::Tensor;

use crate::config::{KCompression, ModelConfig};
use crate::model::decl::{Decl, ParamKind, Split};
use crate::model::positions::Positions;
use crate::model::Fwd;

/// A weight of a transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerWeight {
    AttnNorm,
    QProj,
    AugQGate,
    AugQUp,
    AugQDown,
    KProj,
    /// K compression, "projected" reading: `k_dim` -> `qk_head_dim`.
    KUp,
    VProj,
    OProj,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
}

use LayerWeight as W;

/// The q, k and v projections, in the order their products are returned.
pub const QKV: [LayerWeight; 3] = [W::QProj, W::KProj, W::VProj];

impl LayerWeight {
    /// In model order (initialisation draws them in this order).
    pub const ALL: [LayerWeight; 13] = [
        W::AttnNorm,
        W::QProj,
        W::AugQGate,
        W::AugQUp,
        W::AugQDown,
        W::KProj,
        W::KUp,
        W::VProj,
        W::OProj,
        W::FfnNorm,
        W::FfnGate,
        W::FfnUp,
        W::FfnDown,
    ];

    /// The whole weight under `c`, or None when `c` has no such weight.
    pub fn declare(self, c: &ModelConfig) -> Option<Decl> {
        let d = c.d_model as i64;
        let (nq, nk, nv) = (
            c.num_q_heads as i64,
            c.num_k_heads as i64,
            c.num_v_heads as i64,
        );
        let (dd, dk, dv) = (
            c.dot_dim() as i64,
            c.k_cache_dim() as i64,
            c.v_head_dim as i64,
        );
        let (a, f) = (c.aug_q_dim as i64, c.ffn_dim as i64);
        let aug = c.aug_q_dim > 0;
        let (lin, res, norm) = (ParamKind::Linear, ParamKind::ResidualOut, ParamKind::Norm);
        let decl = |shape: Vec<i64>, kind, split| Some(Decl::new(shape, kind, split));
        match self {
            W::AttnNorm | W::FfnNorm => decl(vec![d], norm, Split::Replicated),
            W::QProj => decl(vec![nq * dd, d], lin, Split::Rows),
            W::AugQGate | W::AugQUp if aug => decl(vec![a, nq * dd], lin, Split::Rows),
            W::AugQDown if aug => decl(vec![nq * dd, a], lin, Split::Cols),
            W::AugQGate | W::AugQUp | W::AugQDown => None,
            W::KProj => decl(vec![nk * dk, d], lin, Split::KeyHeads),
            W::KUp if c.k_compression == KCompression::Projected => {
                decl(vec![dd, dk], lin, Split::ReplicatedPartialGrad)
            }
            W::KUp => None,
            W::VProj => decl(vec![nv * dv, d], lin, Split::ValueHeads),
            W::OProj => decl(vec![d, nq * dv], res, Split::Cols),
            W::FfnGate | W::FfnUp => decl(vec![f, d], lin, Split::Rows),
            W::FfnDown => decl(vec![d, f], res, Split::Cols),
        }
    }

    /// Its path in the module tree (`layers.N.<path>.weight`).
    pub fn path(self) -> &'static str {
        match self {
            W::AttnNorm => "attn_norm",
            W::QProj => "attn.q_proj",
            W::AugQGate => "attn.aug_q.gate",
            W::AugQUp => "attn.aug_q.up",
            W::AugQDown => "attn.aug_q.down",
            W::KProj => "attn.k_proj",
            W::KUp => "attn.k_up",
            W::VProj => "attn.v_proj",
            W::OProj => "attn.o_proj",
            W::FfnNorm => "ffn_norm",
            W::FfnGate => "ffn.gate",
            W::FfnUp => "ffn.up",
            W::FfnDown => "ffn.down",
        }
    }

    /// The component it counts under in `sigma model summary`.
    pub fn component(self) -> &'static str {
        match self {
            W::AttnNorm | W::FfnNorm => "norms",
            W::QProj => "attention q_proj",
            W::AugQGate | W::AugQUp | W::AugQDown => "attention AugQ",
            W::KProj => "attention k_proj",
            W::KUp => "attention k_up (K compression)",
            W::VProj => "attention v_proj",
            W::OProj => "attention o_proj",
            W::FfnGate | W::FfnUp | W::FfnDown => "ffn (SwiGLU)",
        }
    }

    /// The part of the block that reads it.
    pub fn part(self) -> Part {
        match self {
            W::AttnNorm => Part::AttnNorm,
            W::QProj | W::KProj | W::KUp | W::VProj => Part::Qkv,
            W::AugQGate | W::AugQUp | W::AugQDown => Part::AugQ,
            W::OProj => Part::Attend,
            W::FfnNorm => Part::AddNorm,
            W::FfnGate | W::FfnUp | W::FfnDown => Part::Ffn,
        }
    }
}

/// A piece of the block: a function of its input values and weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// [x] -> [h]: the attention norm (fp32 stream in, compute dtype out).
    AttnNorm,
    /// [h] -> [q0 features, k heads (after RoPE), v heads].
    Qkv,
    /// [q0 features] -> [q features]: AugQ (under tensor parallelism over this
    /// rank's share of its width, a partial sum).
    AugQ,
    /// [q features, k, v] -> [o]: RoPE of the queries, attention of this
    /// rank's heads, o_proj (a partial sum under tensor parallelism).
    Attend,
    /// [x, o] -> [x2, h2]: the residual add and the FFN norm.
    AddNorm,
    /// [h2] -> [f]: SwiGLU (a partial sum under tensor parallelism).
    Ffn,
    /// [x2, f] -> [y]: the residual add.
    Add,
}

/// The values flowing through a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Val {
    X,
    H,
    Q0,
    Q,
    K,
    V,
    O,
    X2,
    H2,
    F,
    Y,
}

impl Val {
    pub const COUNT: usize = 11;
}

/// One part and the values it reads and writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wire {
    pub part: Part,
    pub inputs: Vec<Val>,
    pub outputs: Vec<Val>,
}

/// The block of `c`: its parts in order and the values between them. The
/// input is `X`, the output `Y`. Without AugQ there is no `AugQ` part and
/// `Attend` reads `Q0`.
pub fn wiring(c: &ModelConfig) -> Vec<Wire> {
    let aug = c.aug_q_dim > 0;
    let q = if aug { Val::Q } else { Val::Q0 };
    let w = |part, inputs: &[Val], outputs: &[Val]| Wire {
        part,
        inputs: inputs.to_vec(),
        outputs: outputs.to_vec(),
    };
    let mut v = vec![
        w(Part::AttnNorm, &[Val::X], &[Val::H]),
        w(Part::Qkv, &[Val::H], &[Val::Q0, Val::K, Val::V]),
    ];
    if aug {
        v.push(w(Part::AugQ, &[Val::Q0], &[Val::Q]));
    }
    v.extend([
        w(Part::Attend, &[q, Val::K, Val::V], &[Val::O]),
        w(Part::AddNorm, &[Val::X, Val::O], &[Val::X2, Val::H2]),
        w(Part::Ffn, &[Val::H2], &[Val::F]),
        w(Part::Add, &[Val::X2, Val::F], &[Val::Y]),
    ]);
    v
}

/// The values of one block as a runner fills them in.
pub struct Vals(Vec<Option<Tensor>>);

impl Default for Vals {
    fn default() -> Self {
        Vals((0..Val::COUNT).map(|_| None).collect())
    }
}

impl Vals {
    pub fn set(&mut self, v: Val, t: Tensor) {
        self.0[v as usize] = Some(t);
    }
    pub fn get(&self, v: Val) -> &Tensor {
        match &self.0[v as usize] {
            Some(t) => t,
            None => panic!("block value {v:?} read before it was computed"),
        }
    }
    pub fn has(&self, v: Val) -> bool {
        self.0[v as usize].is_some()
    }
    pub fn take(&mut self, v: Val) -> Option<Tensor> {
        self.0[v as usize].take()
    }
    /// The inputs of `wire`, in order.
    pub fn inputs(&self, wire: &Wire) -> Vec<Tensor> {
        wire.inputs
            .iter()
            .map(|&v| self.get(v).shallow_clone())
            .collect()
    }
    /// Store the outputs of `wire`.
    pub fn outputs(&mut self, wire: &Wire, outs: Vec<Tensor>) {
        for (&v, t) in wire.outputs.iter().zip(outs) {
            self.set(v, t);
        }
    }
}

impl Fwd<'_> {
    /// Part `part` of block `l` on its inputs (in the order of its wire).
    pub fn part(&self, l: usize, part: Part, x: &[Tensor]) -> Vec<Tensor> {
        match part {
            Part::AttnNorm => vec![self.norm_in(&x[0], self.lid(l, W::AttnNorm))],
            Part::Qkv => self.qkv(l, &x[0]),
            Part::AugQ => vec![self.aug_q(l, &x[0])],
            Part::Attend => vec![self.attend(l, &self.query_heads(&x[0]), &x[1], &x[2])],
            Part::AddNorm => {
                let (x2, h2) = self.add_norm_in(&x[0], &x[1], self.lid(l, W::FfnNorm));
                vec![x2, h2]
            }
            Part::Ffn => vec![self.ffn(l, &x[0])],
            Part::Add => vec![&x[0] + &x[1]],
        }
    }

    /// Transformer block `l` on one device: pre-norm attention and SwiGLU
    /// FFN with residuals, its parts run in the order of [`wiring`].
    pub fn block(&self, l: usize, x: &Tensor) -> Tensor {
        let mut vals = Vals::default();
        vals.set(Val::X, x.shallow_clone());
        for wire in wiring(&self.cfg) {
            let outs = self.part(l, wire.part, &vals.inputs(&wire));
            vals.outputs(&wire, outs);
        }
        vals.take(Val::Y).expect("the block's output")
    }

    /// The attention of block `l` on its normalised input `h` (one device):
    /// the wiring's parts from `Qkv` to `Attend`.
    pub fn attention(&self, l: usize, h: &Tensor) -> Tensor {
        let mut vals = Vals::default();
        vals.set(Val::H, h.shallow_clone());
        let attn = |w: &&Wire| matches!(w.part, Part::Qkv | Part::AugQ | Part::Attend);
        for wire in wiring(&self.cfg).iter().filter(attn) {
            let outs = self.part(l, wire.part, &vals.inputs(wire));
            vals.outputs(wire, outs);
        }
        vals.take(Val::O).expect("the attention's output")
    }

    /// [q0, keys, values] of block `l` from its normalised input `h`: the
    /// three projections ([`Fwd::qkv_products`]), then the key heads
    /// ([`Fwd::keys_of`]) and the value heads ([`Fwd::value_heads`]).
    fn qkv(&self, l: usize, h: &Tensor) -> Vec<Tensor> {
        let [q0, k, v] = self.qkv_products(l, h);
        vec![q0, self.keys_of(l, &k), self.value_heads(&v)]
    }

    /// The q, k and v products of block `l` on `h` [b, t, d], as
    /// [`Fwd::linears`] computes weights that read one input: `h` quantised
    /// once for FP8 weights; one matrix-vector launch while decoding.
    pub fn qkv_products(&self, l: usize, h: &Tensor) -> [Tensor; 3] {
        self.linears(h, &QKV.map(|w| self.lid(l, w)))
            .try_into()
            .expect("three products")
    }

    /// AugQ on a whole projected query [b, t, n_q * dot_dim]; under tensor
    /// parallelism this rank's share of the AugQ width, a partial sum.
    pub fn aug_q(&self, l: usize, q0: &Tensor) -> Tensor {
        let g = self.gated(q0, self.lid(l, W::AugQGate), self.lid(l, W::AugQUp));
        self.linear(&g, self.lid(l, W::AugQDown))
    }

    /// Query features [b, t, heads * dot_dim] -> heads with RoPE: [b, heads, t, dot_dim].
    pub fn query_heads(&self, q: &Tensor) -> Tensor {
        let (b, t, dd) = (q.size()[0], q.size()[1], self.cfg.dot_dim() as i64);
        self.rope_seq(&q.view([b, t, -1, dd])).transpose(1, 2)
    }

    /// `query_heads` at positions `at` (decoding).
    pub fn query_heads_at(&self, q: &Tensor, at: Positions<'_>) -> Tensor {
        let (b, t, dd) = (q.size()[0], q.size()[1], self.cfg.dot_dim() as i64);
        self.rope(&q.view([b, t, -1, dd]), at).transpose(1, 2)
    }

    /// Key heads from the k_proj product [b, t, k_heads * k_cache_dim]:
    /// optional up-projection and RoPE: [b, k_heads, t, dot_dim].
    fn keys_of(&self, l: usize, k_proj: &Tensor) -> Tensor {
        let k = self.key_heads_raw(k_proj);
        let k = match self.try_lid(l, W::KUp) {
            Some(up) => self.linear(&k, up),
            None => k,
        };
        self.rope_seq(&k).transpose(1, 2)
    }

    /// The k_proj product [b, t, k_heads * k_cache_dim] as key heads, what
    /// a KV cache stores under the projected reading: [b, t, k_heads,
    /// k_cache_dim], before any up-projection and RoPE.
    pub fn key_heads_raw(&self, k: &Tensor) -> Tensor {
        let (b, t) = (k.size()[0], k.size()[1]);
        k.view([b, t, self.heads.k as i64, self.cfg.k_cache_dim() as i64])
    }

    /// Raw keys [b, t, k_heads, k_cache_dim] at positions `at` -> keys for
    /// the dot product [b, k_heads, t, dot_dim]: the projected reading's
    /// up-projection, then RoPE.
    pub fn keys_from_raw(&self, l: usize, k: &Tensor, at: Positions<'_>) -> Tensor {
        let k = match self.try_lid(l, W::KUp) {
            Some(up) => self.linear(k, up),
            None => k.shallow_clone(),
        };
        self.rope(&k, at).transpose(1, 2)
    }

    /// The v_proj product [b, t, v_heads * v_head_dim] as value heads.
    pub fn value_heads(&self, v: &Tensor) -> Tensor {
        let (b, t) = (v.size()[0], v.size()[1]);
        v.view([b, t, self.heads.v as i64, self.cfg.v_head_dim as i64])
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
        self.attend_out(l, &self.attend_core(q, k, v, mask))
    }

    /// The output projection of the attention heads' outputs `[b, t, n_q d_v]`.
    pub fn attend_out(&self, l: usize, o: &Tensor) -> Tensor {
        self.linear(o, self.lid(l, W::OProj))
    }

    /// Attention of the query heads `q` [b, n_q, t, d_qk] to `k` and `v`
    /// (causal unless `mask`): the heads' outputs side by side, `[b, t, n_q d_v]`.
    pub fn attend_core(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, t) = (q.size()[0], q.size()[2]);
        let (nq, nk, nv) = (
            self.heads.q as i64,
            self.heads.k as i64,
            self.heads.v as i64,
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
        let o = crate::kernels::sdpa::attention(
            &q,
            &k,
            &v,
            mask,
            mask.is_none(),
            scale,
            nq != kv_heads,
        );
        o.transpose(1, 2)
            .reshape([b, t, nq * self.cfg.v_head_dim as i64])
    }

    /// SwiGLU of this rank's share of the hidden width (a partial sum under
    /// tensor parallelism).
    pub fn ffn(&self, l: usize, h: &Tensor) -> Tensor {
        let g = self.gated(h, self.lid(l, W::FfnGate), self.lid(l, W::FfnUp));
        self.linear(&g, self.lid(l, W::FfnDown))
    }
}

thread_local! {
    /// Attention calls on this thread, and how many of them SDPA ran on its
    /// math path.
    static SDPA_CALLS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
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
