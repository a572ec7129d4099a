//! The segment engine: a micro-batch runs as a program of segments (pieces of
//! the model with ordinary autograd inside) and communication steps between
//! them, which the engine, not autograd, performs (tch has no custom autograd
//! functions). The engine is the one owner of segments, their parameters and
//! their boundaries; the model stays single-device-shaped.
//!
//! Values live in slots. Forward: a segment reads its input slots (leaves that
//! require grad) and its outputs are detached into fresh leaves; a
//! communication step turns a slot into a new leaf (all-gather, reduce-scatter,
//! all-reduce across the tensor-parallel group). Backward walks the program in
//! reverse: a segment differentiates its outputs, each seeded with its
//! gradient `g_i` (autograd's `grad` with grad_outputs, through a shim:
//! `fused::grad`), with respect to its parameters and input leaves, adding
//! parameter gradients straight into the flat gradient buffer; a
//! communication step applies its conjugate to the gradient (all-gather <->
//! reduce-scatter, identity <-> all-reduce), overlapped with the weight
//! gradients of the segment it feeds when `parallel.tp_comm_overlap` applies.
//!
//! Activation checkpointing: a block's steps run under `no_grad`, only the
//! block's input is kept, and backward first re-runs the block's forward
//! (communication included) from it.
//!
//! Without tensor parallelism a block is one segment and the head computes
//! the loss with autograd. Under tensor parallelism a block is seven segments
//! joined by the Megatron operators (docs/parallelism.md), and the loss is a
//! vocabulary-parallel cross-entropy computed here in closed form.

pub mod pipeline;

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::dist::Collectives;
use crate::error::{Result, TrainError};
use crate::guard::at;
use crate::model::Model;
use crate::model::params::ParamId;

/// A piece of the model with autograd inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    /// tokens -> [x]
    Embed,
    /// [x] -> [x]: a whole block on one device.
    Block(usize),
    /// [x] -> [h]: the attention norm.
    AttnNorm(usize),
    /// [h] -> [q0 features, k heads, v heads]
    Qkv(usize),
    /// [q0 whole] -> [q partial]: AugQ over this rank's share of its width.
    AugQ(usize),
    /// [q features, k, v] -> [o partial]: attention of this rank's heads and o_proj.
    Attend(usize),
    /// [x, o] -> [x2, h2]: residual and the FFN norm.
    AddNorm(usize),
    /// [h2] -> [f partial]
    Ffn(usize),
    /// [x2, f] -> [x3]
    Add(usize),
    /// [x] -> [h]
    FinalNorm,
    /// [x] -> loss sum (one device: final norm, logits, cross-entropy).
    Head,
    /// [h] -> logits of this rank's vocabulary rows.
    HeadLogits,
}

impl Seg {
    fn layer(self) -> Option<usize> {
        match self {
            Seg::Block(l)
            | Seg::AttnNorm(l)
            | Seg::Qkv(l)
            | Seg::AugQ(l)
            | Seg::Attend(l)
            | Seg::AddNorm(l)
            | Seg::Ffn(l)
            | Seg::Add(l) => Some(l),
            _ => None,
        }
    }
}

/// Communication between segments, across the tensor-parallel group. The
/// backward pass applies the conjugate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comm {
    /// Sum the ranks' partial results (backward: identity).
    AllReduce,
    /// Identity into a column-parallel region (backward: all-reduce).
    Copy,
    /// All-gather along the sequence (backward: reduce-scatter).
    GatherSeq,
    /// Reduce-scatter along the sequence (backward: all-gather).
    ScatterSeq,
    /// All-gather along the features (backward: reduce-scatter).
    GatherFeat,
    /// Reduce-scatter along the features (backward: all-gather).
    ScatterFeat,
}

impl Comm {
    fn conjugate(self) -> Comm {
        match self {
            Comm::AllReduce => Comm::Copy,
            Comm::Copy => Comm::AllReduce,
            Comm::GatherSeq => Comm::ScatterSeq,
            Comm::ScatterSeq => Comm::GatherSeq,
            Comm::GatherFeat => Comm::ScatterFeat,
            Comm::ScatterFeat => Comm::GatherFeat,
        }
    }
}

