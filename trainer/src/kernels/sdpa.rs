//! Scaled-dot-product attention of the model (`model/block.rs`) and of the
//! planner's calibration: [`attention`]. On CPU it runs through a shim
//! (csrc/sdpa.cpp): with bf16 or fp16 operands and ATen's kernels below
//! AVX-512 (the tests pin AVX2), libtorch 2.11's flash attention packs its
//! operands for AMX tiles on CPUs that have them, with a routine only its
//! AVX-512 build has, and fails; those calls run libtorch's math attention
//! (the same function, its scores materialised, computed in fp32 and
//! rounded once) and every other call is libtorch's SDPA unchanged. On
//! GPUs it is tch's SDPA call.
#![allow(unsafe_code)] // FFI: the C function of the shim.

use std::ffi::c_void;

use tch::Tensor;

use super::fused::shim_failed;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn sigma_sdpa(
        q: *mut c_void,
        k: *mut c_void,
        v: *mut c_void,
        mask: *mut c_void,
        causal: i32,
        scale: f64,
        gqa: i32,
        out: *mut c_void,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
}

/// `softmax(q k^T * scale + mask) v` as libtorch's
/// `scaled_dot_product_attention` computes it (no dropout): `causal` masks
/// the future (with no `mask`), `gqa` lets `k`, `v` have fewer heads than `q`.
/// Panics, as tch's operations do, with libtorch's message if it fails.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    gqa: bool,
) -> Tensor {
    if q.device() != tch::Device::Cpu {
        return Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, gqa);
    }
    let out = Tensor::new();
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: q, k, v, mask (or null) and out are live tch tensor handles
    // (at::Tensor*) for the call; the shim assigns into `out` and writes at
    // most `err.len()` bytes, NUL-terminated, into `err`; it catches every
    // C++ exception.
    let rc = unsafe {
        sigma_sdpa(
            q.as_ptr() as *mut c_void,
            k.as_ptr() as *mut c_void,
            v.as_ptr() as *mut c_void,
            mask.map_or(std::ptr::null_mut(), |m| m.as_ptr() as *mut c_void),
            causal as i32,
            scale,
            gqa as i32,
            out.as_ptr() as *mut c_void,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        shim_failed("attention", &err);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn qkv(kind: Kind, t: i64) -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(7);
        let mk = |h: i64| Tensor::randn([2, h, t, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
        (mk(8), mk(4), mk(4))
    }

    /// fp32 attention written out (no SDPA), grouped query heads repeated.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (q, k, v) = (
            q.to_kind(Kind::Float),
            k.to_kind(Kind::Float),
            v.to_kind(Kind::Float),
        );
        let rep = q.size()[1] / k.size()[1];
        let k = k.repeat_interleave_self_int(rep, 1, None);
        let v = v.repeat_interleave_self_int(rep, 1, None);
        let t = q.size()[2];
        let s = q.matmul(&k.transpose(-2, -1)) * scale;
        let future = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        let s = s.masked_fill(&future, f64::NEG_INFINITY);
        s.softmax(-1, Kind::Float).matmul(&v)
    }

    /// A causal bf16 attention long enough for libtorch's CPU kernel to
    /// pack (128 tokens; libtorch's own call failed so at 1 to 64 threads
    /// on a CPU with AMX under the tests' AVX2 pin), forward and backward:
    /// it runs and follows fp32.
    #[test]
    fn bf16_attention_runs_on_the_cpu_and_follows_fp32() {
        let (q, k, v) = qkv(Kind::BFloat16, 128);
        let q = q.set_requires_grad(true);
        let o = attention(&q, &k, &v, None, true, 0.125, true);
        assert_eq!(o.size(), [2, 8, 128, 64]);
        assert_eq!(o.kind(), Kind::BFloat16);
        let want = reference(&q, &k, &v, 0.125);
        let diff = (o.to_kind(Kind::Float) - &want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 0.03, "bf16 attention off fp32 by {diff}");
        o.to_kind(Kind::Float).square().sum(Kind::Float).backward();
        let g = q.grad();
        assert_eq!(g.size(), q.size());
        assert!(g.to_kind(Kind::Float).isfinite().all().int64_value(&[]) == 1);
    }

    /// fp32 calls are libtorch's SDPA unchanged: bit for bit, with a mask.
    #[test]
    fn fp32_attention_is_libtorch_sdpa_bit_for_bit() {
        let (q, k, v) = qkv(Kind::Float, 96);
        let mask = Tensor::randn([96, 96], (Kind::Float, Device::Cpu));
        let got = attention(&q, &k, &v, Some(&mask), false, 0.2, true);
        let want =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, 0.2, true);
        assert!(got.equal(&want));
        let diff = (attention(&q, &k, &v, None, true, 0.125, true) - reference(&q, &k, &v, 0.125))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "fp32 attention off the reference by {diff}");
    }

    /// libtorch's error for bad shapes comes back as a panic naming libtorch.
    #[test]
    fn a_shape_error_names_libtorch_and_the_attention() {
        let (q, _, v) = qkv(Kind::Float, 16);
        let k = Tensor::zeros([2, 4, 16, 32], (Kind::Float, Device::Cpu));
        let e = std::panic::catch_unwind(|| attention(&q, &k, &v, None, true, 0.1, true))
            .expect_err("mismatched head dims must fail");
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.starts_with("libtorch failed in attention: "), "{msg}");
    }
}
