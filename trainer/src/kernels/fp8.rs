//! FP8 matmuls through the C++ shim `csrc/fp8_linear.cpp` (its header
//! states the scaling rule and the GEMM convention): quantisation with
//! current scaling ([`quantize`]), the scaled GEMM of two quantised
//! operands ([`gemm`]), a weight's FP8 forms ([`Fp8Weight`]) and the linear
//! layer as an autograd function ([`linear`]; [`linear_with`] takes an
//! input quantised once for several layers, [`quantize_input`]).
//!
//! Two ways to multiply ([`Gemm`]): `ScaledMm` calls libtorch's
//! `_scaled_mm`, the FP8 tensor-core GEMM on a CUDA GPU of compute
//! capability 8.9 or later (libtorch also runs it on the CPU for tensorwise
//! scales, which is how CI checks this path's operand layouts and scale
//! convention); `Emulated` converts the FP8 operands to fp32 (exactly) and
//! multiplies with an fp32 matmul, then applies the scales: the same numbers
//! up to the order of the fp32 sums. What has run where: docs/precision.md.
#![allow(unsafe_code)] // FFI: C functions of the shim.

use std::ffi::{c_char, c_void};

use tch::{Kind, Tensor};

extern "C" {
    fn sigma_fp8_quantize(
        x: *mut c_void,
        fmt: i64,
        rows: i32,
        margin: i64,
        amax: *mut c_void,
        out_q: *mut c_void,
        out_scale: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn sigma_fp8_quantize_2d(
        x: *mut c_void,
        fmt: i64,
        kind: i32,
        margin: i64,
        want_q: i32,
        want_qt: i32,
        path: i32,
        out_q: *mut c_void,
        out_qt: *mut c_void,
        out_scale: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn sigma_fp8_gemm(
        a: *mut c_void,
        sa: *mut c_void,
        b: *mut c_void,
        sb: *mut c_void,
        out_dtype: i64,
        mode: i64,
        out: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn sigma_fp8_linear(
        x: *mut c_void,
        w: *mut c_void,
        wq: *mut c_void,
        wq_scale: *mut c_void,
        wt: *mut c_void,
        wt_scale: *mut c_void,
        main: *mut c_void,
        queue: *mut c_void,
        rows: i32,
        grad: i64,
        wgrad_fp8: i32,
        margin: i64,
        fast_accum: i32,
        mode: i64,
        pq: *mut c_void,
        pqt: *mut c_void,
        ps: *mut c_void,
        out: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sigma_fp8_wgrad_gemm_state() -> i32;
    #[allow(clippy::too_many_arguments)]
    fn sigma_fp8_quantize_input(
        x: *mut c_void,
        rows: i32,
        wgrad_fp8: i32,
        margin: i64,
        out_q: *mut c_void,
        out_qt: *mut c_void,
        out_scale: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// An FP8 format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 4 exponent bits, 3 mantissa bits, no infinities (`float8_e4m3fn`).
    E4m3,
    /// 5 exponent bits, 2 mantissa bits (`float8_e5m2`).
    E5m2,
}

impl Format {
    /// Its number in the shim.
    fn code(self) -> i64 {
        match self {
            Format::E4m3 => 0,
            Format::E5m2 => 1,
        }
    }

    /// libtorch's dtype.
    pub fn kind(self) -> Kind {
        match self {
            Format::E4m3 => Kind::Float8e4m3fn,
            Format::E5m2 => Kind::Float8e5m2,
        }
    }

    /// The largest finite value: 448 (e4m3fn), 57344 (e5m2).
    pub fn max(self) -> f64 {
        match self {
            Format::E4m3 => 448.0,
            Format::E5m2 => 57344.0,
        }
    }

    /// Mantissa bits: rounding to nearest moves a normal value by at most
    /// 2^-(bits + 1) of itself.
    pub fn mantissa_bits(self) -> i32 {
        match self {
            Format::E4m3 => 3,
            Format::E5m2 => 2,
        }
    }

    /// The smallest positive normal value: 2^-6 (e4m3fn), 2^-14 (e5m2).
    /// Below it the spacing is fixed: 2^-9 and 2^-16.
    pub fn min_normal(self) -> f64 {
        match self {
            Format::E4m3 => 2f64.powi(-6),
            Format::E5m2 => 2f64.powi(-14),
        }
    }

    /// The spacing of subnormal values (the smallest positive one).
    pub fn subnormal_step(self) -> f64 {
        self.min_normal() * 2f64.powi(-self.mantissa_bits())
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::E4m3 => "e4m3",
            Format::E5m2 => "e5m2",
        }
    }
}

/// What one scale covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scaling {
    /// One scale per tensor.
    Tensorwise,
    /// One scale per row of each GEMM operand (along the contraction).
    Rowwise,
}

/// How a scaled GEMM is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gemm {
    /// fp32 matmul of the FP8 operands converted exactly to fp32.
    Emulated,
    /// libtorch's `_scaled_mm` (FP8 tensor cores on CUDA).
    ScaledMm,
}

impl Gemm {
    fn code(self) -> i64 {
        match self {
            Gemm::Emulated => 0,
            Gemm::ScaledMm => 1,
        }
    }
}

/// How an FP8 linear layer computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Opts {
    pub scaling: Scaling,
    /// Format of the output gradients (inputs and weights are e4m3).
    pub grad: Format,
    /// The weight-gradient GEMM in FP8 (else bf16).
    pub wgrad_fp8: bool,
    /// Scales `2^-margin` below what the amax allows.
    pub margin: u32,
    /// The forward GEMM in the tensor cores' fast accumulation mode
    /// (`_scaled_mm` on a GPU; the emulation and the CPU ignore it).
    pub fast_accum: bool,
    pub gemm: Gemm,
}

/// Panic with the shim's message (the model's forward and backward report
/// libtorch failures as panics, which the trainer's guard turns into errors).
fn check(rc: i32, err: &[c_char], what: &str) {
    if rc != 0 {
        crate::kernels::fused::shim_failed(what, err);
    }
}

/// c10's number of a GEMM output dtype (tch keeps its own private).
fn scalar_type(k: Kind) -> i64 {
    match k {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::BFloat16 => 15,
        k => panic!("FP8 GEMM: output dtype {k:?} (fp32, bf16 or fp16)"),
    }
}

fn ptr(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// `x` (2-D, any float dtype) in `fmt` with current scaling: one scale
/// (`rows` false) or one per row, `margin` powers of two below the amax.
/// Returns the FP8 tensor and the dequantisation scale (fp32, `[]` or
/// `[rows, 1]`): `x ≈ q * scale`. An amax of 0 gives scale 1; values that
/// round past the format's largest value saturate to it.
pub fn quantize(x: &Tensor, fmt: Format, rows: bool, margin: u32) -> (Tensor, Tensor) {
    quantize_from(x, fmt, rows, margin, &Tensor::new())
}

/// [`quantize`] with scales from a given `amax` (fp32, `[]` or `[rows, 1]`)
/// instead of x's own: where it is below x's, values past it saturate to
/// the format's largest value (x's own amax makes that impossible but for
/// rounding). Training scales from the tensor itself; this is the rule's
/// test (and the form an amax reduced across ranks, or one from earlier
/// steps, would take).
pub fn quantize_with_amax(x: &Tensor, fmt: Format, amax: &Tensor, margin: u32) -> (Tensor, Tensor) {
    quantize_from(x, fmt, amax.dim() > 0, margin, amax)
}

fn quantize_from(
    x: &Tensor,
    fmt: Format,
    rows: bool,
    margin: u32,
    amax: &Tensor,
) -> (Tensor, Tensor) {
    let (q, s) = (Tensor::new(), Tensor::new());
    let mut err = [0 as c_char; 512];
    // SAFETY: x, amax (possibly undefined), q and s are live tch tensor
    // handles for the call; the shim
    // assigns into q and s, writes at most `err.len()` bytes NUL-terminated
    // into `err`, and catches every C++ exception.
    let rc = unsafe {
        sigma_fp8_quantize(
            ptr(x),
            fmt.code(),
            rows as i32,
            margin as i64,
            ptr(amax),
            ptr(&q),
            ptr(&s),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    check(rc, &err, "FP8 quantisation");
    (q, s)
}

/// What one scale of a [`quantize_2d`] covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amax {
    /// The whole tensor.
    Tensor,
    /// A row.
    Rows,
    /// A column (the rowwise scaling of the transpose, which is what is
    /// written).
    Cols,
}

/// Which way [`quantize_2d`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantPath {
    /// The kernels (csrc/train_kernels.cu) where they take the tensor (bf16
    /// or fp32 on a GPU, columns a multiple of 8, rows a multiple of 16 for a
    /// transposed output), else the tensor form: what training runs.
    Auto,
    /// libtorch operations only (the rule as written; any device, any dtype).
    TensorForm,
    /// The kernels, or an error where they do not take the tensor.
    Kernels,
}

/// `x` [rows, cols] quantised to `fmt` with current scaling, one scale per
/// `kind`, `margin` powers of two below the amax: `(q, qt, scale)` with q
/// [rows, cols] (for `Tensor` and `Rows`, when `want_q`), its transpose qt
/// [cols, rows] (for `Tensor` and `Cols`, when `want_qt`; undefined tensors
/// where not wanted) and the dequantisation scales: `[]`, `[rows, 1]` or
/// `[cols, 1]` (one per row of qt). Both paths give the same bytes; the GPU
/// check (`sigma bench fp8`) holds them to it. Panics with libtorch's message
/// (or the kernels' refusal under `QuantPath::Kernels`).
pub fn quantize_2d(
    x: &Tensor,
    fmt: Format,
    kind: Amax,
    margin: u32,
    (want_q, want_qt): (bool, bool),
    path: QuantPath,
) -> (Tensor, Tensor, Tensor) {
    crate::kernels::training::register();
    let (q, qt, s) = (Tensor::new(), Tensor::new(), Tensor::new());
    let mut err = [0 as c_char; 512];
    let kind = match kind {
        Amax::Tensor => 0,
        Amax::Rows => 1,
        Amax::Cols => 2,
    };
    let path = match path {
        QuantPath::Auto => 0,
        QuantPath::TensorForm => 1,
        QuantPath::Kernels => 2,
    };
    // SAFETY: x, q, qt and s are live tch tensor handles for the call; the
    // shim assigns into q, qt and s, writes at most `err.len()` bytes
    // NUL-terminated into `err`, and catches every C++ exception.
    let rc = unsafe {
        sigma_fp8_quantize_2d(
            ptr(x),
            fmt.code(),
            kind,
            margin as i64,
            want_q as i32,
            want_qt as i32,
            path,
            ptr(&q),
            ptr(&qt),
            ptr(&s),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    check(rc, &err, "FP8 quantisation");
    (q, qt, s)
}

/// The scaled GEMM `(a_q b_q) * (sa * sb)` of quantised operands: `a`
/// [M, K] row-major, `b` [K, N] column-major, scales `[]` or `[M, 1]` and
/// `[1, N]`; the result in `out`.
pub fn gemm(a: &Tensor, sa: &Tensor, b: &Tensor, sb: &Tensor, out: Kind, mode: Gemm) -> Tensor {
    let y = Tensor::new();
    let mut err = [0 as c_char; 512];
    // SAFETY: as in `quantize`; the shim assigns into `y`.
    let rc = unsafe {
        sigma_fp8_gemm(
            ptr(a),
            ptr(sa),
            ptr(b),
            ptr(sb),
            scalar_type(out),
            mode.code(),
            ptr(&y),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    check(rc, &err, "FP8 GEMM");
    y
}

/// A weight [N, K] in the two FP8 forms the GEMMs read, made from its
/// master copy once per change of it: `q` [N, K] with `scale` (`[]` or
/// `[N, 1]`) for the forward, and `t` = W^T [K, N] with `t_scale` (`[]` or
/// `[K, 1]`) for the input gradient (for tensorwise scaling `q` transposed
/// with the same scale; for rowwise W^T quantised per row).
pub struct Fp8Weight {
    pub q: Tensor,
    pub scale: Tensor,
    pub t: Tensor,
    pub t_scale: Tensor,
}

impl Fp8Weight {
    /// The FP8 forms of `w` (2-D, fp32 or bf16), in e4m3: by the
    /// quantisation kernels where they take `w` (on a GPU: both forms of a
    /// tensorwise weight from one amax pass and one cast pass), else the
    /// tensor form; the same bytes either way ([`quantize_2d`]).
    pub fn new(w: &Tensor, scaling: Scaling, margin: u32) -> Fp8Weight {
        tch::no_grad(|| {
            let f = Format::E4m3;
            let path = QuantPath::Auto;
            if scaling == Scaling::Rowwise {
                // A scale per row of W for the forward, per row of W^T (per
                // column of W, written transposed) for the input gradient.
                let (q, _, scale) = quantize_2d(w, f, Amax::Rows, margin, (true, false), path);
                let (_, t, t_scale) = quantize_2d(w, f, Amax::Cols, margin, (false, true), path);
                return Fp8Weight {
                    q,
                    scale,
                    t,
                    t_scale,
                };
            }
            let (q, t, scale) = quantize_2d(w, f, Amax::Tensor, margin, (true, true), path);
            Fp8Weight {
                q,
                t_scale: scale.shallow_clone(),
                scale,
                t,
            }
        })
    }

    /// Another handle to the same tensors.
    pub fn shallow_clone(&self) -> Fp8Weight {
        Fp8Weight {
            q: self.q.shallow_clone(),
            scale: self.scale.shallow_clone(),
            t: self.t.shallow_clone(),
            t_scale: self.t_scale.shallow_clone(),
        }
    }

    /// Bytes of its two FP8 forms.
    pub fn bytes(&self) -> i64 {
        (self.q.numel() + self.t.numel()) as i64
    }
}

/// How this process's tensorwise FP8 weight gradients have reached the
/// fp32 gradient buffer (csrc/fp8_linear.cpp, `kernels::fp8_wgrad`): by
/// cuBLASLt's GEMM adding into it (beta = 1, after a first result checked
/// against the other way), or by `_scaled_mm` and an add: where cuBLASLt
/// was not tried (a CPU, the emulation, rowwise scaling, no gradient
/// buffer, none yet) or failed or differed.
pub fn weight_grad_gemm() -> &'static str {
    // SAFETY: reads an atomic of the shim; no arguments.
    match unsafe { sigma_fp8_wgrad_gemm_state() } {
        0 => "_scaled_mm and an add (cuBLASLt's GEMM not tried)",
        1 => "cuBLASLt's GEMM adding into the buffer",
        _ => "_scaled_mm and an add",
    }
}

/// The input of FP8 linear layers quantised once for all of them, as
/// each layer's forward would (e4m3, the recipe's scales, the transpose
/// where tensorwise FP8 weight gradients keep it): [`quantize_input`].
pub struct Fp8Input {
    q: Tensor,
    qt: Tensor,
    scale: Tensor,
}

/// `x` [.., K] quantised for FP8 linear layers of options `o` that all read
/// it (q, k and v): passed to [`linear_with`], it replaces the quantisation
/// each would run, with the same bytes. Panics with libtorch's message.
pub fn quantize_input(x: &Tensor, o: &Fp8Opts) -> Fp8Input {
    crate::kernels::training::register();
    let (q, qt, scale) = (Tensor::new(), Tensor::new(), Tensor::new());
    let mut err = [0 as c_char; 512];
    // SAFETY: x, q, qt and scale are live tch tensor handles for the call;
    // the shim assigns into the last three, writes at most `err.len()` bytes
    // NUL-terminated into `err`, and catches every C++ exception.
    let rc = unsafe {
        sigma_fp8_quantize_input(
            ptr(x),
            (o.scaling == Scaling::Rowwise) as i32,
            o.wgrad_fp8 as i32,
            o.margin as i64,
            ptr(&q),
            ptr(&qt),
            ptr(&scale),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    check(rc, &err, "FP8 quantisation");
    Fp8Input { q, qt, scale }
}

/// `x w^T` [.., N] for `x` [.., K] (bf16) through FP8 GEMMs (see the
/// shim's header): `w` is the bf16 working weight [N, K], whose gradient
/// autograd receives when `main` is None; `weight` its FP8 forms; `main` a
/// view of the fp32 gradient buffer shaped like `w`, into which backward
/// adds the weight gradient (a bf16 one through `queue` when it holds, as
/// [`crate::kernels::fused::linear_accum`] does). The output has `w`'s dtype.
/// Panics with libtorch's message if libtorch fails.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    weight: &Fp8Weight,
    main: Option<&Tensor>,
    queue: Option<&crate::kernels::fused::WgradQueue>,
    o: &Fp8Opts,
) -> Tensor {
    linear_with(x, w, weight, main, queue, o, None)
}

/// [`linear`] with `x` already quantised by [`quantize_input`] with the
/// same options (`input`), or quantised here (None).
pub fn linear_with(
    x: &Tensor,
    w: &Tensor,
    weight: &Fp8Weight,
    main: Option<&Tensor>,
    queue: Option<&crate::kernels::fused::WgradQueue>,
    o: &Fp8Opts,
    input: Option<&Fp8Input>,
) -> Tensor {
    crate::kernels::training::register();
    let out = Tensor::new();
    let none = Tensor::new();
    let mut err = [0 as c_char; 512];
    // SAFETY: every tensor pointer is a live tch handle for the call (an
    // undefined one for a missing `main`); the queue outlives the graph (the
    // gradient sink owns it); the shim assigns into `out`, writes at most
    // `err.len()` bytes NUL-terminated and catches every C++ exception.
    let rc = unsafe {
        sigma_fp8_linear(
            ptr(x),
            ptr(w),
            ptr(&weight.q),
            ptr(&weight.scale),
            ptr(&weight.t),
            ptr(&weight.t_scale),
            ptr(main.unwrap_or(&none)),
            queue.map_or(std::ptr::null_mut(), |q| q.raw()),
            (o.scaling == Scaling::Rowwise) as i32,
            o.grad.code(),
            o.wgrad_fp8 as i32,
            o.margin as i64,
            o.fast_accum as i32,
            o.gemm.code(),
            ptr(input.map_or(&none, |i| &i.q)),
            ptr(input.map_or(&none, |i| &i.qt)),
            ptr(input.map_or(&none, |i| &i.scale)),
            ptr(&out),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    check(rc, &err, "FP8 linear layer");
    out
}
