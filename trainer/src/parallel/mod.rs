//! How the model is cut across ranks: the tensor-parallel plan (`tp`), the
//! pipeline plan (`pipeline`) and the pipeline schedules (`schedule`).

pub mod pipeline;
pub mod schedule;
pub mod tp;
