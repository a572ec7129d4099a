//! NVRTC and the CUDA driver for sigma's run-time compiled kernels (the
//! decode attention here, the training kernels in kernels/training.rs):
//! finding libtorch's NVRTC, compiling a source after csrc/bf16.cuh, a
//! device's context, compute capability and multiprocessors, libtorch's
//! current stream, launching with programmatic dependent launch, timing on
//! it with CUDA events, and putting the thread's CUDA context back after
//! cudarc changed it.

use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};

/// The prelude of every kernel source (bf16, dependent launch, L2 prefetch).
const BF16_HEADER: &str = include_str!("../../../csrc/bf16.cuh");
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
/// `arch` (e.g. 90) with `defines` (what the tests read; devices load
/// machine code, [`super::modules::load_module`]).
pub fn compile(
    src: &str,
    defines: &[(&str, i64)],
    arch: i32,
) -> std::result::Result<String, String> {
    let ptx = run_nvrtc(
        &full_source(src),
        &options(defines, &format!("compute_{arch}")),
        false,
    )?;
    Ok(String::from_utf8_lossy(&ptx).into_owned())
}

/// The text NVRTC compiles: csrc/bf16.cuh, then `src`.
pub(super) fn full_source(src: &str) -> String {
    format!("{BF16_HEADER}\n{src}")
}

/// NVRTC's options: the macros, the target (`compute_90` for PTX, `sm_90`
/// for machine code), C++17.
pub(super) fn options(defines: &[(&str, i64)], target: &str) -> Vec<String> {
    let mut options: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
    options.push(format!("--gpu-architecture={target}"));
    options.push("--std=c++17".into());
    options
}

/// Run NVRTC on `text` with `options` and return its PTX, or with
/// `cubin` its machine code (the target must then be an `sm_` one). The
/// error carries NVRTC's log. Several threads may compile at once.
pub(super) fn run_nvrtc(
    text: &str,
    options: &[String],
    cubin: bool,
) -> std::result::Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    nvrtc()?;
    let c =
        std::ffi::CString::new(text).map_err(|_| "a NUL byte in the kernel source".to_string())?;
    let nv = |e: cudarc::nvrtc::result::NvrtcError| format!("NVRTC: {e:?}");
    let prog = result::create_program(&c, None).map_err(nv)?;
    /// Destroys the program however this function returns.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: a program created above, destroyed once (NVRTC sets
            // the handle it is given to null).
            let _ = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
        }
    }
    let prog = Program(prog);
    // SAFETY: a live program; the options are NUL-free strings.
    if let Err(e) = unsafe { result::compile_program(prog.0, options) } {
        // SAFETY: a live program; its log is copied out whole.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|l| {
                let bytes: Vec<u8> = l.into_iter().map(|c| c as u8).collect();
                std::ffi::CStr::from_bytes_until_nul(&bytes)
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
            })
            .unwrap_or_default();
        return Err(format!(
            "NVRTC could not compile the kernel ({e:?}):\n{log}"
        ));
    }
    if cubin {
        let mut n = 0usize;
        // SAFETY: a compiled program; the buffer has the size NVRTC gave.
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut n) }
            .result()
            .map_err(nv)?;
        if n == 0 {
            return Err("NVRTC made no machine code (the target is not an sm_ one?)".into());
        }
        let mut buf = vec![0u8; n];
        unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) }
            .result()
            .map_err(nv)?;
        return Ok(buf);
    }
    // SAFETY: a compiled program.
    let ptx = unsafe { result::get_ptx(prog.0) }.map_err(nv)?;
    let mut bytes: Vec<u8> = ptx.into_iter().map(|c| c as u8).collect();
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    Ok(bytes)
}

/// NVRTC's version, "major.minor".
pub(super) fn nvrtc_version() -> std::result::Result<String, String> {
    nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("NVRTC: {e:?}"))?;
    Ok(format!("{major}.{minor}"))
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

