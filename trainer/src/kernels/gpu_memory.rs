//! The CUDA caching allocator's statistics through a small C++ shim
//! (csrc/cuda_memory.cpp, built by build.rs against the linked libtorch):
//! tch binds none of them, and nvidia-smi sees only what the process holds
//! in all, from a subprocess.
#![allow(unsafe_code)] // FFI: two C functions of the shim.

/// The CUDA caching allocator's statistics for one device, in bytes:
/// what tensors hold (allocated) and what the allocator holds from the
/// driver (reserved), now and at the peak since the last reset. The CUDA
/// context (about 0.5 GB) is in neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuMemory {
    pub allocated: i64,
    pub peak_allocated: i64,
    pub reserved: i64,
    pub peak_reserved: i64,
}

extern "C" {
    fn sigma_cuda_memory_stats(device: i32, out: *mut i64) -> i32;
    fn sigma_cuda_reset_peak_memory(device: i32) -> i32;
}

/// The caching allocator's statistics for CUDA device `index` (None before
/// CUDA is initialised or without CUDA). Read in-process: no subprocess, no
/// device synchronisation.
pub fn gpu_memory(index: usize) -> Option<GpuMemory> {
    let mut v = [0i64; 4];
    // SAFETY: the shim writes exactly four values and catches every C++ exception.
    let rc = unsafe { sigma_cuda_memory_stats(index as i32, v.as_mut_ptr()) };
    (rc == 0).then_some(GpuMemory {
        allocated: v[0],
        peak_allocated: v[1],
        reserved: v[2],
        peak_reserved: v[3],
    })
}

/// Start the peaks of [`gpu_memory`] again from the current values.
pub fn reset_gpu_peak_memory(index: usize) {
    // SAFETY: as above; a failure (no CUDA) leaves nothing to reset.
    let _ = unsafe { sigma_cuda_reset_peak_memory(index as i32) };
}

/// MiB, rounded up.
pub fn mib(bytes: i64) -> i64 {
    (bytes + (1 << 20) - 1) >> 20
}
