//! Generation: prefill the prompts with the training attention, then decode
//! one token per sequence per step against a KV cache that holds what
//! DiffQKV makes small: `n_k` key heads at the cached K dimension and `n_v`
//! value heads, never K repeated to the query heads. Both walk the block's
//! wiring as training does (`model::block`), with the cache at the `Qkv`
//! and `Attend` parts.
//!
//! Cache layout per layer (preallocated for prompt + new tokens):
//! - keys [b, n_k, capacity, d]: after RoPE for standard and
//!   native-compressed K (d = k_cache_dim). For the projected reading, by
//!   default ([`KeyCache::Expanded`]) the keys as attention reads them,
//!   up-projected and rotated once when written (d = the dot-product
//!   dimension), so a step reads the cache once; or
//!   ([`KeyCache::Compressed`], the smallest cache) the compressed keys
//!   before the up-projection and RoPE (d = k_dim), both applied to every
//!   cached key at every step (RoPE acts on the up-projected vector, so a
//!   rotated compressed key cannot exist);
//! - values [b, n_v, capacity, d_v].
//!
//! Batches of prompts of different lengths are left-padded: a sequence's
//! padding slots are masked out of every attention, and its positions count
//! from its first slot (RoPE depends only on the distance between query and
//! key, so the offset changes nothing but rounding).

use tch::{Device, Kind, Tensor};

pub use super::cache::{KeyCache, KvCache};
use super::decoder::{Decoder, StepMode};
use crate::error::{Result, TrainError};
use crate::kernels::decode::NewToken;
use crate::model::block::{wiring, LayerWeight as W, Part, Val, Vals, QKV};
use crate::model::key::ParamKey;
use crate::model::positions::Positions;
use crate::model::Fwd;
use sigma_data::rng::SplitMix64;

#[cfg(test)]
thread_local! {
    /// The attention shapes that decoding steps of this thread asked for
    /// (tests: what `infer::prebuild` must build).
    pub(crate) static STEP_SHAPES: std::cell::RefCell<Vec<crate::kernels::decode::DecodeShape>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Attention of one new query per sequence against `len` cached slots,
/// without repeating K or V. q [b, n_q, 1, dd], k [b, n_k, S, dd],
/// v [b, n_v, S, dv], valid [b, S] (None: every slot) -> [b, 1, n_q * dv].
/// On a GPU in bf16 the fused decode kernel runs ([`crate::kernels::decode`]);
/// elsewhere, and for shapes it does not take, [`decode_attention_ops`].
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    valid: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(test)]
    STEP_SHAPES.with(|s| {
        s.borrow_mut().push(crate::kernels::decode::DecodeShape {
            n_q: q.size()[1],
            n_k: k.size()[1],
            n_v: v.size()[1],
            d_k: k.size()[3],
            d_v: v.size()[3],
        })
    });
    match crate::kernels::decode::decode_attention(q, k, v, valid, scale)? {
        Some(o) => Ok(o),
        None => Ok(decode_attention_ops(q, k, v, valid, scale)),
    }
}

/// [`decode_attention`] in tensor operations: scores per K head for its
/// group of query heads, probabilities regrouped by V head.
pub fn decode_attention_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    valid: Option<&Tensor>,
    scale: f64,
) -> Tensor {
    let (b, nq, dd) = (q.size()[0], q.size()[1], q.size()[3]);
    let (nk, s) = (k.size()[1], k.size()[2]);
    let (nv, dv) = (v.size()[1], v.size()[3]);
    // Query head i reads K head i / (n_q / n_k): contiguous groups, so a view.
    // Scores and softmax in fp32 at least (f64 stays f64).
    let acc = if q.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let scores = q
        .view([b, nk, nq / nk, dd])
        .matmul(&k.transpose(-1, -2))
        .to_kind(acc)
        * scale;
    let scores = match valid {
        Some(m) => scores.masked_fill(&m.logical_not().view([b, 1, 1, s]), f64::NEG_INFINITY),
        None => scores,
    };
    let p = scores.softmax(-1, acc).to_kind(v.kind());
    // ... and V head i / (n_q / n_v): the same query order, regrouped.
    let o = p.view([b, nv, nq / nv, s]).matmul(v);
    o.reshape([b, 1, nq * dv])
}

/// How a generation pass attends: prefill over the prompt with a mask, or
/// one decoding step against the cache.
enum Mode<'m> {
    Prefill {
        mask: &'m Tensor,
    },
    /// One token per sequence at slot `pos`, attending to slots `0..=pos`.
    Decode {
        pos: i64,
    },
    /// One token per sequence at the slot held by the device tensor `pos`
    /// ([1], int64), attending to the first `span` slots under the cache's
    /// slot mask: shapes and launches that do not depend on the position
    /// below `span`, so a CUDA graph can record them (infer::decoder).
    /// `rope`: the RoPE table's rows at `pos`, gathered once for every layer.
    Static {
        pos: &'m Tensor,
        span: i64,
        rope: &'m (Tensor, Tensor),
    },
}

