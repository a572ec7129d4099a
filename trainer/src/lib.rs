//! sigma-trainer: config, the SIGMA model (single-device definition), the
//! segment engine, AdamW over flat buffers, LR schedules, metrics and the
//! training loop.

pub mod checkpoint;
pub mod config;
pub mod cuda_libs;
pub mod dist;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fused;
pub mod generate;
pub mod gpu_memory;
pub mod guard;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod params;
pub mod pipeline;
pub mod plot;
pub mod profile;
pub mod schedule;
pub mod signals;
pub mod summary;
pub mod tp;
pub mod train;
pub mod train_kernels;

pub use config::RunConfig;
pub use error::{Result, TrainError};
pub use model::Model;
