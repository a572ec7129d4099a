//! The program of one micro-batch on one chunk of layers: segments (pieces
//! of the model with autograd inside) and the collectives between them.
//! Built from the block's wiring (`model::block::wiring`) and the
//! collectives the tensor-parallel plan puts after each segment output
//! (`TpPlan::comm_after`): the engine places them, the plan decides them.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::model::block::{wiring, Part, Val};
use crate::model::key::ParamKey;
use crate::model::params::ParamId;
use crate::model::Model;
use crate::parallel::tp::{Comm, CommPoint, TpPlan};

/// A piece of the model with autograd inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    /// tokens -> [x]: the embedding lookup (this rank's rows under tensor
    /// parallelism).
    Embed,
    /// [x] -> [y]: a whole block (one device).
    Block(usize),
    /// A part of block `l` (tensor parallelism: the collectives between parts).
    Part(usize, Part),
    /// [x] -> [h]: the final norm.
    FinalNorm,
    /// [x] -> loss sum (one device: final norm, logits, cross-entropy).
    Head,
    /// [h] -> logits of this rank's vocabulary rows.
    HeadLogits,
    /// [q] -> query heads (RoPE) of block `l`, before a [`Step::Ring`].
    AttendHeads(usize),
    /// [a] -> o: the output projection of block `l` after a [`Step::Ring`].
    AttendOut(usize),
}

impl Seg {
    pub fn layer(self) -> Option<usize> {
        match self {
            Seg::Block(l) | Seg::Part(l, _) | Seg::AttendHeads(l) | Seg::AttendOut(l) => Some(l),
            _ => None,
        }
    }
}

pub type Slot = usize;

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
    /// Context parallelism: the attention of block `layer` across the ring
    /// (`engine/ring.rs`), from [query heads, K, V] to the heads' outputs.
    Ring {
        layer: usize,
        inputs: [Slot; 3],
        output: Slot,
    },
}

/// The steps of one micro-batch on one chunk of layers (the whole model
/// without pipeline parallelism), for a model and its tensor-parallel plan.
#[derive(Clone, Debug)]
pub struct Program {
    pub steps: Vec<Step>,
    pub(crate) slots: usize,
    /// The slot receiving the previous stage's activation (not on the first stage).
    pub(crate) input_slot: Option<Slot>,
    /// The last stage: the slot whose value is the loss (one device) or the
    /// local logits. Other stages: the activation sent on.
    pub(crate) out_slot: Slot,
    pub(crate) last: bool,
    /// Step ranges recomputed as one under activation checkpointing (blocks).
    pub blocks: Vec<Range<usize>>,
    pub(crate) vocab_parallel: bool,
}

struct Builder<'p> {
    plan: &'p TpPlan,
    /// Attention runs across the context-parallel ring.
    ring: bool,
    steps: Vec<Step>,
    slots: usize,
}

impl Builder<'_> {
    fn slot(&mut self) -> Slot {
        self.slots += 1;
        self.slots - 1
    }

    /// Run `seg` on `inputs`; each output followed by the collective the
    /// plan puts after it (at `point`). Returns the slots holding the
    /// outputs as the next segments read them.
    fn run(
        &mut self,
        seg: Seg,
        point: Option<CommPoint>,
        inputs: &[Slot],
        n_out: usize,
    ) -> Vec<Slot> {
        let outputs: Vec<Slot> = (0..n_out).map(|_| self.slot()).collect();
        self.steps.push(Step::Run {
            seg,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
        });
        outputs
            .into_iter()
            .enumerate()
            .map(
                |(i, from)| match point.and_then(|p| self.plan.comm_after(p, i)) {
                    None => from,
                    Some(op) => {
                        let to = self.slot();
                        self.steps.push(Step::Comm { op, from, to });
                        to
                    }
                },
            )
            .collect()
    }
}

impl Builder<'_> {
    /// Part `part` of block `l` on `ins`, followed by the plan's
    /// collectives; the attention part across the ring when there is one.
    fn part(&mut self, l: usize, part: Part, ins: &[Slot], n_out: usize) -> Vec<Slot> {
        let point = Some(CommPoint::Part(part));
        if !(self.ring && part == Part::Attend) {
            return self.run(Seg::Part(l, part), point, ins, n_out);
        }
        let q = self.run(Seg::AttendHeads(l), None, &ins[..1], 1)[0];
        let output = self.slot();
        self.steps.push(Step::Ring {
            layer: l,
            inputs: [q, ins[1], ins[2]],
            output,
        });
        self.run(Seg::AttendOut(l), point, &[output], 1)
    }
}

impl Program {
    /// The whole model.
    pub fn new(model: &Model, plan: &TpPlan) -> Program {
        Program::chunk(model, plan, 0..model.cfg.num_layers, true, true)
    }