impl Mode<'_> {
    /// The positions of the pass's tokens.
    fn positions(&self) -> Positions<'_> {
        match self {
            Mode::Prefill { .. } => Positions::From(0),
            Mode::Decode { pos } => Positions::From(*pos),
            Mode::Static { rope, .. } => Positions::Device {
                cos: &rope.0,
                sin: &rope.1,
            },
        }
    }
}

impl Fwd<'_> {
    /// Prefill `tokens` [b, t] (left-padded; `valid` [b, t] marks real
    /// tokens) into an empty cache; returns the logits of the last position [b, vocab].
    pub fn prefill(&self, cache: &mut KvCache, tokens: &Tensor, valid: &Tensor) -> Result<Tensor> {
        let (b, t) = (tokens.size()[0], tokens.size()[1]);
        if cache.len != 0 || t > cache.capacity {
            return Err(TrainError::internal_state(format!(
                "prefill of {t} tokens into a cache holding {} of {}",
                cache.len, cache.capacity
            )));
        }
        cache.valid.narrow(1, 0, t).copy_(valid);
        // Causal, and only real keys; a padding query sees itself (its output is never used).
        let causal = Tensor::ones([t, t], (Kind::Bool, tokens.device())).tril(0);
        let eye = Tensor::eye(t, (Kind::Bool, tokens.device()));
        let mask = causal
            .view([1, 1, t, t])
            .logical_and(&valid.view([b, 1, 1, t]))
            .logical_or(&eye.view([1, 1, t, t]));
        let h = self.run_blocks(cache, tokens, Mode::Prefill { mask: &mask })?;
        cache.len = t;
        Ok(self.head_logits(&h.narrow(1, t - 1, 1)).squeeze_dim(1))
    }

    /// One decoding step with static shapes: `tokens` [b] at the slot that
    /// `pos` ([1], int64, on the cache's device) holds, below `span` (at
    /// most the capacity), attending to the first `span` slots under the
    /// slot mask; returns logits [b, vocab]. Reads no value to the host and
    /// leaves `cache.len` to the caller, so a CUDA graph can record it
    /// (infer::decoder). Slots from `pos + 1` to `span` must be marked
    /// empty (a fresh cache's are).
    pub fn decode_step_static(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: &Tensor,
        span: i64,
    ) -> Result<Tensor> {
        let b = tokens.size()[0];
        if span > cache.capacity || span < 1 {
            return Err(TrainError::internal_state(format!(
                "a static decoding step over {span} slots of a cache of {}",
                cache.capacity
            )));
        }
        let _ = cache.valid.f_index_fill_(1, pos, 1)?;
        let rope = self.rope_rows(pos, span, self.cfg.dot_dim() as i64);
        let mode = Mode::Static {
            pos,
            span,
            rope: &rope,
        };
        let h = self.run_blocks(cache, &tokens.view([b, 1]), mode)?;
        Ok(self.head_logits(&h).squeeze_dim(1))
    }

    /// One decoding step: `tokens` [b] at the next slot; returns logits [b, vocab].
    pub fn decode_step(&self, cache: &mut KvCache, tokens: &Tensor) -> Result<Tensor> {
        let b = tokens.size()[0];
        let pos = cache.len;
        if pos >= cache.capacity {
            return Err(TrainError::internal_state(format!(
                "the KV cache is full ({} slots)",
                cache.capacity
            )));
        }
        let _ = cache.valid.narrow(1, pos, 1).fill_(1);
        let h = self.run_blocks(cache, &tokens.view([b, 1]), Mode::Decode { pos })?;
        cache.len = pos + 1;
        Ok(self.head_logits(&h).squeeze_dim(1))
    }

    /// The embedding and every block on `tokens`, walking the block's
    /// wiring (`model::block::wiring`) as training does, except that `Qkv`
    /// writes the new keys and values into the cache and `Attend` reads
    /// them from it; and that each norm runs with the products that read
    /// it (`Fwd::normed_products`: one launch while decoding a few rows),
    /// each residual add with the norm that follows it (the next block's
    /// attention norm, the FFN's norm, or the final norm). Returns the
    /// normalised output of the last block, the head's input.
    fn run_blocks(&self, cache: &mut KvCache, tokens: &Tensor, mode: Mode<'_>) -> Result<Tensor> {
        let wires = wiring(&self.cfg);
        let n = self.cfg.num_layers;
        // The working weights refreshed (if stale) before the first kernel:
        // the matrix-vector kernels read their weights before waiting on
        // the kernel launched just before them (kernels::gemv).
        if n > 0 {
            let _ = self.w(self.lid(0, W::QProj));
        }
        // The residual stream and the branch output not yet added to it.
        let mut stream = (self.embed(tokens), None::<Tensor>);
        for l in 0..n {
            let mut vals = Vals::default();
            // A static step's new keys and values, where `Attend` writes them.
            let mut new = None;
            for wire in &wires {
                match wire.part {
                    Part::AttnNorm | Part::AddNorm => {} // with the products that follow
                    Part::Qkv => new = self.qkv_cached(l, cache, &mut vals, &stream, &mode)?,
                    Part::Attend => {
                        let o = self.attend_cached(l, cache, &vals, &mode, new.take())?;
                        vals.set(Val::O, o);
                    }
                    Part::Ffn => {
                        let ids = [W::FfnGate, W::FfnUp].map(|w| self.lid(l, w));
                        let x_o = (vals.get(Val::X), Some(vals.get(Val::O)));
                        let (x2, mut g) =
                            self.normed_products(x_o, self.lid(l, W::FfnNorm), &ids, true);
                        let f = self.linear(&g.remove(0), self.lid(l, W::FfnDown));
                        vals.set(Val::X2, x2);
                        vals.set(Val::F, f);
                    }
                    Part::Add => {
                        let x2 = vals.take(Val::X2).expect("the FFN's residual stream");
                        stream = (x2, vals.take(Val::F));
                    }
                    part => {
                        let outs = self.part(l, part, &vals.inputs(wire));
                        vals.outputs(wire, outs);
                    }
                }
            }
        }
        let (x, f) = stream;
        let norm = self.id(ParamKey::FinalNorm);
        Ok(match f {
            Some(f) => self.add_norm_in(&x, &f, norm).1,
            None => self.norm_in(&x, norm),
        })
    }

    /// The `Qkv` part with a cache, on the attention norm of `stream` (the
    /// residual stream and a branch output to add first; the sum becomes
    /// the block's `X`): q0 and the values as training computes them, the
    /// keys before the projected reading's up-projection (what the cache
    /// keeps under it) and, otherwise, after RoPE at their positions; the
    /// new keys and values written into the cache. A static step whose
    /// cache keeps the keys as projected (no up-projection, not raw) writes
    /// them by [`Fwd::append_static`], or, where the attention kernel may
    /// write them itself (`kernels::decode::fold_append_enabled`), returns
    /// them for `Attend` (one launch less).
    fn qkv_cached(
        &self,
        l: usize,
        cache: &mut KvCache,
        vals: &mut Vals,
        (x, add): &(Tensor, Option<Tensor>),
        mode: &Mode<'_>,
    ) -> Result<Option<NewKv>> {
        // The norm, then q, k and v, which read its output: one launch while decoding.
        let norm = self.lid(l, W::AttnNorm);
        let ids = QKV.map(|w| self.lid(l, w));
        let (x, qkv) = self.normed_products((x, add.as_ref()), norm, &ids, false);
        let t = x.size()[1];
        vals.set(Val::X, x);
        let [q0, raw, v]: [Tensor; 3] = qkv.try_into().expect("three products");
        let plain_keys = !cache.raw_keys && self.try_lid(l, W::KUp).is_none();
        if matches!(mode, Mode::Static { .. }) && plain_keys {
            vals.set(Val::Q0, q0);
            vals.set(Val::V, self.value_heads(&v));
            let new = NewKv { k: raw, v };
            if crate::kernels::decode::fold_append_enabled() {
                return Ok(Some(new));
            }
            self.append_static(l, cache, &new, mode)?;
            return Ok(None);
        }
        let (raw, v) = (self.key_heads_raw(&raw), self.value_heads(&v));
        let roped = (!cache.raw_keys || matches!(mode, Mode::Prefill { .. }))
            .then(|| self.keys_from_raw(l, &raw, mode.positions()));
        let stored = match &roped {
            Some(k) if !cache.raw_keys => k.shallow_clone(),
            _ => raw.transpose(1, 2),
        };
        match mode {
            Mode::Prefill { .. } | Mode::Decode { .. } => {
                let start = match mode {
                    Mode::Decode { pos } => *pos,
                    _ => 0,
                };
                cache.k[l].narrow(2, start, t).copy_(&stored);
                cache.v[l].narrow(2, start, t).copy_(&v);
            }
            Mode::Static { pos, .. } => {
                let _ = cache.k[l].index_copy_(2, pos, &stored);
                let _ = cache.v[l].index_copy_(2, pos, &v);
            }
        }
        vals.set(Val::Q0, q0);
        if let Some(k) = roped {
            vals.set(Val::K, k);
        }
        vals.set(Val::V, v);
        Ok(None)
    }

    /// A static step's new token written into layer `l`'s cache at the
    /// step's slot (keys as projected, no up-projection): rotated and
    /// written by one kernel where it runs (`kernels::decode::append`),
    /// else RoPE and copies.
    fn append_static(&self, l: usize, cache: &KvCache, new: &NewKv, mode: &Mode<'_>) -> Result<()> {
        let Mode::Static { pos, rope, .. } = mode else {
            return Err(TrainError::internal_state(
                "a cache append at a device slot outside a static step".to_string(),
            ));
        };
        let caches = (&cache.k[l], &cache.v[l]);
        let n_q = self.heads.q as i64;
        let rows = (&rope.0, &rope.1);
        if crate::kernels::decode::append(n_q, &new.k, &new.v, rows, pos, caches)? {
            return Ok(());
        }
        let k = self.keys_from_raw(l, &self.key_heads_raw(&new.k), mode.positions());
        let _ = cache.k[l].shallow_clone().index_copy_(2, pos, &k);
        let _ = cache.v[l]
            .shallow_clone()
            .index_copy_(2, pos, &self.value_heads(&new.v));
        Ok(())
    }

    /// The `Attend` part with a cache: prefill attends over the prompt under
    /// its mask; a decoding step attends one query per sequence against
    /// every cached slot through the DiffQKV decode kernel. `new`: a static
    /// step's new token not yet in the cache ([`Fwd::qkv_cached`]), which
    /// the kernel writes, or else [`Fwd::append_static`] before the
    /// attention's other paths.
    fn attend_cached(
        &self,
        l: usize,
        cache: &KvCache,
        vals: &Vals,
        mode: &Mode<'_>,
        new: Option<NewKv>,
    ) -> Result<Tensor> {
        let q = if vals.has(Val::Q) {
            vals.get(Val::Q)
        } else {
            vals.get(Val::Q0)
        };
        let (n, token) = match mode {
            Mode::Prefill { mask } => {
                let (k, v) = (vals.get(Val::K), vals.get(Val::V));
                return Ok(self.attend_masked(l, &self.query_heads(q), k, v, mask));
            }
            Mode::Decode { pos } => (pos + 1, None),
            Mode::Static { span, pos, .. } => {
                let token = new.as_ref().map(|t| NewToken {
                    k: &t.k,
                    v: &t.v,
                    pos,
                });
                (*span, token)
            }
        };
        let o = match self.attend_by_kernel(l, cache, q, n, mode.positions(), token)? {
            Some(o) => o,
            None => {
                if let Some(t) = &new {
                    self.append_static(l, cache, t, mode)?;
                }
                self.attend_step(l, cache, q, n, mode.positions())?
            }
        };
        Ok(self.linear(&o, self.lid(l, W::OProj)))
    }

    /// A decoding step's attention of the query features `q` [b, 1, n_q *
    /// dot_dim] (before RoPE) at `at` against the first `n` cached slots
    /// by the kernel that rotates the query itself (one launch less), and
    /// writes `new` into the cache first where given: None where it does
    /// not run (nothing written). -> [b, 1, n_q * d_v].
    fn attend_by_kernel(
        &self,
        l: usize,
        cache: &KvCache,
        q: &Tensor,
        n: i64,
        at: Positions<'_>,
        new: Option<NewToken<'_>>,
    ) -> Result<Option<Tensor>> {
        let dd = self.cfg.dot_dim() as i64;
        // Where the model rotates by the training RoPE kernel, whose arithmetic the decode kernel's is.
        let by_kernel = match q.device() {
            Device::Cuda(ordinal) => crate::kernels::training::rope_kernel_runs(ordinal, dd),
            _ => false,
        };
        if cache.raw_keys || !by_kernel {
            return Ok(None);
        }
        let k = cache.k[l].narrow(2, 0, n);
        let v = cache.v[l].narrow(2, 0, n);
        let scale = 1.0 / (dd as f64).sqrt();
        let valid = cache.valid.narrow(1, 0, n);
        let (b, t) = (q.size()[0], q.size()[1]);
        let q0 = q.view([b, t, -1, dd]).transpose(1, 2).to_kind(self.compute);
        let (cos, sin) = self.rope_rows_at(at, dd, q.device(), self.compute);
        crate::kernels::decode::decode_attention_rotated(
            &q0,
            (&cos, &sin),
            (&k, &v),
            Some(&valid),
            scale,
            None,
            new,
        )
    }

    /// A decoding step's attention as [`Fwd::attend_by_kernel`] where that
    /// kernel does not run: the query rotated first, then the decode
    /// kernel or tensor operations. -> [b, 1, n_q * d_v].
    fn attend_step(
        &self,
        l: usize,
        cache: &KvCache,
        q: &Tensor,
        n: i64,
        at: Positions<'_>,
    ) -> Result<Tensor> {
        let k = cache.k[l].narrow(2, 0, n);
        let v = cache.v[l].narrow(2, 0, n);
        let scale = 1.0 / (self.cfg.dot_dim() as f64).sqrt();
        let valid = cache.valid.narrow(1, 0, n);
        let q = self.query_heads_at(q, at).to_kind(self.compute);
        let k = if cache.raw_keys {
            // Contiguous rows, as the decode kernel reads them (made anew each step anyway).
            self.keys_from_raw(l, &k.transpose(1, 2), Positions::From(0))
                .to_kind(self.compute)
                .contiguous()
        } else {
            k
        };
        decode_attention(&q, &k, &v, Some(&valid), scale)
    }
}

