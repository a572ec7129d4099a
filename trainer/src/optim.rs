//! AdamW over the flat parameter buffer: gradients, first and second moments
//! are flat buffers of the same layout; weight decay applies to the decayed
//! prefix only (see params.rs). Gradient reduction across data-parallel ranks,
//! clipping by global norm and the NaN/Inf guard live here too.
//!
//! ZeRO-1 (`parallel.zero = 1`): the flat buffer (padded to a multiple of the
//! data-parallel size) is cut into equal shards; rank `r` keeps AdamW moments
//! only for shard `r`. A step reduce-scatters the gradient, updates the rank's
//! shard of the fp32 weights, and all-gathers the updated shards. Without it,
//! the gradient is all-reduced and every rank updates everything.

use tch::{Kind, Tensor};

use crate::config::OptimConfig;
use crate::dist::collectives::scalar;
use crate::dist::Collectives;
use crate::error::Result;
use crate::model::params::{shard_range, Params};

/// Elements per piece of the optimizer's passes over the flat buffers (256 MB
/// of fp32): temporaries are this big, never a whole buffer (a 2.9 B-parameter
/// pipeline stage once ran out of memory on a 21.5 GB float64 temporary).
const OPTIM_CHUNK: i64 = 1 << 26;

/// Elements per piece of the fused AdamW kernel's lists (below 2^31).
const FUSED_PIECE: i64 = 1 << 28;

/// Sum of squares of `t`, accumulated in float64 over pieces of `chunk`
/// elements. On CPU each piece is converted to float64 and squared (the
/// golden losses' numbers). On GPU (`fast`) each piece's norm is one fused
/// reduction (accumulating in fp32 within the piece, relative error about
/// 1e-6 at most), squared in float64, without float64 copies of the
/// gradient; if a piece's fp32 norm overflows (above about 1.8e19) the
/// float64 way is taken, so a huge but finite gradient is clipped, not
/// skipped as non-finite.
fn sum_squares(t: &Tensor, chunk: i64, fast: bool) -> Tensor {
    let pieces = crate::model::chunks(t.numel() as i64, chunk);
    if pieces.is_empty() {
        return Tensor::zeros([], (Kind::Double, t.device()));
    }
    if fast {
        let norms: Vec<Tensor> = pieces
            .iter()
            .map(|&(s, n)| t.narrow(0, s, n).norm())
            .collect();
        let norms = Tensor::stack(&norms, 0).to_kind(Kind::Double);
        // One check for all pieces (NaN gradients take the exact way too, and stay NaN).
        if norms.isfinite().all().int64_value(&[]) == 1 {
            return norms.square().sum(Kind::Double);
        }
    }
    let mut sq: Option<Tensor> = None;
    for (s, n) in pieces {
        let part = t
            .narrow(0, s, n)
            .to_kind(Kind::Double)
            .pow_tensor_scalar(2)
            .sum(Kind::Double);
        sq = Some(match sq {
            Some(a) => a + part,
            None => part,
        });
    }
    sq.expect("at least one piece")
}

/// This rank's part of the flat buffer under ZeRO-1.
#[derive(Clone, Copy, Debug)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
    /// Elements per shard (the padded length divided by `world`).
    pub size: i64,
}

pub struct AdamW {
    pub cfg: OptimConfig,
    /// Flat ranges (offset, length, copies) of parameters held by several
    /// tensor-parallel ranks: the global norm counts each element once.
    shared: Vec<(i64, i64, usize)>,
    /// Accumulated gradient, full length (padded to a multiple of the shard count).
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Optimizer steps taken (bias correction uses it).
    pub steps: u64,
    pub shard: Option<Shard>,
    numel: i64,
    /// Elements per piece of the passes (`OPTIM_CHUNK`; tests use small ones).
    chunk: i64,
    /// The update through libtorch's fused AdamW kernel (on GPU; the CPU keeps
    /// the piecewise update, whose numbers the golden losses record).
    pub fused: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the gradient was not finite and the update was skipped.
    pub applied: bool,
}

