//! The segment engine: a micro-batch runs as a program of segments (pieces of
//! the model with ordinary autograd inside) and communication steps between
//! them, which the engine, not autograd, performs (tch has no custom autograd
//! functions). The engine is the one owner of segments, their parameters and
//! their boundaries; the model stays single-device-shaped, and the
//! tensor-parallel plan decides which collective goes on which boundary
//! (`program.rs`).
//!
//! Values live in slots. Forward: a segment reads its input slots (leaves that
//! require grad) and its outputs are detached into fresh leaves; a
//! communication step turns a slot into a new leaf (all-gather, reduce-scatter,
//! all-reduce across the tensor-parallel group). Backward walks the program in
//! reverse: a segment differentiates its outputs, each seeded with its
//! gradient `g_i` (autograd's `grad` with grad_outputs, through a shim:
//! `kernels::fused::grad`), with respect to its parameters and input leaves,
//! adding parameter gradients straight into the flat gradient buffer; a
//! communication step applies its conjugate to the gradient (all-gather <->
//! reduce-scatter, identity <-> all-reduce), overlapped with the weight
//! gradients of the segment it feeds when `parallel.tp_comm_overlap` applies.
//!
//! Activation checkpointing: a block's steps run under `no_grad`, only the
//! block's input is kept, and backward first re-runs the block's forward
//! (communication included) from it.
//!
//! How a pass runs beyond the model is an [`ExecOptions`] value resolved once
//! from the config, carried with the model, its tensor-parallel plan and the
//! gradient sink in a [`Runner`].

pub mod comm;
pub mod pipeline;
pub mod program;
pub mod ring;

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::config::RunConfig;
use crate::dist::Collectives;
use crate::error::{Result, TrainError};
use crate::guard::at;
use crate::model::params::ParamId;
use crate::model::{Exec, Fwd, GradSink, Model};
use crate::parallel::tp::{vocab_parallel_cross_entropy, TpPlan};
pub use comm::take_comm_seconds;
use comm::{communicate, finish, start_communicate, InFlight};
pub use program::{Program, Seg, Slot, Step};
pub use ring::Ring;

/// How passes run, beyond the model: resolved once from the config (and
/// the environment), passed to the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// `train.activation_checkpointing`: recompute each block in backward.
    pub checkpoint: bool,
    /// `train.loss_chunk_tokens`: the output head and loss in chunks of this
    /// many tokens (0: all at once).
    pub loss_chunk_tokens: usize,
    /// `parallel.tp_comm_overlap`: overlap the backward collectives of
    /// tensor parallelism with weight-gradient GEMMs (needs the gradient sink).
    pub tp_comm_overlap: bool,
    /// `SIGMA_TIME_COLLECTIVES=1`: time every tensor-parallel collective (the
    /// compute stream synchronised around each; the overlap is then off).
    pub time_collectives: bool,
    /// Evaluation or generation of a loaded model: weights that do not change.
    pub frozen: bool,
}

impl ExecOptions {
    /// The options of a training run of `cfg`.
    pub fn training(cfg: &RunConfig) -> ExecOptions {
        ExecOptions {
            checkpoint: cfg.train.activation_checkpointing,
            loss_chunk_tokens: cfg.train.loss_chunk_tokens,
            tp_comm_overlap: cfg.parallel.tp_comm_overlap,
            time_collectives: sigma_data::env::switch(sigma_data::env::TIME_COLLECTIVES, false),
            frozen: false,
        }
    }
}

/// A model with what its passes need: its tensor-parallel plan, the
/// options, and where matmul weight gradients go.
#[derive(Clone, Copy)]
pub struct Runner<'a> {
    pub model: &'a Model,
    pub plan: &'a TpPlan,
    pub opts: ExecOptions,
    pub sink: Option<&'a GradSink>,
    /// The context-parallel ring (cp > 1): this rank computes the pieces
    /// of each sequence the ring gives it, attention across the ring.
    pub ring: Option<&'a Ring>,
}

