//! The activation memory of one micro-batch's pass through one chunk of
//! layers, read from the engine's program (`engine::Program`): its slots
//! (the values between segments, each a tensor the pass keeps from its
//! forward to its backward), what autograd keeps inside each segment, the
//! working memory of each backward, and with activation checkpointing the
//! blocks that keep only their input.
//!
//! What a part keeps is what its operations save for backward on a GPU in
//! bf16 mixed precision with sigma's training kernels (docs/architecture.md):
//! the RMSNorm kernels keep their fp32 input or sum and one fp32 statistic
//! per token, a matmul keeps its bf16 input (the gradient sink takes its
//! weight gradient), the SwiGLU kernel its merged gate/up input, RoPE
//! nothing, SDPA (cuDNN) its q, k, v, output and one fp32 log-sum-exp per
//! head and token, the cross-entropy kernel the bf16 logits and one fp32
//! log-sum-exp per token. Validated against the allocator peaks of
//! docs/benchmarks.md (docs/plan.md).

use crate::config::ModelConfig;
use crate::engine::program::{Program, Seg, Step};
use crate::model::block::{wiring, Part, Val};
use crate::parallel::tp::{Comm, TpPlan};

pub const BF16: f64 = 2.0;
pub const FP32: f64 = 4.0;
pub const I64: f64 = 8.0;

/// A tensor of a micro-batch: bytes per token, over all the micro-batch's
/// tokens or over this rank's block of them (sequence parallelism; the
/// whole micro-batch without it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Per {
    pub bytes: f64,
    pub seq: bool,
}

impl Per {
    pub const NONE: Per = Per {
        bytes: 0.0,
        seq: false,
    };
    fn all(bytes: f64) -> Per {
        Per { bytes, seq: false }
    }
    fn seq(bytes: f64) -> Per {
        Per { bytes, seq: true }
    }
}

/// Tokens of one micro-batch on this rank: all of them, and its sequence block.
#[derive(Clone, Copy, Debug)]
pub struct Tokens {
    pub all: f64,
    pub seq: f64,
}

impl Tokens {
    /// Micro-batch `rows x seq_len` under `plan`.
    pub fn new(rows: usize, seq_len: usize, plan: &TpPlan) -> Tokens {
        let all = (rows * seq_len) as f64;
        let seq = if plan.sequence_parallel {
            all / plan.tp as f64
        } else {
            all
        };
        Tokens { all, seq }
    }

    pub fn of(&self, p: Per) -> f64 {
        p.bytes * if p.seq { self.seq } else { self.all }
    }
}

/// How a pass runs, as far as its memory goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassOptions {
    pub checkpoint: bool,
    /// `train.loss_chunk_tokens` (0: the head at once).
    pub loss_chunk_tokens: usize,
    /// Logits-sized buffers the one-device head's backward holds: 1 since
    /// 24e075d (the cross-entropy kernel writes the gradient over the
    /// logits), 2 before (for predictions of runs recorded before it).
    pub head_logit_buffers: usize,
}

/// A value of the block, as this rank holds it (before any collective).
pub fn val(c: &ModelConfig, plan: &TpPlan, v: Val) -> Per {
    let d = c.d_model as f64;
    let dd = c.dot_dim() as f64;
    match v {
        Val::X | Val::X2 | Val::Y => Per::seq(FP32 * d),
        Val::H | Val::H2 => Per::seq(BF16 * d),
        Val::Q0 => Per::all(BF16 * plan.q_heads as f64 * dd),
        Val::K => Per::all(BF16 * plan.k_heads as f64 * dd),
        Val::V => Per::all(BF16 * (plan.v_heads * c.v_head_dim) as f64),
        // AugQ's output: partial sums of every head's query features.
        Val::Q if c.aug_q_dim > 0 => Per::all(BF16 * c.num_q_heads as f64 * dd),
        Val::Q => val(c, plan, Val::Q0),
        Val::O | Val::F => Per::all(BF16 * d),
    }
}

