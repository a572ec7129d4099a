//! `sigma plan`: the memory and speed of a layout before launching it, and
//! a projection to more GPUs than were measured, by simulation calibrated
//! on measured runs (docs/plan.md).
//!
//! One source of truth: a layout is checked by `parallel::Layout::check`
//! (the refusals of `sigma train`'s start-up), each rank's share of the
//! model comes from `parallel::Layout::new` and `share` (the `ParamSpec`s
//! the trainer allocates), its activations from the segments of the
//! engine's program (`engine::Program`), its pipeline schedule from
//! `parallel::schedule` (the schedule the trainer runs, simulated with
//! durations). What is modelled rather than read: what autograd keeps inside
//! each part of the block (`acts`), how long a GEMM, an attention, an
//! elementwise pass and a collective take (`cost`, `net`, from a
//! calibration: `calib`).
//!
//! - `layout.rs`: a candidate layout and the config it makes;
//! - `acts.rs`: a micro-batch's activations through a chunk of layers;
//! - `memory.rs`: a rank's state, its schedule's peak, the optimizer's temporaries;
//! - `cost.rs`, `net.rs`: seconds per segment and per collective;
//! - `step.rs`: one step of a layout, simulated;
//! - `search.rs`: every layout of a job;
//! - `calib.rs`: calibration files; `calibrate.rs`: measuring one on a GPU;
//! - `recorded.rs`: the runs of docs/benchmarks.md, predicted again.

pub mod acts;
pub mod calib;
pub mod calibrate;
pub mod cost;
pub mod layout;
pub mod memory;
pub mod net;
pub mod recorded;
pub mod search;
pub mod step;

#[cfg(test)]
mod tests;

use crate::config::{Precision, RunConfig};
use crate::TrainError;

/// What the model covers: bf16 mixed precision, what GPU runs use (`"auto"`
/// on a GPU), without context parallelism. Every rate in the calibrations is
/// a bf16 one and no FP8, fp32 or context-parallel GPU run exists to
/// calibrate another; planning one with those figures would print numbers
/// that are not its own, so it is refused, naming the key.
pub fn check_supported(cfg: &RunConfig) -> Result<(), TrainError> {
    if cfg.parallel.cp > 1 {
        return Err(TrainError::input(
            "parallel.cp",
            format!(
                "sigma plan does not model context parallelism (its layouts have cp = 1), got {}: plan with parallel.cp = 1",
                cfg.parallel.cp
            ),
        ));
    }
    let name = match cfg.train.precision {
        Precision::Auto | Precision::Bf16 => return Ok(()),
        Precision::Fp32 => "fp32",
        Precision::Fp8 => "fp8",
    };
    Err(TrainError::input(
        "train.precision",
        format!(
            "sigma plan models bf16 mixed precision only (its calibrations are bf16 rates); \"{name}\" is not modelled: plan with \"bf16\" or \"auto\""
        ),
    ))
}
