//! `sigma bench`: micro-benchmarks on one device.
//!
//! - `decode` (decode.rs): one decoding step's attention against a KV cache,
//!   DiffQKV (sigma's decode kernel on a GPU, and its tensor-operation path)
//!   against GQA through libtorch's SDPA, at several batch sizes and context
//!   lengths; `--check` compares the kernel with an fp32 reference on many
//!   shapes; `--model` times whole-model decoding (model.rs).
//! - `fused` (fused.rs): the fused training operations, checked against fp32
//!   and timed against the tensor operations they replace, and decoding's
//!   matrix-vector kernels against cuBLAS (gemv.rs).
//! - `fp8` (fp8.rs): the FP8 linear layer of `train.precision = "fp8"`,
//!   `_scaled_mm` against its emulation and fp32, timed against bf16.
//!
//! The arguments are in args.rs and the timing helpers every benchmark shares
//! in timing.rs; this file only dispatches.

mod args;
mod decode;
mod fp8;
mod fused;
mod gemv;
mod model;
mod timing;

use anyhow::Result;
use clap::Subcommand;

use args::{DecodeArgs, FusedArgs};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decoding speed: attention per step (DiffQKV kernel and tensor path vs GQA through SDPA),
    /// the kernel's accuracy (--check) or whole-model tokens/s (--model).
    Decode(DecodeArgs),
    /// The fused bf16 training operations on a GPU (SwiGLU, RoPE, cross-entropy,
    /// RMSNorm and add + RMSNorm kernels, fp32 weight-gradient GEMM): checked
    /// against fp32 and timed against tensor operations.
    Fused(FusedArgs),
    /// The FP8 linear layer (train.precision = "fp8") on a GPU: _scaled_mm against its
    /// emulation and fp32, timed against bf16.
    Fp8(FusedArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Fused(f) => {
            f.validate()?;
            fused::run(f.device.resolve()?, f.steps)
        }
        BenchCommand::Fp8(f) => {
            f.validate()?;
            fp8::run(f.device.resolve()?, f.steps)
        }
        BenchCommand::Decode(a) => {
            a.validate()?;
            let device = a.device.resolve()?;
            if a.check {
                return decode::check(device);
            }
            if let Some(cfg) = &a.model {
                return model::run(&a, cfg, device);
            }
            decode::attention(&a, device)
        }
    }
}
