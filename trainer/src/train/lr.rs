//! Learning-rate schedules: linear warmup, then cosine to `min_lr`, WSD
//! (warmup, stable at `lr`, linear decay to `min_lr` over the last
//! `decay_steps`), or constant.

use crate::config::{OptimConfig, Schedule};

/// Learning rate for optimizer step `step` (0-based) of `total`.
pub fn lr_at(o: &OptimConfig, step: u64, total: u64) -> f64 {
    if step < o.warmup_steps {
        return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
    }
    match o.schedule {
        Schedule::Constant => o.lr,
        Schedule::Cosine => {
            let span = total.saturating_sub(o.warmup_steps).max(1) as f64;
            let p = ((step - o.warmup_steps) as f64 / span).min(1.0);
            o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
        }
        Schedule::Wsd => {
            let decay_start = total.saturating_sub(o.decay_steps);
            if step < decay_start {
                o.lr
            } else {
                let p = ((step - decay_start + 1) as f64 / o.decay_steps.max(1) as f64).min(1.0);
                o.lr + (o.min_lr - o.lr) * p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: Schedule) -> OptimConfig {
        OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            schedule: s,
            decay_steps: 20,
            weight_decay: 0.0,
            decay_norms: false,
            decay_embeddings: false,
            betas: [0.9, 0.95],
            eps: 1e-8,
            grad_clip: 0.0,
        }
    }

    #[test]
    fn shapes_of_the_schedules() {
        let c = cfg(Schedule::Cosine);
        assert!((lr_at(&c, 0, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(&c, 9, 110) - 1.0).abs() < 1e-12);
        assert!(
            (lr_at(&c, 60, 110) - 0.55).abs() < 1e-12,
            "{}",
            lr_at(&c, 60, 110)
        );
        assert!((lr_at(&c, 110, 110) - 0.1).abs() < 1e-12);
        let w = cfg(Schedule::Wsd);
        assert_eq!(lr_at(&w, 89, 110), 1.0);
        assert!((lr_at(&w, 109, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(&w, 99, 110) - 0.55).abs() < 1e-12);
        assert_eq!(lr_at(&cfg(Schedule::Constant), 500, 110), 1.0);
    }
}
