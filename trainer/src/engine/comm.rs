//! The tensor-parallel collectives of the engine: started on the
//! communication stream, finished (waited for and reassembled) later, so
//! that backward can overlap them with weight-gradient GEMMs.

use tch::Tensor;

use crate::dist::Collectives;
use crate::error::Result;
use crate::parallel::tp::Comm;

/// A tensor-parallel collective started on its communication stream and not
/// yet waited for (`start_communicate`); its result comes from `finish`.
pub struct InFlight(Pending);

enum Pending {
    /// Nothing to wait for.
    Done(Tensor),
    /// An all-reduce, in place.
    Reduced(Tensor),
    /// The ranks' tensors, flattened in rank order, and the result's shape
    /// (`feat`: the ranks' parts go side by side along the last dimension).
    Gathered {
        flat: Tensor,
        like: Vec<i64>,
        feat: bool,
    },
    /// This rank's part of the sum, and the result's shape (`feat`: the part
    /// is of the input with its last dimension moved to the front).
    Scattered {
        part: Tensor,
        shape: Vec<i64>,
        feat: bool,
    },
}

/// Start `op` on `x` ([b, t, ..]) without making the compute stream wait
/// for it: work issued before `finish` overlaps the collective (the CPU
/// backend completes it here).
///
/// Sequence parallelism splits a micro-batch's tokens (b x t, flattened)
/// into `world` contiguous blocks; rank r holds block r, viewed as
/// [b, t / world, ..]. Only per-token operations (norms, residual adds) run
/// on the blocks, so which tokens a rank holds does not matter, and both
/// collectives work on contiguous buffers as they are: no transpose before
/// a reduce-scatter, no concatenation after an all-gather (a split along t
/// needs both when b > 1). Feature gathers and scatters (AugQ) split the
/// last dimension and do need them.
pub fn start_communicate(c: &mut dyn Collectives, op: Comm, x: &Tensor) -> Result<InFlight> {
    let w = c.world() as i64;
    let mut shape = x.size();
    tch::no_grad(|| {
        Ok(InFlight(match op {
            Comm::Copy => Pending::Done(x.shallow_clone()),
            Comm::AllReduce => {
                let t = x.contiguous().copy();
                c.start_all_reduce_sum(&t)?;
                Pending::Reduced(t)
            }
            Comm::GatherSeq | Comm::GatherFeat => {
                let feat = op == Comm::GatherFeat;
                let flat = c.start_all_gather_flat(&x.contiguous())?;
                Pending::Gathered {
                    flat,
                    like: shape,
                    feat,
                }
            }
            Comm::ScatterSeq => {
                shape[1] /= w;
                let part = c.start_reduce_scatter_sum(&x.contiguous())?;
                Pending::Scattered {
                    part,
                    shape,
                    feat: false,
                }
            }
            Comm::ScatterFeat => {
                let moved = x.movedim([-1], [0]).contiguous();
                let mut shape = moved.size();
                shape[0] /= w;
                let part = c.start_reduce_scatter_sum(&moved)?;
                Pending::Scattered {
                    part,
                    shape,
                    feat: true,
                }
            }
        }))
    })
}

/// Wait (on the device) for a started collective and assemble its result,
/// contiguous: a feature scatter's part left with the last dimension in
/// front would hand every later kernel a permuted layout (a query whose
/// last dimension is not the fastest sends SDPA to its O(t^2) math path in
/// fp32; elementwise kernels lose vectorisation).
pub fn finish(c: &mut dyn Collectives, f: InFlight) -> Result<Tensor> {
    if !matches!(f.0, Pending::Done(_)) {
        c.wait_pending()?;
    }
    let w = c.world() as i64;
    Ok(tch::no_grad(|| match f.0 {
        Pending::Done(t) | Pending::Reduced(t) => t,
        Pending::Gathered {
            flat,
            mut like,
            feat: false,
        } => {
            like[1] *= w;
            flat.view(like.as_slice())
        }
        Pending::Gathered {
            flat,
            like,
            feat: true,
        } => {
            let mut parts = vec![w];
            parts.extend_from_slice(&like);
            let mut out = like;
            *out.last_mut().expect("a dimension") *= w;
            flat.view(parts.as_slice())
                .movedim([0], [-2])
                .reshape(out.as_slice())
        }
        Pending::Scattered {
            part,
            shape,
            feat: false,
        } => part.view(shape.as_slice()),
        Pending::Scattered {
            part,
            shape,
            feat: true,
        } => part.view(shape.as_slice()).movedim([0], [-1]).contiguous(),
    }))
}

/// Nanoseconds spent in timed collectives (`ExecOptions::time_collectives`).
static COMM_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Seconds spent in timed tensor-parallel collectives since the last call.
pub fn take_comm_seconds() -> f64 {
    COMM_NANOS.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
}

/// Apply `op` to `x` across the tensor-parallel group; `timed`: synchronise
/// the compute stream around it and add its time to what
/// [`take_comm_seconds`] returns (`SIGMA_TIME_COLLECTIVES=1`).
pub fn communicate(c: &mut dyn Collectives, op: Comm, x: &Tensor, timed: bool) -> Result<Tensor> {
    if !timed {
        return communicate_now(c, op, x);
    }
    // The compute stream only (a device-wide wait could wait for pipeline sends).
    let sync = || -> Result<()> {
        if x.device().is_cuda() {
            crate::dist::nccl::sync_compute_stream()?;
        }
        Ok(())
    };
    sync()?;
    let t0 = std::time::Instant::now();
    let y = communicate_now(c, op, x)?;
    sync()?;
    COMM_NANOS.fetch_add(
        t0.elapsed().as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(y)
}

fn communicate_now(c: &mut dyn Collectives, op: Comm, x: &Tensor) -> Result<Tensor> {
    let f = start_communicate(c, op, x)?;
    finish(c, f)
}
