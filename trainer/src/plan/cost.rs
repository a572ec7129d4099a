//! How long one micro-batch's forward and backward through one chunk of
//! layers take, segment by segment of the engine's program: the GEMMs of
//! each segment's weights (this rank's blocks, from its `ParamSpec`s) at the
//! calibrated rate of their shape class, attention at the rate of its head
//! dimension, the elementwise work in proportion to the activations the
//! segment writes, and each
//! tensor-parallel collective (forward, and its conjugate in backward; the
//! ones `parallel.tp_comm_overlap` starts under the next segment's
//! weight-gradient GEMMs partly hidden), each with the engine's fixed cost
//! per collective. Activation checkpointing adds each
//! block's forward to its backward; the chunked head recomputes its logits.

use crate::config::ModelConfig;
use crate::engine::program::{Program, Seg, Step};
use crate::model::block::LayerWeight;
use crate::model::key::ParamKey;
use crate::model::summary::summarize;
use crate::model::Share;
use crate::parallel::tp::{Comm, TpPlan};
use crate::plan::acts::{step_bytes, PassOptions, Tokens};
use crate::plan::calib::Calibration;
use crate::plan::net::Net;

/// Seconds of one pass through a chunk, and where they go.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChunkTime {
    pub fwd: f64,
    pub bwd: f64,
    pub gemm: f64,
    pub attention: f64,
    pub elementwise: f64,
    /// Tensor-parallel collectives, the part not hidden.
    pub tp_comm: f64,
}

/// What the cost of a chunk depends on.
pub struct Ctx<'a> {
    pub c: &'a ModelConfig,
    pub plan: &'a TpPlan,
    pub share: &'a Share,
    pub cal: &'a Calibration,
    pub net: Net<'a>,
    /// Global ranks of this rank's tensor-parallel group.
    pub tp_group: Vec<usize>,
    pub tokens: Tokens,
    pub seq_len: usize,
    pub opts: PassOptions,
    /// `parallel.tp_comm_overlap` in effect.
    pub overlap: bool,
    /// The model's attention FLOPs per token and layer (forward and
    /// backward, all heads): [`attention_flops_per_layer`].
    pub attn_flops: f64,
    /// The positions in `share.specs` of each 2-D weight, by key
    /// ([`matmul_index`]).
    pub mats: std::collections::HashMap<ParamKey, Vec<usize>>,
}

/// The attention FLOPs per token of one layer of model `c` at `seq_len`
/// (forward and backward, all heads), for [`Ctx::attn_flops`]: computed
/// once per rank, not once per block (the model's summary declares every
/// parameter).
pub fn attention_flops_per_layer(c: &ModelConfig, seq_len: usize) -> f64 {
    summarize(c, seq_len).attention_flops_per_token / c.num_layers as f64
}

/// The positions in `share.specs` of its 2-D weights, by key, for
/// [`Ctx::mats`]: a segment finds its weights without a pass over every
/// weight of the rank.
pub fn matmul_index(share: &Share) -> std::collections::HashMap<ParamKey, Vec<usize>> {
    let mut index: std::collections::HashMap<ParamKey, Vec<usize>> = Default::default();
    for (i, s) in share.specs.iter().enumerate() {
        if s.shape.len() == 2 {
            index.entry(s.key).or_default().push(i);
        }
    }
    index
}

/// One step's seconds: forward, backward, of which weight-gradient GEMMs.
#[derive(Clone, Copy, Default)]
struct StepTime {
    fwd: f64,
    bwd: f64,
    wgrad: f64,
    /// Of `fwd` and `bwd`: a collective's transfer.
    comm_f: f64,
    comm_b: f64,
}

impl Ctx<'_> {
    /// The weights segment `seg` multiplies by, as this rank holds them.
    fn matmuls(&self, seg: Seg) -> Vec<(LayerWeight, Vec<i64>)> {
        let head = if self.c.tie_embeddings {
            ParamKey::Embed
        } else {
            ParamKey::LmHead
        };
        let keys: Vec<ParamKey> = match seg {
            Seg::Block(l) => LayerWeight::ALL
                .iter()
                .map(|&w| ParamKey::Layer(l, w))
                .collect(),
            Seg::Part(l, p) => LayerWeight::ALL
                .iter()
                .filter(|w| w.part() == p)
                .map(|&w| ParamKey::Layer(l, w))
                .collect(),
            Seg::Head | Seg::HeadLogits => vec![head],
            Seg::AttendOut(l) => vec![ParamKey::Layer(l, LayerWeight::OProj)],
            Seg::Embed | Seg::FinalNorm | Seg::AttendHeads(_) => vec![],
        };
        // In the order of the rank's weights, as a pass over them would give.
        let mut at: Vec<usize> = keys
            .iter()
            .filter_map(|k| self.mats.get(k))
            .flatten()
            .copied()
            .collect();
        at.sort_unstable();
        at.dedup();
        at.iter()
            .map(|&i| &self.share.specs[i])
            .map(|s| {
                let w = match s.key {
                    ParamKey::Layer(_, w) => w,
                    _ => LayerWeight::QProj, // any row-major matmul weight
                };
                (w, s.shape.clone())
            })
            .collect()
    }

    /// Forward GEMM seconds of `seg`.
    fn gemm(&self, seg: Seg) -> f64 {
        self.matmuls(seg)
            .iter()
            .map(|(w, s)| {
                // k_up multiplies every key head's raw key.
                let rows = match w {
                    LayerWeight::KUp => self.tokens.all * self.plan.k_heads as f64,
                    _ => self.tokens.all,
                };
                let flops = 2.0 * rows * (s[0] * s[1]) as f64;
                flops / self.cal.gemm_flops(s[0].min(s[1]) as usize)
            })
            .sum()
    }

    /// Attention seconds (forward and backward) of one block on this rank.
    fn attention(&self) -> f64 {
        let share = self.plan.q_heads as f64 / self.c.num_q_heads as f64;
        let flops = self.attn_flops * share * self.tokens.all;
        flops / self.cal.attention_flops(self.c.dot_dim())
    }

    fn elementwise(&self, bytes: f64) -> f64 {
        bytes / (self.cal.compute.elementwise_gbps.value * 1e9)
    }

    /// Seconds of a collective over the tensor-parallel group on a tensor
    /// of `full` bytes (gathered, or before its scatter).
    fn collective(&self, op: Comm, full: f64) -> f64 {
        let engine = self.cal.network.tp_collective_us.value * 1e-6;
        match op {
            Comm::Copy => 0.0,
            Comm::AllReduce => engine + self.net.all_reduce(&self.tp_group, full),
            _ => engine + self.net.gather(&self.tp_group, full),
        }
    }
}

