//! The decode kernels of one shape on one device (compiled by NVRTC on
//! first use, a failure remembered) and the launches of one step by a
//! [`Plan`]: the split kernel alone (one split, or the combine folded into
//! it) or followed by the combine kernel. The folded combine counts each
//! sequence's finished blocks in a workspace of `u32` counters kept per
//! device and stream: zeroed once when it is made (or grown), after which
//! the last block of each sequence sets its counter back to zero, so no
//! step needs a memset. Two launches on one stream never overlap, so a
//! stream's counters serve one launch at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};
use tch::{Kind, Tensor};

use super::nvrtc::{compile, current_stream, device, launch_ex};
use super::plan::{DecodeShape, Plan, Tuning, MAX_SMEM};
use crate::error::{Result, TrainError};

/// The decode attention source, compiled with the shape macros of [`DecodeShape::defines`].
pub const DECODE_SOURCE: &str = include_str!("../../../csrc/decode_attention.cu");
/// Threads per block of the split kernel and of the combine kernel (the source's COMBINE_THREADS).
pub const THREADS: u32 = 256;
const COMBINE_THREADS: u32 = 256;

/// One shape's kernels on one device.
pub struct Loaded {
    pub ctx: Arc<CudaContext>,
    split: CudaFunction,
    combine: CudaFunction,
    append: CudaFunction,
    /// The device's multiprocessors and its name (the driver's).
    pub sms: i64,
    pub device_name: String,
    /// Compute capability 9.0 or later: dependent launch possible.
    hopper: bool,
}

impl Loaded {
    /// Whether to launch with programmatic dependent launch.
    fn pdl(&self) -> bool {
        self.hopper && super::nvrtc::pdl_enabled()
    }
}

/// Pointers to each of the named values (locals that outlive the launch),
/// as `cuLaunchKernelEx` takes a kernel's parameters.
macro_rules! params {
    ($($v:expr),* $(,)?) => {
        [$(std::ptr::addr_of!($v) as *mut std::ffi::c_void),*]
    };
}

type Cache = Mutex<HashMap<(usize, DecodeShape), std::result::Result<Arc<Loaded>, String>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn load(
    ordinal: usize,
    shape: DecodeShape,
    t: &Tuning,
) -> std::result::Result<Arc<Loaded>, String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let (ctx, arch, sms) = device(ordinal)?;
    let ptx = compile(DECODE_SOURCE, &shape.defines(THREADS, t.uk, t.uv), arch)?;
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .map_err(drv)?;
    let split = module.load_function("diffqkv_decode_split").map_err(drv)?;
    let combine = module
        .load_function("diffqkv_decode_combine")
        .map_err(drv)?;
    let append = module.load_function("diffqkv_decode_append").map_err(drv)?;
    split
        .set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            MAX_SMEM as i32,
        )
        .map_err(drv)?;
    let device_name = ctx.name().map_err(drv)?;
    Ok(Arc::new(Loaded {
        ctx,
        split,
        combine,
        append,
        sms,
        device_name,
        hopper: arch >= 90,
    }))
}

/// The kernels for `shape` on CUDA device `ordinal` (with `t`'s rows
/// loaded ahead), compiled on first use; a failure is printed once and
/// remembered.
pub fn kernels(
    ordinal: usize,
    shape: DecodeShape,
    t: &Tuning,
) -> std::result::Result<Arc<Loaded>, String> {
    let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
    c.entry((ordinal, shape))
        .or_insert_with(|| {
            let r = load(ordinal, shape, t);
            if let Err(e) = &r {
                eprintln!("warning: the DiffQKV decode kernel is not used for {shape:?} on cuda:{ordinal} (tensor operations instead): {e}");
            }
            r
        })
        .clone()
}

/// The counters of the folded combine for `batch` sequences on `stream`
/// of device `ordinal`: made zero (libtorch's fill, on the same stream)
/// the first time and whenever a larger batch needs more, then kept.
fn workspace(ordinal: usize, stream: &CudaStream, batch: i64) -> Result<u64> {
    type Spaces = Mutex<HashMap<(usize, usize), Tensor>>;
    static SPACES: OnceLock<Spaces> = OnceLock::new();
    let mut spaces = SPACES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (ordinal, stream.cu_stream() as usize);
    if let Some(t) = spaces.get(&key).filter(|t| t.size()[0] >= batch) {
        return Ok(t.data_ptr() as u64);
    }
    let n = (batch.max(64) as u64).next_power_of_two() as i64;
    let t = Tensor::f_zeros([n], (Kind::Int, tch::Device::Cuda(ordinal)))?;
    let p = t.data_ptr() as u64;
    spaces.insert(key, t);
    Ok(p)
}

/// The operands of one step: q [b, n_q, 1, d_k] contiguous, k [b, n_k, S,
/// d_k] and v [b, n_v, S, d_v] with contiguous 16-byte aligned rows, valid
/// [b, >=S] bool or None, out [b, 1, n_q * d_v] bf16 (checked by the caller).
pub struct Operands<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub valid: Option<&'a Tensor>,
    pub out: &'a Tensor,
    pub scale: f64,
}

