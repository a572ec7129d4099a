//! What tch does not bind: kernels of sigma's own compiled with NVRTC
//! (`decode`, `training`, `gemv`) and C++ shims over libtorch (`fused`,
//! `gpu_memory`, `fp8`: FP8 matmuls, `sdpa`: attention clear of a libtorch
//! CPU failure, `cuda_graph`: libtorch's CUDA graphs,
//! and the loading of CUDA libraries in `cuda_libs`), and one call into
//! libtorch's cuBLASLt (`fp8_wgrad`: the FP8 weight gradient accumulated by
//! its GEMM).

pub(crate) mod built;
pub mod cuda_graph;
pub mod cuda_libs;
pub mod decode;
pub mod fp8;
pub mod fp8_wgrad;
pub mod fused;
pub mod gemv;
pub mod gpu_memory;
pub mod sdpa;
pub mod training;