/// A static step's new keys (as projected, [b, 1, n_k * d_k]) and values
/// ([b, 1, n_v * d_v]), not yet in the cache.
struct NewKv {
    k: Tensor,
    v: Tensor,
}

/// How to pick the next token.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0: greedy (the highest logit; the lowest id on a tie).
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f64,
}

/// The generator of sequence `stream` of a request seeded `seed`: one
/// stream per sequence, so a sequence's sample does not depend on what else
/// is in the batch.
pub fn stream_rng(seed: u64, stream: u64) -> SplitMix64 {
    SplitMix64::new(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Greedy picks of logits [b, vocab] on their device: each row's highest
/// logit, the lowest id on a tie (as [`sample`] at temperature 0), only
/// the b ids copied to the host.
pub fn greedy_picks(logits: &Tensor) -> Result<Vec<u32>> {
    let ids = logits.f_argmax(-1, false)?.f_to_device(Device::Cpu)?;
    Ok(Vec::<i64>::try_from(&ids)?
        .into_iter()
        .map(|i| i as u32)
        .collect())
}

/// Pick a token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let top = logits[idx[0]] as f64;
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / s.temperature).exp())
        .collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = p
            .iter()
            .position(|&x| {
                cum += x;
                cum >= s.top_p
            })
            .map(|i| i + 1)
            .unwrap_or(p.len());
        p.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = p.iter().sum();
    let mut u = rng.unit() * total;
    for (j, &x) in p.iter().enumerate() {
        if u < x {
            return idx[j] as u32;
        }
        u -= x;
    }
    idx[p.len() - 1] as u32
}