impl AdamW {
    /// `zero`: Some((rank, world)) to shard the optimizer state (ZeRO-1) over
    /// the data-parallel group; `tp`: the tensor-parallel size the parameters
    /// are split for.
    pub fn new(
        cfg: &OptimConfig,
        params: &Params,
        zero: Option<(usize, usize)>,
        tp: usize,
    ) -> AdamW {
        let n = params.numel();
        let opts = (params.flat.kind(), params.flat.device());
        let (shard, padded) = match zero {
            Some((rank, world)) => {
                let size = (n + world as i64 - 1) / world as i64;
                (Some(Shard { rank, world, size }), size * world as i64)
            }
            None => (None, n),
        };
        let state = shard.map(|s| s.size).unwrap_or(n);
        let shared = params
            .specs
            .iter()
            .zip(&params.offsets)
            .filter(|(s, _)| s.copies(tp) > 1)
            .map(|(s, &o)| (o, s.numel(), s.copies(tp)))
            .collect();
        AdamW {
            cfg: cfg.clone(),
            shared,
            grad: Tensor::zeros([padded], opts),
            exp_avg: Tensor::zeros([state], opts),
            exp_avg_sq: Tensor::zeros([state], opts),
            steps: 0,
            shard,
            numel: n,
            chunk: OPTIM_CHUNK,
            fused: params.flat.device().is_cuda(),
        }
    }