    /// The whole model, its attention across a context-parallel ring when `ring`.
    pub fn with_ring(model: &Model, plan: &TpPlan, ring: bool) -> Program {
        Program::build(&model.cfg, plan, 0..model.cfg.num_layers, true, true, ring)
    }

    /// Layers `layers`, with the embedding in front when `first` and the head
    /// and loss after when `last`. One device: a segment per block and the
    /// loss in the head segment. Tensor parallelism: a segment per part of
    /// each block, the plan's collectives between, the logits of this rank's
    /// vocabulary rows at the end (the loss in closed form, `parallel::tp`).
    pub fn chunk(
        model: &Model,
        plan: &TpPlan,
        layers: Range<usize>,
        first: bool,
        last: bool,
    ) -> Program {
        Program::of_config(&model.cfg, plan, layers, first, last)
    }

    /// [`Program::chunk`] from the model's config alone, without its
    /// weights (the program depends only on the config and the plan):
    /// `sigma plan` reads the segments of models it does not build.
    pub fn of_config(
        cfg: &ModelConfig,
        plan: &TpPlan,
        layers: Range<usize>,
        first: bool,
        last: bool,
    ) -> Program {
        Program::build(cfg, plan, layers, first, last, false)
    }

    /// [`Program::of_config`]; with `ring` (context parallelism) a block
    /// runs as its parts, and its attention part as the query heads, the
    /// ring ([`Step::Ring`]) and the output projection.
    pub fn build(
        cfg: &ModelConfig,
        plan: &TpPlan,
        layers: Range<usize>,
        first: bool,
        last: bool,
        ring: bool,
    ) -> Program {
        let mut b = Builder {
            plan,
            ring,
            steps: Vec::new(),
            slots: 0,
        };
        let mut blocks = Vec::new();
        let input_slot = (!first).then(|| b.slot());
        let mut x = match input_slot {
            Some(x) => x,
            None => b.run(Seg::Embed, Some(CommPoint::Embed), &[], 1)[0],
        };
        let wires = wiring(cfg);
        for l in layers {
            let s = b.steps.len();
            x = if plan.splits_blocks() || ring {
                let mut at = [usize::MAX; Val::COUNT];
                at[Val::X as usize] = x;
                for w in &wires {
                    let ins: Vec<Slot> = w.inputs.iter().map(|&v| at[v as usize]).collect();
                    let outs = b.part(l, w.part, &ins, w.outputs.len());
                    for (&v, o) in w.outputs.iter().zip(outs) {
                        at[v as usize] = o;
                    }
                }
                at[Val::Y as usize]
            } else {
                b.run(Seg::Block(l), None, &[x], 1)[0]
            };
            blocks.push(s..b.steps.len());
        }
        let vocab_parallel = last && plan.splits_blocks();
        let out_slot = match (last, vocab_parallel) {
            (false, _) => x,
            (true, false) => b.run(Seg::Head, None, &[x], 1)[0],
            (true, true) => {
                let h = b.run(Seg::FinalNorm, Some(CommPoint::FinalNorm), &[x], 1)[0];
                b.run(Seg::HeadLogits, None, &[h], 1)[0]
            }
        };
        Program {
            steps: b.steps,
            slots: b.slots,
            input_slot,
            out_slot,
            last,
            blocks,
            vocab_parallel,
        }
    }

    /// The parameters segment `seg` uses.
    pub fn seg_params(model: &Model, seg: Seg) -> Vec<ParamId> {
        let head = || model.try_id(model.head_key());
        let final_norm = || model.try_id(ParamKey::FinalNorm);
        match seg {
            Seg::Embed => model.try_id(ParamKey::Embed).into_iter().collect(),
            Seg::Block(l) => model.layer_params(l, None),
            Seg::Part(l, part) => model.layer_params(l, Some(part)),
            Seg::FinalNorm => final_norm().into_iter().collect(),
            Seg::Head => final_norm().into_iter().chain(head()).collect(),
            Seg::HeadLogits => head().into_iter().collect(),
            Seg::AttendHeads(_) => Vec::new(),
            Seg::AttendOut(l) => model.layer_params(l, Some(Part::Attend)),
        }
    }

    /// The segments in backward order (position 0 is differentiated first).
    pub fn backward_segments(&self) -> Vec<Seg> {
        self.steps
            .iter()
            .rev()
            .filter_map(|s| match s {
                Step::Run { seg, .. } => Some(*seg),
                Step::Comm { .. } | Step::Ring { .. } => None,
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

    /// The layer of the block whose steps are `blk`.
    pub(crate) fn block_layer(&self, blk: &Range<usize>) -> Option<usize> {
        match &self.steps[blk.start] {
            Step::Run { seg, .. } => seg.layer(),
            Step::Ring { layer, .. } => Some(*layer),
            Step::Comm { .. } => None,
        }
    }
}
