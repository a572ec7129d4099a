//! The decode kernels of one shape on one device (compiled by NVRTC on
//! first use per rows loaded ahead and head groups, a failure remembered)
//! and the launches of one step by a
//! [`Plan`]: the split kernel alone (one split, or the combine folded into
//! it) or followed by the combine kernel. The folded combine counts each
//! sequence's finished blocks in a workspace of `u32` counters kept per
//! device and stream: zeroed once when it is made (or grown), after which
//! the last block of each sequence sets its counter back to zero, so no
//! step needs a memset. Two launches on one stream never overlap, so a
//! stream's counters serve one launch at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::kernels::built::Built;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};
use tch::{Kind, Tensor};

use super::modules::load_module;
use super::nvrtc::{arg_pointers, current_stream, device, launch_ex, Arg};
use super::plan::{prefetches, DecodeShape, Plan, Rows, GROUPS, MAX_SMEM, SPLIT_WARPS};
use crate::error::{Result, TrainError};

/// The decode attention source, compiled with the shape macros of [`DecodeShape::defines`].
pub const DECODE_SOURCE: &str = include_str!("../../../csrc/decode_attention.cu");
/// Threads per block of the split kernel.
pub const THREADS: u32 = 32 * SPLIT_WARPS as u32;
/// Threads per block of the combine and append kernels (the source's COMBINE_THREADS).
pub(crate) const COMBINE_THREADS: u32 = 256;

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
    /// The device's L2 cache in bytes.
    pub l2_bytes: i64,
}

impl Loaded {
    /// Whether to launch with programmatic dependent launch.
    fn pdl(&self) -> bool {
        self.hopper && super::nvrtc::pdl_enabled()
    }

    /// Whether the split kernel asks L2 for its chunk of the cache before
    /// it waits ([`prefetches`]).
    fn prefetch(&self, shape: DecodeShape, batch: i64, len: i64) -> bool {
        prefetches(
            prefetch_allowed(),
            shape.cache_bytes(batch, len),
            self.l2_bytes,
        )
    }
}

/// `SIGMA_DECODE_PREFETCH` (on unless set off): whether any launch may prefetch.
pub fn prefetch_allowed() -> bool {
    PREFETCH.get()
}

static PREFETCH: sigma_data::env::ProcessSwitch =
    sigma_data::env::ProcessSwitch::new(sigma_data::env::DECODE_PREFETCH);

/// What one compiled module is for: the device, the shape, the rows
/// loaded ahead, the head groups.
type Key = (usize, DecodeShape, Rows, i64);

/// Every decode module built by this process (failures included).
static BUILT: Built<Key, Loaded> = Built::new(|&(o, s, rows, groups), e| {
    eprintln!(
        "warning: the DiffQKV decode kernel{} loading {}/{} rows ahead in {groups} head groups does not compile for {s:?} on cuda:{o} (its plans are not used; where no kernel compiles, tensor operations run): {e}",
        if rows.local { " (warp-local)" } else { "" },
        rows.uk,
        rows.uv
    )
});

fn load(
    ordinal: usize,
    shape: DecodeShape,
    rows: Rows,
    groups: i64,
) -> std::result::Result<Arc<Loaded>, String> {
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e}");
    let (ctx, arch, sms) = device(ordinal)?;
    let module = load_module(
        &ctx,
        DECODE_SOURCE,
        &shape.defines(THREADS, rows, groups),
        arch,
    )?;
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
    let l2 = cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE;
    let l2_bytes = ctx.attribute(l2).map_err(drv)? as i64;
    Ok(Arc::new(Loaded {
        ctx,
        split,
        combine,
        append,
        sms,
        device_name,
        hopper: arch >= 90,
        l2_bytes,
    }))
}

/// The kernels for `shape` on CUDA device `ordinal` (with `rows` loaded
/// ahead, the heads in `groups` groups: [`DecodeShape::takes_groups`]),
/// compiled on first use (or waited for where another thread is compiling
/// them); a failure is printed once and remembered.
pub fn kernels(
    ordinal: usize,
    shape: DecodeShape,
    rows: Rows,
    groups: i64,
) -> std::result::Result<Arc<Loaded>, String> {
    BUILT.get(&(ordinal, shape, rows, groups), || {
        load(ordinal, shape, rows, groups)
    })
}

