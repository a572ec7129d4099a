//! Kernels of bf16 training (csrc/train_kernels.cu), compiled with NVRTC on
//! first use per device and launched on libtorch's current stream, behind
//! autograd functions of the C++ shim csrc/kernel_ops.cpp:
//!
//! - **SwiGLU** (`silu(gate) * up`) over the merged output of the gate and up
//!   matmuls ([`crate::model::Model::gated`]): one kernel forward and one
//!   backward where the tensor form runs five, and only the merged
//!   activation kept for backward. Elsewhere (CPU, fp32) the shim runs the
//!   tensor form with autograd's gradients.
//! - **RoPE** ([`crate::model::Model::rope_at`]): one kernel forward and one
//!   backward where the tensor form runs a flip, two products and a sum
//!   (strided, broadcast over heads) each way; [`rope`] says when it applies.
//! - **Cross-entropy** of the output head
//!   ([`crate::model::Model::head_loss_sum_whole`]): forward reads the bf16
//!   logits once and keeps one log-sum-exp per row; backward writes the bf16
//!   gradient in one pass, over the logits themselves (no second
//!   logits-sized buffer at the head's backward, where training peaks). The
//!   tensor form copies the logits to fp32 and keeps their fp32 log-softmax
//!   (for SIGMA-1.5B at micro-batch 4, 8.4 GB each); [`cross_entropy_sum`]
//!   says when it applies.
//! - **RMSNorm** of the fp32 residual stream with a bf16 output
//!   ([`crate::model::Model::norm_in`]): forward reads x once and writes the
//!   bf16 input of the matmuls; backward reads the bf16 gradient and writes
//!   the fp32 one, with the weight gradient from per-block partial sums. The
//!   tensor form writes an fp32 output, casts it, and casts the gradient
//!   back; [`rms_norm_bf16`] says when it applies. The residual add before
//!   a norm runs in the same kernels ([`add_rms_norm_bf16`],
//!   [`crate::model::Model::add_norm_in`]): forward writes the fp32 sum and
//!   its bf16 norm from one read of both addends; backward adds the
//!   residual's gradient to the norm's and writes the bf16 gradient of the
//!   branch output, where autograd would run a separate add and a cast.
//!
//! - **FP8 quantisation** (`train.precision = "fp8"`,
//!   [`crate::kernels::fp8::quantize_2d`] through csrc/fp8_linear.cpp): an
//!   amax pass (one, per row or per column) and a cast pass that writes the
//!   FP8 tensor and its transpose, where the tensor form makes fp32 copies
//!   and runs five operations and a transposing copy: of bf16 activations
//!   and gradients, and of the fp32 master weights (their FP8 forms, once
//!   per optimizer step).
//!
//! `SIGMA_TRAIN_KERNELS=off` turns them all off (the tensor forms run); a build
//! or launch failure is reported once and has the same effect (a launch that
//! fails inside backward still fails that step).
#![allow(unsafe_code)] // FFI: the shim, and kernel launches over raw device pointers.

use crate::kernels::built::Built;
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Once};

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig, PushKernelArg};
use tch::{Kind, Tensor};

use crate::kernels::decode;

/// The kernels' source (compiled after csrc/bf16.cuh).
pub const SOURCE: &str = concat!(
    include_str!("../../csrc/rms_norm.cuh"),
    include_str!("../../csrc/train_kernels.cu")
);
const THREADS: u32 = 256;
/// Threads per row of the cross-entropy kernels (the source's CE_THREADS).
const CE_THREADS: u32 = 512;
/// Columns of an FP8 kernel's tile (the source's FP8_COLS).
const FP8_COLS: i64 = 64;
/// Threads per row of the RMSNorm kernels (the source's NORM_THREADS).
const NORM_THREADS: u32 = 256;
/// The widest row the RMSNorm backward takes (4 x NORM_THREADS x NORM_CHUNKS).
pub(crate) const NORM_MAX_DIM: i64 = 8192;

/// One launch, as csrc/kernel_ops.cpp describes it (`KernelArgs` there).
#[repr(C)]
struct KernelArgs {
    op: i32,
    device: i32,
    a: *const c_void,
    b: *const c_void,
    c: *const c_void,
    d: *const c_void,
    e: *const c_void,
    out: *mut c_void,
    out2: *mut c_void,
    out3: *mut c_void,
    rows: i64,
    cols: i64,
    ignore: i64,
    f: i32,
    t: i32,
    heads: i32,
    start: i32,
    blocks: i32,
    eps: f32,
}