impl<'a> Runner<'a> {
    pub fn new(model: &'a Model, plan: &'a TpPlan, opts: ExecOptions) -> Runner<'a> {
        Runner {
            model,
            plan,
            opts,
            sink: None,
            ring: None,
        }
    }

    /// Attention across `ring` (context parallelism).
    pub fn with_ring(mut self, ring: Option<&'a Ring>) -> Runner<'a> {
        self.ring = ring;
        self
    }

    /// Matmul weight gradients into `sink` (its buffer must be the `grads`
    /// backward is given).
    pub fn with_sink(mut self, sink: Option<&'a GradSink>) -> Runner<'a> {
        self.sink = sink;
        self
    }

    /// The model computing under these options.
    pub fn fwd(&self) -> Fwd<'a> {
        self.model.fwd(Exec {
            sink: self.sink,
            frozen: self.opts.frozen,
            pieces: self.ring.map(|r| r.pieces),
        })
    }

    /// The queue of put-off weight-gradient GEMMs, when backward may use
    /// one: with the gradient sink, the overlap on, tensor parallelism, and
    /// collectives not timed (timing runs each to completion).
    pub fn wgrad_queue(&self) -> Option<&'a crate::kernels::fused::WgradQueue> {
        let on = self.opts.tp_comm_overlap && self.plan.tp > 1 && !self.opts.time_collectives;
        self.sink.filter(|_| on).map(|s| &s.queue)
    }

    /// The program of the whole model.
    pub fn program(&self) -> Program {
        Program::with_ring(self.model, self.plan, self.ring.is_some())
    }
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Run one segment on its inputs. `head_chunk`: tokens per chunk of the loss
/// (0: all at once).
fn run_seg(
    r: &Runner<'_>,
    seg: Seg,
    inputs: &[Tensor],
    tokens: &Tensor,
    targets: &Tensor,
    head_chunk: usize,
) -> Vec<Tensor> {
    at(
        match seg {
            Seg::Embed => "forward (embedding)",
            Seg::Head | Seg::HeadLogits | Seg::FinalNorm => "forward (output head and loss)",
            _ => "forward",
        },
        seg.layer(),
    );
    let f = r.fwd();
    match seg {
        Seg::Embed => vec![r.plan.embed(&f, &r.model.cfg, tokens)],
        Seg::Block(l) => vec![f.block(l, &inputs[0])],
        Seg::Part(l, part) => f.part(l, part, inputs),
        Seg::FinalNorm => vec![f.final_norm(&inputs[0])],
        Seg::Head => vec![f.head_loss_sum_chunked(&inputs[0], targets, head_chunk)],
        Seg::HeadLogits => vec![f.head_logits(&inputs[0])],
        Seg::AttendHeads(_) => vec![f.query_heads(&inputs[0])],
        Seg::AttendOut(l) => vec![f.attend_out(l, &inputs[0])],
    }
}

/// Everything a micro-batch's execution on one chunk holds, from its
/// forward to its backward (the activations pipeline schedules keep in flight).
pub struct Pass<'a> {
    run: Runner<'a>,
    prog: &'a Program,
    tokens: Tensor,
    targets: Tensor,
    /// Leaves: the value of every slot.
    val: Vec<Option<Tensor>>,
    /// Segment outputs with their graphs (kept for backward unless recomputed).
    graph: Vec<Option<Tensor>>,
    grad: Vec<Option<Tensor>>,
    checkpoint: bool,
    /// The head ran in chunks without a graph (`train.loss_chunk_tokens`):
    /// backward recomputes it chunk by chunk, scaled by this loss scale.
    head_deferred: Option<f64>,
    /// The backward collective of the Comm step at this index, started while
    /// the weight gradients of the segment after it ran (`parallel.tp_comm_overlap`).
    in_flight: Option<(usize, InFlight)>,
    /// What each ring step's forward kept for its backward, by step.
    ring_saved: Vec<Option<ring::Saved>>,
}

pub type Tp<'t> = Option<&'t mut dyn Collectives>;

