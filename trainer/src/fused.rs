//! libtorch's fused AdamW kernel through the C++ shim csrc/fused_adamw.cpp
//! (tch binds no fused or multi-tensor optimizer). The optimizer uses it on
//! GPU: one pass that reads parameter, gradient and both moments once and
//! writes them once, instead of a dozen elementwise passes with temporaries.
#![allow(unsafe_code)] // FFI: one C function of the shim.

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
        return Err(TrainError::Other(
            "libtorch's fused AdamW failed (optimizer step)".into(),
        ));
    }
    Ok(())
}
