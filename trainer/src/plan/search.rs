//! Every layout of a job worth predicting: the keys `--layout` fixes, the
//! others taken over the values that can fit the job (tensor parallelism in
//! powers of two inside a node, pipeline stages dividing the rest, 1, 2 or 4
//! chunks per pipeline rank, ZeRO-1 on or off, micro-batches of 1 to 8,
//! activation checkpointing on or off, the head in chunks or not), each
//! checked as `sigma train` checks it and predicted.

use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::plan::layout::Candidate;
use crate::plan::step::{predict, Machine, Prediction};

/// The keys `--layout` fixes (`tp=2,pp=4,...`); the others vary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fixed {
    pub tp: Option<usize>,
    pub pp: Option<usize>,
    pub v: Option<usize>,
    pub dp: Option<usize>,
    pub zero: Option<bool>,
    pub mbs: Option<usize>,
    pub ckpt: Option<bool>,
    pub chunk: Option<usize>,
}

/// The keys `--layout` takes.
pub const LAYOUT_KEYS: &str =
    "tp, pp, v, dp, zero (0/1), mbs, ckpt (on/off), chunk (tokens, 0: off)";

impl Fixed {
    /// Parse `tp=2,pp=4,v=2,...`; errors name `--layout` and the key.
    pub fn parse(spec: &str) -> Result<Fixed> {
        let bad = |m: String| TrainError::input("--layout", m);
        let mut f = Fixed::default();
        let mut seen = std::collections::HashSet::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("`{item}` is not KEY=VALUE (keys: {LAYOUT_KEYS})")))?;
            let (k, v) = (k.trim(), v.trim());
            let num = || -> Result<usize> {
                match v.parse::<usize>() {
                    Ok(n) if n > 0 || k == "chunk" => Ok(n),
                    _ => Err(bad(format!("{k}={v}: expected a positive whole number"))),
                }
            };
            let switch = || -> Result<bool> {
                match v {
                    "1" | "on" | "true" => Ok(true),
                    "0" | "off" | "false" => Ok(false),
                    _ => Err(bad(format!("{k}={v}: expected on/off (or 1/0)"))),
                }
            };
            match k {
                "tp" => f.tp = Some(num()?),
                "pp" => f.pp = Some(num()?),
                "v" => f.v = Some(num()?),
                "dp" => f.dp = Some(num()?),
                "zero" => f.zero = Some(switch()?),
                "mbs" => f.mbs = Some(num()?),
                "ckpt" => f.ckpt = Some(switch()?),
                "chunk" => f.chunk = Some(num()?),
                _ => return Err(bad(format!("unknown key `{k}` (keys: {LAYOUT_KEYS})"))),
            }
            if !seen.insert(k) {
                return Err(bad(format!("{k} is given twice")));
            }
        }
        Ok(f)
    }
}

/// A job to plan.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub gpus: usize,
    /// Tokens per optimizer step over the job.
    pub global_tokens: usize,
}

/// A layout predicted, or refused with the reason.
#[derive(Clone, Debug)]
pub enum Outcome {
    Planned(Box<Prediction>),
    Refused { layout: String, reason: String },
}

fn values(fixed: Option<usize>, all: Vec<usize>) -> Vec<usize> {
    fixed.map_or(all, |v| vec![v])
}

fn switches(fixed: Option<bool>, all: &[bool]) -> Vec<bool> {
    fixed.map_or(all.to_vec(), |v| vec![v])
}

/// The (tp, pp, v) shapes to try on `job`.
fn shapes(base: &RunConfig, job: &Job, f: &Fixed, per_node: usize) -> Vec<(usize, usize, usize)> {
    let n = job.gpus;
    let pow2 = (0..)
        .map(|i| 1usize << i)
        .take_while(|&t| t <= n.min(per_node))
        .filter(|t| n.is_multiple_of(*t))
        .collect();
    let mut out = Vec::new();
    for tp in values(f.tp, pow2) {
        let rest = n / tp.max(1);
        let pps = (1..=rest.min(base.model.num_layers))
            .filter(|p| rest.is_multiple_of(*p))
            .collect();
        for pp in values(f.pp, pps) {
            let vs = if pp > 1 { vec![1, 2, 4] } else { vec![1] };
            for v in values(f.v, vs) {
                out.push((tp, pp, v));
            }
        }
    }
    out
}

/// Every layout of `job` that `fixed` allows, predicted or refused.
pub fn search(base: &RunConfig, job: &Job, fixed: &Fixed, m: Machine<'_>) -> Vec<Outcome> {
    let seq = base.data.seq_len;
    let mut out = Vec::new();
    for (tp, pp, v) in shapes(base, job, fixed, m.gpus_per_node) {
        let refuse = |layout: String, reason: String| Outcome::Refused { layout, reason };
        let shape = format!("tp={tp},pp={pp},v={v}");
        if tp * pp > job.gpus || !job.gpus.is_multiple_of(tp * pp) {
            out.push(refuse(
                shape,
                format!("tp x pp = {} does not divide --gpus {}", tp * pp, job.gpus),
            ));
            continue;
        }
        let dp = job.gpus / (tp * pp);
        if let Some(want) = fixed.dp.filter(|&d| d != dp) {
            out.push(refuse(
                shape,
                format!("dp={want}, but --gpus {} / (tp x pp) = {dp}", job.gpus),
            ));
            continue;
        }
        if v > 1 && pp == 1 {
            out.push(refuse(
                shape,
                "v > 1 chunks per rank needs pipeline stages (pp > 1)".into(),
            ));
            continue;
        }
        let zeros = switches(fixed.zero, if dp > 1 { &[false, true] } else { &[false] });
        let chunks = values(fixed.chunk, if tp == 1 { vec![0, 4096] } else { vec![0] });
        for zero in zeros {
            for mbs in values(fixed.mbs, vec![1, 2, 4, 8]) {
                for ckpt in switches(fixed.ckpt, &[false, true]) {
                    for &chunk in &chunks {
                        let per = dp * mbs * seq;
                        let cand = Candidate {
                            tp,
                            pp,
                            v,
                            dp,
                            zero,
                            micro_batch: mbs,
                            accum: (job.global_tokens / per).max(1),
                            checkpoint: ckpt,
                            loss_chunk_tokens: chunk,
                        };
                        if !job.global_tokens.is_multiple_of(per) {
                            let why = format!(
                                "the global batch of {} tokens is not a multiple of dp x micro-batch x data.seq_len = {dp} x {mbs} x {seq}",
                                job.global_tokens
                            );
                            out.push(refuse(cand.describe(), why));
                            continue;
                        }
                        out.push(match cand.check(base, job.gpus) {
                            Ok(cfg) => Outcome::Planned(Box::new(predict(&cfg, &cand, m, 1))),
                            Err(e) => refuse(cand.describe(), e.to_string()),
                        });
                    }
                }
            }
        }
    }
    out
}
