//! The GPU runs recorded in docs/benchmarks.md, predicted again:
//! `trainer/assets/plan/recorded.toml` lists each (config, layout, card,
//! commit, where it is recorded, what was measured, whether it calibrated
//! the model or only checks it), and `sigma plan validate` prints measured
//! against predicted (docs/plan.md holds its output).

use serde::Deserialize;

use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::plan::calib::Calibration;
use crate::plan::layout::Candidate;
use crate::plan::search::Fixed;
use crate::plan::step::{predict, Machine, Prediction};

pub const RECORDED: &str = include_str!("../../assets/plan/recorded.toml");

/// One recorded run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub name: String,
    /// Relative to the repository's root.
    pub config: String,
    #[serde(default)]
    pub set: Vec<String>,
    pub gpu: String,
    pub gpus: usize,
    /// Every key of `--layout`.
    pub layout: String,
    pub accum: usize,
    pub commit: String,
    /// Where docs/benchmarks.md records it.
    pub recorded: String,
    /// "calibration" (the model's rates were fitted to it) or "validation".
    #[serde(rename = "use")]
    pub role: String,
    pub tokens_per_s: Option<f64>,
    /// The caching allocator's peak on rank 0, MiB.
    pub memory_mib: Option<f64>,
    /// Rank 0's idle share in the trace.
    pub bubble: Option<f64>,
    /// Logits-sized buffers of the one-device head's backward at that commit.
    #[serde(default = "one")]
    pub head_logit_buffers: usize,
    #[serde(default)]
    pub note: String,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    run: Vec<Run>,
}

/// The recorded runs.
pub fn runs() -> Result<Vec<Run>> {
    let f: File = toml::from_str(RECORDED).map_err(|e| {
        TrainError::file("trainer/assets/plan/recorded.toml", e.message().to_string())
    })?;
    Ok(f.run)
}

impl Run {
    /// The layout the run used, every key given.
    pub fn candidate(&self) -> Result<Candidate> {
        let f = Fixed::parse(&self.layout)?;
        let need = |v: Option<usize>, k: &str| {
            v.ok_or_else(|| {
                TrainError::file(
                    "trainer/assets/plan/recorded.toml",
                    format!("{}: layout lacks {k}", self.name),
                )
            })
        };
        Ok(Candidate {
            tp: need(f.tp, "tp")?,
            pp: need(f.pp, "pp")?,
            v: need(f.v, "v")?,
            dp: need(f.dp, "dp")?,
            zero: need(f.zero.map(usize::from), "zero")? == 1,
            micro_batch: need(f.mbs, "mbs")?,
            accum: self.accum,
            checkpoint: need(f.ckpt.map(usize::from), "ckpt")? == 1,
            loss_chunk_tokens: need(f.chunk, "chunk")?,
        })
    }

    /// Its prediction by the code as it is (with the head of its commit),
    /// on one host of its GPUs, its config read under `root`.
    pub fn predict(&self, root: &std::path::Path) -> Result<Prediction> {
        let path = root.join(&self.config);
        let base = RunConfig::load(&path.to_string_lossy(), &self.set)?;
        let cand = self.candidate()?;
        let cfg = cand.check(&base, self.gpus)?;
        let cal = Calibration::built_in(&self.gpu)?;
        let m = Machine {
            cal: &cal,
            gpus_per_node: self.gpus,
        };
        Ok(predict(&cfg, &cand, m, self.head_logit_buffers))
    }
}