/// Seconds of `seg`: forward, backward and its weight-gradient GEMMs;
/// `bytes`: the activations it writes; adds to `tally`.
fn seg_time(x: &Ctx<'_>, seg: Seg, bytes: f64, tally: &mut ChunkTime) -> StepTime {
    let gemm = x.gemm(seg);
    let attn = match seg {
        Seg::Block(_) | Seg::Part(_, crate::model::block::Part::Attend) => x.attention(),
        _ => 0.0,
    };
    let elem = x.elementwise(bytes);
    tally.gemm += 3.0 * gemm;
    tally.attention += attn;
    tally.elementwise += 3.0 * elem;
    // FlashAttention's backward does 2.5 times the forward's matmul work.
    let (attn_f, attn_b) = (attn / 3.5, attn * 2.5 / 3.5);
    let mut t = StepTime {
        fwd: gemm + attn_f + elem,
        bwd: 2.0 * gemm + attn_b + 2.0 * elem,
        wgrad: gemm,
        ..StepTime::default()
    };
    if seg == Seg::Head && x.opts.loss_chunk_tokens > 0 {
        // Backward recomputes the head chunk by chunk.
        t.bwd += gemm + elem;
        tally.gemm += gemm;
        tally.elementwise += elem;
    }
    t
}

/// The seconds of a pass through `prog`.
pub fn chunk_time(x: &Ctx<'_>, prog: &Program) -> ChunkTime {
    let bytes = step_bytes(x.c, x.plan, prog, x.tokens, &x.opts);
    let (slot, _) = crate::plan::acts::slots(x.c, x.plan, prog);
    let mut tally = ChunkTime::default();
    let mut steps: Vec<StepTime> = Vec::new();
    for (i, step) in prog.steps.iter().enumerate() {
        let st = match step {
            Step::Run { seg, .. } => seg_time(x, *seg, bytes[i].0 + bytes[i].1, &mut tally),
            // sigma plan does not model context parallelism (its programs have
            // no ring); the attention alone, without the ring's transfers.
            Step::Ring { .. } => {
                let attn = x.attention();
                tally.attention += attn;
                StepTime {
                    fwd: attn / 3.0,
                    bwd: 2.0 * attn / 3.0,
                    ..StepTime::default()
                }
            }
            Step::Comm { op, from, to } => {
                let (a, b) = (x.tokens.of(slot[*from]), x.tokens.of(slot[*to]));
                let full = a.max(b);
                // The copies a collective makes on each side.
                let copy = if *op == Comm::Copy {
                    0.0
                } else {
                    x.elementwise(b)
                };
                tally.elementwise += copy + x.elementwise(a);
                let (cf, cb) = (x.collective(*op, full), x.collective(op.conjugate(), full));
                StepTime {
                    fwd: cf + copy,
                    bwd: cb + x.elementwise(a),
                    wgrad: 0.0,
                    comm_f: cf,
                    comm_b: cb,
                }
            }
        };
        steps.push(st);
    }
    finish(x, prog, &steps, tally)
}

/// Sum the steps: a backward collective feeding a segment whose weight
/// gradients it overlaps is partly hidden; checkpointed blocks run their
/// forward again in backward.
fn finish(x: &Ctx<'_>, prog: &Program, steps: &[StepTime], mut tally: ChunkTime) -> ChunkTime {
    let hide = if x.overlap && x.plan.tp > 1 {
        x.cal.network.tp_overlap.value
    } else {
        0.0
    };
    let mut fwd = 0.0;
    let mut bwd = 0.0;
    for (i, step) in prog.steps.iter().enumerate() {
        let mut b = steps[i].bwd;
        if let Step::Comm { to, .. } = step {
            let feeds = match prog.steps.get(i + 1) {
                Some(Step::Run { inputs, .. }) => inputs.contains(to),
                _ => false,
            };
            let wgrad = if feeds { steps[i + 1].wgrad } else { 0.0 };
            let hidden = hide * steps[i].comm_b.min(wgrad);
            b -= hidden;
            tally.tp_comm += steps[i].comm_f + steps[i].comm_b - hidden;
        }
        fwd += steps[i].fwd;
        bwd += b;
    }
    if x.opts.checkpoint {
        for blk in &prog.blocks {
            let again = &steps[blk.clone()];
            bwd += again.iter().map(|s| s.fwd).sum::<f64>();
            tally.gemm += again.iter().map(|s| s.wgrad).sum::<f64>();
            tally.tp_comm += again.iter().map(|s| s.comm_f).sum::<f64>();
        }
    }
    tally.fwd = fwd;
    tally.bwd = bwd;
    tally
}
