//! Running a pipeline schedule on this rank: forward and backward passes of
//! its chunks in the schedule's order, activations received before a
//! forward and sent after it, gradients the other way.
//!
//! Every virtual edge (stage `s` to `s + 1`) has two channels of its own,
//! one for activations and one for gradients, each a two-rank group carrying
//! messages one way only, in micro-batch order on both sides. A send never
//! waits for its receiver (the CPU backend stores the message; NCCL sends on
//! the channel's own stream without holding the compute stream), so the
//! schedule's order alone decides the waits, and `schedule::simulate` shows
//! they form no cycle. Shapes are known from the config, so nothing is sent
//! ahead of the tensors.

use std::collections::HashMap;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::dist::{Collectives, Links};
use crate::engine::{
    chunk_backward, chunk_eval, chunk_forward, reborrow, Pass, Program, Runner, Tp,
};
use crate::error::Result;
use crate::guard::at;
use crate::parallel::schedule::{Action, Schedule};

/// Per-action start and end times of a few steps, for a Chrome/Perfetto trace.
#[derive(Default)]
pub struct Trace {
    /// (name, category, start µs, duration µs, step).
    pub events: Vec<(String, &'static str, f64, f64, u64)>,
    pub step: u64,
    origin: Option<Instant>,
    device: Option<Device>,
}

impl Trace {
    pub fn new(device: Device) -> Trace {
        Trace {
            device: Some(device),
            ..Default::default()
        }
    }

    /// Wait for the compute stream (not the whole device: a device-wide
    /// synchronisation would also wait for sends that complete only when the
    /// next stage gets to them, and deadlock the pipeline).
    fn sync(&self) -> Result<()> {
        if let Some(Device::Cuda(_)) = self.device {
            crate::dist::nccl::sync_compute_stream()?;
        }
        Ok(())
    }

    /// Time `f` as one event (the device is synchronised around it).
    pub fn span<T>(
        &mut self,
        name: String,
        cat: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.sync()?;
        let origin = *self.origin.get_or_insert_with(Instant::now);
        let t0 = origin.elapsed().as_secs_f64() * 1e6;
        let r = f()?;
        self.sync()?;
        let t1 = origin.elapsed().as_secs_f64() * 1e6;
        self.events.push((name, cat, t0, t1 - t0, self.step));
        Ok(r)
    }

    /// Fraction of the forward/backward stretch of each traced step in which
    /// this rank computed nothing (waiting for its neighbours), averaged.
    pub fn bubble(&self) -> Option<f64> {
        let mut steps: Vec<u64> = self.events.iter().map(|e| e.4).collect();
        steps.dedup();
        let fractions: Vec<f64> = steps
            .iter()
            .filter_map(|&s| {
                let ev: Vec<_> = self
                    .events
                    .iter()
                    .filter(|e| {
                        e.4 == s
                            && (e.1 == "forward"
                                || e.1 == "backward"
                                || e.1 == "recv"
                                || e.1 == "send")
                    })
                    .collect();
                let start = ev.iter().map(|e| e.2).fold(f64::INFINITY, f64::min);
                let end = ev.iter().map(|e| e.2 + e.3).fold(0.0, f64::max);
                let busy: f64 = ev
                    .iter()
                    .filter(|e| e.1 == "forward" || e.1 == "backward")
                    .map(|e| e.3)
                    .sum();
                (end > start).then(|| 1.0 - busy / (end - start))
            })
            .collect();
        (!fractions.is_empty()).then(|| fractions.iter().sum::<f64>() / fractions.len() as f64)
    }

    /// The trace in Chrome's trace-event format (open it in Perfetto or chrome://tracing).
    pub fn to_json(&self, rank: usize) -> serde_json::Value {
        let events: Vec<serde_json::Value> = self
            .events
            .iter()
            .map(|(name, cat, ts, dur, step)| {
                serde_json::json!({
                    "name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur,
                    "pid": rank, "tid": 0, "args": {"step": step}
                })
            })
            .collect();
        serde_json::json!({
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"rank": rank, "bubble": self.bubble()},
        })
    }
}

/// What a step needs to run a schedule on this rank.
pub struct StepInput<'a> {
    /// The model, its plan and options (activation checkpointing among them).
    pub run: Runner<'a>,
    pub schedule: &'a Schedule,
    /// Programs of this rank's chunks, by chunk.
    pub progs: &'a [Program],
    /// Token ids of every micro-batch ([b, t + 1] each).
    pub batches: &'a [Tensor],
    pub loss_scale: f64,
    /// Shape of the activations crossing stages (with sequence parallelism, this rank's slice).
    pub act_shape: Vec<i64>,
}

fn timed<T>(
    trace: &mut Option<&mut Trace>,
    name: impl FnOnce() -> String,
    cat: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match trace {
        Some(t) => t.span(name(), cat, f),
        None => f(),
    }
}