type Slot = usize;

#[derive(Clone, Debug)]
pub enum Step {
    Run {
        seg: Seg,
        inputs: Vec<Slot>,
        outputs: Vec<Slot>,
    },
    Comm {
        op: Comm,
        from: Slot,
        to: Slot,
    },
}

/// The steps of one micro-batch on one chunk of layers (the whole model
/// without pipeline parallelism), for a model and its tensor-parallel plan.
#[derive(Clone, Debug)]
pub struct Program {
    pub steps: Vec<Step>,
    slots: usize,
    /// The slot receiving the previous stage's activation (not on the first stage).
    input_slot: Option<Slot>,
    /// The last stage: the slot whose value is the loss (one device) or the
    /// local logits. Other stages: the activation sent on.
    out_slot: Slot,
    last: bool,
    /// Step ranges recomputed as one under activation checkpointing (blocks).
    pub blocks: Vec<Range<usize>>,
    vocab_parallel: bool,
}

struct Builder {
    steps: Vec<Step>,
    slots: usize,
}

impl Builder {
    fn slot(&mut self) -> Slot {
        self.slots += 1;
        self.slots - 1
    }
    fn run(&mut self, seg: Seg, inputs: &[Slot], n_out: usize) -> Vec<Slot> {
        let outputs: Vec<Slot> = (0..n_out).map(|_| self.slot()).collect();
        self.steps.push(Step::Run {
            seg,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
        });
        outputs
    }
    fn comm(&mut self, op: Option<Comm>, from: Slot) -> Slot {
        match op {
            None => from,
            Some(op) => {
                let to = self.slot();
                self.steps.push(Step::Comm { op, from, to });
                to
            }
        }
    }
}

impl Program {
    /// The whole model.
    pub fn new(model: &Model) -> Program {
        Program::chunk(model, 0..model.cfg.num_layers, true, true)
    }

    /// Layers `layers`, with the embedding in front when `first` and the head
    /// and loss after when `last`.
    pub fn chunk(model: &Model, layers: Range<usize>, first: bool, last: bool) -> Program {
        let plan = model.plan;
        let mut b = Builder {
            steps: Vec::new(),
            slots: 0,
        };
        let mut blocks = Vec::new();
        let input_slot = (!first).then(|| b.slot());
        if plan.tp == 1 {
            let mut x = match input_slot {
                Some(x) => x,
                None => b.run(Seg::Embed, &[], 1)[0],
            };
            for l in layers {
                let s = b.steps.len();
                x = b.run(Seg::Block(l), &[x], 1)[0];
                blocks.push(s..b.steps.len());
            }
            let out_slot = if last {
                b.run(Seg::Head, &[x], 1)[0]
            } else {
                x
            };
            return Program {
                steps: b.steps,
                slots: b.slots,
                input_slot,
                out_slot,
                last,
                blocks,
                vocab_parallel: false,
            };
        }
        // Megatron's f/g operators, with or without sequence parallelism.
        let sp = plan.sequence_parallel;
        let (into, out) = if sp {
            (Comm::GatherSeq, Comm::ScatterSeq)
        } else {
            (Comm::Copy, Comm::AllReduce)
        };
        let mut x = match input_slot {
            Some(x) => x,
            None => {
                let e = b.run(Seg::Embed, &[], 1)[0];
                b.comm(Some(out), e)
            }
        };
        for l in layers {
            let s = b.steps.len();
            let h = b.run(Seg::AttnNorm(l), &[x], 1)[0];
            let h = b.comm(Some(into), h);
            let qkv = b.run(Seg::Qkv(l), &[h], 3);
            let q = if model.cfg.aug_q_dim > 0 {
                let q0 = b.comm(Some(Comm::GatherFeat), qkv[0]);
                let q = b.run(Seg::AugQ(l), &[q0], 1)[0];
                b.comm(Some(Comm::ScatterFeat), q)
            } else {
                qkv[0]
            };
            let o = b.run(Seg::Attend(l), &[q, qkv[1], qkv[2]], 1)[0];
            let o = b.comm(Some(out), o);
            let xh = b.run(Seg::AddNorm(l), &[x, o], 2);
            let h2 = b.comm(Some(into), xh[1]);
            let f = b.run(Seg::Ffn(l), &[h2], 1)[0];
            let f = b.comm(Some(out), f);
            x = b.run(Seg::Add(l), &[xh[0], f], 1)[0];
            blocks.push(s..b.steps.len());
        }
        let out_slot = if last {
            let h = b.run(Seg::FinalNorm, &[x], 1)[0];
            let h = b.comm(Some(into), h);
            b.run(Seg::HeadLogits, &[h], 1)[0]
        } else {
            x
        };
        Program {
            steps: b.steps,
            slots: b.slots,
            input_slot,
            out_slot,
            last,
            blocks,
            vocab_parallel: last,
        }
    }

