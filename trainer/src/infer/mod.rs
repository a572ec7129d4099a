//! Evaluation (`sigma eval`, validation) and generation (`sigma generate`,
//! its decoding steps eager or as CUDA graphs in `decoder`).

pub mod cache;
pub mod decoder;
pub mod eval;
pub mod generate;
pub mod prebuild;
