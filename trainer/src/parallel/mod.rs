//! How the model is cut across ranks: the tensor-parallel plan (`tp`), the
//! pipeline plan (`pipeline`) and the pipeline schedules (`schedule`),
//! resolved together for one rank into a [`Layout`]. [`Layout::check`] is
//! the one validation of a layout: `sigma train`'s start-up, ablation plans
//! and any tool that wants to know whether a config can run call it.

pub mod pipeline;
pub mod schedule;
pub mod tp;

use crate::config::{ModelConfig, RunConfig};
use crate::dist::{Coords, MeshDims};
use crate::error::{Result, TrainError};
use crate::model::Share;
use pipeline::PipelinePlan;
use tp::TpPlan;

/// Context parallelism cuts every sequence into `2 cp` equal pieces (each
/// rank of the ring holds two, docs/context-parallel.md).
fn check_cp(cfg: &RunConfig) -> Result<()> {
    let (cp, seq) = (cfg.parallel.cp, cfg.data.seq_len);
    if cp > 1 && !seq.is_multiple_of(2 * cp) {
        return Err(TrainError::config(
            "data.seq_len",
            format!(
                "{seq} is not divisible by 2 x parallel.cp ({}): context parallelism cuts each sequence into 2 x cp equal pieces, two per rank; choose a data.seq_len that is a multiple of {} or another parallel.cp",
                2 * cp,
                2 * cp
            ),
        ));
    }
    let local = seq / cp;
    if cp > 1 && cfg.parallel.sequence_parallel() && !local.is_multiple_of(cfg.parallel.tp) {
        return Err(TrainError::config(
            "data.seq_len",
            format!(
                "{seq} / parallel.cp ({cp}) = {local} tokens per rank is not divisible by parallel.tp ({}): sequence parallelism splits each rank's tokens over the tensor-parallel group (or set parallel.sequence_parallel = false)",
                cfg.parallel.tp
            ),
        ));
    }
    Ok(())
}

/// One rank's place in the job and its share of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub mesh: MeshDims,
    pub coords: Coords,
    pub tp: TpPlan,
    pub pipe: PipelinePlan,
}

impl Layout {
    /// Check that `cfg`'s layout can run: the tensor-parallel cut of the
    /// model, the pipeline's split of the layers and its schedule for every
    /// accumulation count the run uses. Each refusal names the key and why.
    pub fn check(cfg: &RunConfig) -> Result<()> {
        let (p, t) = (&cfg.parallel, &cfg.train);
        if p.pp > 1 || p.pp_layers.is_some() {
            let v = p.virtual_stages();
            PipelinePlan::check(&cfg.model, p.pp, v, p.pp_layers.as_deref())?;
            // Every accumulation count the run uses (the ramp's too) must fit the schedule.
            let mut counts = vec![t.grad_accum_steps];
            counts.extend((0..t.batch_ramp_steps).map(|s| cfg.accum_steps_at(s)));
            counts.sort();
            counts.dedup();
            for m in counts {
                schedule::check(p.pp, v, m)?;
            }
        }
        check_cp(cfg)?;
        // Under context parallelism a rank holds seq_len / cp tokens of each sequence.
        TpPlan::check(
            &cfg.model,
            p.tp,
            cfg.data.seq_len / p.cp,
            p.sequence_parallel(),
        )?;
        if t.loss_chunk_tokens > 0 && p.tp > 1 {
            return Err(TrainError::config(
                "train.loss_chunk_tokens",
                format!(
                    "chunks the head of one device; with parallel.tp = {} the head is vocabulary-parallel (each rank holds 1/{} of the logits) and is not chunked: set it to 0",
                    p.tp, p.tp
                ),
            ));
        }
        Ok(())
    }

    /// Tokens of each sequence this rank computes: `seq_len / cp`.
    pub fn local_seq_len(&self, seq_len: usize) -> usize {
        seq_len / self.mesh.cp
    }

    /// Rank `rank`'s layout of `cfg` ([`Layout::check`] must have passed).
    pub fn new(cfg: &RunConfig, rank: usize) -> Layout {
        let p = &cfg.parallel;
        let mesh = MeshDims::of(p);
        let coords = mesh.coords(rank);
        Layout {
            mesh,
            coords,
            tp: TpPlan::new(&cfg.model, p.tp, coords.tp, p.sequence_parallel()),
            pipe: PipelinePlan::new(
                &cfg.model,
                p.pp,
                p.virtual_stages(),
                p.pp_layers.as_deref(),
                coords.pp,
            ),
        }
    }

    /// Everything on one device.
    pub fn single(c: &ModelConfig) -> Layout {
        let mesh = MeshDims::new(1, 1, 1);
        Layout {
            mesh,
            coords: mesh.coords(0),
            tp: TpPlan::single(c),
            pipe: PipelinePlan::single(c),
        }
    }

    /// Rank `rank` of a tensor-parallel group of `tp` alone (one pipeline
    /// stage, one data-parallel rank): tests and tools.
    pub fn tensor_parallel(
        c: &ModelConfig,
        tp: usize,
        rank: usize,
        sequence_parallel: bool,
    ) -> Layout {
        let mesh = MeshDims::new(1, tp, 1);
        Layout {
            mesh,
            coords: mesh.coords(rank),
            tp: TpPlan::new(c, tp, rank, sequence_parallel),
            pipe: PipelinePlan::single(c),
        }
    }

    /// This rank's share of the model: every parameter with this rank's
    /// block of it (the tensor-parallel plan), which of them its stages
    /// hold (the pipeline plan), and the heads it computes with. The tied
    /// embedding held by both ends of a pipeline is summed over the two and
    /// written into checkpoints by the first.
    pub fn share(&self, c: &ModelConfig) -> Share {
        let mut specs = self.tp.param_specs(c);
        let held = specs
            .iter_mut()
            .map(|s| {
                let tied = self.pipe.tied_across(c, s.key);
                s.pp_tied = tied;
                s.writer &= !tied || self.pipe.first();
                self.pipe.holds(c, s.key)
            })
            .collect();
        Share {
            specs,
            held,
            heads: self.tp.heads(),
        }
    }

    /// Micro-batches whose activations this rank keeps at once: pipeline
    /// warm-up on the earlier stages (1 without a pipeline).
    pub fn in_flight(&self, accum: usize) -> usize {
        if self.mesh.pp > 1 {
            ((self.mesh.pp - self.coords.pp) * self.pipe.v).min(accum * self.pipe.v)
        } else {
            1
        }
    }

    /// Layers this rank runs.
    pub fn num_layers(&self) -> usize {
        self.pipe.chunks().iter().map(|(_, _, l)| l.len()).sum()
    }
}
