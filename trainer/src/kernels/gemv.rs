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
//!   fp32 sums, the [rows, 2F] product never written;
//! - [`gemv_normed`]: either of those on the RMSNorm (after a residual add)
//!   that makes their input, run by the kernel itself ([`Norm`]): a
//!   decoding step launches no norm kernel of its own.
//!
//! On sm_90 and later they are launched with programmatic dependent launch
//! (csrc/gemv.cu, `decode::launch_ex`): each may start, and load its first
//! weights, while the kernel before it drains (`SIGMA_DECODE_PDL=off`:
//! plain launches). So the weights must not be written by the last kernel
//! on the stream before the launch (its input may: it is read after the
//! wait); the decoding walk refreshes the working weights before its first
//! kernel.
//!
//! Only without autograd (generation, evaluation): the products have no
//! backward. `None` wherever they cannot run (CPU, not bf16, more rows, a
//! layout they do not take, `SIGMA_GEMV_KERNEL=off`, a build or launch
//! failure, reported once); the caller then runs libtorch's matmul.
#![allow(unsafe_code)] // kernel launches over raw device pointers.

use crate::kernels::built::Built;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use sigma_data::env::ProcessSwitch;
use tch::{Device, Kind, Tensor};

use crate::kernels::decode;

/// The kernels' source (compiled after csrc/bf16.cuh).
pub const SOURCE: &str = concat!(
    include_str!("../../csrc/rms_norm.cuh"),
    include_str!("../../csrc/gemv.cu")
);
/// The most shared memory the normed kernels use for their normalised input
/// (rows x k bf16): what a launch gets without opting in to more (48 KiB,
/// static and dynamic together), less room for the static arrays.
const NORM_SHARED_BYTES: i64 = 40 * 1024;
/// Blocks per multiprocessor of a normed launch at most (each normalises
/// the input once, then takes groups of columns in turn); fewer where the
/// kernel's registers or the launch's shared memory let fewer run at once
/// ([`Loaded::norm_blocks_per_sm`]), so that every block starts at once: a
/// second wave of blocks would each normalise and take their groups only
/// after a first block ended (variant (4, 4)'s gated normed kernel, 80
/// registers a thread, fits 3 blocks of 256 threads on an H100's
/// multiprocessor, not 4).
const NORM_BLOCKS_PER_SM: i64 = 4;
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
pub const VARIANTS: [Variant; 9] = [
    Variant::new(2, 2),
    Variant::new(2, 4),
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

    /// The variant [`gemv`] (`gated` false), [`gemv_swiglu`] and
    /// [`gemv_normed`] use for an input of width `k`: two warps per column
    /// for the plain products, four for the gated ones (measured fastest at
    /// SIGMA-1.5B's shapes on an H100, docs/inference.md); each lane loads
    /// 4 pieces of its row at a time, or 2 where its share of a row is at
    /// most 2 pieces (a gated product at k = 2048): registers for pieces
    /// past the row's end would hold nothing, and fewer registers let more
    /// blocks run at once (the gated normed kernel takes 64 registers a
    /// thread instead of 80, so 4 blocks of 256 threads a multiprocessor
    /// instead of 3).
    pub fn pick(gated: bool, k: i64) -> Variant {
        let warps_per_column = if gated { 4 } else { 2 };
        let lanes = 32 * warps_per_column;
        let per_lane = (k / 8 + lanes - 1) / lanes;
        let unroll = if per_lane <= 2 { 2 } else { 4 };
        Variant::new(unroll, warps_per_column as u32)
    }
}

/// `SIGMA_GEMV_KERNEL` (off after a failed launch too).
static SWITCH: ProcessSwitch = ProcessSwitch::new(sigma_data::env::GEMV_KERNEL);

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
    SWITCH.get()
}

/// Turn the kernels on or off for this process (benchmarks compare both).
pub fn set_gemv_kernel(on: bool) {
    SWITCH.set(on);
}

/// `SIGMA_GEMV_NORM` ([`gemv_normed`]).
static NORM_SWITCH: ProcessSwitch = ProcessSwitch::new(sigma_data::env::GEMV_NORM);

