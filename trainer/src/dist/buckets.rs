//! Data-parallel gradient reduction in buckets that overlaps backward.
//!
//! The flat gradient is cut, at parameter boundaries, into buckets of about
//! `parallel.bucket_mb`. The engine reports each segment as its backward
//! finishes (head first, embedding last); on the last micro-batch of a step, a
//! bucket's all-reduce starts as soon as every segment that writes into it is
//! done, so it runs on the communication stream while earlier segments are
//! still differentiated. `finish` starts what is left and orders the optimizer
//! after all of it. Every rank builds the same buckets from the same layout,
//! so all ranks issue the same collectives in the same order.

use tch::Tensor;

use super::Collectives;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Start and length in elements of the flat gradient.
    pub start: i64,
    pub len: i64,
    /// Position, in backward order, of the segment after which it is final.
    pub ready_after: usize,
}

pub struct GradBuckets {
    pub buckets: Vec<Bucket>,
    started: Vec<bool>,
}

impl GradBuckets {
    /// Buckets over a flat gradient whose parameters lie at `layout`
    /// ((offset, length) each, in layout order); `ready_after[i]`: the
    /// backward position of the last segment writing parameter `i`'s
    /// gradient (the engine's `Program::final_positions`; `usize::MAX`: only
    /// at the end of the step, as under pipeline parallelism).
    pub fn new(layout: &[(i64, i64)], ready_after: &[usize], bucket_elems: i64) -> GradBuckets {
        let last = ready_after;
        let mut buckets: Vec<Bucket> = Vec::new();
        for (i, &(off, n)) in layout.iter().enumerate() {
            match buckets.last_mut() {
                Some(b) if b.len < bucket_elems.max(1) => {
                    b.len += n;
                    b.ready_after = b.ready_after.max(last[i]);
                }
                _ => buckets.push(Bucket {
                    start: off,
                    len: n,
                    ready_after: last[i],
                }),
            }
        }
        GradBuckets {
            started: vec![false; buckets.len()],
            buckets,
        }
    }

    /// The segment at backward position `pos` is done: start every bucket that is now final.
    pub fn segment_done(
        &mut self,
        pos: usize,
        grad: &Tensor,
        comm: &mut dyn Collectives,
    ) -> Result<()> {
        for (b, started) in self.buckets.iter().zip(self.started.iter_mut()) {
            if !*started && b.ready_after <= pos {
                comm.start_all_reduce_sum(&grad.narrow(0, b.start, b.len))?;
                *started = true;
            }
        }
        Ok(())
    }

    /// Start the buckets not started yet, order later work after all of them,
    /// and reset for the next step.
    pub fn finish(&mut self, grad: &Tensor, comm: &mut dyn Collectives) -> Result<()> {
        self.segment_done(usize::MAX, grad, comm)?;
        comm.wait_pending()?;
        self.started.iter_mut().for_each(|s| *s = false);
        Ok(())
    }
}
