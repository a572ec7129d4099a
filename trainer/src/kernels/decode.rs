//! CUDA kernels compiled at run time with NVRTC (through cudarc) and
//! launched on libtorch's current stream over libtorch's tensors: the
//! DiffQKV decode attention (csrc/decode_attention.cu, here), which
//! [`crate::infer::generate::decode_attention`] calls on a GPU and which falls back
//! to tensor operations wherever it cannot run; and SwiGLU's forward and
//! backward for training ([`crate::swiglu`]). Every source is compiled after
//! the bf16 helpers of csrc/bf16.cuh.
//!
//! - **Libraries.** NVRTC is found beside the CUDA runtime that libtorch
//!   loaded (pip's CUDA wheels put `libnvrtc.so.N` and its builtins in the
//!   same directory) and opened by its full path, so that cudarc's lookup by
//!   name finds the very same library; the driver is the system's.
//! - **Compilation.** Once per (device, shape): the shapes are macros, so
//!   every loop over heads and dimensions is unrolled; the PTX targets the
//!   device's compute capability. A compile or load failure is reported once
//!   and the tensor path is used from then on for that shape.
//! - **Streams.** Kernels run on libtorch's current stream of the tensors'
//!   device (a C++ shim reads it), so they are ordered with the operations
//!   around them like any libtorch kernel; scratch buffers come from
//!   libtorch's caching allocator.
#![allow(unsafe_code)] // FFI: NVRTC, the CUDA driver and the stream shim.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// The decode attention source, compiled with the shape macros of [`DecodeShape`].
pub const DECODE_SOURCE: &str = include_str!("../../csrc/decode_attention.cu");
/// bf16 conversions and packing, put before every kernel source.
const BF16_HEADER: &str = include_str!("../../csrc/bf16.cuh");
/// Threads per block of the split kernel and of the combine kernel (the source's COMBINE_THREADS).
const THREADS: u32 = 256;
const COMBINE_THREADS: u32 = 256;
/// Splits the combine kernel takes (one float of shared memory each).
const MAX_SPLITS: i64 = 8192;
/// Dynamic shared memory a split block may use (scores of its chunk, q, output).
const MAX_SMEM: i64 = 96 * 1024;

extern "C" {
    fn sigma_cuda_current_stream(device: i32, out: *mut *mut std::ffi::c_void) -> i32;
}

/// The directory of libtorch's CUDA runtime (NVRTC's too, for pip's CUDA wheels).
fn cuda_runtime_dir() -> Option<std::path::PathBuf> {
    crate::kernels::cuda_libs::loaded_library("libcudart.so.")
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
}

/// Whether this libtorch is a CUDA build (its CUDA runtime is loaded), GPU or not.
pub fn cuda_build() -> bool {
    cuda_runtime_dir().is_some()
}

/// Make NVRTC loadable: open libtorch's (beside its CUDA runtime) by full
/// path, builtins first, so that cudarc's lookup by name finds it. The
/// error says where it was looked for.
pub fn nvrtc() -> std::result::Result<(), String> {
    static READY: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let dir = cuda_runtime_dir();
            if let Some(dir) = &dir {
                let mut files: Vec<_> = std::fs::read_dir(dir)
                    .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                    .unwrap_or_default();
                // Builtins before the compiler that opens them; never the ".alt" variants.
                files.sort_by_key(|p| !p.to_string_lossy().contains("builtins"));
                for f in files {
                    let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
                    let name = name.unwrap_or_default();
                    if name.starts_with("libnvrtc") && name.contains(".so.") && !name.contains(".alt.") {
                        // SAFETY: NVIDIA's NVRTC libraries run no code of
                        // consequence when loaded; the handle is kept open for
                        // the life of the process (leaked) so that symbols
                        // cudarc resolves stay valid.
                        if let Ok(lib) = unsafe { libloading::Library::new(&f) } {
                            std::mem::forget(lib);
                        }
                    }
                }
            }
            // SAFETY: only tries to open the library by its usual names.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "NVRTC (libnvrtc.so) was not found beside libtorch's CUDA runtime ({}) nor on the library path",
                    dir.map(|d| d.display().to_string())
                        .unwrap_or_else(|| "not loaded".into())
                ))
            }
        })
        .clone()
}

