//! The one integration-test binary: topic modules share helpers from `sigma_tests`.

mod checkpoint;
mod data_errors;
mod data_pipeline;
mod data_s3;
mod distributed;
mod model;
mod slurm;
mod train;
