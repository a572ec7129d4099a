//! The memory of one rank: its model state (exactly what `Model::from_share`
//! and `optim::AdamW::new` allocate for its share), the passes its pipeline
//! schedule keeps in flight (walked action by action, with the activations
//! its sends hold until the end of the step), the optimizer step's
//! temporaries, and what lives outside the caching allocator (NCCL's
//! buffers, the CUDA context) or is lost in it (fragmentation).

use crate::model::params::shard_range;
use crate::model::Share;
use crate::parallel::schedule::{Action, Schedule};
use crate::plan::acts::{PassMemory, BF16, FP32};

/// One rank's model state in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct State {
    /// fp32 master weights (the flat buffer).
    pub weights: f64,
    /// The accumulated fp32 gradient (padded to the ZeRO-1 shard count).
    pub grads: f64,
    /// AdamW's two moments (this rank's shard under ZeRO-1).
    pub moments: f64,
    /// The bf16 working copy of the weights (mixed precision).
    pub work_copy: f64,
    /// Elements of the flat buffer, and of this rank's optimizer shard.
    pub numel: i64,
    pub shard: i64,
}

impl State {
    /// The state of a rank holding `share`, with the optimizer sharded over
    /// `dp` ranks when `zero`: the flat fp32 buffer of the held parameters,
    /// the gradient of its length padded to `dp` equal shards, the moments
    /// of one shard (`model::params::shard_range`), the bf16 copy.
    pub fn of(share: &Share, dp: usize, zero: bool, mixed: bool) -> State {
        let n = share.held_numel();
        let (grad_len, shard) = if zero && dp > 1 {
            let size = shard_range(n, dp, 0).1;
            (size * dp as i64, size)
        } else {
            (n, n)
        };
        State {
            weights: FP32 * n as f64,
            grads: FP32 * grad_len as f64,
            moments: 2.0 * FP32 * shard as f64,
            work_copy: if mixed { BF16 * n as f64 } else { 0.0 },
            numel: n,
            shard,
        }
    }

    pub fn total(&self) -> f64 {
        self.weights + self.grads + self.moments + self.work_copy
    }
}

/// What a rank holds at its highest point of a step's forward and backward.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassPeak {
    /// All of it (state not included).
    pub total: f64,
    /// Micro-batches whose passes are in flight then (the one running included).
    pub in_flight: usize,
    /// Their kept activations, the head's and loss's apart.
    pub activations: f64,
    pub head: f64,
    /// Activations and gradients held by sends not yet waited for.
    pub sends: f64,
    /// Gradients and temporaries of the pass running then.
    pub working: f64,
}

/// Walk `rank`'s actions of `s` (`passes`: the memory of a pass of each of
/// its chunks) and return the highest point.
pub fn schedule_peak(s: &Schedule, rank: usize, passes: &[PassMemory]) -> PassPeak {
    let mut live: Vec<(usize, usize)> = Vec::new();
    let (mut held, mut best) = (0.0, PassPeak::default());
    let sum = |live: &[(usize, usize)], f: &dyn Fn(&PassMemory) -> f64| -> f64 {
        live.iter().map(|&(_, c)| f(&passes[c])).sum()
    };
    for &a in &s.ranks[rank] {
        let p = &passes[a.chunk()];
        let working = match a {
            Action::Forward { .. } => {
                live.push((a.mb(), a.chunk()));
                p.forward_extra
            }
            // A fresh buffer receives the gradient from the next stage.
            Action::Backward { .. } => p.backward_extra + p.sent,
        };
        let kept = sum(&live, &|p| p.kept);
        let total = kept + held + working;
        if total > best.total {
            let head = sum(&live, &|p| p.head);
            best = PassPeak {
                total,
                in_flight: live.len(),
                activations: kept - head,
                head,
                sends: held,
                working,
            };
        }
        if let Action::Backward { .. } = a {
            live.retain(|&x| x != (a.mb(), a.chunk()));
            // Its output (sent on) and input gradient (sent back) stay with the sends.
            held += p.sent + p.grad_sent;
        }
    }
    best
}

/// The peak of a step without pipeline stages: one pass at a time.
pub fn single_peak(p: &PassMemory) -> PassPeak {
    let working = p.forward_extra.max(p.backward_extra);
    PassPeak {
        total: p.kept + working,
        in_flight: 1,
        activations: p.kept - p.head,
        head: p.head,
        sends: 0.0,
        working,
    }
}

/// Temporaries of the step after the passes (activations freed): ZeRO-1's
/// reduce-scatter output, its shard and the all-gather of every shard; the
/// copy of the tied embedding's gradient summed across the pipeline's ends.
pub fn optimizer_extra(state: &State, dp: usize, zero: bool, tied_numel: i64) -> f64 {
    let zero_temps = if zero && dp > 1 {
        FP32 * state.shard as f64 * (dp as f64 + 2.0)
    } else {
        0.0
    };
    zero_temps.max(FP32 * tied_numel as f64)
}