/// Compile CUDA C `src` (after csrc/bf16.cuh) to PTX for compute capability
/// `arch` (e.g. 90) with `defines`.
pub fn compile(
    src: &str,
    defines: &[(&str, i64)],
    arch: i32,
) -> std::result::Result<String, String> {
    nvrtc()?;
    let mut options: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
    options.push(format!("--gpu-architecture=compute_{arch}"));
    options.push("--std=c++17".into());
    let opts = cudarc::nvrtc::CompileOptions {
        options,
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(format!("{BF16_HEADER}\n{src}"), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(format!(
            "NVRTC could not compile the kernel:\n{}",
            log.to_string_lossy()
        )),
        Err(e) => Err(format!("NVRTC: {e:?}")),
    }
}

/// The decode kernel's tuning: defaults measured on an H100; for other
/// hardware, `SIGMA_DECODE_TUNING` (e.g. `max_chunk=256,uv=4`) overrides
/// any of them for the process (a bad value is reported and ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// The longest chunk of slots one block takes (a multiple of 32).
    pub max_chunk: i64,
    /// Blocks per multiprocessor the split aims at.
    pub blocks_per_sm: i64,
    /// Key rows and value rows a lane loads before using any.
    pub uk: i64,
    pub uv: i64,
}

impl Tuning {
    pub const DEFAULT: Tuning = Tuning {
        max_chunk: 512,
        blocks_per_sm: 8,
        uk: 4,
        uv: 8,
    };

    /// `key=value` pairs separated by commas, over the defaults.
    pub fn parse(text: &str) -> std::result::Result<Tuning, String> {
        let mut t = Tuning::DEFAULT;
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not key=value"))?;
            let v: i64 = value
                .trim()
                .parse()
                .map_err(|_| format!("{key}: {value:?} is not an integer"))?;
            let (field, ok) = match key.trim() {
                "max_chunk" => (&mut t.max_chunk, (32..=4096).contains(&v) && v % 32 == 0),
                "blocks_per_sm" => (&mut t.blocks_per_sm, (1..=64).contains(&v)),
                "uk" => (&mut t.uk, (1..=16).contains(&v)),
                "uv" => (&mut t.uv, (1..=16).contains(&v)),
                k => {
                    return Err(format!(
                        "unknown key {k:?} (max_chunk, blocks_per_sm, uk, uv)"
                    ))
                }
            };
            if !ok {
                return Err(format!("{key} = {v} is out of range"));
            }
            *field = v;
        }
        Ok(t)
    }
}

/// The process's tuning (see [`Tuning`]).
pub fn tuning() -> Tuning {
    static T: OnceLock<Tuning> = OnceLock::new();
    *T.get_or_init(
        || match sigma_data::env::var(sigma_data::env::DECODE_TUNING) {
            Some(text) => Tuning::parse(&text).unwrap_or_else(|e| {
                eprintln!("warning: SIGMA_DECODE_TUNING ignored: {e}");
                Tuning::DEFAULT
            }),
            None => Tuning::DEFAULT,
        },
    )
}

/// Head counts and dimensions that select one compiled decode kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeShape {
    pub n_q: i64,
    pub n_k: i64,
    pub n_v: i64,
    pub d_k: i64,
    pub d_v: i64,
}