/// A shorter-lived borrow of the group, to pass on.
pub fn reborrow<'s>(tp: &'s mut Tp<'_>) -> Tp<'s> {
    tp.as_mut().map(|c| &mut **c as &mut dyn Collectives)
}

fn group<'t>(tp: &'t mut Tp<'_>) -> &'t mut dyn Collectives {
    match tp {
        Some(c) => &mut **c,
        None => panic!("a model split by tensor parallelism needs its group"),
    }
}

impl<'a> Pass<'a> {
    fn new(run: Runner<'a>, prog: &'a Program, tokens: &Tensor, checkpoint: bool) -> Pass<'a> {
        let t = tokens.size()[1] - 1;
        // Context parallelism: this rank's pieces of each sequence (inputs
        // and their next tokens, the targets).
        let mine = |x: Tensor| match run.ring {
            Some(r) => r.pieces.select(&x, t),
            None => x,
        };
        Pass {
            run,
            prog,
            tokens: mine(tokens.narrow(1, 0, t)),
            targets: mine(tokens.narrow(1, 1, t)),
            val: (0..prog.slots).map(|_| None).collect(),
            graph: (0..prog.slots).map(|_| None).collect(),
            grad: (0..prog.slots).map(|_| None).collect(),
            checkpoint,
            head_deferred: None,
            in_flight: None,
            ring_saved: (0..prog.steps.len()).map(|_| None).collect(),
        }
    }

    fn input(&self, s: Slot) -> Tensor {
        self.val[s]
            .as_ref()
            .expect("input computed")
            .shallow_clone()
    }

    /// Forward of steps `range`; segments keep their graphs when `keep`.
    fn forward(&mut self, tp: &mut Tp<'_>, range: Range<usize>, keep: bool) -> Result<()> {
        for i in range {
            match &self.prog.steps[i] {
                Step::Run {
                    seg,
                    inputs,
                    outputs,
                } => {
                    let ins: Vec<Tensor> = inputs.iter().map(|&s| self.input(s)).collect();
                    // The head in chunks: without gradients always (nothing to
                    // keep); in training when asked, its graph then rebuilt in backward.
                    let chunked = self.run.opts.loss_chunk_tokens;
                    let deferred = *seg == Seg::Head && keep && chunked > 0;
                    let head_chunk = match (keep, chunked) {
                        (true, _) => chunked,
                        (false, 0) => crate::model::EVAL_LOSS_CHUNK_TOKENS,
                        (false, c) => c,
                    };
                    let keep = keep && !deferred;
                    if deferred {
                        self.head_deferred = Some(1.0);
                    }
                    let run = || {
                        run_seg(
                            &self.run,
                            *seg,
                            &ins,
                            &self.tokens,
                            &self.targets,
                            head_chunk,
                        )
                    };
                    let outs = if keep { run() } else { tch::no_grad(run) };
                    for (&s, o) in outputs.iter().zip(outs) {
                        self.val[s] = Some(leaf(&o));
                        self.graph[s] = keep.then_some(o);
                    }
                }
                Step::Comm { op, from, to } => {
                    at("tensor-parallel communication", None);
                    let x = self.input(*from);
                    let y = communicate(group(tp), *op, &x, self.run.opts.time_collectives)?;
                    self.val[*to] = Some(leaf(&y));
                }
                Step::Ring {
                    layer,
                    inputs,
                    output,
                } => {
                    at("context-parallel attention (ring)", Some(*layer));
                    let [q, k, v] = inputs.map(|s| self.input(s));
                    let (o, saved) =
                        tch::no_grad(|| self.ring().forward(&q, &k, &v, self.scale()))?;
                    self.val[*output] = Some(leaf(&o));
                    self.ring_saved[i] = keep.then_some(saved);
                }
            }
        }
        Ok(())
    }

    fn ring(&self) -> &'a Ring {
        match self.run.ring {
            Some(r) => r,
            None => panic!("a program with ring steps needs the runner's ring"),
        }
    }

    /// The attention's softmax scale.
    fn scale(&self) -> f64 {
        1.0 / (self.run.model.cfg.dot_dim() as f64).sqrt()
    }

    /// Backward of the ring step `i`: the gradients of its query heads, K and V.
    fn backward_ring(&mut self, i: usize, inputs: [Slot; 3], output: Slot) -> Result<()> {
        let [q, k, v] = inputs.map(|s| self.input(s));
        let saved = self.ring_saved[i].take().ok_or_else(|| {
            TrainError::internal_state(format!(
                "ring step {i} reached backward without its forward"
            ))
        })?;
        // Every rank of the ring must take part, gradient or not.
        let g = match self.grad[output].take() {
            Some(g) => g,
            None => self.input(output).zeros_like(),
        };
        let grads = tch::no_grad(|| self.ring().backward(&g, &q, &k, &v, &saved, self.scale()))?;
        for (s, gi) in inputs.into_iter().zip([grads.0, grads.1, grads.2]) {
            self.add_grad(s, gi);
        }
        self.val[output] = None;
        Ok(())
    }

    /// The whole forward: blocks under checkpointing run without graphs and
    /// keep only their input; everything inside them is dropped once done.
    fn forward_all(&mut self, tp: &mut Tp<'_>) -> Result<()> {
        let prog = self.prog;
        let mut i = 0;
        for blk in &prog.blocks {
            self.forward(tp, i..blk.start, true)?;
            self.forward(tp, blk.clone(), !self.checkpoint)?;
            if self.checkpoint {
                self.drop_inside(blk);
            }
            i = blk.end;
        }
        self.forward(tp, i..prog.steps.len(), true)
    }

    /// Drop every value produced inside `blk` except its output (the next block's input).
    fn drop_inside(&mut self, blk: &Range<usize>) {
        let last = blk.end - 1;
        for i in blk.clone() {
            let outs: Vec<Slot> = match &self.prog.steps[i] {
                Step::Run { outputs, .. } => outputs.clone(),
                Step::Comm { to, .. } => vec![*to],
                Step::Ring { output, .. } => vec![*output],
            };
            self.ring_saved[i] = None;
            if i != last {
                for s in outs {
                    self.val[s] = None;
                    self.graph[s] = None;
                }
            }
        }
    }

    fn add_grad(&mut self, slot: Slot, g: Tensor) {
        self.grad[slot] = Some(match self.grad[slot].take() {
            Some(a) => a + g,
            None => g,
        });
    }

    /// Backward of the head run in chunks: each chunk's norm, logits and loss
    /// are recomputed from its slice of the input and differentiated at once,
    /// so one chunk's logits exist at a time; parameter gradients add into
    /// `grads`, the input's gradient is assembled slice by slice.
    fn head_backward_chunked(&mut self, input: Slot, scale: f64, grads: &mut Tensor) {
        let model = self.run.model;
        let f = self.run.fwd();
        let x = self.val[input].as_ref().expect("input kept").detach();
        let (b, t, d) = (x.size()[0], x.size()[1], x.size()[2]);
        let n = b * t;
        let xf = x.reshape([n, d]);
        let tf = self.targets.reshape([n]);
        let gx = Tensor::zeros([n, d], (x.kind(), x.device()));
        let params = Program::seg_params(model, Seg::Head);
        let chunk = self.run.opts.loss_chunk_tokens as i64;
        for (s, len) in crate::model::chunks(n, chunk) {
            let xc = xf.narrow(0, s, len).detach().set_requires_grad(true);
            let loss =
                f.head_loss_sum(&xc.unsqueeze(0), &tf.narrow(0, s, len).unsqueeze(0)) * scale;
            let seed = loss.ones_like();
            let g_x = backward_into(model, vec![(loss, seed)], &params, &[&xc], grads)
                .pop()
                .expect("input gradient");
            if g_x.defined() {
                tch::no_grad(|| gx.narrow(0, s, len).copy_(&g_x));
            }
        }
        self.add_grad(input, gx.view([b, t, d]));
    }

    /// When step `i` is a segment fed by a collective (step `i - 1`) and
    /// weight gradients may be put off ([`Runner::wgrad_queue`]): the queue
    /// and the collective (op, its output slot), to overlap the collective's
    /// backward with this segment's weight-gradient GEMMs.
    fn overlapped_comm(
        &self,
        i: usize,
    ) -> Option<(
        &'a crate::kernels::fused::WgradQueue,
        (crate::parallel::tp::Comm, Slot),
    )> {
        let q = self.run.wgrad_queue()?;
        let Step::Run { inputs, .. } = &self.prog.steps[i] else {
            return None;
        };
        match self.prog.steps.get(i.checked_sub(1)?)? {
            Step::Comm { op, to, .. } if inputs.contains(to) => Some((q, (*op, *to))),
            _ => None,
        }
    }

    /// Backward of step `i`. Returns true for a segment (for the hook).
    fn backward_step(&mut self, tp: &mut Tp<'_>, i: usize, grads: &mut Tensor) -> Result<bool> {
        match &self.prog.steps[i] {
            Step::Comm { op, from, to } => {
                let (op, from, to) = (*op, *from, *to);
                self.backward_comm(tp, i, op, from, to)?;
                Ok(false)
            }
            Step::Ring {
                layer,
                inputs,
                output,
            } => {
                at("context-parallel attention (ring, backward)", Some(*layer));
                let (inputs, output) = (*inputs, *output);
                self.backward_ring(i, inputs, output)?;
                Ok(false)
            }
            Step::Run {
                seg: Seg::Head,
                inputs,
                outputs,
            } if self.head_deferred.is_some() => {
                at("backward (output head and loss, in chunks)", None);
                if self.grad[outputs[0]].take().is_some() {
                    let scale = self.head_deferred.expect("checked");
                    self.head_backward_chunked(inputs[0], scale, grads);
                }
                self.val[outputs[0]] = None;
                Ok(true)
            }
            Step::Run {
                seg,
                inputs,
                outputs,
            } => {
                let (seg, inputs, outputs) = (*seg, inputs.clone(), outputs.clone());
                self.backward_seg(tp, i, seg, &inputs, &outputs, grads)?;
                Ok(true)
            }
        }
    }

    /// Backward of the collective of step `i`: its conjugate on the gradient
    /// of its output (or the one started during the next segment's backward).
    fn backward_comm(
        &mut self,
        tp: &mut Tp<'_>,
        i: usize,
        op: crate::parallel::tp::Comm,
        from: Slot,
        to: Slot,
    ) -> Result<()> {
        at("tensor-parallel communication (backward)", None);
        let timed = self.run.opts.time_collectives;
        let g = match self.in_flight.take() {
            Some((j, f)) if j == i => Some(finish(group(tp), f)?),
            Some((j, _)) => {
                return Err(TrainError::internal_state(format!(
                    "backward reached step {i} with the collective of step {j} in flight"
                )))
            }
            None => match self.grad[to].take() {
                Some(g) => Some(communicate(group(tp), op.conjugate(), &g, timed)?),
                None => None,
            },
        };
        if let Some(g) = g {
            self.add_grad(from, g);
        }
        self.val[to] = None;
        Ok(())
    }

    /// Backward of the segment of step `i`: differentiate its outputs into
    /// its parameters and inputs; with the overlap, start the backward of
    /// the collective that fed it, then run the put-off weight gradients.
    fn backward_seg(
        &mut self,
        tp: &mut Tp<'_>,
        i: usize,
        seg: Seg,
        inputs: &[Slot],
        outputs: &[Slot],
        grads: &mut Tensor,
    ) -> Result<()> {
        at("backward", seg.layer());
        let mut roots: Vec<(Tensor, Tensor)> = Vec::new();
        for &s in outputs {
            let (Some(out), Some(g)) = (self.graph[s].take(), self.grad[s].take()) else {
                continue;
            };
            let seed = if seg == Seg::Head {
                out.ones_like() // the loss, already scaled by its "gradient"
            } else {
                g.to_kind(out.kind())
            };
            roots.push((out, seed));
            self.val[s] = None;
        }
        let params = Program::seg_params(self.run.model, seg);
        let leaves: Vec<(Slot, Tensor)> = inputs
            .iter()
            .map(|&s| (s, self.val[s].as_ref().expect("input kept").shallow_clone()))
            .collect();
        let overlap = self.overlapped_comm(i);
        if !roots.is_empty() {
            let inputs: Vec<&Tensor> = leaves.iter().map(|(_, t)| t).collect();
            let _held = overlap.map(|(q, _)| q.holding());
            let input_grads = backward_into(self.run.model, roots, &params, &inputs, grads);
            for ((s, _), gi) in leaves.into_iter().zip(input_grads) {
                if gi.defined() {
                    self.add_grad(s, gi);
                }
            }
        }
        if let Some((q, (op, to))) = overlap {
            // The input's gradient is complete (its only reader is this
            // segment): start its collective, then the weight gradients.
            if let Some(g) = self.grad[to].take() {
                match start_communicate(group(tp), op.conjugate(), &g) {
                    Ok(f) => self.in_flight = Some((i - 1, f)),
                    Err(e) => {
                        q.clear();
                        return Err(e);
                    }
                }
            }
            q.drain()?;
        }
        Ok(())
    }
}

