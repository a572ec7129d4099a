//! A candidate layout of a run: the keys `sigma plan` varies, the config it
//! makes, and whether `sigma train` would start it (the same checks as its
//! start-up: config validation, `parallel::Layout::check`, the mesh against
//! the job's size).

use crate::config::{PpSchedule, RunConfig};
use crate::dist::MeshDims;
use crate::error::Result;
use crate::parallel::Layout;

/// One layout: parallelism, optimizer sharding, micro-batching, memory savers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub tp: usize,
    pub pp: usize,
    /// Chunks of layers per pipeline rank (1: 1F1B, more: interleaved).
    pub v: usize,
    pub dp: usize,
    /// ZeRO-1: the optimizer state sharded over the data-parallel ranks.
    pub zero: bool,
    pub micro_batch: usize,
    /// Micro-batches per step on each data-parallel rank.
    pub accum: usize,
    pub checkpoint: bool,
    /// `train.loss_chunk_tokens` (0: the whole head at once).
    pub loss_chunk_tokens: usize,
}

impl Candidate {
    pub fn gpus(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// Tokens of one step over the job.
    pub fn step_tokens(&self, seq_len: usize) -> usize {
        self.dp * self.accum * self.micro_batch * seq_len
    }

    /// `base` with this layout's keys (the batch-size ramp off: the plan is
    /// of the steady step after it; explicit `parallel.pp_layers` kept only
    /// for the pipeline they were written for).
    pub fn apply(&self, base: &RunConfig) -> RunConfig {
        let mut c = base.clone();
        let (p, t) = (&mut c.parallel, &mut c.train);
        if p.pp != self.pp || p.virtual_stages() != self.v {
            p.pp_layers = None;
        }
        p.tp = self.tp;
        p.pp = self.pp;
        p.dp = self.dp;
        p.zero = u8::from(self.zero);
        if self.v > 1 {
            p.pp_schedule = PpSchedule::Interleaved;
            p.pp_virtual_stages = Some(self.v);
        } else {
            p.pp_schedule = PpSchedule::OneFOneB;
            p.pp_virtual_stages = None;
        }
        if self.tp == 1 {
            p.sequence_parallel = None;
        }
        t.micro_batch_size = self.micro_batch;
        t.grad_accum_steps = self.accum;
        t.batch_ramp_steps = 0;
        t.activation_checkpointing = self.checkpoint;
        t.loss_chunk_tokens = self.loss_chunk_tokens;
        c
    }

    /// The config of this layout, refused as `sigma train` refuses it on
    /// `gpus` processes.
    pub fn check(&self, base: &RunConfig, gpus: usize) -> Result<RunConfig> {
        let c = self.apply(base);
        c.validate()?;
        Layout::check(&c)?;
        MeshDims::new(c.parallel.dp, c.parallel.tp, c.parallel.pp).check(gpus)?;
        Ok(c)
    }

    /// `tp=2,pp=4,v=2,dp=8,zero=1,mbs=1,ckpt=off,chunk=0`: the form `--layout` takes.
    pub fn describe(&self) -> String {
        format!(
            "tp={},pp={},v={},dp={},zero={},mbs={},ckpt={},chunk={}",
            self.tp,
            self.pp,
            self.v,
            self.dp,
            u8::from(self.zero),
            self.micro_batch,
            if self.checkpoint { "on" } else { "off" },
            self.loss_chunk_tokens
        )
    }
}