/// Build the kernels of `shape` on device `ordinal` for every (rows, head
/// groups) in `wanted` that is not built yet, in parallel threads (at
/// most one a core): a search's candidates, which one after another took
/// most of a first search's time, or the modules a generation will use
/// ([`crate::infer::prebuild`]). Results and failures are those
/// [`kernels`] then returns.
pub fn prepare(ordinal: usize, shape: DecodeShape, wanted: &[(Rows, i64)]) {
    let mut keys: Vec<Key> = Vec::with_capacity(wanted.len());
    for &(rows, groups) in wanted {
        let k = (ordinal, shape, rows, groups);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    BUILT.build_all(&keys, |&(o, s, r, g)| load(o, s, r, g));
}

/// The counters of the folded combine for `batch` sequences on `stream`
/// of device `ordinal`, one per sequence and head group for the most
/// groups any plan takes (so that another bucket's plan in more groups
/// finds them in place: a graph recorded earlier keeps their address):
/// made zero (libtorch's fill, on the same stream) the first time and
/// whenever a larger batch needs more, then kept.
fn workspace(ordinal: usize, stream: &CudaStream, batch: i64) -> Result<u64> {
    let counters = batch * GROUPS[GROUPS.len() - 1];
    type Spaces = Mutex<HashMap<(usize, usize), Tensor>>;
    static SPACES: OnceLock<Spaces> = OnceLock::new();
    let mut spaces = SPACES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (ordinal, stream.cu_stream() as usize);
    if let Some(t) = spaces.get(&key).filter(|t| t.size()[0] >= counters) {
        return Ok(t.data_ptr() as u64);
    }
    let n = (counters.max(64) as u64).next_power_of_two() as i64;
    let t = Tensor::f_zeros([n], (Kind::Int, tch::Device::Cuda(ordinal)))?;
    let p = t.data_ptr() as u64;
    spaces.insert(key, t);
    Ok(p)
}

/// The operands of one step: q [b, n_q, 1, d_k] contiguous, k [b, n_k, S,
/// d_k] and v [b, n_v, S, d_v] with contiguous 16-byte aligned rows, valid
/// [b, >=S] bool or None, out [b, 1, n_q * d_v] bf16; `rope`: RoPE's
/// table rows (cos, sin), [d_k] each contiguous, to rotate q by in the
/// kernel, or None where q comes rotated; `new`: the step's new token, for
/// the split kernel to write into k and v before it reads them (with
/// `rope`; checked by the caller).
pub struct Operands<'a> {
    pub q: &'a Tensor,
    pub rope: Option<(&'a Tensor, &'a Tensor)>,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub valid: Option<&'a Tensor>,
    pub out: &'a Tensor,
    pub scale: f64,
    pub new: Option<NewToken<'a>>,
}

/// A decoding step's new token, written into the cache by the split
/// kernel's block whose chunk holds its slot (the folded append): keys `k`
/// [b, 1, n_k * d_k] as projected (the kernel rotates them by the step's
/// RoPE rows) and values `v` [b, 1, n_v * d_v], contiguous, and the slot
/// `pos` ([1], int64, below the context the step reads).
#[derive(Clone, Copy)]
pub struct NewToken<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub pos: &'a Tensor,
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
    match Ready::new(kern, ordinal, shape, o, plan)? {
        Some(r) => r.launch().map(|()| true),
        None => Ok(false),
    }
}

/// A plan's launches made ready on libtorch's current stream: the partial
/// results allocated (libtorch's allocator, on that stream) and the
/// counters found, so that [`Ready::launch`] only launches. The search
/// launches a candidate several times back to back this way, so its
/// timing is the device's, not the host's.
pub struct Ready<'a> {
    kern: &'a Loaded,
    ordinal: usize,
    shape: DecodeShape,
    o: &'a Operands<'a>,
    plan: Plan,
    stream: Arc<CudaStream>,
    /// The partial outputs and their max and sum (kept alive), and their
    /// pointers with the counters' (0 where unused).
    _partials: (Option<Tensor>, Option<Tensor>),
    parts: (u64, u64, u64),
}

