//! The SIGMA model, written once for a single device and knowing nothing about
//! distribution. Execution is split into segments (`embed`, one `block` per
//! layer, `head`) that the engine (engine.rs) chains and joins at boundaries.
//!
//! DiffQKV attention: `num_q_heads` query heads, `num_k_heads` key heads and
//! `num_v_heads` value heads with contiguous groups, `k_head(i) = i / (n_q / n_k)`,
//! `v_head(i) = i / (n_q / n_v)`. Training repeats the smaller of K and V so both
//! have `max(n_k, n_v)` heads (the composition of contiguous groups is again
//! contiguous, so the mapping is unchanged) and runs grouped-query SDPA.
//! AugQ: `q = W_down(silu(W_gate q0) * W_up q0)` on the whole projected query.
//! K compression: see `KCompression`. Mixed precision: parameters stay fp32;
//! each matmul casts its inputs to the compute dtype (bf16 on GPU), norms,
//! residual stream and the loss run in fp32. (tch's autocast cannot select
//! bf16, hence explicit casts at the matmuls, which is what autocast does.)

use std::cell::RefCell;
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::config::{KCompression, ModelConfig};
use crate::params::{ParamKind, ParamSpec, Params};

pub struct Model {
    pub cfg: ModelConfig,
    pub params: Params,
    /// dtype of matmul inputs (BFloat16 for mixed precision, else the parameter dtype).
    pub compute: Kind,
    rope: RefCell<HashMap<(i64, i64), (Tensor, Tensor)>>,
}

/// The parameters of a config, named after the module tree.
pub fn param_specs(c: &ModelConfig) -> Vec<ParamSpec> {
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
    let mut s = vec![ParamSpec {
        name: "embed.weight".into(),
        shape: vec![c.vocab_size as i64, d],
        kind: ParamKind::Embedding,
    }];
    let mut p = |name: String, shape: Vec<i64>, kind| s.push(ParamSpec { name, shape, kind });
    for l in 0..c.num_layers {
        let pre = format!("layers.{l}");
        p(format!("{pre}.attn_norm.weight"), vec![d], ParamKind::Norm);
        p(
            format!("{pre}.attn.q_proj.weight"),
            vec![nq * dd, d],
            ParamKind::Linear,
        );
        if c.aug_q_dim > 0 {
            let a = c.aug_q_dim as i64;
            p(
                format!("{pre}.attn.aug_q.gate.weight"),
                vec![a, nq * dd],
                ParamKind::Linear,
            );
            p(
                format!("{pre}.attn.aug_q.up.weight"),
                vec![a, nq * dd],
                ParamKind::Linear,
            );
            p(
                format!("{pre}.attn.aug_q.down.weight"),
                vec![nq * dd, a],
                ParamKind::Linear,
            );
        }
        p(
            format!("{pre}.attn.k_proj.weight"),
            vec![nk * dk, d],
            ParamKind::Linear,
        );
        if c.k_compression == KCompression::Projected {
            p(
                format!("{pre}.attn.k_up.weight"),
                vec![dd, dk],
                ParamKind::Linear,
            );
        }
        p(
            format!("{pre}.attn.v_proj.weight"),
            vec![nv * dv, d],
            ParamKind::Linear,
        );
        p(
            format!("{pre}.attn.o_proj.weight"),
            vec![d, nq * dv],
            ParamKind::ResidualOut,
        );
        p(format!("{pre}.ffn_norm.weight"), vec![d], ParamKind::Norm);
        p(
            format!("{pre}.ffn.gate.weight"),
            vec![c.ffn_dim as i64, d],
            ParamKind::Linear,
        );
        p(
            format!("{pre}.ffn.up.weight"),
            vec![c.ffn_dim as i64, d],
            ParamKind::Linear,
        );
        p(
            format!("{pre}.ffn.down.weight"),
            vec![d, c.ffn_dim as i64],
            ParamKind::ResidualOut,
        );
    }
    p("final_norm.weight".into(), vec![d], ParamKind::Norm);
    if !c.tie_embeddings {
        p(
            "lm_head.weight".into(),
            vec![c.vocab_size as i64, d],
            ParamKind::Embedding,
        );
    }
    s
}

