//! AdamW over the flat parameter buffer: gradients, first and second moments
//! are flat buffers of the same layout; weight decay applies to the decayed
//! prefix only (see params.rs). Gradient clipping by global norm and the
//! NaN/Inf guard live here too.

use tch::{Kind, Tensor};

use crate::config::OptimConfig;
use crate::params::Params;

pub struct AdamW {
    pub cfg: OptimConfig,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Optimizer steps taken (bias correction uses it).
    pub steps: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the gradient was not finite and the update was skipped.
    pub applied: bool,
}

impl AdamW {
    pub fn new(cfg: &OptimConfig, params: &Params) -> AdamW {
        let z = || params.flat.zeros_like();
        AdamW {
            cfg: cfg.clone(),
            grad: z(),
            exp_avg: z(),
            exp_avg_sq: z(),
            steps: 0,
        }
    }

    /// Clip the accumulated flat gradient and update with learning rate `lr`, then
    /// zero the gradient for the next step. A non-finite gradient norm leaves
    /// parameters and moments untouched.
    pub fn step(&mut self, params: &Params, lr: f64) -> StepStats {
        let stats = self.update(params, lr);
        let _ = self.grad.zero_();
        stats
    }

    fn update(&mut self, params: &Params, lr: f64) -> StepStats {
        tch::no_grad(|| {
            let norm = self.grad.norm().double_value(&[]);
            if !norm.is_finite() {
                return StepStats {
                    grad_norm: norm,
                    applied: false,
                };
            }
            if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
                let _ = self.grad.g_mul_scalar_(self.cfg.grad_clip / (norm + 1e-6));
            }
            self.steps += 1;
            let [b1, b2] = self.cfg.betas;
            let t = self.steps as i32;
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let _ = self.exp_avg.lerp_(&self.grad, 1.0 - b1);
            let _ = self.exp_avg_sq.g_mul_scalar_(b2);
            let _ = self
                .exp_avg_sq
                .addcmul_(&(&self.grad * (1.0 - b2)), &self.grad);
            let mut flat = params.flat.shallow_clone();
            if self.cfg.weight_decay > 0.0 && params.num_decayed > 0 {
                let _ = flat
                    .narrow(0, 0, params.num_decayed)
                    .g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
            }
            let denom = (&self.exp_avg_sq / bc2).sqrt() + self.cfg.eps;
            let _ = flat.addcdiv_(&(&self.exp_avg * (-lr / bc1)), &denom);
            StepStats {
                grad_norm: norm,
                applied: true,
            }
        })
    }

    /// Bytes of optimizer state (moments and the flat gradient).
    pub fn state_bytes(&self) -> i64 {
        3 * self.grad.numel() as i64 * kind_bytes(self.grad.kind())
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