impl<'a> Ready<'a> {
    /// None when libtorch's current stream cannot be read.
    pub fn new(
        kern: &'a Loaded,
        ordinal: usize,
        shape: DecodeShape,
        o: &'a Operands<'a>,
        plan: Plan,
    ) -> Result<Option<Ready<'a>>> {
        let Some(stream) = current_stream(&kern.ctx, ordinal) else {
            return Ok(None);
        };
        // Each head group is a sequence of its own to the partials and counters.
        let (seqs, heads) = (o.q.size()[0] * plan.groups, shape.n_q / plan.groups);
        let f32s = (Kind::Float, o.q.device());
        // One split writes the output itself: no partials.
        let (part_o, part_ml) = if plan.splits > 1 {
            (
                Some(Tensor::f_empty(
                    [seqs, plan.splits, heads, shape.d_v],
                    f32s,
                )?),
                Some(Tensor::f_empty([seqs, plan.splits, heads, 2], f32s)?),
            )
        } else {
            (None, None)
        };
        let done = if plan.fold {
            workspace(ordinal, &stream, o.q.size()[0])?
        } else {
            0
        };
        let ptr = |t: &Option<Tensor>| t.as_ref().map_or(0u64, |t| t.data_ptr() as u64);
        let parts = (ptr(&part_o), ptr(&part_ml), done);
        Ok(Some(Ready {
            kern,
            ordinal,
            shape,
            o,
            plan,
            stream,
            _partials: (part_o, part_ml),
            parts,
        }))
    }

    /// The step's launches (each use rewrites `o.out` and the partials).
    pub fn launch(&self) -> Result<()> {
        launch(
            &self.stream,
            self.kern,
            self.shape,
            self.o,
            self.parts,
            self.plan,
        )
        .map_err(|e| {
            TrainError::gpu(
                "NVRTC kernel",
                format!("DiffQKV decode attention on cuda:{}", self.ordinal),
                e.to_string(),
            )
        })
    }
}

/// The split kernel's arguments, in csrc/decode_attention.cu's order:
/// `parts` are the partial outputs, the partial max and sum and the
/// counters (0 where unused).
fn split_args(
    o: &Operands,
    (op, mp, done): (u64, u64, u64),
    plan: Plan,
    prefetch: bool,
) -> Vec<Arg> {
    let ptr = |t: &Tensor| Arg::Ptr(t.data_ptr() as u64);
    let null = Arg::Ptr(0);
    let (valid, valid_batch) = o.valid.map_or((null, 0), |m| (ptr(m), m.stride()[0]));
    let (cs, sn) = o.rope.map_or((null, null), |(c, s)| (ptr(c), ptr(s)));
    let (kn, vn, pos) = o
        .new
        .map_or((null, null, null), |t| (ptr(t.k), ptr(t.v), ptr(t.pos)));
    let (ks, vs) = (o.k.stride(), o.v.stride());
    let scale_log2 = (o.scale * std::f64::consts::LOG2_E) as f32;
    vec![
        ptr(o.q),
        ptr(o.k),
        ptr(o.v),
        valid,
        Arg::I64(ks[0]),
        Arg::I64(ks[1]),
        Arg::I64(vs[0]),
        Arg::I64(vs[1]),
        Arg::I64(valid_batch),
        Arg::Ptr(op),
        Arg::Ptr(mp),
        ptr(o.out),
        Arg::Ptr(done),
        cs,
        sn,
        Arg::I32(o.k.size()[2] as i32),
        Arg::I32(plan.chunk as i32),
        Arg::F32(scale_log2),
        Arg::I32(i32::from(plan.fold)),
        Arg::I32(i32::from(prefetch)),
        kn,
        vn,
        pos,
    ]
}

/// The combine kernel's arguments: the partial outputs, the partial max
/// and sum, the output, the splits.
fn combine_args(o: &Operands, (op, mp): (u64, u64), plan: Plan) -> Vec<Arg> {
    let out = Arg::Ptr(o.out.data_ptr() as u64);
    vec![
        Arg::Ptr(op),
        Arg::Ptr(mp),
        out,
        Arg::I32(plan.splits as i32),
    ]
}

