//! The decoding loop's step, three ways (`StepMode`): eager (each step
//! launches its kernels from the host and attends to exactly the filled
//! slots); static (the same arithmetic with shapes and launches that do not
//! depend on the position: the position lives on the device, attention
//! reads a bucket of `SPAN_BUCKET` slots under the slot mask); and graphs
//! (the static step recorded once per bucket as a CUDA graph and replayed
//! per token, so a step costs one launch from the host instead of hundreds).
//!
//! Per bucket, the first step runs the static step on the graph's side
//! stream (this is the real step: it fills the cache and gives the logits;
//! whatever is compiled, tuned or allocated at first use happens here),
//! then records it; later steps in the bucket copy the new tokens and the
//! position into the graph's inputs and replay. The graphs of one decoder
//! share a memory pool and are replayed in the order they were recorded
//! (positions only grow). Prefill stays eager.

use tch::{Device, Kind, Tensor};

use super::cache::KvCache;
use crate::error::{Result, TrainError};
use crate::kernels::cuda_graph::{self, CudaGraph};
use crate::model::Fwd;

/// How decoding steps run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepMode {
    /// Launched from the host, attending to exactly the filled slots.
    Eager,
    /// The graph's step without a graph: position on the device, attention
    /// over a bucket of slots under the mask (tests the graphs' arithmetic
    /// on a CPU; on a GPU, measures what recording gains).
    Static,
    /// On a CUDA device, the static step recorded per bucket and replayed;
    /// elsewhere (and in a build without CUDA graphs, with a warning) eager.
    #[default]
    Graph,
}

/// Slots per bucket: a step attends to the filled slots rounded up to a
/// multiple of this, so one graph serves this many positions and a step
/// reads fewer than twice this many empty slots. A last bucket shorter
/// than this is merged into the one before (the capacity ends it), which
/// saves a recording at the cost of reading up to that many slots more.
pub const SPAN_BUCKET: i64 = 256;

/// The slots a static step at slot `pos` attends to.
pub fn span_for(pos: i64, capacity: i64) -> i64 {
    let span = (pos + 1 + SPAN_BUCKET - 1) / SPAN_BUCKET * SPAN_BUCKET;
    if capacity - span < SPAN_BUCKET {
        capacity
    } else {
        span
    }
}

/// One bucket's recording and the logits tensor each replay rewrites.
struct Recorded {
    span: i64,
    graph: CudaGraph,
    logits: Tensor,
}

/// A KV cache and the decoding steps over it.
pub struct Decoder<'f, 'm> {
    fwd: &'f Fwd<'m>,
    pub cache: KvCache,
    mode: StepMode,
    /// The static step's inputs: tokens [b] and the slot [1] (int64, on the device).
    tokens: Tensor,
    pos: Tensor,
    recorded: Vec<Recorded>,
    /// Host time of the steps that recorded a graph (each runs the step,
    /// then records it).
    recording_s: f64,
}

impl<'f, 'm> Decoder<'f, 'm> {
    /// Steps over `cache` by `mode` (graphs only where they can run).
    pub fn new(fwd: &'f Fwd<'m>, cache: KvCache, mode: StepMode) -> Result<Self> {
        let device = cache.device();
        let mode = match mode {
            StepMode::Graph if !device.is_cuda() => StepMode::Eager,
            StepMode::Graph if !cuda_graph::built() => {
                warn_once("this build has no CUDA graphs (scripts/setup.sh installs the CUDA headers they need): decoding steps run eagerly");
                StepMode::Eager
            }
            m => m,
        };
        let b = cache.batch();
        Ok(Decoder {
            fwd,
            cache,
            mode,
            tokens: Tensor::f_zeros([b], (Kind::Int64, device))?,
            pos: Tensor::f_zeros([1], (Kind::Int64, device))?,
            recorded: Vec::new(),
            recording_s: 0.0,
        })
    }

    /// The mode steps run by (graphs resolved to eager where they cannot run).
    pub fn mode(&self) -> StepMode {
        self.mode
    }

    /// Graphs recorded so far (one per bucket of positions reached).
    pub fn graphs(&self) -> usize {
        self.recorded.len()
    }