/// Differentiate the outputs of `roots`, each seeded with its gradient
/// (output, seed), with respect to the parameters `params` and the
/// tensors `inputs`: parameter gradients are added into the flat buffer
/// `grads` (a parameter's gradient arrives through the parameter itself and,
/// when the trainer keeps one, through its bf16 working copy; both are
/// added), the inputs' gradients returned (undefined where unused).
fn backward_into(
    model: &Model,
    roots: Vec<(Tensor, Tensor)>,
    params: &[ParamId],
    inputs: &[&Tensor],
    grads: &mut Tensor,
) -> Vec<Tensor> {
    let p = &model.params;
    let mut wrt: Vec<&Tensor> = Vec::new();
    let mut owner: Vec<ParamId> = Vec::new();
    for &id in params {
        wrt.push(p.tensor(id));
        owner.push(id);
        if let Some(w) = p.work_leaf(id) {
            wrt.push(w);
            owner.push(id);
        }
    }
    let n = wrt.len();
    wrt.extend_from_slice(inputs);
    let (outs, seeds): (Vec<&Tensor>, Vec<&Tensor>) = roots.iter().map(|(o, g)| (o, g)).unzip();
    let mut g = crate::kernels::fused::grad(&outs, &seeds, &wrt);
    let input_grads = g.split_off(n);
    tch::no_grad(|| {
        for (&id, gi) in owner.iter().zip(&g) {
            if gi.defined() {
                let _ = grads
                    .narrow(0, p.offsets[id.0], p.specs[id.0].numel())
                    .g_add_(&gi.reshape([-1]));
            }
        }
    });
    input_grads
}

