//! sigma-trainer: the SIGMA model and everything that trains, evaluates and
//! serves it. The folders follow the architecture (docs/architecture.md):
//!
//! - `model/`: the model for the parameters one device holds: the typed
//!   parameter keys, the block, the flat parameter buffer, counts and FLOPs;
//! - `parallel/`: how the model is cut: the tensor-parallel plan (sharding and
//!   where the collectives go), the pipeline plan and its schedules;
//! - `dist/`: where a process sits and how it talks: environment, mesh and
//!   groups, rendezvous store, collectives (NCCL, CPU), liveness, buckets;
//! - `engine/`: a micro-batch run as segments and communication steps,
//!   forward and backward, recompute, and the pipeline's execution;
//! - `train/`: the training loop in phases, the optimizer, learning-rate
//!   schedules, metrics, profile and plots;
//! - `infer/`: evaluation and generation;
//! - `kernels/`: what tch does not bind: NVRTC kernels and C++ shims;
//! - `checkpoint/`: sharded checkpoints, resharding, export;
//! - `plan/`: `sigma plan`, a layout's memory and step time simulated
//!   before launching (docs/plan.md).

pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod engine;
pub mod error;
pub mod guard;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod plan;
pub mod signals;
pub mod train;

pub use config::RunConfig;
pub use error::{Result, TrainError};
pub use model::Model;