/// What to generate.
pub struct Request {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Stop a sequence when it produces this token.
    pub eos: Option<u32>,
    /// Prompt + new tokens may not exceed this.
    pub max_context: usize,
    /// The keys of the projected K-compression reading in the cache.
    pub key_cache: KeyCache,
    /// How decoding steps run (CUDA graphs by default, on a GPU).
    pub steps: StepMode,
}

/// Generate for a batch of prompts; `on_token(sequence, token)` sees each
/// new token as it is chosen. Returns the new tokens of every prompt.
pub fn generate(
    model: &Fwd<'_>,
    prompts: &[Vec<u32>],
    r: &Request,
    first_stream: u64,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    generate_timed(model, prompts, r, first_stream, on_token).map(|(out, _)| out)
}

/// Where a [`generate_timed`] call spent its time (host clock; every step
/// ends with its picks on the host, so each interval is complete).
#[derive(Clone, Debug, Default)]
pub struct Timing {
    /// From the start to the first new tokens chosen: the prefill and the
    /// first picks.
    pub prefill_s: f64,
    /// Decoding steps run after the prefill, and their time (each step and
    /// its picks).
    pub steps: usize,
    pub decode_s: f64,
    /// How the steps ran, and the CUDA graphs recorded.
    pub mode: StepMode,
    pub graphs: usize,
    /// Of `decode_s`, the steps that recorded a graph (each ran its step,
    /// then recorded it).
    pub recording_s: f64,
}