/// Forward of one micro-batch (`tokens` [b, t + 1]: inputs `tokens[:, :-1]`,
/// targets `tokens[:, 1:]`) through chunk `prog`, from `input` (the previous
/// stage's activation; None on the first stage). Returns the pass, kept for
/// backward, and what it produced: the activation for the next stage, or on
/// the last stage the (unscaled) loss sum, detached, with backward seeded
/// for `sum of token losses * loss_scale`.
pub fn chunk_forward<'a>(
    run: Runner<'a>,
    prog: &'a Program,
    mut tp: Tp<'_>,
    tokens: &Tensor,
    input: Option<Tensor>,
    loss_scale: f64,
) -> Result<(Pass<'a>, Tensor)> {
    let mut ex = Pass::new(run, prog, tokens, run.opts.checkpoint);
    if let (Some(s), Some(x)) = (prog.input_slot, input) {
        ex.val[s] = Some(leaf(&x));
    }
    ex.forward_all(&mut tp)?;
    let out = prog.out_slot;
    if !prog.last {
        let act = ex.val[out].as_ref().expect("stage output").detach();
        return Ok((ex, act));
    }
    let loss = if prog.vocab_parallel {
        at("loss (vocabulary-parallel cross-entropy)", None);
        let logits = ex.val[out].as_ref().expect("logits").shallow_clone();
        let (first, _) = run.plan.vocab_rows(&run.model.cfg);
        let targets = ex.targets.shallow_clone();
        let (loss, g) = vocab_parallel_cross_entropy(
            group(&mut tp),
            &logits,
            &targets,
            first,
            Some(loss_scale),
        )?;
        ex.grad[out] = g;
        loss
    } else if ex.head_deferred.is_some() {
        let loss = ex.val[out].as_ref().expect("loss").detach();
        ex.head_deferred = Some(loss_scale);
        ex.grad[out] = Some(Tensor::ones([], (Kind::Float, loss.device())));
        loss
    } else {
        let loss = ex.graph[out].as_ref().expect("loss").shallow_clone();
        ex.graph[out] = Some(&loss * loss_scale);
        ex.grad[out] = Some(Tensor::ones([], (Kind::Float, loss.device())));
        loss.detach()
    };
    Ok((ex, loss))
}

