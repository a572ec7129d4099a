//! Matrix-vector products of decoding (csrc/gemv.cu, compiled with NVRTC
//! on first use per device and launched on libtorch's current stream): a
//! few rows of activations (at most [`MAX_ROWS`], e.g. one token of each of
//! a few sequences) times bf16 weights, where a step reads every weight
//! once and the time is the memory's. cuBLAS's kernels for such products
//! reach about half of an H100's bandwidth at SIGMA-1.5B's shapes
//! (docs/inference.md); these stream each weight with enough loads in
//! flight to keep the memory busy, and save launches:
//!
//! - [`gemv`]: up to three weights that read the same input in one launch
//!   (a block's q, k and v projections);
//! - [`gemv_swiglu`]: the merged gate/up weight with SwiGLU applied to the
//!   fp32 sums, the [rows, 2F] product never written.
//!
//! Only without autograd (generation, evaluation): the products have no
//! backward. `None` wherever they cannot run (CPU, not bf16, more rows, a
//! layout they do not take, `SIGMA_GEMV_KERNEL=off`, a build or launch
//! failure, reported once); the caller then runs libtorch's matmul.
#![allow(unsafe_code)] // kernel launches over raw device pointers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

use crate::kernels::decode;

/// The kernels' source (compiled after csrc/bf16.cuh).
pub const SOURCE: &str = include_str!("../../csrc/gemv.cu");
/// Warps per block (the source's GEMV_WARPS).
const WARPS: u32 = 8;
/// The most activation rows a launch takes.
pub const MAX_ROWS: i64 = 8;
/// The most rows the model's products hand to the kernels ([`gemv`],
/// [`gemv_swiglu`]); more go to cuBLAS: a first version of the kernels
/// made a whole decoding step at 4 rows slower than cuBLAS did, and 3 to
/// 8 rows were not measured in a whole step since (docs/inference.md).
pub const AUTO_ROWS: i64 = 2;
/// The row counts the kernels are built for (a launch takes the smallest
/// that holds its rows).
const ROW_BUCKETS: [i64; 4] = [1, 2, 4, 8];

/// How a kernel cuts the work: `unroll` 16-byte pieces of weight in flight
/// per lane, `warps_per_column` warps sharing each output column (their
/// sums added through shared memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub unroll: u32,
    pub warps_per_column: u32,
}

/// The variants a launch may ask for (each compiled on first use).
pub const VARIANTS: [Variant; 7] = [
    Variant::new(4, 1),
    Variant::new(8, 1),
    Variant::new(16, 1),
    Variant::new(4, 2),
    Variant::new(8, 2),
    Variant::new(4, 4),
    Variant::new(8, 4),
];

impl Variant {
    pub const fn new(unroll: u32, warps_per_column: u32) -> Variant {
        Variant {
            unroll,
            warps_per_column,
        }
    }

    /// The variant [`gemv`] (`gated` false) and [`gemv_swiglu`] use:
    /// measured fastest at SIGMA-1.5B's shapes on an H100
    /// (docs/inference.md): two warps per column for the plain products,
    /// four for the gated one.
    pub fn pick(gated: bool) -> Variant {
        if gated {
            Variant::new(4, 4)
        } else {
            Variant::new(4, 2)
        }
    }
}

/// 0: not yet read from the environment, 1: on, 2: off.
static SWITCH: AtomicU8 = AtomicU8::new(0);

/// Launches made so far by this process.
static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The kernels' launches made so far by this process (a CUDA graph's
/// replays launch nothing from the host: a recorded launch counts once).
/// `sigma generate --timing` reports it, so a check can tell that they ran.
pub fn launches() -> u64 {
    LAUNCHES.load(Relaxed)
}