/// [`generate`], also returning where the time went.
pub fn generate_timed(
    model: &Fwd<'_>,
    prompts: &[Vec<u32>],
    r: &Request,
    first_stream: u64,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<(Vec<Vec<u32>>, Timing)> {
    let started = std::time::Instant::now();
    let mut timing = Timing::default();
    let device = model.params.flat.device();
    let b = prompts.len();
    let (tokens, valid) = padded_prompts(prompts, r, device)?;
    let capacity = tokens.size()[1] + r.max_new_tokens as i64;
    let cache = KvCache::with_keys(model, b as i64, capacity, device, r.key_cache)?;
    let mut decoder = Decoder::new(model, cache, r.steps)?;
    let mut rngs: Vec<SplitMix64> = (0..b)
        .map(|i| stream_rng(r.seed, first_stream + i as u64))
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut logits = tch::no_grad(|| decoder.prefill(&tokens, &valid))?;
    let mut decoding: Option<std::time::Instant> = None;
    for _ in 0..r.max_new_tokens {
        let picks = pick(&logits, &done, r, &mut rngs)?;
        let mut next = vec![r.eos.unwrap_or(0) as i64; b];
        for (i, t) in picks.into_iter().enumerate() {
            let Some(t) = t else { continue };
            out[i].push(t);
            on_token(i, t);
            next[i] = t as i64;
            done[i] |= Some(t) == r.eos;
        }
        if decoding.is_none() {
            timing.prefill_s = started.elapsed().as_secs_f64();
            decoding = Some(std::time::Instant::now());
        }
        if done.iter().all(|&d| d) || out.iter().all(|o| o.len() == r.max_new_tokens) {
            break;
        }
        let t = Tensor::from_slice(&next).to_device(device);
        logits = tch::no_grad(|| decoder.step(&t))?;
        timing.steps += 1;
    }
    timing.decode_s = decoding.map_or(0.0, |d| d.elapsed().as_secs_f64());
    timing.mode = decoder.mode();
    timing.graphs = decoder.graphs();
    timing.recording_s = decoder.recording_s();
    Ok((out, timing))
}

/// Every prompt has tokens and, with the request's new tokens, fits the
/// maximum context; an error names the first that does not (prompt 1 is
/// `prompts[0]`). A command checks all of its prompts so before it
/// generates for any (nothing is written for a file whose tenth prompt is
/// too long); [`generate_timed`] checks each batch again.
pub fn check_prompts(prompts: &[Vec<u32>], r: &Request) -> Result<()> {
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(TrainError::input(
                format!("prompt {}", i + 1),
                "is empty (no tokens)",
            ));
        }
        if p.len()
            .checked_add(r.max_new_tokens)
            .is_none_or(|n| n > r.max_context)
        {
            return Err(TrainError::input(
                "--max-new-tokens",
                format!(
                    "prompt {}: {} tokens plus {} new tokens exceeds the maximum context of {} tokens (the training sequence length; --max-context raises it, at the quality RoPE gives beyond it)",
                    i + 1,
                    p.len(),
                    r.max_new_tokens,
                    r.max_context
                ),
            ));
        }
    }
    Ok(())
}