    /// Reduce the accumulated gradient over data-parallel ranks (if `comm`), clip,
    /// update with learning rate `lr`, and zero the gradient for the next step.
    /// A non-finite gradient norm leaves parameters and moments untouched, and
    /// so does `skip` (the step's loss was not finite; every rank passes the
    /// same value, so all skip together and no collective is left half-done).
    /// `spread`: the groups over which the parameters are split (tensor- and
    /// pipeline-parallel), over which the global norm is summed too.
    pub fn step(
        &mut self,
        params: &Params,
        lr: f64,
        comm: Option<&mut (dyn Collectives + '_)>,
        spread: Vec<&mut dyn Collectives>,
        skip: bool,
    ) -> Result<StepStats> {
        let stats = if skip {
            StepStats {
                grad_norm: f64::NAN,
                applied: false,
            }
        } else {
            tch::no_grad(|| self.update(params, lr, comm, spread))?
        };
        let _ = self.grad.zero_();
        Ok(stats)
    }

    fn update(
        &mut self,
        params: &Params,
        lr: f64,
        comm: Option<&mut (dyn Collectives + '_)>,
        spread: Vec<&mut dyn Collectives>,
    ) -> Result<StepStats> {
        // This rank's gradient (whole or shard) and the range of the flat buffer it updates.
        let (mut g, start, len, mut comm) = match (self.shard, comm) {
            (Some(s), Some(c)) => {
                let g = c.reduce_scatter_sum(&self.grad)?;
                let (start, len) = shard_range(self.numel, s.world, s.rank);
                (g, start, len, Some(c))
            }
            (None, Some(c)) => {
                c.all_reduce_sum(&mut self.grad)?;
                (self.grad.shallow_clone(), 0, self.numel, None)
            }
            (_, None) => (self.grad.shallow_clone(), 0, self.numel, None),
        };
        let norm = self.global_norm(&g, start..start + len, comm.as_deref_mut(), spread)?;
        if !norm.is_finite() {
            return Ok(StepStats {
                grad_norm: norm,
                applied: false,
            });
        }
        if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            let _ = g.g_mul_scalar_(self.cfg.grad_clip / (norm + 1e-6));
        }
        self.steps += 1;
        let decayed = (params.num_decayed - start).clamp(0, len);
        if self.fused {
            self.apply_fused(params, &g, start, len, decayed, lr)?;
        } else {
            self.apply_piecewise(params, &g, start, len, decayed, lr);
        }
        // The fused kernel writes through raw pointers, which libtorch's
        // version counter does not see: announce the change (the bf16
        // working copy is refreshed from it).
        params.mark_changed();
        if let (Some(s), Some(c)) = (self.shard, comm) {
            self.gather_shards(params, s, start, len, c)?;
        }
        Ok(StepStats {
            grad_norm: norm,
            applied: true,
        })
    }

    /// The global gradient norm: this rank's squares of `g` (its elements
    /// `range` of the flat buffer), elements held by several tensor-parallel
    /// ranks weighted 1/copies so each counts once, summed over the
    /// data-parallel shards (`comm`, under ZeRO-1) and the tensor- and
    /// pipeline-parallel groups (`spread`).
    fn global_norm(
        &self,
        g: &Tensor,
        range: std::ops::Range<i64>,
        comm: Option<&mut (dyn Collectives + '_)>,
        spread: Vec<&mut dyn Collectives>,
    ) -> Result<f64> {
        let fast = g.device().is_cuda();
        let mut sq = sum_squares(g, self.chunk, fast);
        for &(off, n, copies) in &self.shared {
            if let Some(r) = crate::model::params::intersect(off..off + n, range.clone()) {
                let part = g.narrow(0, r.start - range.start, r.end - r.start);
                sq -= sum_squares(&part, self.chunk, fast) * (1.0 - 1.0 / copies as f64);
            }
        }
        let device = self.grad.device();
        let sum = |c: &mut dyn Collectives, sq: Tensor| -> Result<Tensor> {
            let mut s = scalar(sq.double_value(&[]), device);
            c.all_reduce_sum(&mut s)?;
            Ok(s)
        };
        if let Some(c) = comm {
            sq = sum(c, sq)?;
        }
        for c in spread {
            sq = sum(c, sq)?;
        }
        Ok(sq.double_value(&[]).sqrt())
    }

    /// ZeRO-1: share the updated shards, so every rank ends with the whole
    /// new buffer.
    fn gather_shards(
        &self,
        params: &Params,
        s: Shard,
        start: i64,
        len: i64,
        c: &mut (dyn Collectives + '_),
    ) -> Result<()> {
        let mine = Tensor::zeros([s.size], (params.flat.kind(), params.flat.device()));
        if len > 0 {
            mine.narrow(0, 0, len)
                .copy_(&params.flat.narrow(0, start, len));
        }
        for (q, part) in c.all_gather(&mine)?.iter().enumerate() {
            let (qs, ql) = shard_range(self.numel, s.world, q);
            if ql > 0 {
                params.flat.narrow(0, qs, ql).copy_(&part.narrow(0, 0, ql));
            }
        }
        Ok(())
    }

    /// The AdamW update of flat elements `start..start + len` (the first
    /// `decayed` of them decayed) from this rank's gradient `g`, piece by
    /// piece: every operation is elementwise, so the numbers are those of
    /// whole-buffer operations, and the temporaries stay small.
    fn apply_piecewise(
        &mut self,
        params: &Params,
        g: &Tensor,
        start: i64,
        len: i64,
        decayed: i64,
        lr: f64,
    ) {
        let [b1, b2] = self.cfg.betas;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let wd = self.cfg.weight_decay;
        for (cs, cn) in crate::model::chunks(g.numel() as i64, self.chunk) {
            let gc = g.narrow(0, cs, cn);
            let m = self.exp_avg.narrow(0, cs, cn);
            let v = self.exp_avg_sq.narrow(0, cs, cn);
            let _ = m.shallow_clone().lerp_(&gc, 1.0 - b1);
            let _ = v.shallow_clone().g_mul_scalar_(b2);
            let _ = v.shallow_clone().addcmul_(&(&gc * (1.0 - b2)), &gc);
            // The parameters this rank updates: 0..len of its range.
            let pn = (len - cs).clamp(0, cn);
            if pn == 0 {
                continue;
            }
            let mut p = params.flat.narrow(0, start + cs, pn);
            let dn = (decayed - cs).clamp(0, pn);
            if wd > 0.0 && dn > 0 {
                let _ = p.narrow(0, 0, dn).g_mul_scalar_(1.0 - lr * wd);
            }
            let denom = (&v.narrow(0, 0, pn) / bc2).sqrt() + self.cfg.eps;
            let _ = p.addcdiv_(&(&m.narrow(0, 0, pn) * (-lr / bc1)), &denom);
        }
    }

    /// The same update through libtorch's fused AdamW kernel (GPU): the
    /// decayed and the undecayed elements in one call each, as pieces of at
    /// most `FUSED_PIECE` elements (the kernel indexes with 32-bit integers).
    /// Equal to the piecewise update up to rounding (it divides by the square
    /// root of the bias correction instead of under the root).
    fn apply_fused(
        &mut self,
        params: &Params,
        g: &Tensor,
        start: i64,
        len: i64,
        decayed: i64,
        lr: f64,
    ) -> Result<()> {
        let step = Tensor::from(self.steps as f32).to_device(g.device());
        for (a, b, wd) in [(0, decayed, self.cfg.weight_decay), (decayed, len, 0.0)] {
            let (mut p, mut gs, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (s, n) in crate::model::chunks(b - a, FUSED_PIECE) {
                p.push(params.flat.narrow(0, start + a + s, n));
                gs.push(g.narrow(0, a + s, n));
                m.push(self.exp_avg.narrow(0, a + s, n));
                v.push(self.exp_avg_sq.narrow(0, a + s, n));
            }
            let args = crate::kernels::fused::AdamWArgs {
                lr,
                betas: self.cfg.betas,
                weight_decay: wd,
                eps: self.cfg.eps,
            };
            crate::kernels::fused::adamw(&p, &gs, &m, &v, &step, args)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state held by this rank (moments and the gradient buffer).
    pub fn state_bytes(&self) -> i64 {
        let e = kind_bytes(self.grad.kind());
        (self.grad.numel() as i64 + 2 * self.exp_avg.numel() as i64) * e
    }
}

pub fn kind_bytes(k: Kind) -> i64 {
    match k {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::BFloat16 | Kind::Half => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, OptimConfig, Schedule};
    use crate::model::Model;
    use crate::model::ModelInit;

    fn tiny() -> (Model, AdamW) {
        tiny_with(false)
    }

    /// `mixed`: bf16 matmuls (on the CPU too).
    fn tiny_with(mixed: bool) -> (Model, AdamW) {
        let c: ModelConfig = toml::from_str(
            "vocab_size = 16\nd_model = 8\nnum_layers = 1\nffn_dim = 16\nnum_q_heads = 2\n\
             num_k_heads = 1\nnum_v_heads = 2\nqk_head_dim = 4\nv_head_dim = 4\n",
        )
        .expect("config");
        let m = Model::new(
            &c,
            &ModelInit {
                seed: 1,
                decay_norms: false,
                decay_embeddings: false,
                device: tch::Device::Cpu,
                mixed: mixed,
            },
        );
        let o = OptimConfig {
            lr: 0.1,
            min_lr: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            decay_steps: 0,
            weight_decay: 0.1,
            decay_norms: false,
            decay_embeddings: false,
            betas: [0.9, 0.95],
            eps: 1e-8,
            grad_clip: 1.0,
        };
        let a = AdamW::new(&o, &m.params, None, 1);
        (m, a)
    }

    #[test]
    fn a_skipped_step_leaves_weights_and_moments_alone_and_an_applied_one_does_not() {
        let (m, mut a) = tiny();
        let w0 = m.params.flat.copy();
        let _ = a.grad.fill_(0.5);
        // The loss was not finite although the gradient is: no update at all.
        let s = a
            .step(&m.params, 0.1, None, Vec::new(), true)
            .expect("step");
        assert!(!s.applied);
        assert!(m.params.flat.equal(&w0));
        assert_eq!(a.steps, 0);
        assert_eq!(
            f64::try_from(a.exp_avg.abs().sum(Kind::Double)).expect("sum"),
            0.0
        );
        // The gradient is cleared either way.
        assert_eq!(
            f64::try_from(a.grad.abs().sum(Kind::Double)).expect("sum"),
            0.0
        );
        let _ = a.grad.fill_(0.5);
        let s = a
            .step(&m.params, 0.1, None, Vec::new(), false)
            .expect("step");
        assert!(s.applied && s.grad_norm.is_finite());
        assert!(!m.params.flat.equal(&w0));
        assert_eq!(a.steps, 1);
    }

    /// The optimizer's passes piece by piece give the numbers of whole-buffer
    /// passes (pieces of 7 elements: parameter and decay boundaries fall
    /// inside pieces): the update exactly, the norm to float64 rounding.
    #[test]
    fn piecewise_optimizer_passes_give_the_whole_buffer_update() {
        let (m1, mut a1) = tiny();
        let (m2, mut a2) = tiny();
        a2.chunk = 7;
        for step in 0..3 {
            let g = randn(a1.grad.numel() as i64) * (step + 1) as f64;
            let _ = a1.grad.copy_(&g);
            let _ = a2.grad.copy_(&g);
            let s1 = a1
                .step(&m1.params, 0.1, None, Vec::new(), false)
                .expect("step");
            let s2 = a2
                .step(&m2.params, 0.1, None, Vec::new(), false)
                .expect("step");
            // The float64 sum of squares adds in another order: equal to rounding.
            let rel = (s1.grad_norm - s2.grad_norm).abs() / s1.grad_norm;
            assert!(rel < 1e-14, "norms {} and {}", s1.grad_norm, s2.grad_norm);
            assert!(
                m1.params.flat.equal(&m2.params.flat),
                "step {step}: weights differ"
            );
            assert!(a1.exp_avg.equal(&a2.exp_avg) && a1.exp_avg_sq.equal(&a2.exp_avg_sq));
        }
    }

    /// libtorch's fused AdamW (the GPU path; run here on its CPU kernel)
    /// follows the piecewise update to rounding, weight decay on the decayed
    /// prefix only, with bias correction over several steps.
    #[test]
    fn the_fused_update_follows_the_piecewise_one() {
        let (m1, mut a1) = tiny();
        let (m2, mut a2) = tiny();
        a2.fused = true;
        for step in 0..5 {
            let g = randn(a1.grad.numel() as i64) * 0.1 * (step + 1) as f64;
            let _ = a1.grad.copy_(&g);
            let _ = a2.grad.copy_(&g);
            a1.step(&m1.params, 0.1, None, Vec::new(), false)
                .expect("step");
            a2.step(&m2.params, 0.1, None, Vec::new(), false)
                .expect("step");
            let moved = (&m1.params.flat - &m2.params.flat)
                .abs()
                .max()
                .double_value(&[]);
            assert!(moved < 1e-5, "step {step}: weights differ by {moved:e}");
        }
        // The update moved the weights well beyond that tolerance.
        let (m0, _) = tiny();
        let total = (&m1.params.flat - &m0.params.flat)
            .abs()
            .max()
            .double_value(&[]);
        assert!(total > 0.1, "{total}");
        // Norm gains (not decayed) and decayed weights both followed.
        assert!(a1.exp_avg_sq.allclose(&a2.exp_avg_sq, 1e-5, 1e-9, false));
    }

    /// A gradient of `n` standard normal values, drawn under the global lock.
    fn randn(n: i64) -> Tensor {
        let _rng = crate::model::params::global_rng_lock();
        Tensor::randn([n], (Kind::Float, tch::Device::Cpu))
    }

    /// The bf16 working copy follows the master weights after a fused AdamW
    /// update (whose kernel writes through raw pointers, unseen by libtorch's
    /// version counter): the next forward equals one that casts at each matmul.
    #[test]
    fn the_working_copy_follows_a_fused_update() {
        let (mut mw, mut aw) = tiny_with(true);
        let (mc, mut ac) = tiny_with(true);
        mw.params.enable_work_copy(Kind::BFloat16);
        assert!(mw.params.has_work_copy() && !mc.params.has_work_copy());
        aw.fused = true;
        ac.fused = true;
        let tokens = Tensor::from_slice(&[1i64, 5, 2, 9, 3, 15, 0, 7, 4]).view([1, 9]);
        let before = crate::engine::loss_sum(&mw, &tokens);
        assert!(before.equal(&crate::engine::loss_sum(&mc, &tokens)));
        for _ in 0..2 {
            let g = randn(aw.grad.numel() as i64);
            let _ = aw.grad.copy_(&g);
            let _ = ac.grad.copy_(&g);
            aw.step(&mw.params, 0.1, None, Vec::new(), false)
                .expect("step");
            ac.step(&mc.params, 0.1, None, Vec::new(), false)
                .expect("step");
            let (lw, lc) = (
                crate::engine::loss_sum(&mw, &tokens),
                crate::engine::loss_sum(&mc, &tokens),
            );
            assert!(
                lw.equal(&lc),
                "working copy {lw:?} vs cast at each matmul {lc:?}"
            );
        }
        assert!(!crate::engine::loss_sum(&mw, &tokens).equal(&before));
    }

    /// The GPU way of the norm (pieces' fp32 norms) agrees with the float64
    /// way, and falls back to it when a piece's fp32 norm overflows.
    #[test]
    fn the_fast_norm_agrees_and_survives_overflow() {
        let t = randn(1000) * 3.0;
        let exact = sum_squares(&t, 7, false).double_value(&[]);
        let fast = sum_squares(&t, 7, true).double_value(&[]);
        assert!((fast - exact).abs() <= 1e-6 * exact, "{fast} vs {exact}");
        // Squares of 1e20 overflow fp32 (max 3.4e38) but not float64.
        let big = Tensor::from_slice(&[1e20f32, -1e20, 3.0]);
        let exact = sum_squares(&big, 2, false).double_value(&[]);
        assert!(exact.is_finite() && exact > 1.9e40);
        assert_eq!(sum_squares(&big, 2, true).double_value(&[]), exact);
        let empty = Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
        assert_eq!(sum_squares(&empty, 2, true).double_value(&[]), 0.0);
    }
}
