//! The one integration-test binary: topic modules share helpers from `sigma_tests`.

mod ablate;
mod architecture;
mod bad_inputs;
mod bad_inputs_data;
mod checkpoint;
mod context_parallel;
mod data_errors;
mod data_pipeline;
mod data_s3;
mod distributed;
mod eval;
mod fp8;
mod generate;
mod hf_export;
mod model;
mod pipeline;
mod plan;
mod restarts;
mod slurm;
mod tensor_parallel;
mod train;
mod version;