/// What autograd keeps inside `part`, besides the values it reads.
fn part_internal(c: &ModelConfig, plan: &TpPlan, part: Part) -> Vec<Per> {
    let tp = plan.tp as f64;
    let dd = c.dot_dim() as f64;
    let (qh, kh, vh) = (plan.q_heads, plan.k_heads, plan.v_heads);
    match part {
        // One fp32 statistic per token.
        Part::AttnNorm | Part::AddNorm => vec![Per::seq(FP32)],
        // K compression, projected: k_up keeps the raw keys.
        Part::Qkv if c.k_compression == crate::config::KCompression::Projected => {
            vec![Per::all(BF16 * (kh * c.k_cache_dim()) as f64)]
        }
        Part::Qkv | Part::Add => vec![],
        // Merged gate/up output (SwiGLU kernel) and the gated product (down).
        Part::AugQ => gated(c.aug_q_dim as f64 / tp),
        Part::Ffn => gated(c.ffn_dim as f64 / tp),
        Part::Attend => {
            let mut v = vec![
                Per::all(BF16 * qh as f64 * dd),             // q after RoPE
                Per::all(BF16 * (qh * c.v_head_dim) as f64), // SDPA's output
                Per::all(FP32 * qh as f64),                  // its log-sum-exp
            ];
            if kh < vh {
                v.push(Per::all(BF16 * vh as f64 * dd)); // K repeated to the V heads
            } else if vh < kh {
                v.push(Per::all(BF16 * (kh * c.v_head_dim) as f64)); // V repeated
            }
            v
        }
    }
}

fn gated(width: f64) -> Vec<Per> {
    vec![Per::all(BF16 * 2.0 * width), Per::all(BF16 * width)]
}

/// The values `part`'s backward reads (its saved inputs or outputs).
fn part_reads(plan: &TpPlan, part: Part) -> Vec<Val> {
    match part {
        Part::AttnNorm => vec![Val::X],
        Part::Qkv => vec![Val::H],
        Part::AugQ => vec![Val::Q0],
        Part::Attend if plan.k_heads == plan.v_heads => vec![Val::K, Val::V],
        Part::Attend if plan.k_heads < plan.v_heads => vec![Val::V],
        Part::Attend => vec![Val::K],
        Part::AddNorm => vec![Val::X2],
        Part::Ffn => vec![Val::H2],
        Part::Add => vec![],
    }
}

/// A collective's output from its input.
fn after(p: Per, op: Comm, tp: f64) -> Per {
    match op {
        Comm::GatherSeq => Per::all(p.bytes),
        Comm::ScatterSeq => Per::seq(p.bytes),
        Comm::GatherFeat => Per {
            bytes: p.bytes * tp,
            ..p
        },
        Comm::ScatterFeat => Per {
            bytes: p.bytes / tp,
            ..p
        },
        Comm::AllReduce | Comm::Copy => p,
    }
}

/// The slots of `prog` as this rank holds them, and which are views of
/// another (an identity collective).
pub fn slots(c: &ModelConfig, plan: &TpPlan, prog: &Program) -> (Vec<Per>, Vec<bool>) {
    let mut slot = vec![Per::NONE; prog.slots];
    let mut alias = vec![false; prog.slots];
    if let Some(s) = prog.input_slot {
        slot[s] = val(c, plan, Val::X);
    }
    let wires = wiring(c);
    for step in &prog.steps {
        match step {
            Step::Run { seg, outputs, .. } => {
                let outs: Vec<Per> = match seg {
                    Seg::Embed => vec![Per::all(FP32 * c.d_model as f64)],
                    Seg::Block(_) => vec![val(c, plan, Val::Y)],
                    Seg::Part(_, p) => {
                        let w = wires.iter().find(|w| w.part == *p).expect("a wired part");
                        w.outputs.iter().map(|&v| val(c, plan, v)).collect()
                    }
                    Seg::FinalNorm => vec![val(c, plan, Val::H)],
                    Seg::HeadLogits => vec![logits(c, plan, FP32)],
                    Seg::Head => vec![Per::NONE],
                    // Context parallelism (not modelled by sigma plan): the
                    // query heads and the attention output are as wide as q.
                    Seg::AttendHeads(_) => vec![val(c, plan, Val::Q0)],
                    Seg::AttendOut(_) => vec![val(c, plan, Val::O)],
                };
                for (&s, p) in outputs.iter().zip(outs) {
                    slot[s] = p;
                }
            }
            Step::Comm { op, from, to } => {
                slot[*to] = after(slot[*from], *op, plan.tp as f64);
                alias[*to] = *op == Comm::Copy;
            }
            Step::Ring { output, .. } => slot[*output] = val(c, plan, Val::Q0),
        }
    }
    (slot, alias)
}