/// The launches of one step: the split kernel, then the combine kernel
/// unless the plan has one split or folds it, each with a block per head
/// group in the grid's third dimension (`kern` is compiled for the plan's
/// groups). `parts`: the partial outputs, the partial max and sum, the
/// counters (0 where unused).
fn launch(
    stream: &Arc<CudaStream>,
    kern: &Loaded,
    shape: DecodeShape,
    o: &Operands,
    parts: (u64, u64, u64),
    plan: Plan,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    let b = o.q.size()[0];
    let prefetch = kern.prefetch(shape, b, o.k.size()[2]);
    let mut split = split_args(o, parts, plan, prefetch);
    let groups = plan.groups as u32;
    let split_cfg = LaunchConfig {
        grid_dim: (plan.splits as u32, b as u32, groups),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shape
            .grouped(plan.groups)
            .smem_bytes(plan.chunk, plan.rows.local) as u32,
    };
    // SAFETY: every pointer is a live libtorch tensor of the device whose
    // extent matches the kernel's indexing (checked by the caller and by
    // `run`, which sizes the partials by the plan and the counters by the
    // batch); the tensors outlive the launches, which run on the stream
    // that any later use of them is ordered after. The partials are read
    // only when the plan has more than one split, the counters only when
    // it folds, the RoPE rows (d_k each) only when given, the new token
    // ([b, n_k * d_k] and [b, n_v * d_v] contiguous, its slot one int64
    // below the length, checked by `token_refusal` and the decoder) only
    // with the RoPE rows, and written only at that slot; the grid's third
    // dimension is the groups the kernel is compiled for. The arguments
    // are in the kernels' order and types (a test holds them to the PTX).
    unsafe {
        let mut ps = arg_pointers(&mut split);
        launch_ex(stream, &kern.split, &split_cfg, &mut ps, kern.pdl())?;
        if plan.launches() == 2 {
            let cfg = LaunchConfig {
                grid_dim: ((shape.n_q / plan.groups) as u32, b as u32, groups),
                block_dim: (COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut combine = combine_args(o, (parts.0, parts.1), plan);
            let mut ps = arg_pointers(&mut combine);
            launch_ex(stream, &kern.combine, &cfg, &mut ps, kern.pdl())?;
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

/// The append kernel's arguments, in its order.
fn append_args(a: &Append) -> Vec<Arg> {
    let ptr = |t: &Tensor| Arg::Ptr(t.data_ptr() as u64);
    let (ks, vs) = (a.kc.stride(), a.vc.stride());
    let mut args: Vec<Arg> = [a.k, a.v, a.cos, a.sin, a.pos, a.kc, a.vc]
        .map(ptr)
        .to_vec();
    args.extend([ks[0], ks[1], vs[0], vs[1]].map(Arg::I64));
    args
}

/// One append on libtorch's current stream of device `ordinal`; false
/// when that stream cannot be read (nothing ran).
pub fn append(kern: &Loaded, ordinal: usize, a: &Append) -> Result<bool> {
    let Some(stream) = current_stream(&kern.ctx, ordinal) else {
        return Ok(false);
    };
    let cfg = LaunchConfig {
        grid_dim: (a.k.size()[0] as u32, 1, 1),
        block_dim: (COMBINE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = append_args(a);
    // SAFETY: every pointer is a live libtorch tensor of the device with
    // the layout the kernel indexes (checked by the caller: contiguous new
    // keys and values of the shape's heads, table rows of d_k, one int64
    // slot, caches with rows d apart); the slot is below the caches'
    // length (the decoder keeps it so); the launch runs on the stream that
    // any later use of the tensors is ordered after. The arguments are in
    // the kernel's order and types (a test holds them to the PTX).
    let mut ps = arg_pointers(&mut args);
    let r = unsafe { launch_ex(&stream, &kern.append, &cfg, &mut ps, kern.pdl()) };
    r.map_err(|e| {
        TrainError::gpu(
            "NVRTC kernel",
            format!("DiffQKV decode cache append on cuda:{ordinal}"),
            e.to_string(),
        )
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::decode::{compile, cuda_build, ptx_param_sizes, skip_unless_ci};

    /// NVRTC compiles a search's kernels in parallel threads to the same
    /// machine code (sm_90, what a device loads), byte for byte, as one
    /// after another: every rows and head groups of SIGMA-1.5B's shape
    /// that the search builds.
    #[test]
    fn kernels_compiled_in_parallel_equal_those_compiled_in_turn() {
        if !cuda_build() {
            skip_unless_ci("libtorch is not a CUDA build (no NVRTC beside it)");
            return;
        }
        use super::super::nvrtc::{full_source, options, run_nvrtc};
        let shape = super::super::plan::tests::sigma_1_5b();
        let mut builds: Vec<(Rows, i64)> = super::super::plan::candidates(&shape, 4096)
            .iter()
            .map(|p| (p.rows, p.groups))
            .collect();
        builds.sort_by_key(|&(r, g)| (r.uk, r.uv, r.local, g));
        builds.dedup();
        assert!(builds.len() >= 4, "{builds:?}");
        let text = full_source(DECODE_SOURCE);
        let build = |&(r, g): &(Rows, i64)| {
            run_nvrtc(
                &text,
                &options(&shape.defines(THREADS, r, g), "sm_90"),
                true,
            )
        };
        let parallel: Vec<_> = {
            use rayon::prelude::*;
            builds.par_iter().map(build).collect()
        };
        for (b, p) in builds.iter().zip(parallel) {
            let p = p.unwrap_or_else(|e| panic!("{b:?}: {e}"));
            assert!(p.starts_with(b"\x7fELF"), "{b:?}: not an ELF image");
            assert_eq!(p, build(b).expect("compiles"), "{b:?}");
        }
    }

    /// The arguments each launch passes have the sizes of its kernel's
    /// parameters, in order (the PTX's `.param` list): a mismatch would be
    /// read as garbage on the GPU, with no error. With and without the
    /// optional operands (mask, RoPE rows, partials, the new token), which change values,
    /// never the list.
    #[test]
    fn the_arguments_match_every_kernels_parameters() {
        if !cuda_build() {
            skip_unless_ci("libtorch is not a CUDA build (no NVRTC beside it)");
            return;
        }
        let shape = super::super::plan::tests::sigma_1_5b();
        let t = Rows::DEFAULT;
        let ptx = compile(DECODE_SOURCE, &shape.defines(THREADS, t, 4), 90).expect("compiles");
        let sizes = |name: &str| ptx_param_sizes(&ptx, name).expect("the kernel");
        let of = |args: &[Arg]| args.iter().map(Arg::size).collect::<Vec<_>>();
        let bf = |s: &[i64]| Tensor::zeros(s, (Kind::BFloat16, tch::Device::Cpu));
        let (q, k, v, out) = (
            bf(&[2, 32, 1, 64]),
            bf(&[2, 4, 9, 64]),
            bf(&[2, 16, 9, 64]),
            bf(&[2, 1, 2048]),
        );
        let valid = Tensor::ones([2, 9], (Kind::Bool, tch::Device::Cpu));
        let (cos, sin) = (bf(&[1, 64]), bf(&[1, 64]));
        let plan = Plan::new(32, 9, true);
        let pos = Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu));
        let (k_new, v_new) = (bf(&[2, 1, 256]), bf(&[2, 1, 1024]));
        let token = NewToken {
            k: &k_new,
            v: &v_new,
            pos: &pos,
        };
        for (m, rope, new) in [
            (None, None, None),
            (Some(&valid), Some((&cos, &sin)), None),
            (Some(&valid), Some((&cos, &sin)), Some(token)),
        ] {
            let o = Operands {
                q: &q,
                rope,
                k: &k,
                v: &v,
                valid: m,
                out: &out,
                scale: 0.125,
                new,
            };
            for prefetch in [false, true] {
                let args = split_args(&o, (1, 2, 3), plan, prefetch);
                assert_eq!(of(&args), sizes("diffqkv_decode_split"));
            }
            assert_eq!(
                of(&combine_args(&o, (1, 2), plan)),
                sizes("diffqkv_decode_combine")
            );
        }
        let a = Append {
            k: &k_new,
            v: &v_new,
            cos: &cos,
            sin: &sin,
            pos: &pos,
            kc: &k,
            vc: &v,
        };
        assert_eq!(of(&append_args(&a)), sizes("diffqkv_decode_append"));
    }
}
