//! libtorch's CUDA graphs (csrc/cuda_graph.cpp): record the kernels that
//! some libtorch work launches once, then launch the recording again with
//! one call: what the decode step needs, whose hundreds of small kernels
//! otherwise cost more host time than device time (infer::decoder).
//!
//! A [`CudaGraph`] owns a side stream. [`CudaGraph::on_side`] runs work on
//! it (ordered after the caller's stream, which then waits for it):
//! warm-ups, so that everything allocated or compiled at first use exists
//! before a capture. [`CudaGraph::capture`] records a call on that stream
//! (nothing runs); the memory it allocates comes from a private pool that
//! outlives the capture, so the tensors it returns stay valid and are
//! rewritten by each [`CudaGraph::replay`]. A graph made with `share`
//! uses the side stream and the pool of an earlier one: replay them in the
//! order they were captured (libtorch's rule for shared pools).
#![allow(unsafe_code)] // FFI: the graph shim.

use std::ffi::{c_char, c_void};

use crate::error::{Result, TrainError};

extern "C" {
    fn sigma_graph_built() -> i32;
    fn sigma_graph_new(
        device: i32,
        share: *mut c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        n: usize,
    ) -> i32;
    fn sigma_graph_free(g: *mut c_void);
    fn sigma_graph_enter(g: *mut c_void, err: *mut c_char, n: usize) -> i32;
    fn sigma_graph_leave(g: *mut c_void, err: *mut c_char, n: usize) -> i32;
    fn sigma_graph_begin(g: *mut c_void, err: *mut c_char, n: usize) -> i32;
    fn sigma_graph_end(g: *mut c_void, err: *mut c_char, n: usize) -> i32;
    fn sigma_graph_replay(g: *mut c_void, err: *mut c_char, n: usize) -> i32;
}

/// Whether this build has CUDA graphs (the CUDA runtime's headers were
/// found when it was built).
pub fn built() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { sigma_graph_built() != 0 }
}

/// One recording of work on a CUDA device.
pub struct CudaGraph {
    raw: *mut c_void,
    device: usize,
}

/// A shim call with a message buffer: Ok, or the shim's message as a GPU error.
fn call(what: &str, device: usize, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    let mut err = [0 as c_char; 512];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates its message within the buffer.
    let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
    Err(TrainError::gpu(
        "libtorch CUDA graph",
        format!("{what} on cuda:{device}"),
        crate::error::clean_torch_message(&msg),
    ))
}

impl CudaGraph {
    /// An empty graph on CUDA device `device`, with its own side stream and
    /// pool, or those of `share`.
    pub fn new(device: usize, share: Option<&CudaGraph>) -> Result<CudaGraph> {
        let mut raw = std::ptr::null_mut();
        let share_raw = share.map_or(std::ptr::null_mut(), |g| g.raw);
        // SAFETY: `share_raw` is null or a live graph; the shim writes one pointer.
        call("making a graph", device, |e, n| unsafe {
            sigma_graph_new(device as i32, share_raw, &mut raw, e, n)
        })?;
        Ok(CudaGraph { raw, device })
    }

    /// Run `f` with the side stream as the device's current stream.
    pub fn on_side<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: `raw` is live for `self`'s lifetime.
        call("entering the side stream", self.device, |e, n| unsafe {
            sigma_graph_enter(self.raw, e, n)
        })?;
        let out = f();
        let left = call("leaving the side stream", self.device, |e, n| unsafe {
            sigma_graph_leave(self.raw, e, n)
        });
        let out = out?;
        left?;
        Ok(out)
    }

    /// Record the kernels `f` launches on the side stream (nothing runs):
    /// `f` must not copy to or from the host or synchronise. Its result
    /// (tensors in the graph's pool) is what every replay rewrites.
    pub fn capture<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let raw = self.raw;
        let device = self.device;
        self.on_side(|| {
            // SAFETY: `raw` is live; the side stream is current.
            call("starting a capture", device, |e, n| unsafe {
                sigma_graph_begin(raw, e, n)
            })?;
            let out = f();
            let end = call("ending a capture", device, |e, n| unsafe {
                sigma_graph_end(raw, e, n)
            });
            let out = out?;
            end?;
            Ok(out)
        })
    }

    /// Launch the recording on the device's current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `raw` is live and captured (a replay before a capture is
        // an error the shim reports).
        call("replaying a graph", self.device, |e, n| unsafe {
            sigma_graph_replay(self.raw, e, n)
        })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: made by `sigma_graph_new`, freed once.
        unsafe { sigma_graph_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build found the CUDA runtime's headers wherever libtorch is a
    /// CUDA build (CI's is: scripts/setup.sh installs the headers), so GPU
    /// machines that run this binary get graphs.
    #[test]
    fn graphs_are_built_with_a_cuda_libtorch() {
        if !crate::kernels::decode::cuda_build() {
            crate::kernels::decode::skip_unless_ci("this libtorch is not a CUDA build");
            return;
        }
        assert!(built(), "a CUDA libtorch but no CUDA graphs in this build");
    }

    /// Without a GPU, making a graph is an error that says where, not a crash.
    #[test]
    fn a_graph_without_a_gpu_is_an_error() {
        if tch::Cuda::is_available() {
            return;
        }
        let e = CudaGraph::new(0, None).err().expect("no GPU: no graph");
        assert!(e.to_string().contains("cuda:0"), "{e}");
    }
}