// The shim's struct has the same size (a static_assert there).
const _: () = assert!(std::mem::size_of::<KernelArgs>() == 120);

type Launcher = extern "C" fn(*const KernelArgs) -> i32;

extern "C" {
    fn sigma_kernel_ops_set_launcher(l: Option<Launcher>);
    fn sigma_swiglu(gu: *mut c_void, out: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
    fn sigma_rope(
        x: *mut c_void,
        cs: *mut c_void,
        sn: *mut c_void,
        start: i64,
        out: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sigma_rms_norm_bf16(
        x: *mut c_void,
        w: *mut c_void,
        eps: f64,
        out: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sigma_add_rms_norm_bf16(
        x: *mut c_void,
        y: *mut c_void,
        w: *mut c_void,
        eps: f64,
        out_sum: *mut c_void,
        out_norm: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sigma_cross_entropy_sum(
        logits: *mut c_void,
        targets: *mut c_void,
        ignore: i64,
        out: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

struct Loaded {
    ctx: Arc<CudaContext>,
    swiglu_forward: CudaFunction,
    swiglu_backward: CudaFunction,
    rope: CudaFunction,
    ce_forward: CudaFunction,
    ce_backward: CudaFunction,
    norm_forward: CudaFunction,
    norm_backward: CudaFunction,
    fp8_amax: CudaFunction,
    fp8_cast: CudaFunction,
    fp8_amax_f32: CudaFunction,
    fp8_cast_f32: CudaFunction,
    sms: i64,
}

fn load(ordinal: usize) -> Result<Arc<Loaded>, String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let (ctx, arch, sms) = decode::device(ordinal)?;
    let module = decode::load_module(&ctx, SOURCE, &[], arch)?;
    Ok(Arc::new(Loaded {
        swiglu_forward: module.load_function("swiglu_forward").map_err(drv)?,
        swiglu_backward: module.load_function("swiglu_backward").map_err(drv)?,
        rope: module.load_function("rope").map_err(drv)?,
        ce_forward: module.load_function("cross_entropy_forward").map_err(drv)?,
        ce_backward: module
            .load_function("cross_entropy_backward")
            .map_err(drv)?,
        norm_forward: module.load_function("rms_norm_forward").map_err(drv)?,
        norm_backward: module.load_function("rms_norm_backward").map_err(drv)?,
        fp8_amax: module.load_function("fp8_amax").map_err(drv)?,
        fp8_cast: module.load_function("fp8_cast").map_err(drv)?,
        fp8_amax_f32: module.load_function("fp8_amax_f32").map_err(drv)?,
        fp8_cast_f32: module.load_function("fp8_cast_f32").map_err(drv)?,
        ctx,
        sms,
    }))
}

/// The training kernels built by this process, per device (failures included).
static BUILT: Built<usize, Loaded> = Built::new(|ordinal, e| {
    eprintln!("warning: the training kernels are not used on cuda:{ordinal} (tensor operations instead): {e}")
});

/// The kernels of CUDA device `ordinal`, built on first use (or waited
/// for where another thread is building them); a failure is printed once
/// and remembered.
fn loaded(ordinal: usize) -> Result<Arc<Loaded>, String> {
    BUILT.get(&ordinal, || load(ordinal))
}

/// Build the kernels of device `ordinal` now where they are on (so that
/// their first use finds them built); a failure is reported as at first use.
pub fn prebuild(ordinal: usize) {
    if kernels_enabled() {
        let _ = loaded(ordinal);
    }
}

fn launch_on(a: &KernelArgs) -> Result<(), String> {
    let ordinal = usize::try_from(a.device).map_err(|_| format!("device {}", a.device))?;
    let _restore = decode::RestoreContext::save();
    let k = loaded(ordinal)?;
    let stream = decode::current_stream(&k.ctx, ordinal)
        .ok_or_else(|| format!("no current CUDA stream for cuda:{ordinal}"))?;
    if a.op == 13 {
        // A cuBLASLt call, not a cudarc launch (which binds the context itself).
        k.ctx
            .bind_to_thread()
            .map_err(|e| format!("cuda:{ordinal}'s context: {e}"))?;
        let g = crate::kernels::fp8_wgrad::Accum {
            device: a.device,
            x_t: a.a,
            x_scale: a.c,
            gy_t: a.b,
            gy_scale: a.d,
            gy_e5m2: a.t == 1,
            main: a.out,
            tokens: a.rows,
            k_in: a.cols,
            n_out: a.ignore,
            workspace: a.e as *mut c_void,
            workspace_bytes: usize::try_from(a.blocks).map_err(|_| "workspace size")?,
        };
        // SAFETY: the shim passes live device tensors of these extents on
        // this device, ordered on libtorch's current stream, read above.
        let r =
            unsafe { crate::kernels::fp8_wgrad::accumulate(&g, stream.cu_stream() as *mut c_void) };
        return r.map_err(|e| format!("the FP8 weight-gradient GEMM on cuda:{ordinal}: {e}"));
    }
    let cfg = grid(a, &k)?;
    if cfg.grid_dim.0 == 0 {
        return Ok(());
    }
    launch_kernel(&stream, &k, a, cfg).map_err(|e| format!("launch on cuda:{ordinal}: {e}"))
}

/// The launch shape of operation `a.op`. SwiGLU and RoPE: a thread per 8
/// columns (of F, of half a head); cross-entropy and RMSNorm: a block per
/// row (RMSNorm backward: the shim's number of blocks, each with its
/// weight-gradient partial).
fn grid(a: &KernelArgs, k: &Loaded) -> Result<LaunchConfig, String> {
    let (blocks, threads) = match a.op {
        0..=3 => {
            let per_row = if a.op < 2 { a.f / 8 } else { a.f / 16 } as i64;
            let b = (a.rows * per_row + THREADS as i64 - 1) / THREADS as i64;
            (b.min(k.sms * 32), THREADS)
        }
        4 | 5 => (a.rows.min(1 << 30), CE_THREADS),
        6 => (a.rows.min(1 << 30), NORM_THREADS),
        7 => (a.blocks as i64, NORM_THREADS),
        8..=11 => return Ok(fp8_grid(a, k.sms)),
        op => return Err(format!("unknown kernel operation {op}")),
    };
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The FP8 kernels' tiles: 64 columns by 32 rows (amax, whose blocks loop
/// over rows, about 8 blocks per multiprocessor in all) or by 64 rows (cast;
/// the shim keeps the row tiles within the grid's limit). No blocks for an
/// empty tensor.
fn fp8_grid(a: &KernelArgs, sms: i64) -> LaunchConfig {
    let x = (a.cols + FP8_COLS - 1) / FP8_COLS;
    let y = if a.op == 8 || a.op == 10 {
        let tiles = (a.rows + 31) / 32;
        tiles.min((sms * 8 / x.max(1)).max(1))
    } else {
        (a.rows + 63) / 64
    };
    let x = if y == 0 { 0 } else { x };
    LaunchConfig {
        grid_dim: (x as u32, y.max(1) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch operation `a.op` with its arguments: a flat table, one launch
/// per kernel, longer than a screen by its argument lists alone.
fn launch_kernel(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    k: &Loaded,
    a: &KernelArgs,
    cfg: LaunchConfig,
) -> Result<(), cudarc::driver::DriverError> {
    let (pa, pb, pc, pd) = (a.a as u64, a.b as u64, a.c as u64, a.d as u64);
    let (pe, out, out2, out3) = (a.e as u64, a.out as u64, a.out2 as u64, a.out3 as u64);
    // SAFETY: the shim passes data pointers of live, contiguous, 16-byte
    // aligned bf16 tensors of this device with the extents the kernels index:
    // SwiGLU gu [rows, 2f], y or dy [rows, f], dgu [rows, 2f] (f a multiple
    // of 8); RoPE x, dy, out [rows, dim] and tables of at least
    // start + t rows of dim (dim a multiple of 16, checked by `rope`);
    // cross-entropy logits and gradient [rows, cols] bf16 (cols a multiple of
    // 8), targets [rows] int64, losses and lse [rows] fp32, the gradient of
    // the sum one fp32 (checked by `cross_entropy_sum` and the shim);
    // RMSNorm x, dx, its sum and residual gradient [rows, f] fp32 (or null),
    // y, dy, its addend and dx16 [rows, f] bf16 (or null), w [f] fp32, rstd
    // [rows] fp32, partials [blocks, f] fp32, f a multiple of 4 and at most
    // NORM_MAX_DIM (checked by `rms_norm_bf16` and the shim); FP8 x [rows,
    // cols] bf16 (ops 8, 9) or fp32 (10, 11; cols a multiple of 8), amax
    // fp32 [1], [rows] or [cols] (zeroed for ops 8 and 10), q [rows, cols]
    // and qt [cols, rows] bytes (rows a multiple of 16 for qt) or null, scales fp32 of amax's length or null
    // (checked by csrc/fp8_linear.cpp). The
    // launch is on the stream that every later use of them is ordered after.
    unsafe {
        match a.op {
            0 => stream
                .launch_builder(&k.swiglu_forward)
                .arg(&pa)
                .arg(&out)
                .arg(&a.rows)
                .arg(&a.f)
                .launch(cfg),
            1 => stream
                .launch_builder(&k.swiglu_backward)
                .arg(&pa)
                .arg(&pb)
                .arg(&out)
                .arg(&a.rows)
                .arg(&a.f)
                .launch(cfg),
            2 | 3 => {
                let backward = (a.op == 3) as i32;
                stream
                    .launch_builder(&k.rope)
                    .arg(&pa)
                    .arg(&pb)
                    .arg(&pc)
                    .arg(&out)
                    .arg(&a.rows)
                    .arg(&a.t)
                    .arg(&a.heads)
                    .arg(&a.f)
                    .arg(&a.start)
                    .arg(&backward)
                    .launch(cfg)
            }
            4 => stream
                .launch_builder(&k.ce_forward)
                .arg(&pa)
                .arg(&pb)
                .arg(&out)
                .arg(&out2)
                .arg(&a.rows)
                .arg(&a.cols)
                .arg(&a.ignore)
                .launch(cfg),
            5 => stream
                .launch_builder(&k.ce_backward)
                .arg(&pa)
                .arg(&pb)
                .arg(&pc)
                .arg(&pd)
                .arg(&out)
                .arg(&a.rows)
                .arg(&a.cols)
                .arg(&a.ignore)
                .launch(cfg),
            6 => stream
                .launch_builder(&k.norm_forward)
                .arg(&pa)
                .arg(&pb)
                .arg(&out)
                .arg(&out2)
                .arg(&a.rows)
                .arg(&a.f)
                .arg(&a.eps)
                .arg(&pe)
                .arg(&out3)
                .launch(cfg),
            7 => stream
                .launch_builder(&k.norm_backward)
                .arg(&pa)
                .arg(&pb)
                .arg(&pc)
                .arg(&pd)
                .arg(&out)
                .arg(&out2)
                .arg(&a.rows)
                .arg(&a.f)
                .arg(&pe)
                .arg(&out3)
                .launch(cfg),
            8 | 10 => stream
                .launch_builder(if a.op == 8 {
                    &k.fp8_amax
                } else {
                    &k.fp8_amax_f32
                })
                .arg(&pa)
                .arg(&out)
                .arg(&a.rows)
                .arg(&a.cols)
                .arg(&a.f)
                .launch(cfg),
            9 | 11 => stream
                .launch_builder(if a.op == 9 {
                    &k.fp8_cast
                } else {
                    &k.fp8_cast_f32
                })
                .arg(&pa)
                .arg(&pb)
                .arg(&out)
                .arg(&out2)
                .arg(&out3)
                .arg(&a.rows)
                .arg(&a.cols)
                .arg(&a.f)
                .arg(&a.t)
                .arg(&a.eps)
                .launch(cfg),
            _ => unreachable!("grid() refused the operation"),
        }
        .map(|_| ())
    }
}

/// The launcher the shim calls (from autograd's threads too): 0 on success;
/// a failure is printed, after which the shim stops using the kernels.
extern "C" fn launch(args: *const KernelArgs) -> i32 {
    // SAFETY: the shim passes a pointer to arguments alive for the call.
    let a = unsafe { &*args };
    match std::panic::catch_unwind(|| launch_on(a)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) if a.op == 13 => {
            // Not a kernel: the shim falls back for this GEMM alone.
            eprintln!("warning: the FP8 weight gradient's cuBLASLt GEMM failed (_scaled_mm and an add from now on): {e}");
            1
        }
        Ok(Err(e)) => {
            eprintln!("warning: a training kernel failed (tensor operations from now on): {e}");
            FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            1
        }
        Err(_) => 1,
    }
}

static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether training may use the kernels: unless `SIGMA_TRAIN_KERNELS=off`.
pub fn kernels_enabled() -> bool {
    sigma_data::env::switch(sigma_data::env::TRAIN_KERNELS, true)
}

pub(crate) fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if kernels_enabled() {
            // SAFETY: stores a function pointer that lives for the process.
            unsafe { sigma_kernel_ops_set_launcher(Some(launch)) }
        }
    });
}

/// Message of a failed shim call, read from its NUL-terminated buffer.
fn shim_error(err: &[c_char]) -> String {
    // SAFETY: the shims NUL-terminate their message within the buffer.
    unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// One call of a shim entry point that assigns its result into a fresh
/// handle: `call(out, err, err_len)` passes the handle (an at::Tensor*) and
/// a message buffer to the shim, which assigns into `out`, writes at most
/// `err_len` bytes, NUL-terminated, into `err`, catches every C++ exception
/// and returns non-zero on failure. The result, or the shim's message.
fn shim_call(call: impl FnOnce(*mut c_void, *mut c_char, usize) -> i32) -> Result<Tensor, String> {
    shim_call2(|out, _, err, n| call(out, err, n)).map(|(t, _)| t)
}

/// `shim_call` for an entry point that assigns two results.
fn shim_call2(
    call: impl FnOnce(*mut c_void, *mut c_void, *mut c_char, usize) -> i32,
) -> Result<(Tensor, Tensor), String> {
    let (a, b) = (Tensor::new(), Tensor::new());
    let mut err = [0 as c_char; 512];
    match call(
        a.as_ptr() as *mut c_void,
        b.as_ptr() as *mut c_void,
        err.as_mut_ptr(),
        err.len(),
    ) {
        0 => Ok((a, b)),
        _ => Err(shim_error(&err)),
    }
}

/// `silu(gu[.., :F]) * gu[.., F:]` for `gu` [.., 2F], differentiable (see the
/// module). Panics (as tch's own operations do; the trainer's guard reports
/// it with the phase) if libtorch fails, e.g. out of memory.
pub fn swiglu(gu: &Tensor) -> Tensor {
    register();
    // SAFETY: gu is a live tch tensor handle (at::Tensor*) for the call; the
    // rest as `shim_call` describes.
    shim_call(|out, err, n| unsafe { sigma_swiglu(gu.as_ptr() as *mut c_void, out, err, n) })
        .unwrap_or_else(|e| panic!("SwiGLU: {e}"))
}

/// After a failed shim call of a kernel's forward: None (the caller runs the
/// tensor form) when a kernel launch failed, which the launcher reported and
/// which turns the kernels off from then on; any other failure (libtorch's,
/// e.g. out of memory) panics as tch's own operations do, and the trainer's
/// guard reports it with the phase.
fn launch_failed<T>(what: &str, err: String) -> Option<T> {
    if FAILED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    panic!("{what}: {err}");
}

/// Whether the kernels may run on CUDA device `ordinal`: on, built, and no
/// launch has failed (the launcher registered with the shim).
fn available(ordinal: usize) -> bool {
    let ok = kernels_enabled()
        && !FAILED.load(std::sync::atomic::Ordering::Relaxed)
        && loaded(ordinal).is_ok();
    if ok {
        register();
    }
    ok
}

/// Sum over rows of the cross-entropy of `logits` [rows, v] against
/// `targets` [rows] (rows equal to `ignore` count nothing) by the kernels,
/// differentiable, with the loss in fp32; None where they do not apply (not
/// contiguous bf16 logits on a CUDA device with `v` a multiple of 8,
/// targets not int64 on that device, kernels off or unavailable): the
/// caller runs the tensor form. Backward writes the logits' gradient over
/// `logits` when the graph made them (neither a leaf nor a view of one: the
/// output of the head's matmul, read by nothing after the loss): nothing
/// may read such logits after this loss's backward.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor, ignore: i64) -> Option<Tensor> {
    let s = logits.size();
    let tch::Device::Cuda(ordinal) = logits.device() else {
        return None;
    };
    let applies = s.len() == 2
        && s[1] % 8 == 0
        && logits.kind() == Kind::BFloat16
        && logits.is_contiguous()
        && targets.kind() == Kind::Int64
        && targets.device() == logits.device()
        && targets.size() == [s[0]]
        && available(ordinal);
    if !applies {
        return None;
    }
    // SAFETY: as in `swiglu`; the extents are checked above.
    shim_call(|out, err, n| unsafe {
        sigma_cross_entropy_sum(
            logits.as_ptr() as *mut c_void,
            targets.as_ptr() as *mut c_void,
            ignore,
            out,
            err,
            n,
        )
    })
    .map_or_else(|e| launch_failed("cross-entropy", e), Some)
}

/// RMSNorm of `x` [.., d] with the weight `w` [d] and `eps`, written in bf16,
/// by the kernels, differentiable (gradients in fp32); None where they do
/// not apply (x and w not contiguous, 16-byte aligned fp32 on one CUDA
/// device, d not a multiple of 4 or over 8,192, kernels off or
/// unavailable): the caller runs the tensor form.
pub fn rms_norm_bf16(x: &Tensor, w: &Tensor, eps: f64) -> Option<Tensor> {
    if !norm_applies(x, w) {
        return None;
    }
    // SAFETY: as in `swiglu`; the extents are checked by `norm_applies`.
    shim_call(|out, err, n| unsafe {
        sigma_rms_norm_bf16(
            x.as_ptr() as *mut c_void,
            w.as_ptr() as *mut c_void,
            eps,
            out,
            err,
            n,
        )
    })
    .map_or_else(|e| launch_failed("RMSNorm", e), Some)
}

/// `(x + y, rms_norm_bf16(x + y, w, eps))` for the fp32 residual stream `x`
/// and a bf16 branch output `y` of its shape, by the kernels in one pass
/// each way (backward adds the residual's gradient to the norm's and writes
/// the bf16 gradient of `y` in the same kernel), differentiable; None where
/// `rms_norm_bf16` would not apply or `y` is not a contiguous, 16-byte
/// aligned bf16 tensor of `x`'s shape on its device.
pub fn add_rms_norm_bf16(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Option<(Tensor, Tensor)> {
    let y_fits = y.kind() == Kind::BFloat16
        && y.device() == x.device()
        && y.size() == x.size()
        && y.is_contiguous()
        && (y.data_ptr() as usize).is_multiple_of(16);
    if !y_fits || !norm_applies(x, w) {
        return None;
    }
    // SAFETY: as in `swiglu`; the extents are checked above. The shim
    // assigns into the two fresh handles.
    shim_call2(|sum, norm, err, n| unsafe {
        sigma_add_rms_norm_bf16(
            x.as_ptr() as *mut c_void,
            y.as_ptr() as *mut c_void,
            w.as_ptr() as *mut c_void,
            eps,
            sum,
            norm,
            err,
            n,
        )
    })
    .map_or_else(|e| launch_failed("add + RMSNorm", e), Some)
}

/// Whether the RMSNorm kernels take `x` [.., d] with the weight `w` [d]:
/// contiguous, 16-byte aligned fp32 on one CUDA device, d a multiple of 4
/// and at most `NORM_MAX_DIM`, the kernels on and available.
fn norm_applies(x: &Tensor, w: &Tensor) -> bool {
    let tch::Device::Cuda(ordinal) = x.device() else {
        return false;
    };
    let s = x.size();
    let d = w.size().first().copied().unwrap_or(0);
    let fits = |t: &Tensor| {
        t.kind() == Kind::Float
            && t.device() == x.device()
            && t.is_contiguous()
            && (t.data_ptr() as usize).is_multiple_of(16)
    };
    w.dim() == 1
        && s.last() == Some(&d)
        && d > 0
        && d % 4 == 0
        && d <= NORM_MAX_DIM
        && x.numel() / (d as usize) <= i32::MAX as usize
        && fits(x)
        && fits(w)
        && available(ordinal)
}

/// Whether [`rope`] runs its kernel on CUDA device `ordinal` for a head
/// dimension `dim` (given the other conditions it checks): decoding lets
/// the decode kernel rotate a query in this kernel's arithmetic only where
/// the model would have rotated it by this kernel.
pub fn rope_kernel_runs(ordinal: usize, dim: i64) -> bool {
    dim % 16 == 0 && available(ordinal)
}

/// RoPE of `x` [b, t, heads, dim] at positions `start..start + t` with the
/// tables `cs` = [cos, cos] and `sn` = [-sin, sin] ([positions, dim], see
/// `Model::rope_at`) by the kernels, differentiable; None where they do not
/// apply (not a contiguous bf16 CUDA tensor, `dim` not a multiple of 16,
/// tables too short or of another dtype or device, kernels off or
/// unavailable): the caller runs the tensor form.
pub fn rope(x: &Tensor, cs: &Tensor, sn: &Tensor, start: i64) -> Option<Tensor> {
    let s = x.size();
    let tch::Device::Cuda(ordinal) = x.device() else {
        return None;
    };
    let tables_fit = |t: &Tensor| {
        t.kind() == Kind::BFloat16
            && t.device() == x.device()
            && t.is_contiguous()
            && t.size() == [t.size()[0], s[3]]
            && t.size()[0] >= start + s[1]
    };
    let applies = s.len() == 4
        && x.kind() == Kind::BFloat16
        && x.is_contiguous()
        && s[3] % 16 == 0
        && start >= 0
        && start + s[1] <= i32::MAX as i64
        && tables_fit(cs)
        && tables_fit(sn)
        && available(ordinal);
    if !applies {
        return None;
    }
    // SAFETY: as in `swiglu`; the tensors' extents are checked above.
    shim_call(|out, err, n| unsafe {
        sigma_rope(
            x.as_ptr() as *mut c_void,
            cs.as_ptr() as *mut c_void,
            sn.as_ptr() as *mut c_void,
            start,
            out,
            err,
            n,
        )
    })
    .map_or_else(|e| launch_failed("RoPE", e), Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The tensor form (CPU) equals silu(gate) * up and its autograd
    /// gradients exactly: same operations on the same values.
    #[test]
    fn the_tensor_form_equals_silu_times_up_and_its_gradients() {
        for kind in [Kind::Double, Kind::BFloat16] {
            let gu = (Tensor::randn([3, 5, 16], (Kind::Double, Device::Cpu)) * 3.0)
                .to_kind(kind)
                .set_requires_grad(true);
            let dy = Tensor::randn([3, 5, 8], (Kind::Double, Device::Cpu)).to_kind(kind);
            let y = swiglu(&gu);
            let g = gu.narrow(-1, 0, 8).detach().set_requires_grad(true);
            let u = gu.narrow(-1, 8, 8).detach().set_requires_grad(true);
            let y_ref = g.silu() * &u;
            assert!(y.equal(&y_ref), "{kind:?}: forward differs");
            let d = Tensor::run_backward(&[(&y * &dy).sum(kind)], &[&gu], false, false);
            let r = Tensor::run_backward(&[(&y_ref * &dy).sum(kind)], &[&g, &u], false, false);
            assert!(
                d[0].narrow(-1, 0, 8).equal(&r[0]),
                "{kind:?}: gate gradient differs"
            );
            assert!(
                d[0].narrow(-1, 8, 8).equal(&r[1]),
                "{kind:?}: up gradient differs"
            );
        }
        let odd = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let msg = std::panic::catch_unwind(|| swiglu(&odd)).expect_err("odd width refused");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("gate and up halves"), "{msg}");
    }

    /// The kernels compile (NVRTC runs without a GPU where libtorch is a CUDA build).
    #[test]
    fn the_training_kernels_compile() {
        if !decode::cuda_build() {
            decode::skip_unless_ci("libtorch is not a CUDA build (no NVRTC beside it)");
            return;
        }
        // Hopper, and Ampere (where the FP8 kernels' conversion is left out:
        // FP8 refuses GPUs before compute capability 8.9).
        for arch in [90, 80] {
            let ptx = decode::compile(SOURCE, &[], arch).expect("compiles");
            for k in [
                "swiglu_forward",
                "swiglu_backward",
                "rope",
                "cross_entropy_forward",
                "cross_entropy_backward",
                "rms_norm_forward",
                "rms_norm_backward",
                "fp8_amax",
                "fp8_cast",
                "fp8_amax_f32",
                "fp8_cast_f32",
            ] {
                assert!(
                    ptx.contains(&format!(".entry {k}")),
                    "{k} missing from the PTX"
                );
            }
            let converts = ptx.contains("cvt.rn.satfinite.e4m3x2.f32")
                && ptx.contains("cvt.rn.satfinite.e5m2x2.f32");
            assert_eq!(converts, arch >= 89, "sm_{arch}");
        }
    }
}