/// Whether [`gemv_normed`] runs the norm in the kernels: on unless
/// `SIGMA_GEMV_NORM=off`.
pub fn norm_enabled() -> bool {
    NORM_SWITCH.get()
}

/// The four kernels of one row bucket and variant ([`Kind4::index`]), and
/// whether the device takes programmatic dependent launch.
struct Loaded {
    ctx: Arc<CudaContext>,
    funcs: Vec<CudaFunction>,
    pdl: bool,
    /// The device's multiprocessors.
    sms: i64,
    /// The blocks a normed launch runs per multiprocessor, by kernel
    /// ([`Kind4::index`]) and dynamic shared memory, asked of the driver
    /// once each ([`Loaded::norm_blocks_per_sm`]).
    norm_fit: std::sync::Mutex<std::collections::HashMap<(usize, u32), i64>>,
}

impl Loaded {
    /// The blocks per multiprocessor of a normed launch of kernel `kind`
    /// with `shared` bytes of dynamic shared memory: as many as fit at once
    /// by the driver's occupancy of the kernel, at most
    /// [`NORM_BLOCKS_PER_SM`] ([`norm_blocks`]). The context must be
    /// current.
    fn norm_blocks_per_sm(&self, kind: usize, shared: u32) -> Result<i64, String> {
        let mut fit = self.norm_fit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&b) = fit.get(&(kind, shared)) {
            return Ok(b);
        }
        let n = self.funcs[kind]
            .occupancy_max_active_blocks_per_multiprocessor(WARPS * 32, shared as usize, None)
            .map_err(|e| format!("CUDA driver: {e}"))?;
        let b = norm_blocks(n as i64)?;
        fit.insert((kind, shared), b);
        Ok(b)
    }
}

/// Which of a variant's kernels: plain or gated, reading x or normalising it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kind4 {
    gated: bool,
    norm: bool,
}

impl Kind4 {
    const ALL: [Kind4; 4] = [
        Kind4::new(false, false),
        Kind4::new(true, false),
        Kind4::new(false, true),
        Kind4::new(true, true),
    ];

    const fn new(gated: bool, norm: bool) -> Kind4 {
        Kind4 { gated, norm }
    }

    fn index(self) -> usize {
        self.gated as usize + 2 * self.norm as usize
    }
}

fn load(ordinal: usize, rows: i64, v: Variant) -> Result<Arc<Loaded>, String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let (ctx, arch, sms) = decode::device(ordinal)?;
    let module = decode::load_module(&ctx, SOURCE, &defines(rows, v), arch)?;
    let funcs = Kind4::ALL
        .iter()
        .map(|&f| module.load_function(&kernel_name(f, rows, v)).map_err(drv))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Arc::new(Loaded {
        funcs,
        ctx,
        pdl: arch >= 90,
        sms,
        norm_fit: Default::default(),
    }))
}