/// One kernel argument by value: `cuLaunchKernelEx` takes a pointer to
/// each, and reads as many bytes as the kernel's parameter has, so each
/// must have its parameter's type (tests compare the sizes with the PTX's
/// `.param` list: [`ptx_param_sizes`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    /// A device pointer (0: null).
    Ptr(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

impl Arg {
    /// The bytes the kernel's parameter must have.
    #[cfg(test)]
    pub(crate) fn size(&self) -> usize {
        match self {
            Arg::Ptr(_) | Arg::I64(_) => 8,
            Arg::I32(_) | Arg::F32(_) => 4,
        }
    }

    /// Where the value is, as the driver takes it.
    fn address(&mut self) -> *mut std::ffi::c_void {
        match self {
            Arg::Ptr(v) => v as *mut u64 as *mut std::ffi::c_void,
            Arg::I64(v) => v as *mut i64 as *mut std::ffi::c_void,
            Arg::I32(v) => v as *mut i32 as *mut std::ffi::c_void,
            Arg::F32(v) => v as *mut f32 as *mut std::ffi::c_void,
        }
    }
}

/// Pointers to each of `args`, valid while `args` is neither moved nor dropped.
pub(crate) fn arg_pointers(args: &mut [Arg]) -> Vec<*mut std::ffi::c_void> {
    args.iter_mut().map(Arg::address).collect()
}

/// Tests: the PTX of kernel `name`, from its `.entry` to the next one.
#[cfg(test)]
pub(crate) fn ptx_entry<'p>(ptx: &'p str, name: &str) -> Option<&'p str> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let rest = &ptx[start + 1..];
    Some(&ptx[start..start + 1 + rest.find(".entry").unwrap_or(rest.len())])
}

/// Tests: the sizes in bytes of kernel `name`'s parameters, in order, as
/// its PTX declares them.
#[cfg(test)]
pub(crate) fn ptx_param_sizes(ptx: &str, name: &str) -> Option<Vec<usize>> {
    let body = ptx_entry(ptx, name)?;
    let head = &body[..body.find(')')?];
    let sizes = head
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".param ."))
        .map(|t| match &t[..3] {
            "u64" | "b64" | "s64" => 8,
            "u32" | "b32" | "s32" | "f32" => 4,
            other => panic!("{name}: a parameter of type {other}"),
        })
        .collect();
    Some(sizes)
}

/// One launch by `cuLaunchKernelEx` on `stream`, its context bound to the
/// thread first, with programmatic stream serialization where `pdl` (the
/// kernel may start before the one before it ends: csrc/bf16.cuh). Where
/// the driver refuses the attribute (not supported, an invalid value), the
/// launch is made without it, with a warning once, and [`pdl_enabled`] is
/// false from then on; any other error is returned as it is.
///
/// # Safety
/// `params` must point at values that match `func`'s parameters, and
/// every device pointer among them must be valid for what the kernel
/// reads and writes.
pub(crate) unsafe fn launch_ex(
    stream: &cudarc::driver::CudaStream,
    func: &CudaFunction,
    cfg: &LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
    pdl: bool,
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    stream.context().bind_to_thread()?;
    // SAFETY: a plain C struct of integers and a union; zero is a valid value.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
        numAttrs: pdl as u32,
    };
    // SAFETY: the caller's contract; the values `params` points at live
    // until the call returns (the driver copies them at launch).
    let go = |config: &sys::CUlaunchConfig, params: &mut [*mut std::ffi::c_void]| unsafe {
        sys::cuLaunchKernelEx(
            config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    };
    let refused = |e: &cudarc::driver::DriverError| {
        matches!(
            e.0,
            sys::CUresult::CUDA_ERROR_NOT_SUPPORTED | sys::CUresult::CUDA_ERROR_INVALID_VALUE
        )
    };
    match go(&config, params) {
        Err(e) if pdl && refused(&e) => {
            if PDL_SWITCH.turn_off() {
                eprintln!("warning: decoding's kernels cannot use programmatic dependent launch here ({e}); plain launches from now on");
            }
            let plain = sys::CUlaunchConfig {
                attrs: std::ptr::null_mut(),
                numAttrs: 0,
                ..config
            };
            go(&plain, params)
        }
        r => r,
    }
}

/// `SIGMA_DECODE_PDL` (off after the driver refused the attribute too).
static PDL_SWITCH: sigma_data::env::ProcessSwitch =
    sigma_data::env::ProcessSwitch::new(sigma_data::env::DECODE_PDL);

/// Whether decoding's kernels (matrix-vector products, attention, cache
/// append) are launched with programmatic dependent launch on devices of
/// compute capability 9.0 and later: on unless `SIGMA_DECODE_PDL=off` or
/// the driver refused it.
pub fn pdl_enabled() -> bool {
    PDL_SWITCH.get()
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

/// Tests: a prerequisite this machine lacks skips the test (saying so),
/// except under `CI=true`, where every prerequisite is installed and a
/// missing one is a failure.
#[cfg(test)]
pub(crate) fn skip_unless_ci(why: &str) {
    let ci = sigma_data::env::var("CI").is_some_and(|v| v == "true");
    assert!(!ci, "CI=true, but this test cannot run: {why}");
    eprintln!("skipped: {why}");
}