/// Whether the kernels may run: on unless `SIGMA_GEMV_KERNEL=off` (or
/// [`set_gemv_kernel`]`(false)`, or a launch failed).
pub fn gemv_kernel_enabled() -> bool {
    match SWITCH.load(Relaxed) {
        0 => {
            let on = sigma_data::env::switch(sigma_data::env::GEMV_KERNEL, true);
            SWITCH.store(if on { 1 } else { 2 }, Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Turn the kernels on or off for this process (benchmarks compare both).
pub fn set_gemv_kernel(on: bool) {
    SWITCH.store(if on { 1 } else { 2 }, Relaxed);
}

/// The plain and the gated kernel of one row bucket and variant.
struct Loaded {
    ctx: Arc<CudaContext>,
    plain: CudaFunction,
    gated: CudaFunction,
}

fn load(ordinal: usize, rows: i64, v: Variant) -> Result<Arc<Loaded>, String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let (ctx, arch, _) = decode::device(ordinal)?;
    let ptx = decode::compile(SOURCE, &defines(rows, v), arch)?;
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .map_err(drv)?;
    Ok(Arc::new(Loaded {
        plain: module
            .load_function(&kernel_name(false, rows, v))
            .map_err(drv)?,
        gated: module
            .load_function(&kernel_name(true, rows, v))
            .map_err(drv)?,
        ctx,
    }))
}

/// The source's macros for row bucket `rows` and variant `v`.
fn defines(rows: i64, v: Variant) -> [(&'static str, i64); 3] {
    [
        ("GEMV_R", rows),
        ("GEMV_U", v.unroll as i64),
        ("GEMV_WPC", v.warps_per_column as i64),
    ]
}

/// The source's name of a kernel.
fn kernel_name(gated: bool, rows: i64, v: Variant) -> String {
    let g = if gated { "_gated" } else { "" };
    format!("gemv{g}_r{rows}_u{}_w{}", v.unroll, v.warps_per_column)
}

/// The kernels of row bucket `rows` and variant `v` on CUDA device
/// `ordinal`, built on first use; a failure is printed once and remembered.
fn loaded(ordinal: usize, rows: i64, v: Variant) -> Result<Arc<Loaded>, String> {
    type Cache = Mutex<HashMap<(usize, i64, Variant), Result<Arc<Loaded>, String>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut c = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    c.entry((ordinal, rows, v))
        .or_insert_with(|| {
            let r = load(ordinal, rows, v);
            if let Err(e) = &r {
                eprintln!("warning: the decoding matrix-vector kernels ({rows} rows, {v:?}) are not used on cuda:{ordinal} (libtorch's matmul instead): {e}");
            }
            r
        })
        .clone()
}

/// Why `x` [.., k] times weights `ws` (each [n, k]) cannot run here, with
/// `gated` for one merged gate/up weight (None: it can). Reads no device
/// value; nothing is compiled.
pub fn refusal(x: &Tensor, ws: &[&Tensor], gated: bool) -> Option<String> {
    let dev = x.device();
    if !dev.is_cuda() || ws.iter().any(|w| w.device() != dev) {
        return Some("not on one CUDA device".into());
    }
    shape_refusal(x, ws, gated)
}

/// [`refusal`]'s rules after the device's: dtype, counts, widths, layout.
fn shape_refusal(x: &Tensor, ws: &[&Tensor], gated: bool) -> Option<String> {
    if x.kind() != Kind::BFloat16 || ws.iter().any(|w| w.kind() != Kind::BFloat16) {
        return Some("not bf16".into());
    }
    if ws.is_empty() || ws.len() > 3 || (gated && ws.len() != 1) {
        return Some(format!("{} weights (one to three, one gated)", ws.len()));
    }
    let Some(&k) = x.size().last() else {
        return Some("a scalar input (no width)".into());
    };
    if k == 0 || k % 8 != 0 || k > i32::MAX as i64 {
        return Some(format!("an input width of {k} (a positive multiple of 8)"));
    }
    let rows = x.numel() as i64 / k;
    if rows < 1 || rows > MAX_ROWS {
        return Some(format!("{rows} rows (1 to {MAX_ROWS})"));
    }
    let aligned = |t: &Tensor| (t.data_ptr() as usize).is_multiple_of(16);
    let mut cols = 0i64;
    for w in ws {
        if w.dim() != 2 || w.size()[1] != k || !w.is_contiguous() || !aligned(w) {
            return Some(format!(
                "a weight {:?} that is not a contiguous, 16-byte aligned [n, {k}] matrix",
                w.size()
            ));
        }
        cols += w.size()[0];
    }
    if gated && cols % 2 != 0 {
        return Some(format!(
            "a gated weight of {cols} rows (gate and up halves)"
        ));
    }
    // The kernels index columns in int, a block's worth past the last.
    if cols == 0 || cols > (i32::MAX - WARPS as i32) as i64 {
        return Some(format!("{cols} output columns"));
    }
    None
}

/// Whether these products skip the kernels: autograd is on (they have no
/// backward), they are off, or [`refusal`] says no.
fn skip(x: &Tensor, ws: &[&Tensor], gated: bool) -> bool {
    crate::kernels::fused::grad_enabled()
        || !gemv_kernel_enabled()
        || refusal(x, ws, gated).is_some()
}

/// The rows of `x` [.., k] (0 for an empty width).
fn rows_of(x: &Tensor) -> i64 {
    let k = x.size().last().copied().unwrap_or(0);
    if k == 0 {
        0
    } else {
        x.numel() as i64 / k
    }
}

/// Whether the model should offer `x`'s products to [`gemv`] and
/// [`gemv_swiglu`] at all: a bf16 CUDA input of at most [`AUTO_ROWS`] rows,
/// autograd off, the kernels on. Cheap: callers ask before gathering weights.
pub fn wants(x: &Tensor) -> bool {
    x.device().is_cuda()
        && x.kind() == Kind::BFloat16
        && rows_of(x) <= AUTO_ROWS
        && gemv_kernel_enabled()
        && !crate::kernels::fused::grad_enabled()
}

/// `x` [.., k] times each of `ws` ([n_j, k], at most three): [.., n_j]
/// each, in one launch. None where the kernels cannot run or [`wants`]
/// declines `x`.
pub fn gemv(x: &Tensor, ws: &[&Tensor]) -> Option<Vec<Tensor>> {
    if !wants(x) {
        return None;
    }
    gemv_by(x, ws, false, Variant::pick(false))
}

/// SwiGLU of `x` [.., k] times the merged gate/up weight `w` [2F, k]:
/// `silu(x gate^T) * (x up^T)` [.., F] in one launch. None where the
/// kernels cannot run or [`wants`] declines `x`.
pub fn gemv_swiglu(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    if !wants(x) {
        return None;
    }
    gemv_by(x, &[w], true, Variant::pick(true)).and_then(|mut y| y.pop())
}

/// [`gemv`] (or, `gated`, [`gemv_swiglu`]'s one product) by variant `v`,
/// up to [`MAX_ROWS`] rows (benchmarks compare them).
pub fn gemv_by(x: &Tensor, ws: &[&Tensor], gated: bool, v: Variant) -> Option<Vec<Tensor>> {
    if skip(x, ws, gated) || !VARIANTS.contains(&v) {
        return None;
    }
    let outs: Vec<Tensor> = if gated {
        vec![out_like(x, ws[0].size()[0] / 2)]
    } else {
        ws.iter().map(|w| out_like(x, w.size()[0])).collect()
    };
    launch(x, ws, &outs, gated, v).then_some(outs)
}

/// An empty bf16 output [.., n] for input `x` [.., k].
fn out_like(x: &Tensor, n: i64) -> Tensor {
    let mut size = x.size();
    *size.last_mut().expect("refusal checked the rank") = n;
    Tensor::empty(size, (Kind::BFloat16, x.device()))
}

/// The launch; false (with a warning, once, and the kernels turned off)
/// when it could not be made.
fn launch(x: &Tensor, ws: &[&Tensor], outs: &[Tensor], gated: bool, v: Variant) -> bool {
    let Device::Cuda(ordinal) = x.device() else {
        return false;
    };
    // The kernels read x in 16-byte pieces: a contiguous view that starts
    // off a 16-byte boundary (a slice of a larger tensor) is copied too.
    let x = if !x.is_contiguous() {
        x.contiguous() // a fresh allocation: aligned
    } else if (x.data_ptr() as usize).is_multiple_of(16) {
        x.shallow_clone()
    } else {
        let mut fresh = Tensor::empty(x.size(), (x.kind(), x.device()));
        fresh.copy_(x);
        fresh
    };
    match launch_on(ordinal, &x, ws, outs, (gated, v)) {
        Ok(()) => {
            LAUNCHES.fetch_add(1, Relaxed);
            true
        }
        Err(e) => {
            if SWITCH.swap(2, Relaxed) != 2 {
                eprintln!("warning: the decoding matrix-vector kernels failed on cuda:{ordinal} and are off from now on (libtorch's matmul instead): {e}");
            }
            false
        }
    }
}

fn launch_on(
    ordinal: usize,
    x: &Tensor,
    ws: &[&Tensor],
    outs: &[Tensor],
    (gated, v): (bool, Variant),
) -> Result<(), String> {
    let _restore = decode::RestoreContext::save();
    let k = *x.size().last().expect("refusal checked the rank");
    let rows = x.numel() as i64 / k;
    let bucket = *ROW_BUCKETS
        .iter()
        .find(|&&r| r >= rows)
        .expect("refusal checked the rows");
    let kern = loaded(ordinal, bucket, v)?;
    let stream = decode::current_stream(&kern.ctx, ordinal)
        .ok_or_else(|| format!("no current CUDA stream for cuda:{ordinal}"))?;
    let func = if gated { &kern.gated } else { &kern.plain };
    // Columns of the launch: the outputs' (a gated weight's half).
    let ns: Vec<i32> = outs.iter().map(|o| o.size()[o.dim() - 1] as i32).collect();
    let cols: i64 = ns.iter().map(|&n| n as i64).sum();
    let per_block = (WARPS / v.warps_per_column) as i64;
    let cfg = LaunchConfig {
        grid_dim: (((cols + per_block - 1) / per_block) as u32, 1, 1),
        block_dim: (WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let dims = (rows as i32, k as i32, gated);
    launch_args(&stream, func, cfg, (x, ws, outs, &ns), dims)
        .map_err(|e| format!("launch on cuda:{ordinal}: {e}"))
}

/// The launch itself: a gated kernel's arguments (x, w, y, n, rows, k) or
/// a plain one's (x, then weight, output and width of three slots, unused
/// ones empty, then rows, k).
fn launch_args(
    stream: &Arc<cudarc::driver::CudaStream>,
    func: &CudaFunction,
    cfg: LaunchConfig,
    (x, ws, outs, ns): (&Tensor, &[&Tensor], &[Tensor], &[i32]),
    (rows, k, gated): (i32, i32, bool),
) -> Result<(), cudarc::driver::DriverError> {
    let ptr = |t: &Tensor| t.data_ptr() as u64;
    let xp = ptr(x);
    let slot = |j: usize| {
        (
            ws.get(j).map_or(0, |w| ptr(w)),
            outs.get(j).map_or(0, ptr),
            ns.get(j).copied().unwrap_or(0),
        )
    };
    let slots = [slot(0), slot(1), slot(2)];
    let mut b = stream.launch_builder(func);
    b.arg(&xp);
    let used = if gated { 1 } else { 3 };
    for s in &slots[..used] {
        b.arg(&s.0).arg(&s.1).arg(&s.2);
    }
    b.arg(&rows).arg(&k);
    // SAFETY: x, the weights and the outputs are live, contiguous, 16-byte
    // aligned bf16 tensors of this device (refusal, `launch`'s copy of an
    // unaligned or strided x, and `out_like`'s fresh tensors) with the extents the kernels index: x
    // [rows, k], weight j [n_j, k] (gated: [2n, k]), output j [rows, n_j];
    // they outlive the launch, which runs on the stream that any later use
    // of them is ordered after. Unused weight slots have zero columns and
    // are never read.
    unsafe { b.launch(cfg) }.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source compiles (NVRTC runs without a GPU where libtorch is a
    /// CUDA build) with every row bucket, plain and gated, and streams the
    /// weights past L1.
    #[test]
    fn the_gemv_kernels_compile() {
        if !decode::cuda_build() {
            decode::skip_unless_ci("libtorch is not a CUDA build (no NVRTC beside it)");
            return;
        }
        // Every variant at one row; at every row bucket the variants the
        // model picks, and one more.
        let picked = [
            Variant::pick(false),
            Variant::pick(true),
            Variant::new(8, 1),
        ];
        let cases = VARIANTS.iter().map(|&v| (1, v)).chain(
            ROW_BUCKETS[1..]
                .iter()
                .flat_map(|&r| picked.iter().map(move |&v| (r, v))),
        );
        for (r, v) in cases {
            for arch in [90, 80] {
                let ptx = decode::compile(SOURCE, &defines(r, v), arch)
                    .unwrap_or_else(|e| panic!("{r} rows, {v:?}, sm_{arch}: {e}"));
                for g in [false, true] {
                    let k = kernel_name(g, r, v);
                    assert!(ptx.contains(&format!(".entry {k}(")), "{k} missing");
                }
                assert!(ptx.contains("L1::no_allocate"), "weights not streamed");
                let shared = ptx.contains(".shared");
                assert_eq!(
                    shared,
                    v.warps_per_column > 1,
                    "{v:?}: shared memory only to add warps' sums"
                );
            }
        }
    }

    /// What the kernels refuse, said in words (the rules after the
    /// device's on CPU tensors, through `shape_refusal`).
    #[test]
    fn the_kernels_refuse_what_they_cannot_take() {
        let bf = |s: &[i64]| Tensor::zeros(s, (Kind::BFloat16, Device::Cpu));
        let (x, w) = (bf(&[1, 1, 64]), bf(&[32, 64]));
        assert_eq!(
            refusal(&x, &[&w], false).as_deref(),
            Some("not on one CUDA device")
        );
        // The rules after the device's, on CPU tensors.
        let r = |x: &Tensor, ws: &[&Tensor], g: bool| shape_refusal(x, ws, g);
        assert_eq!(r(&x, &[&w], false), None);
        assert_eq!(r(&bf(&[8, 64]), &[&w, &w, &w], false), None);
        assert_eq!(r(&bf(&[2, 1, 64]), &[&w], true), None);
        let f = Tensor::zeros([1, 64], (Kind::Float, Device::Cpu));
        assert_eq!(r(&f, &[&w], false).as_deref(), Some("not bf16"));
        assert!(r(&bf(&[9, 64]), &[&w], false).unwrap().contains("9 rows"));
        assert!(r(&bf(&[1, 60]), &[&bf(&[32, 60])], false)
            .unwrap()
            .contains("multiple of 8"));
        assert!(r(&x, &[&w, &w, &w, &w], false)
            .unwrap()
            .contains("4 weights"));
        assert!(r(&x, &[&w, &w], true).unwrap().contains("2 weights"));
        assert!(r(&x, &[&bf(&[32, 128])], false)
            .unwrap()
            .contains("[32, 128]"));
        let strided = bf(&[64, 32]).transpose(0, 1);
        assert!(r(&x, &[&strided], false).unwrap().contains("contiguous"));
        assert!(r(&x, &[&bf(&[31, 64])], true)
            .unwrap()
            .contains("gate and up"));
        let scalar = Tensor::zeros([], (Kind::BFloat16, Device::Cpu));
        assert!(r(&scalar, &[&w], false).unwrap().contains("scalar"));
    }
}