impl DecodeShape {
    /// Why the kernel cannot take this shape (None: it can).
    pub fn unsupported(&self) -> Option<String> {
        let lanes_ok = |d: i64| d > 0 && d % 8 == 0 && 32 % (d / 8) == 0;
        let group_ok = |g: i64| g <= 8 || g % 8 == 0;
        let s = self;
        if s.n_k <= 0 || s.n_v <= 0 || s.n_q % s.n_k != 0 || s.n_q % s.n_v != 0 {
            Some(format!(
                "n_k {} and n_v {} must divide n_q {}",
                s.n_k, s.n_v, s.n_q
            ))
        } else if !lanes_ok(s.d_k) || !lanes_ok(s.d_v) {
            Some(format!(
                "head dimensions {} (K) and {} (V) must be 8, 16, 32, 64, 128 or 256",
                s.d_k, s.d_v
            ))
        } else if !group_ok(s.n_q / s.n_k) || !group_ok(s.n_q / s.n_v) {
            Some(format!(
                "query heads per K head ({}) and per V head ({}) must be at most 8 or a multiple of 8",
                s.n_q / s.n_k,
                s.n_q / s.n_v
            ))
        } else if self.max_chunk() < 32 {
            Some(format!(
                "{} query heads leave no room for a chunk in shared memory",
                s.n_q
            ))
        } else {
            None
        }
    }

    fn defines(&self) -> [(&'static str, i64); 8] {
        let t = tuning();
        [
            ("NQ", self.n_q),
            ("NK", self.n_k),
            ("NV", self.n_v),
            ("DK", self.d_k),
            ("DV", self.d_v),
            ("THREADS", THREADS as i64),
            ("UK", t.uk),
            ("UV", t.uv),
        ]
    }

    /// Shared memory of a split block, in bytes, for a chunk of `chunk` slots.
    pub fn smem_bytes(&self, chunk: i64) -> i64 {
        4 * self.n_q * (self.d_k + self.d_v + 2 + chunk)
    }

    /// The largest chunk (a multiple of 32, at most [`Tuning::max_chunk`])
    /// whose block fits [`MAX_SMEM`].
    fn max_chunk(&self) -> i64 {
        let free = MAX_SMEM / 4 - self.n_q * (self.d_k + self.d_v + 2);
        ((free / self.n_q.max(1)) / 32 * 32).min(tuning().max_chunk)
    }

    /// Split `len` slots of `batch` sequences into chunks so that about
    /// [`Tuning::blocks_per_sm`] blocks per multiprocessor exist: (chunk,
    /// splits), chunk a multiple of 32 and `splits * chunk >= len >
    /// (splits - 1) * chunk`.
    pub fn plan(&self, batch: i64, len: i64, sms: i64) -> (i64, i64) {
        let want_splits = ((tuning().blocks_per_sm * sms + batch - 1) / batch).max(1);
        let chunk = (len + want_splits - 1) / want_splits;
        let chunk = ((chunk + 31) / 32 * 32).clamp(32, self.max_chunk().max(32));
        (chunk, (len + chunk - 1) / chunk)
    }
}

/// Puts the thread's current CUDA context back when dropped: cudarc makes
/// the tensors' device current, while libtorch keeps its own current device.
pub(crate) struct RestoreContext(Option<cudarc::driver::sys::CUcontext>);

impl RestoreContext {
    pub(crate) fn save() -> RestoreContext {
        RestoreContext(cudarc::driver::result::ctx::get_current().ok().flatten())
    }
}

impl Drop for RestoreContext {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            // SAFETY: a context that was current on this thread a moment ago
            // (a primary context, which lives as long as the process).
            let _ = unsafe { cudarc::driver::result::ctx::set_current(c) };
        }
    }
}

/// libtorch's current stream of CUDA device `ordinal`, for cudarc.
pub(crate) fn current_stream(
    ctx: &Arc<CudaContext>,
    ordinal: usize,
) -> Option<Arc<cudarc::driver::CudaStream>> {
    let mut raw = std::ptr::null_mut();
    // SAFETY: the shim writes one pointer and catches every C++ exception.
    if unsafe { sigma_cuda_current_stream(ordinal as i32, &mut raw) } != 0 {
        return None;
    }
    // SAFETY: libtorch's current stream of this device, alive for the process.
    Some(unsafe { ctx.wrap_borrowed_stream(raw as _) })
}

/// Times work on libtorch's current stream of a CUDA device with CUDA
/// events (device time between two points of the stream, no host clock).
pub struct StreamTimer {
    stream: Arc<cudarc::driver::CudaStream>,
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
}