/// Backward of a pass: `grad_out` is the gradient of its output activation
/// from the next stage (None on the last stage, which seeded its own).
/// Parameter gradients are added into `grads`; `on_segment_done(pos)` is
/// called as soon as the segment at backward position `pos` has added its
/// own. Returns the gradient of the pass's input (None on the first stage).
pub fn chunk_backward(
    mut ex: Pass<'_>,
    mut tp: Tp<'_>,
    grad_out: Option<Tensor>,
    grads: &mut Tensor,
    on_segment_done: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Option<Tensor>> {
    let prog = ex.prog;
    if ex.run.sink.is_some_and(|s| !s.is(grads)) {
        return Err(TrainError::internal_state(
            "the model adds matmul weight gradients into another buffer than the one \
             backward was given (the runner's gradient sink)",
        ));
    }
    if let Some(g) = grad_out {
        ex.grad[prog.out_slot] = Some(g);
        // The output's graph is needed: a checkpointed last block recomputes it below.
    }
    let mut pos = 0;
    let mut i = prog.steps.len();
    while i > 0 {
        i -= 1;
        if ex.checkpoint {
            if let Some(blk) = prog.blocks.iter().find(|b| b.end == i + 1) {
                at(
                    "recompute (activation checkpointing)",
                    prog.block_layer(blk),
                );
                ex.forward(&mut tp, blk.clone(), true)?;
            }
        }
        if ex.backward_step(&mut tp, i, grads)? {
            on_segment_done(pos, grads)?;
            pos += 1;
        }
    }
    Ok(prog.input_slot.and_then(|s| ex.grad[s].take()))
}

impl Runner<'_> {
    /// Forward and backward of one micro-batch through the whole model (see
    /// `chunk_forward`). The gradient of `sum of token losses * loss_scale`
    /// is added into `grads` (flat, laid out like the parameters). Returns
    /// the (unscaled) loss sum, detached. `tp`: the tensor-parallel group
    /// (required when the model is split). `on_segment_done(pos)`: see
    /// `chunk_backward` (position 0 is the head, the last the embedding).
    pub fn forward_backward(
        &self,
        mut tp: Tp<'_>,
        tokens: &Tensor,
        loss_scale: f64,
        grads: &mut Tensor,
        on_segment_done: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let prog = self.program();
        let (pass, loss) =
            chunk_forward(*self, &prog, reborrow(&mut tp), tokens, None, loss_scale)?;
        chunk_backward(pass, tp, None, grads, on_segment_done)?;
        Ok(loss)
    }

    /// Sum of token losses without gradients (validation), with the
    /// tensor-parallel group when the model is split.
    pub fn loss_sum(&self, tp: Tp<'_>, tokens: &Tensor) -> Result<Tensor> {
        chunk_eval(*self, &self.program(), tp, tokens, None)
    }
}