impl Model {
    /// Build and initialise (seeded, on CPU, then moved). `mixed`: bf16 matmuls.
    pub fn new(
        cfg: &ModelConfig,
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
        let params = Params::new(
            param_specs(cfg),
            decayed,
            seed,
            cfg.init_std,
            cfg.num_layers,
            device,
        );
        Model {
            cfg: cfg.clone(),
            params,
            compute: if mixed { Kind::BFloat16 } else { Kind::Float },
            rope: RefCell::new(HashMap::new()),
        }
    }

    /// The same model in float64 (tests: references and finite differences).
    pub fn to_double(mut self) -> Model {
        let flat = self.params.flat.to_kind(Kind::Double);
        self.params.tensors = self
            .params
            .specs
            .iter()
            .zip(&self.params.offsets)
            .map(|(s, &o)| {
                flat.narrow(0, o, s.numel())
                    .view(s.shape.as_slice())
                    .set_requires_grad(true)
            })
            .collect();
        self.params.flat = flat;
        self.compute = Kind::Double;
        self
    }

    /// Indices (into `params`) of the parameters a segment uses.
    pub fn segment_params(&self, seg: crate::engine::Segment) -> Vec<usize> {
        use crate::engine::Segment;
        let prefix = match seg {
            Segment::Embed => "embed.".to_string(),
            Segment::Block(l) => format!("layers.{l}."),
            Segment::Head => String::new(),
        };
        let head_weight = if self.cfg.tie_embeddings {
            "embed.weight"
        } else {
            "lm_head.weight"
        };
        (0..self.params.specs.len())
            .filter(|&i| {
                let n = &self.params.specs[i].name;
                match seg {
                    Segment::Head => n == "final_norm.weight" || n == head_weight,
                    _ => n.starts_with(&prefix),
                }
            })
            .collect()
    }

    fn p(&self, name: &str) -> &Tensor {
        self.params.get(name)
    }

    fn mm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        if x.kind() == self.compute && w.kind() == self.compute {
            x.linear::<Tensor>(w, None)
        } else {
            x.to_kind(self.compute)
                .linear::<Tensor>(&w.to_kind(self.compute), None)
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let k = w.kind();
        let xf = x.to_kind(k);
        let ms = xf.pow_tensor_scalar(2).mean_dim(-1, true, k);
        xf * (ms + self.cfg.norm_eps).rsqrt() * w
    }

    /// cos/sin tables [t, dim/2] for positions 0..t (angles computed in f64).
    fn rope_tables(&self, t: i64, dim: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
        let mut cache = self.rope.borrow_mut();
        let (c, s) = cache.entry((t, dim)).or_insert_with(|| {
            let opts = (Kind::Double, Device::Cpu);
            let inv = (Tensor::arange_start_step(0, dim, 2, opts) / dim as f64
                * -(self.cfg.rope_theta.ln()))
            .exp();
            let ang = Tensor::arange(t, opts).unsqueeze(1) * inv.unsqueeze(0);
            (ang.cos().to_device(device), ang.sin().to_device(device))
        });
        (c.to_kind(kind), s.to_kind(kind))
    }

    /// Rotary embedding on [b, h, t, dim], rotating the two halves of each head.
    fn rope(&self, x: &Tensor) -> Tensor {
        let (t, dim) = (x.size()[2], x.size()[3]);
        let (cos, sin) = self.rope_tables(t, dim, x.device(), x.kind());
        let x1 = x.narrow(-1, 0, dim / 2);
        let x2 = x.narrow(-1, dim / 2, dim / 2);
        Tensor::cat(&[&x1 * &cos - &x2 * &sin, &x2 * &cos + &x1 * &sin], -1)
    }