/// A normed launch's blocks per multiprocessor where `fit` of them can run
/// at once: at most [`NORM_BLOCKS_PER_SM`]; an error where none fits.
fn norm_blocks(fit: i64) -> Result<i64, String> {
    if fit < 1 {
        return Err("a normed kernel's block does not fit a multiprocessor".into());
    }
    Ok(fit.min(NORM_BLOCKS_PER_SM))
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
fn kernel_name(f: Kind4, rows: i64, v: Variant) -> String {
    let g = if f.gated { "_gated" } else { "" };
    let n = if f.norm { "_norm" } else { "" };
    format!("gemv{g}{n}_r{rows}_u{}_w{}", v.unroll, v.warps_per_column)
}

/// Every matrix-vector module built by this process (failures included).
static BUILT: Built<(usize, i64, Variant), Loaded> = Built::new(|&(ordinal, rows, v), e| {
    eprintln!("warning: the decoding matrix-vector kernels ({rows} rows, {v:?}) are not used on cuda:{ordinal} (libtorch's matmul instead): {e}")
});

/// The kernels of row bucket `rows` and variant `v` on CUDA device
/// `ordinal`, built on first use (or waited for where another thread is
/// building them); a failure is printed once and remembered.
fn loaded(ordinal: usize, rows: i64, v: Variant) -> Result<Arc<Loaded>, String> {
    BUILT.get(&(ordinal, rows, v), || load(ordinal, rows, v))
}

/// Build, in parallel, the modules that products of `rows` rows on device
/// `ordinal` will use, plain ones on inputs of the widths `plain` and gated
/// ones on `gated` ([`prebuilt`]), where the kernels are on and take that
/// many rows; nothing otherwise. A failure is reported as at first use.
pub fn prebuild(ordinal: usize, rows: i64, (plain, gated): (&[i64], &[i64])) {
    if !gemv_kernel_enabled() || !(1..=AUTO_ROWS).contains(&rows) {
        return;
    }
    let keys: Vec<_> = prebuilt(rows, (plain, gated))
        .into_iter()
        .map(|(r, v)| (ordinal, r, v))
        .collect();
    BUILT.build_all(&keys, |&(o, r, v)| load(o, r, v));
}

/// The modules (row bucket, variant) that products of `rows` rows may
/// use, plain ones on inputs of the widths `plain` and gated ones on
/// `gated`: [`Variant::pick`]'s variant of each (a module holds a variant's
/// plain, gated and normed kernels), each once.
fn prebuilt(rows: i64, (plain, gated): (&[i64], &[i64])) -> Vec<(i64, Variant)> {
    let bucket = bucket_of(rows);
    let picks = (plain.iter().map(|&k| Variant::pick(false, k)))
        .chain(gated.iter().map(|&k| Variant::pick(true, k)));
    let mut keys: Vec<(i64, Variant)> = Vec::new();
    for v in picks {
        if !keys.contains(&(bucket, v)) {
            keys.push((bucket, v));
        }
    }
    keys
}

/// The row bucket a launch of `rows` rows takes: the smallest that holds
/// them (`rows` within [`ROW_BUCKETS`]' largest).
fn bucket_of(rows: i64) -> i64 {
    *ROW_BUCKETS
        .iter()
        .find(|&&r| r >= rows)
        .expect("refusal checked the rows")
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
    extent_refusal(x, ws, gated)
}

/// The rules on counts, widths and the weights' layout, for an input `x`
/// [.., k] of any dtype.
fn extent_refusal(x: &Tensor, ws: &[&Tensor], gated: bool) -> Option<String> {
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
    if !(1..=MAX_ROWS).contains(&rows) {
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
    let k = width(x);
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
    x.kind() == Kind::BFloat16 && offered(x)
}

/// Whether the model should offer the products on the RMSNorm of the fp32
/// stream `x` to [`gemv_normed`]: as [`wants`] for an fp32 `x`, and the
/// normed kernels on (`SIGMA_GEMV_NORM`).
pub fn wants_normed(x: &Tensor) -> bool {
    x.kind() == Kind::Float
        && offered(x)
        && norm_enabled()
        && crate::kernels::training::kernels_enabled()
}

/// A CUDA input of at most [`AUTO_ROWS`] rows, autograd off, the kernels on.
fn offered(x: &Tensor) -> bool {
    x.device().is_cuda()
        && rows_of(x) <= AUTO_ROWS
        && gemv_kernel_enabled()
        && !crate::kernels::fused::grad_enabled()
}

/// The RMSNorm whose output a block's products read: `x` [.., k] the fp32
/// residual stream, `add` a bf16 branch output of its shape added to it
/// first (the sum is the new stream), `w` the fp32 weight [k].
pub struct Norm<'a> {
    pub x: &'a Tensor,
    pub add: Option<&'a Tensor>,
    pub w: &'a Tensor,
    pub eps: f64,
}

/// The products of `ws` ([`gemv`]'s, or with `gated` [`gemv_swiglu`]'s one
/// merged weight) on `n`'s output, the norm run by the kernel: one launch
/// instead of a norm and the products. The output rounds as the norm
/// kernel's bf16 (csrc/rms_norm.cuh, shared). Returns the sum `x + add`
/// (where `add` is given) and the products; None where the kernels cannot
/// run or [`wants_normed`] declines `n.x`.
pub fn gemv_normed(n: &Norm, ws: &[&Tensor], gated: bool) -> Option<(Option<Tensor>, Vec<Tensor>)> {
    if !wants_normed(n.x) || norm_refusal(n, ws, gated).is_some() {
        return None;
    }
    let v = Variant::pick(gated, width(n.x));
    let sum = n
        .add
        .map(|_| Tensor::empty(n.x.size(), (Kind::Float, n.x.device())));
    let outs = outputs(n.x, ws, gated);
    let input = Input::Normed {
        n,
        sum: sum.as_ref(),
    };
    launch(input, ws, &outs, (gated, v)).then_some((sum, outs))
}

/// Why [`gemv_normed`] cannot take `n` with these weights (None: it can).
fn norm_refusal(n: &Norm, ws: &[&Tensor], gated: bool) -> Option<String> {
    let dev = n.x.device();
    let on_dev = |t: &Tensor| t.device() == dev;
    if !dev.is_cuda() || !ws.iter().all(|w| on_dev(w)) || !on_dev(n.w) || !n.add.is_none_or(on_dev)
    {
        return Some("not on one CUDA device".into());
    }
    norm_shape_refusal(n, ws, gated)
}

/// [`norm_refusal`]'s rules after the device's.
fn norm_shape_refusal(n: &Norm, ws: &[&Tensor], gated: bool) -> Option<String> {
    let bf = |t: &Tensor| t.kind() == Kind::BFloat16;
    if n.x.kind() != Kind::Float || n.w.kind() != Kind::Float {
        return Some("a norm whose stream or weight is not fp32".into());
    }
    if !ws.iter().all(|w| bf(w)) || !n.add.is_none_or(bf) {
        return Some("weights or a branch output that are not bf16".into());
    }
    if let Some(r) = extent_refusal(n.x, ws, gated) {
        return Some(r);
    }
    let k = *n.x.size().last().expect("extent_refusal checked the rank");
    // Where the norm kernel would not run, the other paths (prefill, the
    // switch off) normalise by libtorch's rms_norm and round otherwise.
    if k > crate::kernels::training::NORM_MAX_DIM {
        return Some(format!(
            "a width of {k} (the norm kernel's limit: {})",
            crate::kernels::training::NORM_MAX_DIM
        ));
    }
    let dense = |t: &Tensor| t.is_contiguous() && (t.data_ptr() as usize).is_multiple_of(16);
    if !dense(n.x) || !n.add.is_none_or(|a| dense(a) && a.size() == n.x.size()) {
        return Some(
            "a stream or branch output that is not contiguous, 16-byte aligned and of one shape"
                .into(),
        );
    }
    if n.w.size() != [k] || !dense(n.w) {
        return Some(format!(
            "a norm weight {:?} that is not a contiguous, aligned [{k}]",
            n.w.size()
        ));
    }
    let bytes = rows_of(n.x) * k * 2;
    if bytes > NORM_SHARED_BYTES {
        return Some(format!(
            "a normalised input of {bytes} bytes (at most {NORM_SHARED_BYTES} in shared memory)"
        ));
    }
    None
}

/// `x` [.., k] times each of `ws` ([n_j, k], at most three): [.., n_j]
/// each, in one launch. None where the kernels cannot run or [`wants`]
/// declines `x`.
pub fn gemv(x: &Tensor, ws: &[&Tensor]) -> Option<Vec<Tensor>> {
    if !wants(x) {
        return None;
    }
    gemv_by(x, ws, false, Variant::pick(false, width(x)))
}

/// The width of `x` [.., k] (0 for a scalar).
fn width(x: &Tensor) -> i64 {
    x.size().last().copied().unwrap_or(0)
}

/// SwiGLU of `x` [.., k] times the merged gate/up weight `w` [2F, k]:
/// `silu(x gate^T) * (x up^T)` [.., F] in one launch. None where the
/// kernels cannot run or [`wants`] declines `x`.
pub fn gemv_swiglu(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    if !wants(x) {
        return None;
    }
    gemv_by(x, &[w], true, Variant::pick(true, width(x))).and_then(|mut y| y.pop())
}

/// [`gemv`] (or, `gated`, [`gemv_swiglu`]'s one product) by variant `v`,
/// up to [`MAX_ROWS`] rows (benchmarks compare them).
pub fn gemv_by(x: &Tensor, ws: &[&Tensor], gated: bool, v: Variant) -> Option<Vec<Tensor>> {
    if skip(x, ws, gated) || !VARIANTS.contains(&v) {
        return None;
    }
    let outs = outputs(x, ws, gated);
    launch(Input::Plain(x), ws, &outs, (gated, v)).then_some(outs)
}

/// Empty outputs for the products of `ws` on `x` (gated: one, half the
/// merged weight's rows).
fn outputs(x: &Tensor, ws: &[&Tensor], gated: bool) -> Vec<Tensor> {
    if gated {
        vec![out_like(x, ws[0].size()[0] / 2)]
    } else {
        ws.iter().map(|w| out_like(x, w.size()[0])).collect()
    }
}

/// What a launch reads: a bf16 input, or the norm that makes it (and where
/// the sum goes).
enum Input<'a> {
    Plain(&'a Tensor),
    Normed {
        n: &'a Norm<'a>,
        sum: Option<&'a Tensor>,
    },
}

/// An empty bf16 output [.., n] for input `x` [.., k].
fn out_like(x: &Tensor, n: i64) -> Tensor {
    let mut size = x.size();
    *size.last_mut().expect("refusal checked the rank") = n;
    Tensor::empty(size, (Kind::BFloat16, x.device()))
}

/// The launch; false (with a warning, once, and the kernels turned off)
/// when it could not be made.
fn launch(input: Input, ws: &[&Tensor], outs: &[Tensor], (gated, v): (bool, Variant)) -> bool {
    let x0 = match &input {
        Input::Plain(x) => *x,
        Input::Normed { n, .. } => n.x,
    };
    let Device::Cuda(ordinal) = x0.device() else {
        return false;
    };
    // (A norm's tensors were checked dense by `norm_refusal`.)
    let dense;
    let input = match input {
        Input::Plain(x) => {
            dense = dense_input(x);
            Input::Plain(&dense)
        }
        normed => normed,
    };
    match launch_on(ordinal, &input, ws, outs, (gated, v)) {
        Ok(()) => {
            LAUNCHES.fetch_add(1, Relaxed);
            true
        }
        Err(e) => {
            if SWITCH.turn_off() {
                eprintln!("warning: the decoding matrix-vector kernels failed on cuda:{ordinal} and are off from now on (libtorch's matmul instead): {e}");
            }
            false
        }
    }
}

/// `x`, or a copy where it is not contiguous from a 16-byte boundary: the
/// kernels read it in 16-byte pieces (a contiguous slice of a larger
/// tensor may start off one).
fn dense_input(x: &Tensor) -> Tensor {
    if !x.is_contiguous() {
        x.contiguous() // a fresh allocation: aligned
    } else if (x.data_ptr() as usize).is_multiple_of(16) {
        x.shallow_clone()
    } else {
        let mut fresh = Tensor::empty(x.size(), (x.kind(), x.device()));
        fresh.copy_(x);
        fresh
    }
}

fn launch_on(
    ordinal: usize,
    input: &Input,
    ws: &[&Tensor],
    outs: &[Tensor],
    (gated, v): (bool, Variant),
) -> Result<(), String> {
    let _restore = decode::RestoreContext::save();
    let (x, norm) = match input {
        Input::Plain(x) => (*x, false),
        Input::Normed { n, .. } => (n.x, true),
    };
    let k = *x.size().last().expect("refusal checked the rank");
    let rows = x.numel() as i64 / k;
    let kern = loaded(ordinal, bucket_of(rows), v)?;
    let stream = decode::current_stream(&kern.ctx, ordinal)
        .ok_or_else(|| format!("no current CUDA stream for cuda:{ordinal}"))?;
    let kind = Kind4::new(gated, norm).index();
    let func = &kern.funcs[kind];
    // Columns of the launch: the outputs' (a gated weight's half).
    let ns: Vec<i32> = outs.iter().map(|o| o.size()[o.dim() - 1] as i32).collect();
    let cols: i64 = ns.iter().map(|&n| n as i64).sum();
    let per_block = (WARPS / v.warps_per_column) as i64;
    let groups = (cols + per_block - 1) / per_block;
    let shared = if norm { (rows * k * 2) as u32 } else { 0 };
    kern.ctx
        .bind_to_thread()
        .map_err(|e| format!("CUDA driver: {e}"))?;
    // A normed kernel's blocks normalise the input once each: no more of
    // them than the device runs at once, each taking several groups.
    let blocks = if norm {
        groups.min(kern.sms * kern.norm_blocks_per_sm(kind, shared)?)
    } else {
        groups
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (WARPS * 32, 1, 1),
        shared_mem_bytes: shared,
    };
    let args = Args::new(input, ws, outs, &ns, [rows as i32, k as i32, groups as i32]);
    let pdl = kern.pdl && decode::pdl_enabled();
    // SAFETY: `args` holds the kernel's arguments in its parameter order
    // (csrc/gemv.cu, GEMV_PARAMS): x, the tensors of the norm and the
    // weights' and outputs' are live, contiguous, 16-byte aligned tensors
    // of this device (refusal, norm_refusal, `launch`'s copy of an
    // unaligned or strided x, `outputs`' fresh tensors) with the extents
    // the kernels index: x and the norm's stream and sum [rows, k], its
    // weight [k], weight j [n_j, k] (gated: [2n, k]), output j [rows, n_j];
    // they outlive the launch, which runs on the stream that any later use
    // of them is ordered after. Unused weight slots have zero columns and
    // are never read; the shared memory asked for holds [rows, k] bf16.
    let mut args = args;
    let mut params = args.pointers();
    unsafe { decode::launch_ex(&stream, func, &cfg, &mut params, pdl) }
        .map_err(|e| format!("launch on cuda:{ordinal}: {e}"))
}

/// The kernels' arguments by value, in the parameter order of csrc/gemv.cu
/// (GEMV_PARAMS), for `cuLaunchKernelEx`.
#[derive(Clone, Copy)]
struct Args {
    /// x, then the norm's stream, branch output, sum and weight (0: none).
    ptrs: [u64; 5],
    eps: f32,
    slots: [(u64, u64, i32); 3],
    /// rows, k and the groups of columns.
    dims: [i32; 3],
}

impl Args {
    fn new(input: &Input, ws: &[&Tensor], outs: &[Tensor], ns: &[i32], dims: [i32; 3]) -> Args {
        let ptr = |t: &Tensor| t.data_ptr() as u64;
        let opt = |t: Option<&Tensor>| t.map_or(0, ptr);
        let (ptrs, eps) = match input {
            Input::Plain(x) => ([ptr(x), 0, 0, 0, 0], 0.0),
            Input::Normed { n, sum } => {
                ([0, ptr(n.x), opt(n.add), opt(*sum), ptr(n.w)], n.eps as f32)
            }
        };
        let slot = |j: usize| {
            (
                ws.get(j).map_or(0, |w| ptr(w)),
                outs.get(j).map_or(0, ptr),
                ns.get(j).copied().unwrap_or(0),
            )
        };
        Args {
            ptrs,
            eps,
            slots: [slot(0), slot(1), slot(2)],
            dims,
        }
    }

    /// Pointers to each argument, as the driver takes them.
    fn pointers(&mut self) -> Vec<*mut std::ffi::c_void> {
        self.fields().into_iter().map(|(p, _)| p).collect()
    }

    /// Each argument's address and size, in the kernels' parameter order.
    fn fields(&mut self) -> Vec<(*mut std::ffi::c_void, usize)> {
        fn p<T>(v: &mut T) -> (*mut std::ffi::c_void, usize) {
            (
                v as *mut T as *mut std::ffi::c_void,
                std::mem::size_of::<T>(),
            )
        }
        let [x, nx, nadd, nsum, nw] = &mut self.ptrs;
        let mut v = vec![p(x), p(nx), p(nadd), p(nsum), p(nw), p(&mut self.eps)];
        for (w, y, n) in &mut self.slots {
            v.extend([p(w), p(y), p(n)]);
        }
        v.extend(self.dims.iter_mut().map(p));
        v
    }
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
            Variant::pick(false, 2048),
            Variant::pick(true, 2048),
            Variant::pick(true, 6144),
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
                for f in Kind4::ALL {
                    let k = kernel_name(f, r, v);
                    let body = decode::ptx_entry(&ptx, &k).unwrap_or_else(|| panic!("{k} missing"));
                    let shared = body.contains(".shared");
                    assert_eq!(
                        shared,
                        f.norm || v.warps_per_column > 1,
                        "{k}: shared memory only to add warps' sums and for a norm's output"
                    );
                    // Dependent launch: the wait before reading x, on sm_90 only.
                    let waits = body.contains("griddepcontrol.wait");
                    assert_eq!(waits, arch >= 90, "{k}, sm_{arch}: griddepcontrol");
                    assert!(body.contains("prefetch.global.L2"), "{k}: no L2 prefetch");
                    // The weights loaded ahead stay in registers.
                    assert!(!body.contains(".local"), "{k}: local memory");
                }
                assert!(ptx.contains("L1::no_allocate"), "weights not streamed");
            }
        }
    }

    /// The arguments `launch_on` passes have the sizes of every kernel's
    /// parameters, in order (the PTX's `.param` list): a mismatch would
    /// be read as garbage on the GPU, with no error.
    #[test]
    fn the_arguments_match_every_kernels_parameters() {
        if !decode::cuda_build() {
            decode::skip_unless_ci("libtorch is not a CUDA build (no NVRTC beside it)");
            return;
        }
        let x = Tensor::zeros([1, 64], (Kind::BFloat16, Device::Cpu));
        let mut args = Args::new(&Input::Plain(&x), &[], &[], &[], [1, 64, 1]);
        let sizes: Vec<usize> = args.fields().iter().map(|&(_, n)| n).collect();
        let v = Variant::pick(true, 2048);
        let ptx = decode::compile(SOURCE, &defines(2, v), 90).expect("compiles");
        for f in Kind4::ALL {
            let name = kernel_name(f, 2, v);
            let params = decode::ptx_param_sizes(&ptx, &name).expect("the kernel");
            assert_eq!(params, sizes, "{name}");
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

    /// A lane loads 2 pieces of a row at a time where its share of the row
    /// is at most 2 (registers for more would hold nothing), else 4; every
    /// variant picked is one the benches and compile tests cover.
    #[test]
    fn the_variant_fits_a_lanes_share_of_the_row() {
        for (gated, k, want) in [
            (true, 2048, Variant::new(2, 4)),
            (true, 1024, Variant::new(2, 4)),
            (true, 2056, Variant::new(4, 4)),
            (true, 3072, Variant::new(4, 4)),
            (true, 6144, Variant::new(4, 4)),
            (false, 2048, Variant::new(4, 2)),
            (false, 1032, Variant::new(4, 2)),
            (false, 1024, Variant::new(2, 2)),
            (false, 64, Variant::new(2, 2)),
            (false, 6144, Variant::new(4, 2)),
        ] {
            assert_eq!(Variant::pick(gated, k), want, "gated {gated}, k {k}");
        }
        for k in (8..=16384).step_by(8) {
            for gated in [false, true] {
                let v = Variant::pick(gated, k);
                assert!(VARIANTS.contains(&v), "{v:?} (k {k}) is not among VARIANTS");
            }
        }
    }

    /// The modules built ahead hold the variant of every plain and gated
    /// product's width, at the rows' bucket, each once, and no other.
    #[test]
    fn the_modules_built_ahead_cover_every_width() {
        let (plain, gated) = ([2048, 3072, 6144], [2048, 4096]);
        for rows in [1, 2] {
            let got = prebuilt(rows, (&plain, &gated));
            let want = [
                Variant::new(4, 2), // every plain width
                Variant::new(2, 4), // gated at 2048
                Variant::new(4, 4), // gated at 4096
            ];
            assert_eq!(got, want.map(|v| (rows, v)).to_vec());
        }
        // SIGMA-1.5B's: its gated products read 2048 wide only.
        let got = prebuilt(1, (&plain, &[2048]));
        assert_eq!(got, vec![(1, Variant::new(4, 2)), (1, Variant::new(2, 4))]);
        assert_eq!(
            prebuilt(3, (&[8], &[]))[0].0,
            4,
            "three rows take the bucket of 4"
        );
    }

    /// A normed launch takes as many blocks a multiprocessor as fit, at
    /// most NORM_BLOCKS_PER_SM, and none fitting is an error, not an
    /// empty launch.
    #[test]
    fn a_normed_launch_takes_the_blocks_that_fit_at_once() {
        assert_eq!(norm_blocks(3), Ok(3));
        assert_eq!(norm_blocks(1), Ok(1));
        assert_eq!(norm_blocks(NORM_BLOCKS_PER_SM), Ok(NORM_BLOCKS_PER_SM));
        assert_eq!(norm_blocks(8), Ok(NORM_BLOCKS_PER_SM));
        let e = norm_blocks(0).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
    }

    /// What the normed kernels refuse, said in words (CPU tensors, through
    /// `norm_shape_refusal`, after `norm_refusal`'s device rule).
    #[test]
    fn the_normed_kernels_refuse_what_they_cannot_take() {
        let t = |s: &[i64], k: Kind| Tensor::zeros(s, (k, Device::Cpu));
        let (bf, f) = (Kind::BFloat16, Kind::Float);
        let (x, add, g, w) = (
            t(&[1, 1, 64], f),
            t(&[1, 1, 64], bf),
            t(&[64], f),
            t(&[32, 64], bf),
        );
        let norm = |x, add, g| Norm {
            x,
            add,
            w: g,
            eps: 1e-5,
        };
        let r = |n: &Norm, ws: &[&Tensor], gated| norm_shape_refusal(n, ws, gated);
        assert_eq!(
            norm_refusal(&norm(&x, Some(&add), &g), &[&w], false).as_deref(),
            Some("not on one CUDA device")
        );
        assert_eq!(r(&norm(&x, Some(&add), &g), &[&w], false), None);
        assert_eq!(r(&norm(&x, None, &g), &[&w, &w, &w], false), None);
        assert_eq!(r(&norm(&x, Some(&add), &g), &[&w], true), None);
        let x16 = t(&[1, 1, 64], bf);
        assert!(r(&norm(&x16, None, &g), &[&w], false)
            .unwrap()
            .contains("not fp32"));
        let add32 = t(&[1, 1, 64], f);
        assert!(r(&norm(&x, Some(&add32), &g), &[&w], false)
            .unwrap()
            .contains("not bf16"));
        let wide = t(&[2, 1, 64], bf);
        assert!(r(&norm(&x, Some(&wide), &g), &[&w], false)
            .unwrap()
            .contains("one shape"));
        let g32 = t(&[32], f);
        assert!(r(&norm(&x, None, &g32), &[&w], false)
            .unwrap()
            .contains("[32]"));
        // Rows x k in bf16 must fit 40 KiB of shared memory.
        let (big, gbig) = (t(&[3, 8192], f), t(&[8192], f));
        let wbig = t(&[8, 8192], bf);
        assert!(r(&norm(&big, None, &gbig), &[&wbig], false)
            .unwrap()
            .contains("49152 bytes"));
        let one = big.narrow(0, 0, 1);
        assert_eq!(r(&norm(&one, None, &gbig), &[&wbig], false), None);
        // Wider than the norm kernel takes (8,192).
        let (x9, g9) = (t(&[1, 8200], f), t(&[8200], f));
        assert!(r(&norm(&x9, None, &g9), &[&t(&[8, 8200], bf)], false)
            .unwrap()
            .contains("8200"));
        assert!(r(&norm(&x, None, &g), &[&w, &w], true)
            .unwrap()
            .contains("2 weights"));
    }
}