/// The prompts checked ([`check_prompts`]) and left-padded to the longest:
/// tokens and the mask of real ones, [b, longest], on `device`.
fn padded_prompts(prompts: &[Vec<u32>], r: &Request, device: Device) -> Result<(Tensor, Tensor)> {
    let b = prompts.len();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    check_prompts(prompts, r)?;
    let mut ids = vec![0i64; b * longest];
    let mut valid = vec![false; b * longest];
    for (i, p) in prompts.iter().enumerate() {
        let pad = longest - p.len();
        for (j, &t) in p.iter().enumerate() {
            ids[i * longest + pad + j] = t as i64;
            valid[i * longest + pad + j] = true;
        }
    }
    let shape = [b as i64, longest as i64];
    Ok((
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&valid).view(shape).to_device(device),
    ))
}

/// The next token of every sequence not `done` (None for those): greedy by
/// the argmax on the device (b ids to the host), else sampled on the host
/// from the whole rows (b x vocab floats), each sequence by its own stream.
fn pick(
    logits: &Tensor,
    done: &[bool],
    r: &Request,
    rngs: &mut [SplitMix64],
) -> Result<Vec<Option<u32>>> {
    if r.sampling.temperature <= 0.0 {
        let picks = greedy_picks(logits)?;
        return Ok(picks
            .into_iter()
            .zip(done)
            .map(|(t, &d)| (!d).then_some(t))
            .collect());
    }
    let l = logits
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
        .contiguous();
    let vocab = l.size()[1] as usize;
    let mut flat = vec![0f32; l.numel()];
    l.copy_data(&mut flat, l.numel());
    Ok(flat
        .chunks(vocab)
        .zip(done)
        .zip(rngs.iter_mut())
        .map(|((row, &d), rng)| (!d).then(|| sample(row, &r.sampling, rng)))
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{KCompression, ModelConfig};
    use crate::model::{Model, ModelInit};

    fn cfg(
        nk: usize,
        nv: usize,
        aug: usize,
        kc: KCompression,
        k_dim: Option<usize>,
    ) -> ModelConfig {
        ModelConfig {
            vocab_size: 61,
            d_model: 32,
            num_layers: 2,
            ffn_dim: 48,
            num_q_heads: 8,
            num_k_heads: nk,
            num_v_heads: nv,
            qk_head_dim: 8,
            v_head_dim: 6,
            aug_q_dim: aug,
            k_compression: kc,
            k_dim,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            init_std: 0.3,
        }
    }

    /// Small models of every kind of attention decoding takes.
    pub(crate) fn configs() -> Vec<(&'static str, ModelConfig)> {
        vec![
            ("n_k < n_v", cfg(2, 4, 0, KCompression::None, None)),
            ("n_k > n_v", cfg(4, 2, 0, KCompression::None, None)),
            ("AugQ, n_k 1", cfg(1, 8, 40, KCompression::None, None)),
            (
                "projected K",
                cfg(2, 4, 40, KCompression::Projected, Some(4)),
            ),
            ("native K", cfg(2, 4, 0, KCompression::Native, Some(4))),
        ]
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Cached decoding gives the full forward's logits at every step (f64:
    /// only rounding differs, the two paths order the sums differently).
    #[test]
    fn cached_decoding_matches_the_full_forward_at_every_step() {
        let keys = [KeyCache::Expanded, KeyCache::Compressed];
        for ((name, c), keys) in configs()
            .into_iter()
            .flat_map(|c| keys.map(|k| (c.clone(), k)))
        {
            let m = Model::new(&c, &ModelInit::cpu(7)).to_double();
            let seq: Vec<i64> = (0..14).map(|i| (i * 17 + 3) % 61).collect();
            let all = Tensor::from_slice(&seq).view([1, -1]);
            let full = tch::no_grad(|| m.plain().forward(&all));
            let prompt = 5;
            let mut cache =
                KvCache::with_keys(&m, 1, seq.len() as i64, Device::Cpu, keys).expect("cache");
            let valid = Tensor::ones([1, prompt], (Kind::Bool, Device::Cpu));
            let l = tch::no_grad(|| {
                m.plain()
                    .prefill(&mut cache, &all.narrow(1, 0, prompt), &valid)
            })
            .expect("prefill");
            let mut worst = max_diff(&l, &full.select(1, prompt - 1));
            for p in prompt..seq.len() as i64 {
                let l = tch::no_grad(|| m.plain().decode_step(&mut cache, &all.select(1, p)))
                    .expect("decode");
                worst = worst.max(max_diff(&l, &full.select(1, p)));
            }
            assert!(
                worst < 1e-10,
                "{name} ({keys:?} keys): cached vs full logits differ by {worst:e}"
            );
        }
    }

    /// Left-padded prompts of different lengths decode as each would alone.
    #[test]
    fn padded_batches_decode_like_single_prompts() {
        for (name, c) in configs() {
            let m = Model::new(&c, &ModelInit::cpu(11)).to_double();
            let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 2], vec![1, 2, 3, 4, 5, 6, 7], vec![40]];
            let r = Request {
                max_new_tokens: 6,
                sampling: Sampling {
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                },
                seed: 0,
                eos: None,
                max_context: 64,
                key_cache: KeyCache::default(),
                steps: StepMode::Eager,
            };
            let together = generate(&m.plain(), &prompts, &r, 0, &mut |_, _| {}).expect("batch");
            for (i, p) in prompts.iter().enumerate() {
                let alone = generate(&m.plain(), std::slice::from_ref(p), &r, 0, &mut |_, _| {})
                    .expect("one");
                assert_eq!(together[i], alone[0], "{name}: prompt {i}");
            }
            // ... and the padded prefill's logits match the unpadded ones.
            let mut cache = KvCache::new(&m, 2, 8, Device::Cpu).expect("cache");
            let toks =
                Tensor::from_slice(&[0i64, 0, 0, 0, 5, 9, 2, 1, 2, 3, 4, 5, 6, 7]).view([2, 7]);
            let valid = Tensor::from_slice(&[
                false, false, false, false, true, true, true, true, true, true, true, true, true,
                true,
            ])
            .view([2, 7]);
            let l = tch::no_grad(|| m.plain().prefill(&mut cache, &toks, &valid)).expect("prefill");
            let alone = tch::no_grad(|| {
                m.plain()
                    .forward(&Tensor::from_slice(&[5i64, 9, 2]).view([1, 3]))
            });
            assert!(
                max_diff(&l.get(0), &alone.get(0).get(2)) < 1e-10,
                "{name}: padded prefill"
            );
        }
    }

    /// The static step (what a CUDA graph records: the slot on the device,
    /// attention over a bucket of slots under the slot mask) gives the eager
    /// step's logits at every step (f64: rounding only), so greedy
    /// generation picks the same tokens: every kind of model, both key
    /// caches, a left-padded batch whose steps cross a bucket boundary;
    /// with the new token written where the qkv products run, and left to
    /// the attention (`SIGMA_DECODE_FOLD_APPEND`: on the CPU, written by
    /// the fallback before the attention's tensor path, which must see it).
    #[test]
    fn static_steps_decode_like_eager_steps() {
        for fold in [false, true] {
            crate::kernels::decode::set_fold_append(fold);
            static_steps_like_eager();
        }
        crate::kernels::decode::set_fold_append(false);
    }

    fn static_steps_like_eager() {
        use crate::infer::decoder::{span_for, Decoder, StepMode, SPAN_BUCKET};
        let keys = [KeyCache::Expanded, KeyCache::Compressed];
        for ((name, c), keys) in configs()
            .into_iter()
            .flat_map(|c| keys.map(|k| (c.clone(), k)))
        {
            let m = Model::new(&c, &ModelInit::cpu(5)).to_double();
            let fwd = m.plain();
            let longest = SPAN_BUCKET - 3;
            let ids: Vec<i64> = (0..2 * longest).map(|i| (i * 7 + 1) % 61).collect();
            let mut valid = vec![true; 2 * longest as usize];
            valid[longest as usize..2 * longest as usize - 5].fill(false); // row 2: 5 tokens, left-padded
            let tokens = Tensor::from_slice(&ids).view([2, longest]);
            let valid = Tensor::from_slice(&valid).view([2, longest]);
            // Ten steps from slot 253: buckets of 256 slots, then the rest.
            let capacity = 2 * SPAN_BUCKET + 10;
            assert_ne!(span_for(longest, capacity), span_for(longest + 9, capacity));
            let decoder = |mode, capacity| {
                let cache = KvCache::with_keys(&m, 2, capacity, Device::Cpu, keys).expect("cache");
                Decoder::new(&fwd, cache, mode).expect("decoder")
            };
            let (mut eager, mut fixed) = (
                decoder(StepMode::Eager, capacity),
                decoder(StepMode::Static, capacity),
            );
            assert_eq!(fixed.mode(), StepMode::Static);
            assert_eq!(
                decoder(StepMode::Graph, capacity).mode(),
                StepMode::Eager,
                "no graphs on a CPU"
            );
            let mut a = tch::no_grad(|| eager.prefill(&tokens, &valid)).expect("prefill");
            let mut b = tch::no_grad(|| fixed.prefill(&tokens, &valid)).expect("prefill");
            for step in 0..10 {
                let next = a.argmax(-1, false);
                assert_eq!(
                    Vec::<i64>::try_from(&next).unwrap(),
                    Vec::<i64>::try_from(&b.argmax(-1, false)).unwrap(),
                    "{name} ({keys:?} keys): step {step} picks other tokens"
                );
                a = tch::no_grad(|| eager.step(&next)).expect("eager step");
                b = tch::no_grad(|| fixed.step(&next)).expect("static step");
                let d = max_diff(&a, &b);
                assert!(d < 1e-10, "{name} ({keys:?} keys): step {step}: {d:e}");
            }
            assert_eq!(fixed.cache.len, longest + 10);
            // One slot after the prompt: one step, then the cache is full.
            let mut small = decoder(StepMode::Static, longest + 1);
            let l = tch::no_grad(|| small.prefill(&tokens, &valid)).expect("prefill");
            let next = l.argmax(-1, false);
            let _ = tch::no_grad(|| small.step(&next)).expect("the last slot");
            let full = tch::no_grad(|| small.step(&next));
            assert!(full.is_err(), "{name}: a step past the capacity");
        }
    }

    #[test]
    fn the_cache_holds_n_k_keys_at_the_cached_dimension() {
        let c = cfg(2, 4, 40, KCompression::Projected, Some(4));
        let m = Model::new(&c, &ModelInit::cpu(1));
        let with = |k| KvCache::with_keys(&m, 1, 16, Device::Cpu, k).expect("cache");
        // 2 layers x (2 heads x 4 + 4 heads x 6) x 4 bytes (fp32 on CPU).
        let small = with(KeyCache::Compressed);
        assert_eq!(small.bytes_per_token(), 2 * (2 * 4 + 4 * 6) * 4);
        // Expanded: the keys at the dot-product dimension.
        let dd = c.dot_dim() as i64;
        assert_ne!(dd, 4);
        assert_eq!(
            with(KeyCache::Expanded).bytes_per_token(),
            2 * (2 * dd + 4 * 6) * 4
        );
    }

    /// Greedy picks on the device are the host's greedy sample, ties to
    /// the lowest id included.
    #[test]
    fn greedy_picks_are_greedy_samples_ties_included() {
        let rows: [&[f32]; 4] = [
            &[0.5, 3.0, 2.9, -1.0, 3.0],
            &[7.0, 7.0, 7.0, 7.0, 7.0],
            &[-1.0, -2.0, -0.5, -0.5, -3.0],
            &[0.0, 0.0, 0.0, 0.0, 1e-7],
        ];
        let flat: Vec<f32> = rows.concat();
        let picks = greedy_picks(&Tensor::from_slice(&flat).view([4, 5])).expect("picks");
        let s = Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        };
        let want: Vec<u32> = rows
            .iter()
            .map(|r| sample(r, &s, &mut stream_rng(0, 0)))
            .collect();
        assert_eq!(picks, want);
        assert_eq!(picks, [1, 0, 2, 4]);
    }

    #[test]
    fn sampling_is_greedy_at_zero_temperature_and_respects_top_k_and_top_p() {
        let logits = [0.5f32, 3.0, 2.9, -1.0, 3.0];
        let s = |t, k, p| Sampling {
            temperature: t,
            top_k: k,
            top_p: p,
        };
        let mut rng = stream_rng(1, 0);
        assert_eq!(
            sample(&logits, &s(0.0, 0, 1.0), &mut rng),
            1,
            "ties go to the lowest id"
        );
        for _ in 0..200 {
            let t = sample(&logits, &s(1.0, 2, 1.0), &mut rng);
            assert!(t == 1 || t == 4, "top-k 2 keeps ids 1 and 4, got {t}");
            assert_eq!(
                sample(&logits, &s(1.0, 0, 0.01), &mut rng),
                1,
                "top-p 0.01 keeps the top token"
            );
        }
        // Frequencies follow the softmax: ids 1 and 4 equally likely, 2 a bit less.
        let mut n = [0usize; 5];
        let mut rng = stream_rng(42, 3);
        for _ in 0..20000 {
            n[sample(&logits, &s(1.0, 0, 1.0), &mut rng) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &c) in n.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            let f = c as f64 / 20000.0;
            assert!(
                (f - p).abs() < 0.015,
                "id {i}: frequency {f} vs probability {p}"
            );
        }
    }
}