/// This rank's logits of the vocabulary in `bytes` per element.
fn logits(c: &ModelConfig, plan: &TpPlan, bytes: f64) -> Per {
    Per::all(bytes * (c.vocab_size / plan.tp) as f64)
}

/// What segment `seg` keeps besides its slots.
fn seg_internal(c: &ModelConfig, plan: &TpPlan, seg: Seg, o: &PassOptions) -> Vec<Per> {
    let d = c.d_model as f64;
    match seg {
        Seg::Embed if plan.tp > 1 => vec![Per::all(I64), Per::all(FP32)], // ids, row mask
        Seg::Embed => vec![Per::all(I64)],
        Seg::Block(_) => {
            let mut v = Vec::new();
            let mut reads: Vec<Val> = Vec::new();
            for w in wiring(c) {
                v.extend(part_internal(c, plan, w.part));
                reads.extend(part_reads(plan, w.part));
            }
            reads.sort_by_key(|r| *r as usize);
            reads.dedup();
            // The block's input is its slot; the other values live inside it.
            v.extend(
                reads
                    .iter()
                    .filter(|&&r| r != Val::X)
                    .map(|&r| val(c, plan, r)),
            );
            v
        }
        Seg::Part(_, p) => part_internal(c, plan, p),
        Seg::FinalNorm => vec![Per::seq(FP32)],
        Seg::Head if o.loss_chunk_tokens > 0 => vec![],
        // Norm statistic, the normalised input, bf16 logits, log-sum-exp.
        Seg::Head => vec![
            Per::all(FP32),
            Per::all(BF16 * d),
            logits(c, plan, BF16),
            Per::all(FP32),
        ],
        // The loss gradient over the logits, made in the forward (closed form).
        Seg::HeadLogits => vec![logits(c, plan, FP32)],
        Seg::AttendHeads(_) | Seg::AttendOut(_) => vec![],
    }
}

/// One micro-batch's pass through one chunk of layers, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassMemory {
    /// Kept from its forward to its backward, the head and loss included.
    pub kept: f64,
    /// Of which the output head and loss.
    pub head: f64,
    /// Held for a moment beyond `kept` at the end of the forward (the
    /// vocabulary-parallel loss's temporaries).
    pub forward_extra: f64,
    /// Held for a moment beyond `kept` during the backward: a checkpointed
    /// block's recompute, gradients, the head's working buffers.
    pub backward_extra: f64,
    /// The activation sent to the next stage (0 on the last).
    pub sent: f64,
    /// The gradient sent back to the stage before (0 on the first).
    pub grad_sent: f64,
}

/// What each step of `prog` produces: (bytes of its
/// output slots, bytes its segment keeps inside, whether it is the head's).
pub fn step_bytes(
    c: &ModelConfig,
    plan: &TpPlan,
    prog: &Program,
    t: Tokens,
    o: &PassOptions,
) -> Vec<(f64, f64, bool)> {
    let (slot, alias) = slots(c, plan, prog);
    let out = |s: usize| if alias[s] { 0.0 } else { t.of(slot[s]) };
    prog.steps
        .iter()
        .map(|step| match step {
            Step::Run { seg, outputs, .. } => {
                let inside: f64 = seg_internal(c, plan, *seg, o)
                    .iter()
                    .map(|&p| t.of(p))
                    .sum();
                let head = matches!(seg, Seg::Head | Seg::FinalNorm | Seg::HeadLogits);
                (outputs.iter().map(|&s| out(s)).sum(), inside, head)
            }
            Step::Comm { to, .. } => (out(*to), 0.0, false),
            Step::Ring { output, .. } => (out(*output), 0.0, false),
        })
        .collect()
}

