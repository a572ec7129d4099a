//! Checkpoints: `step-NNNNNNN/` directories holding safetensors shards written
//! by the ranks that own them, `metadata.json` (config, layout, progress, data
//! and optimizer state, the index of every logical tensor's pieces, file
//! checksums), the run's tokenizer, and a `COMMITTED` marker written last.
//! See docs/checkpoint.md for the format and the commit protocol.
//!
//! State is three flat fp32 buffers laid out like the parameters (params.rs):
//! the master weights and AdamW's two moments. Data-parallel rank `r` of `dp`
//! owns elements `[r * S, min((r + 1) * S, N))` of its buffers, `S = ceil(N /
//! dp)` (exactly its ZeRO-1 shard), and writes the pieces of every parameter
//! that fall in it. Under tensor parallelism a rank's parameter is a block of
//! the whole tensor, so a piece records that block (offset and length per
//! dimension) and a flat range within it; a copy held by several
//! tensor-parallel ranks is written by the first of them only. Loading
//! assembles whatever block and range a rank needs from the pieces that
//! cover it, so a checkpoint loads under any (dp, tp) layout, with or
//! without ZeRO-1.

pub mod load;
pub mod safetensors;
pub mod save;
pub mod tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sigma_data::DataState;

use crate::error::{Result, TrainError};

pub const FORMAT: &str = "sigma-checkpoint";
pub const FORMAT_VERSION: u32 = 1;
pub const MARKER: &str = "COMMITTED";
pub const METADATA: &str = "metadata.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// The flat buffers a checkpoint holds, and the prefix of their tensors' names.
pub const BUFFERS: [&str; 3] = ["model", "optim.exp_avg", "optim.exp_avg_sq"];

pub fn tensor_name(buffer: &str, param: &str) -> String {
    format!("{buffer}/{param}")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:07}")
}

pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}.safetensors")
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// How the state was distributed when it was saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub dp: usize,
    /// Context-parallel ranks (absent in checkpoints from before `parallel.cp`: 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub cp: usize,
    pub tp: usize,
    pub pp: usize,
    pub zero: u8,
    /// Elements of each flat buffer.
    pub flat_numel: i64,
}

pub use crate::model::params::shard_range as owned_range;

/// Where a piece of a logical tensor lives: elements `[start, end)` of a
/// block of the tensor (the whole tensor when `block` is absent) flattened in
/// row-major order, stored under the tensor's name in `file`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub file: String,
    pub start: i64,
    pub end: i64,
    /// (offset, length) per dimension of the block of the whole tensor this
    /// piece is a range of; absent for the whole tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<Vec<(i64, i64)>>,
    /// xxh3-64 of the piece's bytes (16 hex digits), checked whenever it is read.
    pub xxh3: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Global (logical) shape.
    pub shape: Vec<i64>,
    pub dtype: String,
    pub pieces: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    /// xxh3-64 of the whole file, 16 hex digits.
    pub xxh3: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps completed (the next step to run has this index).
    pub step: u64,
    pub consumed_samples: u64,
    pub consumed_tokens: u64,
    /// Steps whose update was skipped (non-finite gradient).
    pub skipped_steps: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// AdamW updates applied (bias correction uses it).
    pub adam_steps: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// The schedule is a pure function of (step, total steps, optim config).
    pub step: u64,
    pub total_steps: u64,
    pub last_lr: f64,
}

/// Random state. Nothing in a training step draws random numbers: weights are
/// initialised from `seed` before step 0 and the data order is a pure
/// function of `data_seed` and the data state, so these seeds are all of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub data_seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format: String,
    pub format_version: u32,
    pub progress: Progress,
    pub data: DataState,
    pub optimizer: OptimizerState,
    pub scheduler: SchedulerState,
    pub rng: RngState,
    pub layout: Layout,
    /// The resolved run config (as `sigma train` used it).
    pub config: serde_json::Value,
    pub tensors: BTreeMap<String, TensorEntry>,
    pub files: BTreeMap<String, FileEntry>,
    /// Seconds since the Unix epoch at commit.
    pub saved_unix_s: u64,
}

impl Metadata {
    pub fn read(dir: &Path) -> Result<Metadata> {
        let p = dir.join(METADATA);
        let text = std::fs::read(&p).map_err(|e| TrainError::io(p.display().to_string(), e))?;
        let m: Metadata = serde_json::from_slice(&text).map_err(|e| {
            TrainError::file(
                p.display(),
                format!("not a sigma checkpoint metadata file: {e}"),
            )
        })?;
        if m.format != FORMAT || m.format_version != FORMAT_VERSION {
            return Err(TrainError::file(
                p.display(),
                format!(
                    "format {} version {}, this build reads {FORMAT} version {FORMAT_VERSION}",
                    m.format, m.format_version
                ),
            ));
        }
        Ok(m)
    }

    pub fn run_config(&self) -> Result<crate::RunConfig> {
        serde_json::from_value(self.config.clone())
            .map_err(|e| TrainError::file(METADATA, format!("its run config does not parse: {e}")))
    }
}

/// Step number of a `step-NNNNNNN` directory name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let d = name.strip_prefix("step-")?;
    (d.len() >= 7 && d.bytes().all(|b| b.is_ascii_digit()))
        .then(|| d.parse().ok())
        .flatten()
}

/// Committed checkpoints under `root`, oldest first.
pub fn committed(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let step = parse_step_dir(e.file_name().to_str()?)?;
            e.path().join(MARKER).is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest committed checkpoint under `root`.
pub fn latest(root: &Path) -> Option<(u64, PathBuf)> {
    committed(root).pop()
}