impl StreamTimer {
    pub fn new(ordinal: usize) -> std::result::Result<StreamTimer, String> {
        let _restore = RestoreContext::save();
        let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        let stream = current_stream(&ctx, ordinal)
            .ok_or_else(|| format!("no current CUDA stream for cuda:{ordinal}"))?;
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(StreamTimer {
            start: ctx.new_event(timed).map_err(drv)?,
            end: ctx.new_event(timed).map_err(drv)?,
            stream,
        })
    }

    /// Mark the start on the stream.
    pub fn start(&self) -> std::result::Result<(), String> {
        let _restore = RestoreContext::save();
        self.start
            .record(&self.stream)
            .map_err(|e| format!("CUDA event: {e}"))
    }

    /// Mark the end, wait for it, and return the milliseconds since `start`.
    pub fn stop_ms(&self) -> std::result::Result<f64, String> {
        let _restore = RestoreContext::save();
        let err = |e: cudarc::driver::DriverError| format!("CUDA event: {e}");
        self.end.record(&self.stream).map_err(err)?;
        self.end.synchronize().map_err(err)?;
        Ok(self.start.elapsed_ms(&self.end).map_err(err)? as f64)
    }
}

/// CUDA device `ordinal`'s context (cudarc's, on the primary context that
/// libtorch uses too), compute capability (e.g. 90) and multiprocessor count.
pub(crate) fn device(ordinal: usize) -> std::result::Result<(Arc<CudaContext>, i32, i64), String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let ctx = CudaContext::new(ordinal).map_err(drv)?;
    let attr = |a| ctx.attribute(a).map_err(drv);
    let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as i64;
    Ok((ctx, major * 10 + minor, sms))
}

/// One shape's kernels on one device.
struct Loaded {
    ctx: Arc<CudaContext>,
    split: CudaFunction,
    combine: CudaFunction,
    sms: i64,
}

type Cache = Mutex<HashMap<(usize, DecodeShape), std::result::Result<Arc<Loaded>, String>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn load(ordinal: usize, shape: DecodeShape) -> std::result::Result<Arc<Loaded>, String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let (ctx, arch, sms) = device(ordinal)?;
    let ptx = compile(DECODE_SOURCE, &shape.defines(), arch)?;
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .map_err(drv)?;
    let split = module.load_function("diffqkv_decode_split").map_err(drv)?;
    let combine = module
        .load_function("diffqkv_decode_combine")
        .map_err(drv)?;
    split
        .set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            MAX_SMEM as i32,
        )
        .map_err(drv)?;
    Ok(Arc::new(Loaded {
        ctx,
        split,
        combine,
        sms,
    }))
}

/// The kernels for `shape` on CUDA device `ordinal`, compiled on first use;
/// a failure is printed once and remembered.
fn kernels(ordinal: usize, shape: DecodeShape) -> std::result::Result<Arc<Loaded>, String> {
    let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
    c.entry((ordinal, shape))
        .or_insert_with(|| {
            let r = load(ordinal, shape);
            if let Err(e) = &r {
                eprintln!("warning: the DiffQKV decode kernel is not used for {shape:?} on cuda:{ordinal} (tensor operations instead): {e}");
            }
            r
        })
        .clone()
}

/// 0: not yet read from the environment, 1: on, 2: off.
static DECODE_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether decoding may use the kernel: on unless `SIGMA_DECODE_KERNEL=off`
/// (or [`set_decode_kernel`]`(false)`).
pub fn decode_kernel_enabled() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match DECODE_KERNEL.load(Relaxed) {
        0 => {
            let off = !sigma_data::env::switch(sigma_data::env::DECODE_KERNEL, true);
            DECODE_KERNEL.store(if off { 2 } else { 1 }, Relaxed);
            !off
        }
        v => v == 1,
    }
}