/// The memory of a pass of one micro-batch (`t`) through `prog`.
pub fn pass_memory(
    c: &ModelConfig,
    plan: &TpPlan,
    prog: &Program,
    t: Tokens,
    o: &PassOptions,
) -> PassMemory {
    let bytes = step_bytes(c, plan, prog, t, o);
    let (slot, _) = slots(c, plan, prog);
    // With checkpointing a block keeps only its output (the next one's input).
    let dropped =
        |i: usize| o.checkpoint && prog.blocks.iter().any(|b| b.contains(&i) && i + 1 != b.end);
    let inside_block = |i: usize| o.checkpoint && prog.blocks.iter().any(|b| b.contains(&i));
    let mut kept = prog.input_slot.map_or(0.0, |s| t.of(slot[s]));
    let mut head = 0.0;
    for (i, &(outs, inside, is_head)) in bytes.iter().enumerate() {
        let k = if dropped(i) { 0.0 } else { outs } + if inside_block(i) { 0.0 } else { inside };
        kept += k;
        if is_head {
            head += k;
        }
    }
    let forward_extra = if prog.vocab_parallel {
        // The closed-form loss: exponentials and two steps of the gradient.
        3.0 * t.of(logits(c, plan, FP32))
    } else {
        0.0
    };
    let backward_extra = backward_peak(c, plan, prog, t, o, &bytes, kept) - kept;
    PassMemory {
        kept,
        head,
        forward_extra,
        backward_extra: backward_extra.max(0.0),
        sent: if prog.last {
            0.0
        } else {
            t.of(slot[prog.out_slot])
        },
        grad_sent: prog.input_slot.map_or(0.0, |s| t.of(slot[s])),
    }
}

/// The most the pass holds during its backward: walking the program in
/// reverse, what is left of it, a checkpointed block recomputed, and the
/// working memory of the segment being differentiated.
fn backward_peak(
    c: &ModelConfig,
    plan: &TpPlan,
    prog: &Program,
    t: Tokens,
    o: &PassOptions,
    bytes: &[(f64, f64, bool)],
    kept: f64,
) -> f64 {
    let mut left = kept;
    let mut peak = kept;
    for i in (0..prog.steps.len()).rev() {
        if let Some(b) = prog.blocks.iter().find(|b| o.checkpoint && b.end == i + 1) {
            // The recompute: everything inside the block but its output.
            left += bytes[b.clone()].iter().map(|x| x.1).sum::<f64>()
                + bytes[b.start..b.end - 1].iter().map(|x| x.0).sum::<f64>();
        }
        if let Step::Run { seg, .. } = &prog.steps[i] {
            peak = peak.max(left + seg_working(c, plan, *seg, t, o));
        }
        left -= bytes[i].0 + bytes[i].1;
    }
    peak
}

/// Gradients and temporaries of the backward of `seg`, beyond what it keeps.
fn seg_working(c: &ModelConfig, plan: &TpPlan, seg: Seg, t: Tokens, o: &PassOptions) -> f64 {
    let d = c.d_model as f64;
    let part = |p: Part| -> f64 {
        let w = wiring(c).into_iter().find(|w| w.part == p);
        let vals: f64 = w.map_or(0.0, |w| {
            w.inputs
                .iter()
                .chain(&w.outputs)
                .map(|&v| t.of(val(c, plan, v)))
                .sum()
        });
        let big = part_internal(c, plan, p)
            .iter()
            .map(|&x| t.of(x))
            .fold(0.0, f64::max);
        // The gradient of its largest intermediate while the one of the
        // next smaller is still held (SwiGLU: 2f and f next to each other).
        vals + 1.5 * big
    };
    match seg {
        // The embedding's dense weight gradient, before it is added in.
        Seg::Embed => t.all * FP32 * d + FP32 * (c.vocab_size / plan.tp) as f64 * d,
        Seg::Block(_) => {
            let parts = wiring(c).iter().map(|w| part(w.part)).fold(0.0, f64::max);
            2.0 * t.of(val(c, plan, Val::Y)) + parts
        }
        Seg::Part(_, p) => part(p),
        // Context parallelism (not modelled): as the attention part.
        Seg::AttendHeads(_) | Seg::AttendOut(_) => part(Part::Attend),
        Seg::FinalNorm => t.seq * (FP32 + BF16) * d,
        Seg::Head if o.loss_chunk_tokens > 0 => {
            let chunk = t.all.min(o.loss_chunk_tokens as f64);
            let v = (c.vocab_size / plan.tp) as f64;
            chunk * (2.0 * FP32 + (BF16 + FP32) * d + BF16 * v) + t.all * FP32 * d
        }
        Seg::Head => {
            let extra = o.head_logit_buffers.saturating_sub(1) as f64;
            extra * t.of(logits(c, plan, BF16)) + t.all * (BF16 + FP32) * d
        }
        Seg::HeadLogits => t.of(logits(c, plan, BF16)) + t.all * BF16 * d,
    }
}