    /// The parameters segment `seg` uses.
    pub fn seg_params(model: &Model, seg: Seg) -> Vec<ParamId> {
        let ids = &model.ids;
        match seg {
            Seg::Embed => ids.embed.into_iter().collect(),
            Seg::Block(l) => ids.layer(l).all(),
            Seg::AttnNorm(l) => vec![ids.layer(l).attn.norm],
            Seg::Qkv(l) => {
                let a = &ids.layer(l).attn;
                let mut v = vec![a.q_proj, a.k_proj];
                v.extend(a.k_up);
                v.push(a.v_proj);
                v
            }
            Seg::AugQ(l) => ids
                .layer(l)
                .attn
                .aug_q
                .map(|a| a.to_vec())
                .unwrap_or_default(),
            Seg::Attend(l) => vec![ids.layer(l).attn.o_proj],
            Seg::AddNorm(l) => vec![ids.layer(l).ffn.norm],
            Seg::Ffn(l) => {
                let f = &ids.layer(l).ffn;
                vec![f.gate, f.up, f.down]
            }
            Seg::Add(_) => Vec::new(),
            Seg::FinalNorm => ids.final_norm.into_iter().collect(),
            Seg::Head => ids.final_norm.into_iter().chain(ids.head).collect(),
            Seg::HeadLogits => ids.head.into_iter().collect(),
        }
    }

    /// The segments in backward order (position 0 is differentiated first).
    pub fn backward_segments(&self) -> Vec<Seg> {
        self.steps
            .iter()
            .rev()
            .filter_map(|s| match s {
                Step::Run { seg, .. } => Some(*seg),
                Step::Comm { .. } => None,
            })
            .collect()
    }

    /// For every parameter, the backward position of the last segment that
    /// writes its gradient: after it, the gradient of the micro-batch is final.
    pub fn final_positions(&self, model: &Model) -> Vec<usize> {
        let mut last = vec![0usize; model.params.specs.len()];
        for (pos, seg) in self.backward_segments().into_iter().enumerate() {
            for id in Program::seg_params(model, seg) {
                last[id.0] = last[id.0].max(pos);
            }
        }
        last
    }
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

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

/// Set `SIGMA_TIME_COLLECTIVES=1` to time every tensor-parallel collective
/// (the compute stream is synchronised around each, which costs a little speed): the
/// trainer logs the seconds per step as `tp_comm_s`. Timing runs every
/// collective to completion where it is issued, so it also turns off the
/// overlap of backward collectives with weight gradients
/// (`parallel.tp_comm_overlap`): the time is all exposed.
pub const TIME_COLLECTIVES: &str = "SIGMA_TIME_COLLECTIVES";

static COMM_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn timing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(TIME_COLLECTIVES).is_ok_and(|v| v == "1"))
}

/// Seconds spent in timed tensor-parallel collectives since the last call.
pub fn take_comm_seconds() -> f64 {
    COMM_NANOS.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
}