    /// Token ids [b, t] -> hidden states [b, t, d] (parameter dtype).
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(self.p("embed.weight"), tokens, -1, false, false)
    }

    /// Query heads after projection, AugQ, head split and RoPE: [b, n_q, t, dot_dim].
    pub fn queries(&self, l: usize, h: &Tensor) -> Tensor {
        let c = &self.cfg;
        let (b, t) = (h.size()[0], h.size()[1]);
        let pre = format!("layers.{l}.attn");
        let q0 = self.mm(h, self.p(&format!("{pre}.q_proj.weight")));
        let q = if c.aug_q_dim > 0 {
            let g = self
                .mm(&q0, self.p(&format!("{pre}.aug_q.gate.weight")))
                .silu();
            let u = self.mm(&q0, self.p(&format!("{pre}.aug_q.up.weight")));
            self.mm(&(g * u), self.p(&format!("{pre}.aug_q.down.weight")))
        } else {
            q0
        };
        self.rope(
            &q.view([b, t, c.num_q_heads as i64, c.dot_dim() as i64])
                .transpose(1, 2),
        )
    }

    /// Key heads after projection, optional up-projection and RoPE: [b, n_k, t, dot_dim].
    pub fn keys(&self, l: usize, h: &Tensor) -> Tensor {
        let c = &self.cfg;
        let (b, t) = (h.size()[0], h.size()[1]);
        let pre = format!("layers.{l}.attn");
        let k = self.mm(h, self.p(&format!("{pre}.k_proj.weight"))).view([
            b,
            t,
            c.num_k_heads as i64,
            c.k_cache_dim() as i64,
        ]);
        let k = if c.k_compression == KCompression::Projected {
            self.mm(&k, self.p(&format!("{pre}.k_up.weight")))
        } else {
            k
        };
        self.rope(&k.transpose(1, 2))
    }

    /// Value heads: [b, n_v, t, v_head_dim].
    pub fn values(&self, l: usize, h: &Tensor) -> Tensor {
        let c = &self.cfg;
        let (b, t) = (h.size()[0], h.size()[1]);
        let v = self.mm(h, self.p(&format!("layers.{l}.attn.v_proj.weight")));
        v.view([b, t, c.num_v_heads as i64, c.v_head_dim as i64])
            .transpose(1, 2)
    }

    /// DiffQKV attention of layer `l` on normalised input `h` [b, t, d] -> [b, t, d].
    pub fn attention(&self, l: usize, h: &Tensor) -> Tensor {
        let c = &self.cfg;
        let (b, t) = (h.size()[0], h.size()[1]);
        let (nq, nk, nv) = (
            c.num_q_heads as i64,
            c.num_k_heads as i64,
            c.num_v_heads as i64,
        );
        let q = self.queries(l, h);
        let mut k = self.keys(l, h);
        let mut v = self.values(l, h);
        if nk < nv {
            k = k.repeat_interleave_self_int(nv / nk, 1, None);
        } else if nv < nk {
            v = v.repeat_interleave_self_int(nk / nv, 1, None);
        }
        let kv_heads = nk.max(nv);
        let (q, k, v) = (
            q.to_kind(self.compute),
            k.to_kind(self.compute),
            v.to_kind(self.compute),
        );
        let scale = 1.0 / (c.dot_dim() as f64).sqrt();
        let o = Tensor::scaled_dot_product_attention::<Tensor>(
            &q,
            &k,
            &v,
            None,
            0.0,
            true,
            scale,
            nq != kv_heads,
        );
        let o = o.transpose(1, 2).reshape([b, t, nq * c.v_head_dim as i64]);
        self.mm(&o, self.p(&format!("layers.{l}.attn.o_proj.weight")))
    }

    pub fn ffn(&self, l: usize, h: &Tensor) -> Tensor {
        let pre = format!("layers.{l}.ffn");
        let g = self.mm(h, self.p(&format!("{pre}.gate.weight"))).silu();
        let u = self.mm(h, self.p(&format!("{pre}.up.weight")));
        self.mm(&(g * u), self.p(&format!("{pre}.down.weight")))
    }

    /// Transformer block `l`: pre-norm attention and SwiGLU FFN with residuals.
    pub fn block(&self, l: usize, x: &Tensor) -> Tensor {
        let x = x + self.attention(
            l,
            &self.rms_norm(x, self.p(&format!("layers.{l}.attn_norm.weight"))),
        );
        let h = self.rms_norm(&x, self.p(&format!("layers.{l}.ffn_norm.weight")));
        &x + self.ffn(l, &h)
    }

    /// Final norm and output projection: [b, t, d] -> logits [b, t, vocab] (parameter dtype).
    pub fn logits(&self, x: &Tensor) -> Tensor {
        let h = self.rms_norm(x, self.p("final_norm.weight"));
        let w = if self.cfg.tie_embeddings {
            self.p("embed.weight")
        } else {
            self.p("lm_head.weight")
        };
        self.mm(&h, w).to_kind(self.params.flat.kind())
    }

    /// Sum of next-token cross-entropy over all positions: the head segment.
    pub fn head_loss_sum(&self, x: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.logits(x);
        let v = logits.size()[2];
        logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(
            &targets.reshape([-1]),
            None,
            tch::Reduction::Sum,
            -100,
            0.0,
        )
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