/// Turn the decode kernel on or off for this process (benchmarks compare both).
pub fn set_decode_kernel(on: bool) {
    DECODE_KERNEL.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the kernel would run for these operands; Err says why not
/// (for benchmarks and checks that must not silently time the fallback).
pub fn decode_kernel_available(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> std::result::Result<(), String> {
    let (shape, ordinal) = check(q, k, v, None)?;
    let _restore = RestoreContext::save();
    kernels(ordinal, shape).map(|_| ())
}

/// The kernel's shape and device for these operands, or why it cannot take
/// them (turned off, not CUDA, layout, shape); nothing is compiled here.
fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    valid: Option<&Tensor>,
) -> std::result::Result<(DecodeShape, usize), String> {
    if !decode_kernel_enabled() {
        return Err("turned off (SIGMA_DECODE_KERNEL=off)".into());
    }
    if let Some(r) = refusal(q, k, v, valid) {
        return Err(r);
    }
    let shape = shape_of(q, k, v);
    if let Some(r) = shape.unsupported() {
        return Err(r);
    }
    let Device::Cuda(ordinal) = q.device() else {
        return Err("not on a CUDA device".into());
    };
    Ok((shape, ordinal))
}

fn shape_of(q: &Tensor, k: &Tensor, v: &Tensor) -> DecodeShape {
    DecodeShape {
        n_q: q.size()[1],
        n_k: k.size()[1],
        n_v: v.size()[1],
        d_k: k.size()[3],
        d_v: v.size()[3],
    }
}

/// Why the kernel cannot run these operands (None: it can). q [b, n_q, 1,
/// d_k], k [b, n_k, S, d_k], v [b, n_v, S, d_v], valid [b, S] bool.
fn refusal(q: &Tensor, k: &Tensor, v: &Tensor, valid: Option<&Tensor>) -> Option<String> {
    let dev = q.device();
    if !dev.is_cuda() || k.device() != dev || v.device() != dev {
        return Some("not on one CUDA device".into());
    }
    if [q.kind(), k.kind(), v.kind()] != [Kind::BFloat16; 3] {
        return Some("not bf16".into());
    }
    if q.dim() != 4
        || k.dim() != 4
        || v.dim() != 4
        || q.size()[2] != 1
        || q.size()[3] != k.size()[3]
    {
        return Some("not one query per sequence".into());
    }
    let (b, len) = (q.size()[0], k.size()[2]);
    if k.size()[0] != b || v.size()[0] != b || v.size()[2] != len {
        return Some("q, K and V differ in batch or K and V in length (no broadcasting)".into());
    }
    if b == 0 || b > 65535 || len == 0 {
        return Some(format!(
            "batch {b} and context {len}: the kernel takes 1 to 65,535 sequences of at least one slot"
        ));
    }
    let (ks, vs) = (k.stride(), v.stride());
    let (dk, dv) = (k.size()[3], v.size()[3]);
    // A row of K and of V contiguous, every row 16-byte aligned.
    let aligned = |t: &Tensor, s: &[i64]| {
        s[3] == 1 && s[0] % 8 == 0 && s[1] % 8 == 0 && (t.data_ptr() as usize).is_multiple_of(16)
    };
    if ks[2] != dk || vs[2] != dv || !aligned(k, &ks) || !aligned(v, &vs) {
        return Some("K or V rows not contiguous and 16-byte aligned".into());
    }
    if let Some(m) = valid {
        if m.kind() != Kind::Bool
            || m.device() != dev
            || m.dim() != 2
            || m.size()[0] != b
            || m.size()[1] < len
            || m.stride()[1] != 1
        {
            return Some("the slot mask is not a bool [b, S] tensor with contiguous rows".into());
        }
    }
    if k.size()[2] > i32::MAX as i64 {
        return Some("context too long".into());
    }
    None
}

/// DiffQKV decode attention by the kernel: Ok(None) where it cannot run
/// (CPU, not bf16, a shape or layout it does not take, NVRTC missing,
/// `SIGMA_DECODE_KERNEL=off`); the caller then uses tensor operations.
/// Same contract as [`crate::infer::generate::decode_attention`]: -> [b, 1, n_q * d_v].
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    valid: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let Ok((shape, ordinal)) = check(q, k, v, valid) else {
        return Ok(None);
    };
    let _restore = RestoreContext::save();
    let Ok(kern) = kernels(ordinal, shape) else {
        return Ok(None);
    };
    let (b, len) = (q.size()[0], k.size()[2]);
    let (chunk, splits) = shape.plan(b, len, kern.sms);
    if splits > MAX_SPLITS {
        return Ok(None);
    }
    let f32s = (Kind::Float, q.device());
    let q = q.contiguous();
    let part_o = Tensor::f_empty([b, splits, shape.n_q, shape.d_v], f32s)?;
    let part_ml = Tensor::f_empty([b, splits, shape.n_q, 2], f32s)?;
    let out = Tensor::f_empty([b, 1, shape.n_q * shape.d_v], (Kind::BFloat16, q.device()))?;
    let Some(stream) = current_stream(&kern.ctx, ordinal) else {
        return Ok(None);
    };
    let bufs = [&q, k, v, &part_o, &part_ml, &out];
    launch_split_and_combine(&stream, &kern, shape, bufs, valid, (chunk, splits), scale).map_err(
        |e| {
            TrainError::gpu(
                "NVRTC kernel",
                format!("DiffQKV decode attention on cuda:{ordinal}"),
                e.to_string(),
            )
        },
    )?;
    Ok(Some(out))
}