/// One step's attention into `o.out` by `plan` on libtorch's current stream
/// of device `ordinal`; false when that stream cannot be read (nothing ran).
pub fn run(
    kern: &Loaded,
    ordinal: usize,
    shape: DecodeShape,
    o: &Operands,
    plan: Plan,
) -> Result<bool> {
    let Some(stream) = current_stream(&kern.ctx, ordinal) else {
        return Ok(false);
    };
    let b = o.q.size()[0];
    let f32s = (Kind::Float, o.q.device());
    // One split writes the output itself: no partials.
    let (part_o, part_ml) = if plan.splits > 1 {
        (
            Some(Tensor::f_empty(
                [b, plan.splits, shape.n_q, shape.d_v],
                f32s,
            )?),
            Some(Tensor::f_empty([b, plan.splits, shape.n_q, 2], f32s)?),
        )
    } else {
        (None, None)
    };
    let done = if plan.fold {
        workspace(ordinal, &stream, b)?
    } else {
        0
    };
    let ptr = |t: &Option<Tensor>| t.as_ref().map_or(0u64, |t| t.data_ptr() as u64);
    let parts = (ptr(&part_o), ptr(&part_ml), done);
    launch(&stream, kern, shape, o, parts, plan).map_err(|e| {
        TrainError::gpu(
            "NVRTC kernel",
            format!("DiffQKV decode attention on cuda:{ordinal}"),
            e.to_string(),
        )
    })?;
    Ok(true)
}

/// The launches of one step: the split kernel, then the combine kernel
/// unless the plan has one split or folds it. `parts`: the partial
/// outputs, the partial max and sum, the counters (0 where unused).
fn launch(
    stream: &Arc<CudaStream>,
    kern: &Loaded,
    shape: DecodeShape,
    o: &Operands,
    (op, mp, done): (u64, u64, u64),
    plan: Plan,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    let ptr = |t: &Tensor| t.data_ptr() as u64;
    let (qp, kp, vp, outp) = (ptr(o.q), ptr(o.k), ptr(o.v), ptr(o.out));
    let (validp, valid_batch) = o.valid.map_or((0u64, 0i64), |m| (ptr(m), m.stride()[0]));
    let (ks, vs) = (o.k.stride(), o.v.stride());
    let (b, len) = (o.q.size()[0], o.k.size()[2]);
    let (len32, chunk32, splits32) = (len as i32, plan.chunk as i32, plan.splits as i32);
    let fold = i32::from(plan.fold);
    let scale_log2 = (o.scale * std::f64::consts::LOG2_E) as f32;
    let split_cfg = LaunchConfig {
        grid_dim: (plan.splits as u32, b as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shape.smem_bytes(plan.chunk) as u32,
    };
    // SAFETY: every pointer is a live libtorch tensor of the device whose
    // extent matches the kernel's indexing (checked by the caller and by
    // `run`, which sizes the partials by the plan and the counters by the
    // batch); the tensors outlive the launches, which run on the stream
    // that any later use of them is ordered after. The partials are read
    // only when the plan has more than one split, the counters only when
    // it folds. The parameters are in the kernels' order and types.
    unsafe {
        let mut split = params![
            qp,
            kp,
            vp,
            validp,
            ks[0],
            ks[1],
            vs[0],
            vs[1],
            valid_batch,
            op,
            mp,
            outp,
            done,
            len32,
            chunk32,
            scale_log2,
            fold
        ];
        launch_ex(stream, &kern.split, &split_cfg, &mut split, kern.pdl())?;
        if plan.launches() == 2 {
            let cfg = LaunchConfig {
                grid_dim: (shape.n_q as u32, b as u32, 1),
                block_dim: (COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 4 * splits32 as u32,
            };
            let mut combine = params![op, mp, outp, splits32];
            launch_ex(stream, &kern.combine, &cfg, &mut combine, kern.pdl())?;
        }
    }
    Ok(())
}

/// The operands of one cache append: the new token's keys `k` [b, 1,
/// n_k * d_k] and values `v` [b, 1, n_v * d_v] (contiguous), RoPE's table
/// rows `cos` and `sin` ([1, d_k] contiguous), the slot `pos` ([1] int64),
/// the caches `kc` [b, n_k, S, d_k] and `vc` [b, n_v, S, d_v] with
/// contiguous rows (checked by the caller).
pub struct Append<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub pos: &'a Tensor,
    pub kc: &'a Tensor,
    pub vc: &'a Tensor,
}

/// One append on libtorch's current stream of device `ordinal`; false
/// when that stream cannot be read (nothing ran).
pub fn append(kern: &Loaded, ordinal: usize, a: &Append) -> Result<bool> {
    let Some(stream) = current_stream(&kern.ctx, ordinal) else {
        return Ok(false);
    };
    let ptr = |t: &Tensor| t.data_ptr() as u64;
    let (ks, vs) = (a.kc.stride(), a.vc.stride());
    let cfg = LaunchConfig {
        grid_dim: (a.k.size()[0] as u32, 1, 1),
        block_dim: (COMBINE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let ps = [a.k, a.v, a.cos, a.sin, a.pos, a.kc, a.vc].map(ptr);
    // SAFETY: every pointer is a live libtorch tensor of the device with
    // the layout the kernel indexes (checked by the caller: contiguous new
    // keys and values of the shape's heads, table rows of d_k, one int64
    // slot, caches with rows d apart); the slot is below the caches'
    // length (the decoder keeps it so); the launch runs on the stream that
    // any later use of the tensors is ordered after. The parameters are in
    // the kernel's order and types.
    let [kp, vp, cp, sp, pp, kcp, vcp] = ps;
    let mut params = params![kp, vp, cp, sp, pp, kcp, vcp, ks[0], ks[1], vs[0], vs[1]];
    let r = unsafe { launch_ex(&stream, &kern.append, &cfg, &mut params, kern.pdl()) };
    r.map_err(|e| {
        TrainError::gpu(
            "NVRTC kernel",
            format!("DiffQKV decode cache append on cuda:{ordinal}"),
            e.to_string(),
        )
    })?;
    Ok(true)
}
