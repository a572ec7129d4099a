//! Evaluation (`sigma eval`, validation) and generation (`sigma generate`).

pub mod eval;
pub mod generate;