/// `Runner::forward_backward` of a whole model on one device with the plain
/// options (tests): activation checkpointing as given, no gradient sink.
pub fn forward_backward(
    model: &Model,
    tokens: &Tensor,
    loss_scale: f64,
    checkpoint: bool,
    grads: &mut Tensor,
    on_segment_done: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let plan = TpPlan::single(&model.cfg);
    let opts = ExecOptions {
        checkpoint,
        ..ExecOptions::default()
    };
    Runner::new(model, &plan, opts).forward_backward(
        None,
        tokens,
        loss_scale,
        grads,
        on_segment_done,
    )
}

/// Forward of chunk `prog` without gradients: the activation for the next
/// stage, or on the last stage the sum of token losses (validation).
pub fn chunk_eval(
    run: Runner<'_>,
    prog: &Program,
    mut tp: Tp<'_>,
    tokens: &Tensor,
    input: Option<Tensor>,
) -> Result<Tensor> {
    at("validation forward", None);
    let mut ex = Pass::new(run, prog, tokens, false);
    if let (Some(s), Some(x)) = (prog.input_slot, input) {
        ex.val[s] = Some(x);
    }
    let n = prog.steps.len();
    if prog.last && prog.vocab_parallel {
        // Everything up to the logits, then logits and loss a chunk of
        // tokens at a time: one chunk's logits exist at once.
        tch::no_grad(|| ex.forward(&mut tp, 0..n - 1, false))?;
        let Step::Run {
            seg: Seg::HeadLogits,
            inputs,
            ..
        } = &prog.steps[n - 1]
        else {
            unreachable!("a vocabulary-parallel program ends in the head's logits")
        };
        let h = ex.val[inputs[0]].as_ref().expect("head input").detach();
        return vocab_parallel_loss_chunked(&run, group(&mut tp), &h, &ex.targets);
    }
    tch::no_grad(|| ex.forward(&mut tp, 0..n, false))?;
    Ok(ex.val[prog.out_slot].as_ref().expect("output").detach())
}

