//! `--device` of `sigma eval`, `sigma generate` and `sigma bench`: a closed
//! choice, resolved to a libtorch device once CUDA's availability is known.

use anyhow::{bail, Result};

/// Where a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// GPU 0 when CUDA is usable, else the CPU.
    Auto,
    /// the CPU.
    Cpu,
    /// GPU 0 (an error when no CUDA device is usable).
    Cuda,
}

impl DeviceArg {
    pub fn resolve(self) -> Result<tch::Device> {
        Ok(match self {
            DeviceArg::Cpu => tch::Device::Cpu,
            DeviceArg::Cuda if tch::Cuda::is_available() => tch::Device::Cuda(0),
            DeviceArg::Cuda => bail!("--device cuda: no CUDA device is usable"),
            DeviceArg::Auto => tch::Device::cuda_if_available(),
        })
    }
}