    /// Seconds the steps that recorded a graph took (running the step,
    /// then recording it).
    pub fn recording_s(&self) -> f64 {
        self.recording_s
    }

    /// Prefill (eager): see [`Fwd::prefill`].
    pub fn prefill(&mut self, tokens: &Tensor, valid: &Tensor) -> Result<Tensor> {
        self.fwd.prefill(&mut self.cache, tokens, valid)
    }

    /// One decoding step: `tokens` [b] at the next slot; logits [b, vocab].
    pub fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        if self.mode == StepMode::Eager {
            return self.fwd.decode_step(&mut self.cache, tokens);
        }
        let pos = self.cache.len;
        if pos >= self.cache.capacity {
            return Err(TrainError::internal_state(format!(
                "the KV cache is full ({} slots)",
                self.cache.capacity
            )));
        }
        let span = span_for(pos, self.cache.capacity);
        let _ = self.pos.f_fill_(pos)?;
        self.tokens.f_copy_(tokens)?;
        let logits = match self.mode {
            StepMode::Static => self.static_step(span)?,
            _ => self.graph_step(span)?,
        };
        self.cache.len = pos + 1;
        Ok(logits)
    }

    fn static_step(&mut self, span: i64) -> Result<Tensor> {
        self.fwd
            .decode_step_static(&mut self.cache, &self.tokens, &self.pos, span)
    }

    /// Replay the bucket's graph, or run the step and record it.
    fn graph_step(&mut self, span: i64) -> Result<Tensor> {
        if let Some(r) = self.recorded.iter().find(|r| r.span == span) {
            r.graph.replay()?;
            return Ok(r.logits.f_detach_copy()?);
        }
        let Device::Cuda(ordinal) = self.cache.device() else {
            return self.static_step(span);
        };
        let started = std::time::Instant::now();
        let out = self.record(ordinal, span);
        self.recording_s += started.elapsed().as_secs_f64();
        out
    }

    /// Run the step at `span` on a new graph's side stream, then record it.
    fn record(&mut self, ordinal: usize, span: i64) -> Result<Tensor> {
        let mut graph = CudaGraph::new(ordinal, self.recorded.first().map(|r| &r.graph))?;
        let logits = graph.on_side(|| self.static_step(span))?;
        match graph.capture(|| self.static_step(span)) {
            Ok(recorded) => self.recorded.push(Recorded {
                span,
                graph,
                logits: recorded,
            }),
            Err(e) => {
                // The step ran; decode the rest eagerly rather than fail.
                eprintln!(
                    "warning: recording the decoding step as a CUDA graph failed, so steps run eagerly: {e}"
                );
                self.recorded.clear();
                self.mode = StepMode::Eager;
            }
        }
        Ok(logits)
    }
}

fn warn_once(msg: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("warning: {msg}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_the_filled_slots_up_and_stop_at_the_capacity() {
        assert_eq!(span_for(0, 10_000), SPAN_BUCKET);
        assert_eq!(span_for(SPAN_BUCKET - 1, 10_000), SPAN_BUCKET);
        assert_eq!(span_for(SPAN_BUCKET, 10_000), 2 * SPAN_BUCKET);
        assert_eq!(span_for(9, 10), 10);
        // A short last bucket joins the one before: 4,096 to 4,199 is one graph.
        assert_eq!(span_for(4000, 4200), 4200);
        assert_eq!(span_for(4096, 4200), 4200);
        for cap in [1, 255, 256, 257, 511, 700, 1024] {
            let spans: Vec<i64> = (0..cap).map(|pos| span_for(pos, cap)).collect();
            for (pos, &s) in spans.iter().enumerate() {
                assert!(s > pos as i64 && s <= cap, "{cap}: {pos} -> {s}");
                assert!(s == cap || s % SPAN_BUCKET == 0, "{cap}: {pos} -> {s}");
                assert!(s - (pos as i64) <= 2 * SPAN_BUCKET, "{cap}: {pos} -> {s}");
            }
            let mut distinct = spans.clone();
            distinct.dedup();
            let want = (cap / SPAN_BUCKET).max(1);
            assert_eq!(distinct.len() as i64, want, "{cap}: {distinct:?}");
        }
    }
}