/// Receive `what` ("activation" or "gradient") of micro-batch `mb` into a
/// fresh tensor made by `like`, timed in the trace.
fn recv_timed(
    trace: &mut Option<&mut Trace>,
    c: &mut dyn Collectives,
    what: &'static str,
    mb: usize,
    like: impl FnOnce() -> Tensor,
) -> Result<Tensor> {
    let (short, phase) = match what {
        "activation" => ("act", "pipeline receive (activation)"),
        _ => ("grad", "pipeline receive (gradient)"),
    };
    timed(
        trace,
        || format!("recv {short} {mb}"),
        "recv",
        || {
            at(phase, None);
            let mut t = like();
            c.recv(&mut t, 0)?;
            Ok(t)
        },
    )
}

/// Start sending `what` of micro-batch `mb`, timed in the trace.
fn send_timed(
    trace: &mut Option<&mut Trace>,
    c: &mut dyn Collectives,
    what: &'static str,
    mb: usize,
    t: &Tensor,
) -> Result<()> {
    let (short, phase) = match what {
        "activation" => ("act", "pipeline send (activation)"),
        _ => ("grad", "pipeline send (gradient)"),
    };
    timed(
        trace,
        || format!("send {short} {mb}"),
        "send",
        || {
            at(phase, None);
            c.start_send(&t.contiguous(), 1)
        },
    )
}

/// Run this rank's actions of `input.schedule`. Gradients are added into
/// `grads`; returns the sum of token losses of the micro-batches (the last
/// stage's; zero elsewhere).
pub fn run_step(
    input: &StepInput<'_>,
    rank: usize,
    mut tp: Tp<'_>,
    links: &mut Links,
    grads: &mut Tensor,
    mut trace: Option<&mut Trace>,
) -> Result<Tensor> {
    let s = input.schedule;
    let n = s.num_stages();
    let device = grads.device();
    let kind = input.run.model.params.flat.kind();
    let like = || Tensor::zeros(input.act_shape.as_slice(), (kind, device));
    let mut loss = Tensor::zeros([], (Kind::Double, device));
    let mut passes: HashMap<(usize, usize), Pass<'_>> = HashMap::new();
    for &a in &s.ranks[rank] {
        let (mb, chunk) = (a.mb(), a.chunk());
        let st = s.stage(rank, chunk);
        match a {
            Action::Forward { .. } => {
                let x = if st > 0 {
                    let c = Links::chan(&mut links.act, st - 1);
                    Some(recv_timed(&mut trace, c, "activation", mb, like)?)
                } else {
                    None
                };
                let (pass, out) = timed(
                    &mut trace,
                    || format!("F{mb}.{chunk}"),
                    "forward",
                    || {
                        chunk_forward(
                            input.run,
                            &input.progs[chunk],
                            reborrow(&mut tp),
                            &input.batches[mb],
                            x,
                            input.loss_scale,
                        )
                    },
                )?;
                if st + 1 < n {
                    let c = Links::chan(&mut links.act, st);
                    send_timed(&mut trace, c, "activation", mb, &out)?;
                } else {
                    loss += out.to_kind(Kind::Double);
                }
                passes.insert((mb, chunk), pass);
            }
            Action::Backward { .. } => {
                let pass = passes
                    .remove(&(mb, chunk))
                    .expect("the schedule runs a forward before its backward");
                let g = if st + 1 < n {
                    let c = Links::chan(&mut links.grad, st);
                    Some(recv_timed(&mut trace, c, "gradient", mb, like)?)
                } else {
                    None
                };
                let gin = timed(
                    &mut trace,
                    || format!("B{mb}.{chunk}"),
                    "backward",
                    || chunk_backward(pass, reborrow(&mut tp), g, grads, &mut |_, _| Ok(())),
                )?;
                if st > 0 {
                    let c = Links::chan(&mut links.grad, st - 1);
                    let g = gin.expect("a stage after the first has an input gradient");
                    send_timed(&mut trace, c, "gradient", mb, &g)?;
                }
            }
        }
    }
    links.finish()?;
    Ok(loss)
}

/// Forward only (validation) of one batch through the pipeline: this rank
/// runs its chunks in stage order. Returns the sum of token losses on the
/// last stage, zero elsewhere.
pub fn eval_step(
    input: &StepInput<'_>,
    rank: usize,
    mut tp: Tp<'_>,
    links: &mut Links,
    tokens: &Tensor,
) -> Result<Tensor> {
    let s = input.schedule;
    let n = s.num_stages();
    let device = tokens.device();
    let kind = input.run.model.params.flat.kind();
    let mut loss = Tensor::zeros([], (Kind::Double, device));
    // A validation batch may have fewer rows than a micro-batch.
    let mut shape = input.act_shape.clone();
    shape[0] = tokens.size()[0];
    let mut untraced: Option<&mut Trace> = None;
    for chunk in 0..s.v {
        let st = s.stage(rank, chunk);
        let x = if st > 0 {
            let c = Links::chan(&mut links.act, st - 1);
            let like = || Tensor::zeros(shape.as_slice(), (kind, device));
            Some(recv_timed(&mut untraced, c, "activation", 0, like)?)
        } else {
            None
        };
        let out = chunk_eval(input.run, &input.progs[chunk], reborrow(&mut tp), tokens, x)?;
        if st + 1 < n {
            let c = Links::chan(&mut links.act, st);
            send_timed(&mut untraced, c, "activation", 0, &out)?;
        } else {
            loss += out.to_kind(Kind::Double);
        }
    }
    links.finish()?;
    Ok(loss)
}