/// The vocabulary-parallel loss sum of normalised states `h` [b, t, d]
/// without gradients, over chunks of tokens (`train.loss_chunk_tokens`, else
/// `EVAL_LOSS_CHUNK_TOKENS`); every rank of the group runs the same chunks.
fn vocab_parallel_loss_chunked(
    run: &Runner<'_>,
    c: &mut dyn Collectives,
    h: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let (first, _) = run.plan.vocab_rows(&run.model.cfg);
    let (b, t, d) = (h.size()[0], h.size()[1], h.size()[2]);
    let (hf, tf) = (h.reshape([1, b * t, d]), targets.reshape([1, b * t]));
    let chunk = match run.opts.loss_chunk_tokens {
        0 => crate::model::EVAL_LOSS_CHUNK_TOKENS,
        n => n,
    };
    let f = run.fwd();
    let mut total: Option<Tensor> = None;
    for (s, len) in crate::model::chunks(b * t, chunk as i64) {
        at("validation forward (output head and loss)", None);
        let logits = tch::no_grad(|| f.head_logits(&hf.narrow(1, s, len)));
        let (l, _) = vocab_parallel_cross_entropy(c, &logits, &tf.narrow(1, s, len), first, None)?;
        total = Some(match total {
            Some(a) => a + l,
            None => l,
        });
    }
    Ok(total.expect("at least one token"))
}

/// `Runner::loss_sum` of a whole model on one device with the plain
/// options and the given chunking of the head (tests).
pub fn loss_sum(model: &Model, tokens: &Tensor) -> Tensor {
    let plan = TpPlan::single(&model.cfg);
    match Runner::new(model, &plan, ExecOptions::default()).loss_sum(None, tokens) {
        Ok(l) => l,
        Err(e) => panic!("a model on one device has no communication to fail: {e}"),
    }
}
