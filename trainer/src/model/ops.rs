//! The operations the model is written in: matmuls by a weight (with the
//! gradient sink and the merged gate/up matmul where they apply), RMSNorm
//! into the compute dtype (with the residual add before it), RoPE. Each
//! picks the fused kernel (`crate::kernels::training`) on a GPU in bf16 and
//! the tensor operations elsewhere.
//!
//! Mixed precision: parameters stay fp32; matmuls run in the compute dtype
//! (bf16 on GPU) on a working copy of the weights that the trainer refreshes
//! once per change of them (`Params::weight`; without one, each matmul casts
//! its weight), each norm's output is cast once for the matmuls that read
//! it; norms, residual stream and the loss run in fp32. (tch's autocast
//! cannot select bf16, hence explicit casts.)

use std::cell::Cell;

use tch::{Device, Kind, Tensor};

use crate::kernels::fp8::Fp8Input;
use crate::model::params::ParamId;
use crate::model::positions::Positions;
use crate::model::Fwd;

thread_local! {
    /// Merged gate/up matmuls of a frozen model on this thread.
    static MERGED_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Gate/up pairs that a frozen model ran as one matmul on this thread so far.
pub fn frozen_merged_calls_on_this_thread() -> u64 {
    MERGED_CALLS.with(|c| c.get())
}

impl Fwd<'_> {
    /// `x` times parameter `id` (a matmul weight [out, in]): [.., in] -> [.., out].
    /// In FP8 when the model runs that weight in FP8 (`model::fp8`).
    pub fn linear(&self, x: &Tensor, id: ParamId) -> Tensor {
        self.linear_in(x, id, None)
    }

    /// [`Fwd::linear`], an FP8 weight reading `x` as quantised in `input`
    /// (made once for the weights that read it, [`Fwd::linears`]).
    fn linear_in(&self, x: &Tensor, id: ParamId, input: Option<&Fp8Input>) -> Tensor {
        let w = self.w(id);
        if let Some(f) = self.fp8() {
            if let Some(q) = f.weight(&self.params, id) {
                let main = self.exec.sink.map(|s| self.sink_view(s, id, w));
                let queue = self.exec.sink.map(|s| &s.queue);
                let o = &f.plan.opts;
                return crate::kernels::fp8::linear_with(x, w, &q, main.as_ref(), queue, o, input);
            }
        }
        match self.exec.sink {
            Some(sink) if x.kind() == w.kind() => {
                let main = self.sink_view(sink, id, w);
                crate::kernels::fused::linear_accum(x, w, &main, Some(&sink.queue))
            }
            _ => self.mm(x, w),
        }
    }

    /// Parameter `id`'s gradient in the sink, shaped like its weight `w`.
    fn sink_view(&self, sink: &crate::model::GradSink, id: ParamId, w: &Tensor) -> Tensor {
        let (o, n) = (self.params.offsets[id.0], self.params.specs[id.0].numel());
        sink.buffer.narrow(0, o, n).view(w.size().as_slice())
    }

    /// `x` times two weights that read it, as one matmul [.., rows_a + rows_b]
    /// (their working copies, and gradients in the sink, are contiguous):
    /// only with a working copy and `b` right after `a` in the parameter
    /// layout. With the gradient sink the matmul adds its weight gradient
    /// there; without one only for frozen weights under `no_grad`
    /// (evaluation, generation): the merged view of the working copy is not
    /// a leaf that autograd would give gradients to.
    fn linear_merged(&self, x: &Tensor, a: ParamId, b: ParamId) -> Option<Tensor> {
        let sink = self.exec.sink;
        if sink.is_none() && (!self.exec.frozen || crate::kernels::fused::grad_enabled()) {
            return None;
        }
        let (w, o) = self.params.merged_weight(a, b)?;
        if x.kind() != w.kind() {
            return None;
        }
        let Some(sink) = sink else {
            MERGED_CALLS.with(|c| c.set(c.get() + 1));
            return Some(x.linear::<Tensor>(&w, None));
        };
        let main = sink
            .buffer
            .narrow(0, o, w.numel() as i64)
            .view(w.size().as_slice());
        Some(crate::kernels::fused::linear_accum(
            x,
            &w,
            &main,
            Some(&sink.queue),
        ))
    }

    /// `silu(x gate^T) * (x up^T)`, SwiGLU's and AugQ's gating: one matmul by
    /// both weights and the fused SwiGLU (crate::kernels::training) where
    /// `linear_merged` (bf16) or `fp8_merged` applies, else two matmuls and
    /// the tensor form.
    pub fn gated(&self, x: &Tensor, gate: ParamId, up: ParamId) -> Tensor {
        let fp8 = self.is_fp8(gate) || self.is_fp8(up);
        let halves = |id: ParamId| self.params.specs[id.0].shape[0];
        if !fp8
            && self.exec.sink.is_none()
            && crate::kernels::gemv::wants(x)
            && halves(gate) == halves(up)
        {
            // A few rows without autograd (decoding): one kernel for both matmuls and SwiGLU.
            let merged = self.params.merged_weight(gate, up);
            if let Some(y) = merged.and_then(|(w, _)| crate::kernels::gemv::gemv_swiglu(x, &w)) {
                return y;
            }
        }
        let merged = if fp8 {
            self.fp8_merged(x, gate, up)
        } else {
            self.linear_merged(x, gate, up)
        };
        match merged {
            Some(gu) => crate::kernels::training::swiglu(&gu),
            None => self.linear(x, gate).silu() * self.linear(x, up),
        }
    }

    /// `x` times FP8 weights `a` and `b` as one FP8 GEMM [.., rows_a +
    /// rows_b]: their merged FP8 forms (`Fp8Weights::merged`), x quantised
    /// once. Where `linear_merged`'s layout holds (a working copy, b right
    /// after a), with the gradient sink or without: the weight gradient goes
    /// into the sink's merged view, or through autograd to both working
    /// weights (joined for the call), so both routes compute alike.
    fn fp8_merged(&self, x: &Tensor, a: ParamId, b: ParamId) -> Option<Tensor> {
        let f = self.fp8()?;
        let (w, o) = self.params.merged_weight(a, b)?;
        if x.kind() != w.kind() {
            return None;
        }
        let q = f.merged(&self.params, a, b)?;
        let opts = &f.plan.opts;
        Some(match self.exec.sink {
            Some(sink) => {
                let main = sink
                    .buffer
                    .narrow(0, o, w.numel() as i64)
                    .view(w.size().as_slice());
                crate::kernels::fp8::linear(x, &w, &q, Some(&main), Some(&sink.queue), opts)
            }
            None => {
                let w = Tensor::cat(&[self.w(a), self.w(b)], 0);
                crate::kernels::fp8::linear(x, &w, &q, None, None, opts)
            }
        })
    }

    /// `x` times each of the weights `ids` (which all read it): as many
    /// [`Fwd::linear`]s, with `x` quantised once for all of them where they
    /// are FP8 weights, or, for a few rows without autograd or FP8
    /// (decoding), one launch of the matrix-vector kernel
    /// (`crate::kernels::gemv`) for up to three of them.
    pub fn linears(&self, x: &Tensor, ids: &[ParamId]) -> Vec<Tensor> {
        let fp8 = ids.iter().filter(|&&id| self.is_fp8(id)).count();
        if self.exec.sink.is_none() && fp8 == 0 && crate::kernels::gemv::wants(x) {
            let ws: Vec<&Tensor> = ids.iter().map(|&id| self.w(id)).collect();
            if ws.iter().all(|w| w.kind() == self.compute) {
                if let Some(ys) = crate::kernels::gemv::gemv(x, &ws) {
                    return ys;
                }
            }
        }
        let input = match self.fp8() {
            Some(f) if fp8 == ids.len() && fp8 > 1 => {
                Some(crate::kernels::fp8::quantize_input(x, &f.plan.opts))
            }
            _ => None,
        };
        ids.iter()
            .map(|&id| self.linear_in(x, id, input.as_ref()))
            .collect()
    }

    /// `x w^T` in the compute dtype, casting what is not in it. A few rows
    /// without autograd (decoding) by the matrix-vector kernel where it runs
    /// (`crate::kernels::gemv`).
    pub fn mm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        if x.kind() == self.compute && w.kind() == self.compute {
            if let Some(mut y) = crate::kernels::gemv::gemv(x, &[w]) {
                return y.pop().expect("one weight, one product");
            }
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
            if let Some(y) =
                crate::kernels::training::rms_norm_bf16(x, self.p(w), self.cfg.norm_eps)
            {
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

    /// The products of `ids` (with `gated`, one gate/up pair and SwiGLU,
    /// as [`Fwd::gated`]) on the RMSNorm with weight `norm` of `x` plus
    /// `add` (or of `x`): returns the sum (or `x`) and the products. For a
    /// few rows without autograd or FP8 (decoding) one matrix-vector launch
    /// that runs the norm too (`crate::kernels::gemv::gemv_normed`, which
    /// rounds as the norm kernel does); else [`Fwd::add_norm_in`] or
    /// [`Fwd::norm_in`], then [`Fwd::gated`] or [`Fwd::linears`].
    pub fn normed_products(
        &self,
        (x, add): (&Tensor, Option<&Tensor>),
        norm: ParamId,
        ids: &[ParamId],
        gated: bool,
    ) -> (Tensor, Vec<Tensor>) {
        if let Some(r) = self.normed_by_gemv((x, add), norm, ids, gated) {
            return r;
        }
        let (s, h) = match add {
            Some(a) => self.add_norm_in(x, a, norm),
            None => (x.shallow_clone(), self.norm_in(x, norm)),
        };
        let ys = if gated {
            vec![self.gated(&h, ids[0], ids[1])]
        } else {
            self.linears(&h, ids)
        };
        (s, ys)
    }

    /// [`Fwd::normed_products`] by the matrix-vector kernel, where it runs.
    fn normed_by_gemv(
        &self,
        (x, add): (&Tensor, Option<&Tensor>),
        norm: ParamId,
        ids: &[ParamId],
        gated: bool,
    ) -> Option<(Tensor, Vec<Tensor>)> {
        let plain = self.exec.sink.is_none() && !ids.iter().any(|&id| self.is_fp8(id));
        if !plain || self.compute != Kind::BFloat16 || !crate::kernels::gemv::wants_normed(x) {
            return None;
        }
        let merged;
        let ws: Vec<&Tensor> = if gated {
            let halves = |id: ParamId| self.params.specs[id.0].shape[0];
            if ids.len() != 2 || halves(ids[0]) != halves(ids[1]) {
                return None;
            }
            merged = self.params.merged_weight(ids[0], ids[1])?.0;
            vec![&merged]
        } else {
            ids.iter().map(|&id| self.w(id)).collect()
        };
        let n = crate::kernels::gemv::Norm {
            x,
            add,
            w: self.p(norm),
            eps: self.cfg.norm_eps,
        };
        let (sum, ys) = crate::kernels::gemv::gemv_normed(&n, &ws, gated)?;
        Some((sum.unwrap_or_else(|| x.shallow_clone()), ys))
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
    /// on a GPU in bf16 one kernel each way (`kernels::training::rope`, fp32
    /// math: the tensor form's roundings of the products are not made).
    /// The table covers a power-of-two length (each angle is computed on its
    /// own, so a longer table holds the same values): decoding one position
    /// after another reuses a few tables instead of making one per length.
    pub fn rope_at(&self, x: &Tensor, start: i64) -> Tensor {
        self.rope(x, Positions::From(start))
    }

    /// [`Fwd::rope_at`] at `at`: positions known on the host, or one token
    /// at a position held on the device, whose table rows are gathered there
    /// (the same values, so the same result to the bit).
    pub fn rope(&self, x: &Tensor, at: Positions<'_>) -> Tensor {
        let size = x.size();
        let (b, t, h, dim) = (size[0], size[1], size[2], size[3]);
        let (cos, sin, start) = match at {
            Positions::From(start) => {
                let len = ((start + t) as u64).next_power_of_two() as i64;
                let (cos, sin) = self.rope_tables(len, dim, x.device(), x.kind());
                (cos, sin, start)
            }
            // Gathered in the compute dtype: the same kind as x (no copy) but in a check.
            Positions::Device { cos, sin } => (cos.to_kind(x.kind()), sin.to_kind(x.kind()), 0),
        };
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

    /// The RoPE table rows ([1, dim] each, dtype `kind`) that [`Fwd::rope`]
    /// rotates one token at `at` by: the rows the decode kernel rotates a
    /// decoding step's query by (`kernels::decode::decode_attention_rotated`).
    pub fn rope_rows_at(
        &self,
        at: Positions<'_>,
        dim: i64,
        device: Device,
        kind: Kind,
    ) -> (Tensor, Tensor) {
        match at {
            Positions::From(start) => {
                let len = ((start + 1) as u64).next_power_of_two() as i64;
                let (cos, sin) = self.rope_tables(len, dim, device, kind);
                (cos.narrow(0, start, 1), sin.narrow(0, start, 1))
            }
            Positions::Device { cos, sin } => (cos.to_kind(kind), sin.to_kind(kind)),
        }
    }

    /// The rows of the RoPE tables (`dim` wide, the compute dtype) at the
    /// position that `pos` ([1], int64, on the device) holds, below `span`:
    /// [`Positions::Device`]'s, gathered on the device, the same values as
    /// the host's table rows.
    pub fn rope_rows(&self, pos: &Tensor, span: i64, dim: i64) -> (Tensor, Tensor) {
        let len = (span as u64).next_power_of_two() as i64;
        let (cos, sin) = self.rope_tables(len, dim, pos.device(), self.compute);
        (cos.index_select(0, pos), sin.index_select(0, pos))
    }

    /// RoPE of a training sequence [b, t, h, dim]: positions `0..t`, or
    /// with `Exec::pieces` each half at its piece's positions.
    pub fn rope_seq(&self, x: &Tensor) -> Tensor {
        let Some(p) = self.exec.pieces else {
            return self.rope_at(x, 0);
        };
        let half = x.size()[1] / 2;
        let starts = p.starts(x.size()[1]);
        let parts: Vec<Tensor> = (0..2)
            .map(|j| {
                self.rope_at(
                    &x.narrow(1, j * half, half).contiguous(),
                    starts[j as usize],
                )
            })
            .collect();
        Tensor::cat(&parts, 1)
    }
}
