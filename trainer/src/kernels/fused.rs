//! What tch does not bind, through C++ shims: libtorch's fused AdamW kernel
//! (csrc/fused_adamw.cpp; tch binds no fused or multi-tensor optimizer), which
//! the optimizer uses on GPU: one pass that reads parameter, gradient and
//! both moments once and writes them once, instead of a dozen elementwise
//! passes with temporaries; and a linear layer with a custom backward that
//! adds its weight gradient straight into the fp32 gradient buffer
//! (csrc/linear_accum.cpp, see [`linear_accum`]); and autograd's `grad`
//! with seeded outputs (csrc/autograd_grad.cpp, see [`grad`]).
#![allow(unsafe_code)] // FFI: C functions of the shims.

use std::ffi::c_void;

use tch::Tensor;

use crate::error::{Result, TrainError};

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn sigma_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        n: usize,
        step: *mut c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> i32;
    fn sigma_linear_accum(
        x: *mut c_void,
        w: *mut c_void,
        main: *mut c_void,
        queue: *mut c_void,
        out: *mut c_void,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
    fn sigma_linear_accum_fused_gemm() -> i32;
    #[allow(clippy::too_many_arguments)]
    fn sigma_autograd_grad(
        outputs: *const *mut c_void,
        grads: *const *mut c_void,
        n_out: usize,
        inputs: *const *mut c_void,
        n_in: usize,
        results: *const *mut c_void,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
    fn sigma_grad_enabled() -> i32;
    fn sigma_wgrad_queue_new() -> *mut c_void;
    fn sigma_wgrad_queue_free(q: *mut c_void);
    fn sigma_wgrad_queue_hold(q: *mut c_void, on: i32);
    fn sigma_wgrad_queue_drain(q: *mut c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn sigma_wgrad_queue_drained(q: *mut c_void) -> u64;
    fn sigma_wgrad_queue_clear(q: *mut c_void);
}

/// AdamW hyper-parameters of one fused update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWArgs {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub eps: f64,
}

/// One fused AdamW update of the pieces `p` (with gradients `g` and moments
/// `m`, `v` of the same shapes, all contiguous on one device), at step
/// `step` (a float tensor on that device, already counting this step).
pub fn adamw(
    p: &[Tensor],
    g: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    step: &Tensor,
    a: AdamWArgs,
) -> Result<()> {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "fused AdamW: lists of one length"
    );
    let ptrs = |ts: &[Tensor]| -> Vec<*mut c_void> {
        ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    };
    let (pp, gp, mp, vp) = (ptrs(p), ptrs(g), ptrs(m), ptrs(v));
    // SAFETY: every pointer is a live tch tensor handle (an at::Tensor) for
    // the duration of the call; the shim copies the handles and catches
    // every C++ exception.
    let rc = unsafe {
        sigma_fused_adamw(
            pp.as_ptr(),
            gp.as_ptr(),
            mp.as_ptr(),
            vp.as_ptr(),
            n,
            step.as_ptr() as *mut c_void,
            a.lr,
            a.betas[0],
            a.betas[1],
            a.weight_decay,
            a.eps,
        )
    };
    if rc != 0 {
        return Err(TrainError::gpu(
            "libtorch",
            "fused AdamW (optimizer step)",
            "the kernel reported a failure",
        ));
    }
    Ok(())
}

/// `x w^T` whose weight gradient, in backward, is added into `main` (a view
/// of the fp32 gradient buffer shaped like `w`) instead of being returned
/// through `w`: on CUDA with bf16 operands by one GEMM that accumulates in
/// fp32 into the buffer (Megatron's gradient-accumulation fusion); on CPU by
/// computing it in the operands' dtype and adding, as autograd and the
/// engine's add did. `w` gets no gradient through autograd; `x` does.
/// With `queue`, backward puts the weight-gradient GEMM on the queue while
/// it holds (see [`WgradQueue`]).
/// Panics (as tch's own operations do; the trainer's guard reports it with
/// the phase) if libtorch fails, e.g. out of memory.
pub fn linear_accum(x: &Tensor, w: &Tensor, main: &Tensor, queue: Option<&WgradQueue>) -> Tensor {
    let out = Tensor::new();
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: x, w, main and out are live tch tensor handles (at::Tensor*)
    // for the call; the shim assigns into `out` and writes at most
    // `err.len()` bytes, NUL-terminated, into `err`; it catches every C++
    // exception.
    let rc = unsafe {
        sigma_linear_accum(
            x.as_ptr() as *mut c_void,
            w.as_ptr() as *mut c_void,
            main.as_ptr() as *mut c_void,
            queue.map_or(std::ptr::null_mut(), |q| q.0),
            out.as_ptr() as *mut c_void,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        shim_failed("linear layer (fused weight gradient)", &err);
    }
    out
}

/// A C++ shim returned non-zero with libtorch's exception text in `err`
/// (NUL-terminated within the buffer, as every shim writes it): panic with a
/// message that names libtorch, so `guard` reports it as a libtorch failure
/// of the phase and layer at hand (with the out-of-memory advice when it is
/// one), never as an internal error. Every shim's failure goes through here.
pub fn shim_failed(what: &str, err: &[std::ffi::c_char]) -> ! {
    let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
    let bytes: Vec<u8> = err[..end].iter().map(|&c| c as u8).collect();
    panic!(
        "libtorch failed in {what}: {}",
        String::from_utf8_lossy(&bytes)
    );
}

/// Whether autograd records operations on this thread now (false inside
/// `tch::no_grad`; tch does not expose it).
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag; no arguments.
    unsafe { sigma_grad_enabled() != 0 }
}