/// The two launches of a decoding step's attention: the split kernel (each
/// block one chunk of the context, partial outputs and softmax statistics
/// into `part_o` and `part_ml`) and the combine kernel (into `out`). `bufs`:
/// q, k, v, part_o, part_ml, out.
fn launch_split_and_combine(
    stream: &Arc<cudarc::driver::CudaStream>,
    kern: &Loaded,
    shape: DecodeShape,
    bufs: [&Tensor; 6],
    valid: Option<&Tensor>,
    (chunk, splits): (i64, i64),
    scale: f64,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    let ptr = |t: &Tensor| t.data_ptr() as u64;
    let [q, k, v, part_o, part_ml, out] = bufs;
    let (qp, kp, vp, op, mp, outp) = (ptr(q), ptr(k), ptr(v), ptr(part_o), ptr(part_ml), ptr(out));
    let (validp, valid_batch) = valid.map_or((0u64, 0i64), |m| (ptr(m), m.stride()[0]));
    let (ks, vs) = (k.stride(), v.stride());
    let (b, len) = (q.size()[0], k.size()[2]);
    let (len32, chunk32, splits32) = (len as i32, chunk as i32, splits as i32);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let split_cfg = LaunchConfig {
        grid_dim: (splits as u32, b as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shape.smem_bytes(chunk) as u32,
    };
    // SAFETY: every pointer is a live libtorch tensor of the device whose
    // extent matches the kernel's indexing (checked by `refusal` and the
    // caller's shapes); the tensors outlive the launches, which run on the
    // stream that any later use of them is ordered after.
    unsafe {
        stream
            .launch_builder(&kern.split)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&validp)
            .arg(&ks[0])
            .arg(&ks[1])
            .arg(&vs[0])
            .arg(&vs[1])
            .arg(&valid_batch)
            .arg(&op)
            .arg(&mp)
            .arg(&len32)
            .arg(&chunk32)
            .arg(&scale_log2)
            .launch(split_cfg)?;
        stream
            .launch_builder(&kern.combine)
            .arg(&op)
            .arg(&mp)
            .arg(&outp)
            .arg(&splits32)
            .launch(LaunchConfig {
                grid_dim: (shape.n_q as u32, b as u32, 1),
                block_dim: (COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 4 * splits as u32,
            })?;
    }
    Ok(())
}

/// Tests: a prerequisite this machine lacks skips the test (saying so),
/// except under `CI=true`, where every prerequisite is installed and a
/// missing one is a failure.
#[cfg(test)]
pub(crate) fn skip_unless_ci(why: &str) {
    let ci = sigma_data::env::var("CI").is_some_and(|v| v == "true");
    assert!(!ci, "CI=true, but this test cannot run: {why}");
    eprintln!("skipped: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigma_1_5b() -> DecodeShape {
        DecodeShape {
            n_q: 32,
            n_k: 4,
            n_v: 16,
            d_k: 64,
            d_v: 64,
        }
    }

    #[test]
    fn plans_cover_the_context_exactly_and_fill_the_device() {
        let s = sigma_1_5b();
        for (b, len) in [
            (1, 1),
            (1, 4096),
            (16, 32768),
            (64, 4096),
            (3, 1000),
            (1, 65536),
        ] {
            let (chunk, splits) = s.plan(b, len, 132);
            assert_eq!(chunk % 32, 0);
            assert!(
                splits * chunk >= len && (splits - 1) * chunk < len,
                "{b} {len}"
            );
            assert!(s.smem_bytes(chunk) <= MAX_SMEM);
            // Enough blocks for the 132 multiprocessors whenever the context allows it.
            if len >= 32 * 1056 / b {
                assert!(b * splits >= 132, "{b} {len}: {splits} splits");
            }
        }
        assert_eq!(s.plan(16, 32768, 132), (512, 64));
    }

    #[test]
    fn tuning_overrides_parse_and_bad_ones_are_named() {
        assert_eq!(Tuning::parse("").unwrap(), Tuning::DEFAULT);
        let t = Tuning::parse("max_chunk=256, uv=4").unwrap();
        assert_eq!((t.max_chunk, t.uv, t.uk), (256, 4, Tuning::DEFAULT.uk));
        assert!(Tuning::parse("max_chunk=100")
            .unwrap_err()
            .contains("out of range"));
        assert!(Tuning::parse("uv=x")
            .unwrap_err()
            .contains("not an integer"));
        assert!(Tuning::parse("warps=4")
            .unwrap_err()
            .contains("unknown key"));
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_named() {
        let ok = sigma_1_5b();
        assert_eq!(ok.unsupported(), None);
        let bad = DecodeShape { d_k: 48, ..ok };
        assert!(bad.unsupported().unwrap().contains("48"));
        let bad = DecodeShape {
            n_q: 48,
            n_k: 4,
            ..ok
        };
        assert!(bad.unsupported().unwrap().contains("per K head (12)"));
        let bad = DecodeShape { n_k: 5, ..ok };
        assert!(bad.unsupported().unwrap().contains("must divide"));
    }

    /// The kernel source compiles (NVRTC, for Hopper and Ampere) for every
    /// kind of shape sigma produces: SIGMA's 32/4/16, one K head (AugQ),
    /// n_k > n_v, compressed K dimensions, GQA-like equal heads, large groups.
    /// Needs a CUDA build of libtorch (NVRTC beside its runtime), no GPU.
    #[test]
    fn the_decode_kernel_compiles_for_every_kind_of_shape() {
        if !cuda_build() {
            skip_unless_ci("this libtorch is not a CUDA build (no NVRTC beside it)");
            return;
        }
        nvrtc().expect("a CUDA build of libtorch ships NVRTC beside its runtime");
        let shapes = [
            (32, 4, 16, 64, 64),
            (32, 1, 16, 64, 64),
            (8, 8, 2, 64, 64),
            (32, 4, 16, 32, 64),
            (32, 4, 16, 16, 64),
            (16, 16, 16, 128, 128),
            (64, 4, 2, 64, 64),
            (8, 2, 4, 8, 8),
            (8, 2, 4, 256, 256),
            (12, 3, 6, 64, 64),
        ];
        for (n_q, n_k, n_v, d_k, d_v) in shapes {
            let s = DecodeShape {
                n_q,
                n_k,
                n_v,
                d_k,
                d_v,
            };
            assert_eq!(s.unsupported(), None, "{s:?}");
            for arch in [90, 80] {
                let ptx = compile(DECODE_SOURCE, &s.defines(), arch)
                    .unwrap_or_else(|e| panic!("{s:?} sm_{arch}: {e}"));
                assert!(ptx.contains(".entry diffqkv_decode_split"), "{s:?}");
                assert!(ptx.contains(".entry diffqkv_decode_combine"), "{s:?}");
            }
        }
        // A broken source reports NVRTC's log.
        let err = compile(
            "extern \"C\" __global__ void f() { undefined_name; }",
            &[],
            90,
        )
        .unwrap_err();
        assert!(err.contains("undefined_name"), "{err}");
    }
}