/// Apply `op` to `x` across the tensor-parallel group.
pub fn communicate(c: &mut dyn Collectives, op: Comm, x: &Tensor) -> Result<Tensor> {
    if !timing() {
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

/// Run one segment on its inputs.
/// `head_chunk`: tokens per chunk of the loss (0: all at once).
fn run_seg(
    model: &Model,
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
    let ids = &model.ids;
    match seg {
        Seg::Embed => vec![model.embed(tokens)],
        Seg::Block(l) => vec![model.block(l, &inputs[0])],
        // Under tensor parallelism a norm's output is gathered before the matmuls
        // cast it to the compute dtype anyway: cast first, move half the bytes.
        Seg::AttnNorm(l) => vec![model.norm_in(&inputs[0], ids.layer(l).attn.norm)],
        Seg::Qkv(l) => vec![
            model.q0(l, &inputs[0]),
            model.keys(l, &inputs[0]),
            model.values(l, &inputs[0]),
        ],
        Seg::AugQ(l) => vec![model.aug_q(l, &inputs[0])],
        Seg::Attend(l) => {
            vec![model.attend(l, &model.query_heads(&inputs[0]), &inputs[1], &inputs[2])]
        }
        Seg::AddNorm(l) => {
            let (x2, h2) = model.add_norm_in(&inputs[0], &inputs[1], ids.layer(l).ffn.norm);
            vec![x2, h2]
        }
        Seg::Ffn(l) => vec![model.ffn(l, &inputs[0])],
        Seg::Add(_) => vec![&inputs[0] + &inputs[1]],
        Seg::FinalNorm => vec![model.norm_in(
            &inputs[0],
            ids.final_norm.expect("the last stage holds the final norm"),
        )],
        Seg::Head => vec![model.head_loss_sum_chunked(&inputs[0], targets, head_chunk)],
        Seg::HeadLogits => vec![model.head_logits(&inputs[0])],
    }
}

/// Vocabulary-parallel cross-entropy of this rank's logits [b, t, rows]
/// (rows `first..first + rows` of the vocabulary): the max, the sum of
/// exponentials and the target's logit are reduced across the group, the full
/// logits never gathered. Returns the loss summed over positions and, with
/// `scale`, the gradient of `scale * loss` with respect to the local logits
/// (softmax minus one-hot, in closed form).
pub fn vocab_parallel_cross_entropy(
    c: &mut dyn Collectives,
    logits: &Tensor,
    targets: &Tensor,
    first: i64,
    scale: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    tch::no_grad(|| {
        let rows = logits.size()[2];
        let l = logits.reshape([-1, rows]);
        let (m_local, _) = l.max_dim(-1, false);
        let m = Tensor::stack(&c.all_gather(&m_local.contiguous())?, 0).amax([0].as_slice(), false);
        let e = (&l - m.unsqueeze(1)).exp();
        let t = targets.reshape([-1]) - first;
        let mine = t.ge(0).logical_and(&t.lt(rows));
        let idx = t.clamp(0, rows - 1).unsqueeze(1);
        let t_local = l.gather(1, &idx, false).squeeze_dim(1) * mine.to_kind(l.kind());
        let mut both = Tensor::cat(
            &[e.sum_dim_intlist([1].as_slice(), false, l.kind()), t_local],
            0,
        );
        c.all_reduce_sum(&mut both)?;
        let n = m.size()[0];
        let (z, tl) = (both.narrow(0, 0, n), both.narrow(0, n, n));
        let loss = (z.log() + &m - tl).sum(Kind::Double);
        let grad = scale.map(|s| {
            let g = &e / z.unsqueeze(1);
            let g = g.scatter_add(1, &idx, &(-mine.to_kind(l.kind())).unsqueeze(1));
            (g * s).view(logits.size().as_slice())
        });
        Ok((loss, grad))
    })
}

/// Everything a micro-batch's execution on one chunk holds, from its
/// forward to its backward (the activations pipeline schedules keep in flight).
pub struct Pass<'a> {
    model: &'a Model,
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
    fn new(model: &'a Model, prog: &'a Program, tokens: &Tensor, checkpoint: bool) -> Pass<'a> {
        let t = tokens.size()[1] - 1;
        Pass {
            model,
            prog,
            tokens: tokens.narrow(1, 0, t),
            targets: tokens.narrow(1, 1, t),
            val: (0..prog.slots).map(|_| None).collect(),
            graph: (0..prog.slots).map(|_| None).collect(),
            grad: (0..prog.slots).map(|_| None).collect(),
            checkpoint,
            head_deferred: None,
            in_flight: None,
        }
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
                    let ins: Vec<Tensor> = inputs
                        .iter()
                        .map(|&s| {
                            self.val[s]
                                .as_ref()
                                .expect("input computed")
                                .shallow_clone()
                        })
                        .collect();
                    // The head in chunks: without gradients always (nothing to
                    // keep); in training when asked, its graph then rebuilt in backward.
                    let chunked = self.model.loss_chunk_tokens;
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
                            self.model,
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
                    let x = self.val[*from]
                        .as_ref()
                        .expect("input computed")
                        .shallow_clone();
                    let y = communicate(group(tp), *op, &x)?;
                    self.val[*to] = Some(leaf(&y));
                }
            }
        }
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
            };
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
        let model = self.model;
        let x = self.val[input].as_ref().expect("input kept").detach();
        let (b, t, d) = (x.size()[0], x.size()[1], x.size()[2]);
        let n = b * t;
        let xf = x.reshape([n, d]);
        let tf = self.targets.reshape([n]);
        let gx = Tensor::zeros([n, d], (x.kind(), x.device()));
        let params = Program::seg_params(model, Seg::Head);
        for (s, len) in crate::model::chunks(n, model.loss_chunk_tokens as i64) {
            let xc = xf.narrow(0, s, len).detach().set_requires_grad(true);
            let loss = model
                .head_loss_sum_whole(&xc.unsqueeze(0), &tf.narrow(0, s, len).unsqueeze(0))
                * scale;
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

    /// When step `i` is a segment fed by a collective (step `i - 1`) and the
    /// model puts weight gradients off (`Model::wgrad_queue`): the queue and
    /// the collective (op, its output slot), to overlap the collective's
    /// backward with this segment's weight-gradient GEMMs.
    fn overlapped_comm(&self, i: usize) -> Option<(&'a crate::kernels::fused::WgradQueue, (Comm, Slot))> {
        let q = self.model.wgrad_queue().filter(|_| !timing())?;
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
                at("tensor-parallel communication (backward)", None);
                let g = match self.in_flight.take() {
                    Some((j, f)) if j == i => Some(finish(group(tp), f)?),
                    Some((j, _)) => {
                        return Err(TrainError::Other(format!(
                            "internal: backward reached step {i} with the collective of step {j} in flight"
                        )))
                    }
                    None => match self.grad[*to].take() {
                        Some(g) => Some(communicate(group(tp), op.conjugate(), &g)?),
                        None => None,
                    },
                };
                if let Some(g) = g {
                    self.add_grad(*from, g);
                }
                self.val[*to] = None;
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
                at("backward", seg.layer());
                let mut roots: Vec<(Tensor, Tensor)> = Vec::new();
                for &s in outputs {
                    let (Some(out), Some(g)) = (self.graph[s].take(), self.grad[s].take()) else {
                        continue;
                    };
                    let seed = if *seg == Seg::Head {
                        out.ones_like() // the loss, already scaled by its "gradient"
                    } else {
                        g.to_kind(out.kind())
                    };
                    roots.push((out, seed));
                    self.val[s] = None;
                }
                let params = Program::seg_params(self.model, *seg);
                let leaves: Vec<(Slot, Tensor)> = inputs
                    .iter()
                    .map(|&s| (s, self.val[s].as_ref().expect("input kept").shallow_clone()))
                    .collect();
                let overlap = self.overlapped_comm(i);
                if !roots.is_empty() {
                    let inputs: Vec<&Tensor> = leaves.iter().map(|(_, t)| t).collect();
                    let _held = overlap.map(|(q, _)| q.holding());
                    let input_grads = backward_into(self.model, roots, &params, &inputs, grads);
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
                Ok(true)
            }
        }
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
    model: &'a Model,
    prog: &'a Program,
    mut tp: Tp<'_>,
    tokens: &Tensor,
    input: Option<Tensor>,
    loss_scale: f64,
    checkpoint: bool,
) -> Result<(Pass<'a>, Tensor)> {
    let mut ex = Pass::new(model, prog, tokens, checkpoint);
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
        let (first, _) = model.plan.vocab_rows(&model.cfg);
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
    if !ex.model.grad_sink_is(grads) {
        return Err(TrainError::Other(
            "internal: the model adds matmul weight gradients into another buffer than the one \
             backward was given (Model::set_grad_sink)"
                .into(),
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
                    prog_layer(prog, blk),
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

fn prog_layer(prog: &Program, blk: &Range<usize>) -> Option<usize> {
    match &prog.steps[blk.start] {
        Step::Run { seg, .. } => seg.layer(),
        Step::Comm { .. } => None,
    }
}

/// Forward and backward of one micro-batch through the whole model (see
/// `chunk_forward`). The gradient of `sum of token losses * loss_scale` is
/// added into `grads` (flat, laid out like the parameters). Returns the
/// (unscaled) loss sum, detached. `tp`: the tensor-parallel group (required
/// when the model is split). `on_segment_done(pos)`: see `chunk_backward`
/// (position 0 is the head, the last the embedding).
pub fn forward_backward_in(
    model: &Model,
    mut tp: Tp<'_>,
    tokens: &Tensor,
    loss_scale: f64,
    checkpoint: bool,
    grads: &mut Tensor,
    on_segment_done: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let prog = Program::new(model);
    let (pass, loss) = chunk_forward(
        model,
        &prog,
        reborrow(&mut tp),
        tokens,
        None,
        loss_scale,
        checkpoint,
    )?;
    chunk_backward(pass, tp, None, grads, on_segment_done)?;
    Ok(loss)
}

/// `forward_backward_in` on one device.
pub fn forward_backward(
    model: &Model,
    tokens: &Tensor,
    loss_scale: f64,
    checkpoint: bool,
    grads: &mut Tensor,
    on_segment_done: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    forward_backward_in(
        model,
        None,
        tokens,
        loss_scale,
        checkpoint,
        grads,
        on_segment_done,
    )
}

/// Forward of chunk `prog` without gradients: the activation for the next
/// stage, or on the last stage the sum of token losses (validation).
pub fn chunk_eval(
    model: &Model,
    prog: &Program,
    mut tp: Tp<'_>,
    tokens: &Tensor,
    input: Option<Tensor>,
) -> Result<Tensor> {
    at("validation forward", None);
    let mut ex = Pass::new(model, prog, tokens, false);
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
        return vocab_parallel_loss_chunked(model, group(&mut tp), &h, &ex.targets);
    }
    tch::no_grad(|| ex.forward(&mut tp, 0..n, false))?;
    Ok(ex.val[prog.out_slot].as_ref().expect("output").detach())
}

/// The vocabulary-parallel loss sum of normalised states `h` [b, t, d]
/// without gradients, over chunks of tokens (`train.loss_chunk_tokens`, else
/// `EVAL_LOSS_CHUNK_TOKENS`); every rank of the group runs the same chunks.
fn vocab_parallel_loss_chunked(
    model: &Model,
    c: &mut dyn Collectives,
    h: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let (first, _) = model.plan.vocab_rows(&model.cfg);
    let (b, t, d) = (h.size()[0], h.size()[1], h.size()[2]);
    let (hf, tf) = (h.reshape([1, b * t, d]), targets.reshape([1, b * t]));
    let chunk = match model.loss_chunk_tokens {
        0 => crate::model::EVAL_LOSS_CHUNK_TOKENS,
        n => n,
    };
    let mut total: Option<Tensor> = None;
    for (s, len) in crate::model::chunks(b * t, chunk as i64) {
        at("validation forward (output head and loss)", None);
        let logits = tch::no_grad(|| model.head_logits(&hf.narrow(1, s, len)));
        let (l, _) = vocab_parallel_cross_entropy(c, &logits, &tf.narrow(1, s, len), first, None)?;
        total = Some(match total {
            Some(a) => a + l,
            None => l,
        });
    }
    Ok(total.expect("at least one token"))
}

/// Sum of token losses without gradients (validation), with the
/// tensor-parallel group when the model is split.
pub fn loss_sum_in(model: &Model, tp: Tp<'_>, tokens: &Tensor) -> Result<Tensor> {
    chunk_eval(model, &Program::new(model), tp, tokens, None)
}

/// `loss_sum_in` on one device.
pub fn loss_sum(model: &Model, tokens: &Tensor) -> Tensor {
    match loss_sum_in(model, None, tokens) {
        Ok(l) => l,
        Err(e) => panic!("a model on one device has no communication to fail: {e}"),
    }
}