/// The gradients of `inputs` when each of `outputs` is seeded with the
/// gradient of the same index (autograd's `grad` with grad_outputs; tch
/// binds only scalar roots seeded with 1): undefined for unused inputs. The
/// graph is freed. Panics with libtorch's message (as tch's own operations
/// do; the trainer's guard reports it with the phase) if libtorch fails.
pub fn grad(outputs: &[&Tensor], grads: &[&Tensor], inputs: &[&Tensor]) -> Vec<Tensor> {
    assert_eq!(outputs.len(), grads.len(), "one gradient per output");
    let ptrs = |ts: &[&Tensor]| -> Vec<*mut c_void> {
        ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    };
    let results: Vec<Tensor> = inputs.iter().map(|_| Tensor::new()).collect();
    let result_ptrs: Vec<*mut c_void> = results.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let (o, g, i) = (ptrs(outputs), ptrs(grads), ptrs(inputs));
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: every pointer is a live tch tensor handle (an at::Tensor) for
    // the call; the shim assigns into the `results` handles and writes at
    // most `err.len()` bytes, NUL-terminated; it catches every C++ exception.
    let rc = unsafe {
        sigma_autograd_grad(
            o.as_ptr(),
            g.as_ptr(),
            o.len(),
            i.as_ptr(),
            i.len(),
            result_ptrs.as_ptr(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        shim_failed("backward", &err);
    }
    results
}

/// Weight-gradient GEMMs of [`linear_accum`] layers put off during a
/// backward pass, to overlap a tensor-parallel collective: while the queue
/// holds, those layers' backward computes the input gradient only and
/// queues the GEMM that adds the weight gradient into the buffer; `drain`
/// runs the queued GEMMs, in order, on the current stream. The GEMMs and
/// their order per buffer are those of the unqueued path, so the gradients
/// are bit-identical.
pub struct WgradQueue(*mut c_void);

// SAFETY: the C++ queue guards its list with a mutex and its flags are
// atomics; autograd pushes from its own thread by design.
unsafe impl Send for WgradQueue {}
unsafe impl Sync for WgradQueue {}

impl WgradQueue {
    pub fn new() -> WgradQueue {
        // SAFETY: allocates a queue owned by the returned value (freed in Drop).
        WgradQueue(unsafe { sigma_wgrad_queue_new() })
    }

    /// Queue (true) or compute at once (false) from now on.
    fn hold(&self, on: bool) {
        // SAFETY: a live queue.
        unsafe { sigma_wgrad_queue_hold(self.0, on as i32) }
    }

    /// Run the queued GEMMs; the queue is empty afterwards, also on failure.
    pub fn drain(&self) -> Result<()> {
        let mut err = [0 as std::ffi::c_char; 512];
        // SAFETY: a live queue; the shim writes at most `err.len()` bytes,
        // NUL-terminated, and catches every C++ exception.
        let rc = unsafe { sigma_wgrad_queue_drain(self.0, err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            // SAFETY: the shim NUL-terminated the message within the buffer.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
            return Err(TrainError::gpu(
                "libtorch",
                "weight gradient (put off to overlap a tensor-parallel collective)",
                msg.to_string_lossy(),
            ));
        }
        Ok(())
    }

    /// Queue from now until the returned guard is dropped; a panic in
    /// between (a failed backward) drops what was queued.
    pub fn holding(&self) -> Holding<'_> {
        self.hold(true);
        Holding(self)
    }

    /// Drop the queued GEMMs without running them: after a failed backward,
    /// so that none is added into a later step's gradients.
    pub fn clear(&self) {
        // SAFETY: a live queue.
        unsafe { sigma_wgrad_queue_clear(self.0) }
    }

    /// The C++ queue, for another autograd shim that queues into it
    /// (`kernels::fp8::linear`).
    pub(crate) fn raw(&self) -> *mut c_void {
        self.0
    }

    /// How many queued GEMMs have run since the queue was made.
    pub fn drained(&self) -> u64 {
        // SAFETY: a live queue.
        unsafe { sigma_wgrad_queue_drained(self.0) }
    }
}

/// See [`WgradQueue::holding`].
pub struct Holding<'q>(&'q WgradQueue);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.hold(false);
        if std::thread::panicking() {
            self.0.clear();
        }
    }
}

impl Default for WgradQueue {
    fn default() -> Self {
        WgradQueue::new()
    }
}

impl Drop for WgradQueue {
    fn drop(&mut self) {
        // SAFETY: the queue was made by sigma_wgrad_queue_new and is freed once;
        // the graphs that point at it belong to the model that owns it.
        unsafe { sigma_wgrad_queue_free(self.0) }
    }
}

/// Whether [`linear_accum`] adds on GPU with the fused fp32-output GEMM
/// (false once libtorch refused it, after which it computes and adds).
pub fn linear_accum_fused_gemm() -> bool {
    // SAFETY: reads an atomic flag of the shim.
    unsafe { sigma_linear_accum_fused_gemm() != 0 }
}
