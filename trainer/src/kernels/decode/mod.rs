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
//!   name finds the very same library; the driver is the system's (nvrtc.rs).
//! - **Compilation.** Once per (device, shape): the shapes are macros, so
//!   every loop over heads and dimensions is unrolled; the PTX targets the
//!   device's compute capability. A compile or load failure is reported once
//!   and the tensor path is used from then on for that shape (launch.rs).
//! - **Plans.** How a step is cut into blocks and whether the combine is
//!   folded into the split kernel (plan.rs, no device), chosen per device
//!   by a timed search at first use or fixed by `SIGMA_DECODE_TUNING`
//!   (tune.rs); reference.rs is the same split-and-merge arithmetic on the
//!   CPU, for tests.
//! - **Streams.** Kernels run on libtorch's current stream of the tensors'
//!   device (a C++ shim reads it), so they are ordered with the operations
//!   around them like any libtorch kernel; scratch buffers come from
//!   libtorch's caching allocator.
#![allow(unsafe_code)] // FFI: NVRTC, the CUDA driver and the stream shim.

mod launch;
mod modules;
mod nvrtc;
pub mod plan;
pub mod reference;
mod tune;

use tch::{Device, Kind, Tensor};

use crate::error::Result;

pub use launch::{NewToken, DECODE_SOURCE};
pub(crate) use modules::load_module;
#[cfg(test)]
pub(crate) use nvrtc::skip_unless_ci;
pub use nvrtc::{compile, cuda_build, nvrtc, pdl_enabled, StreamTimer};
pub(crate) use nvrtc::{current_stream, device, launch_ex, RestoreContext};
#[cfg(test)]
pub(crate) use nvrtc::{ptx_entry, ptx_param_sizes};
pub use plan::{DecodeShape, Plan, Tuning};
pub use tune::env_tuning;

/// `SIGMA_DECODE_KERNEL`.
static DECODE_KERNEL: sigma_data::env::ProcessSwitch =
    sigma_data::env::ProcessSwitch::new(sigma_data::env::DECODE_KERNEL);

/// Whether decoding may use the kernel: on unless `SIGMA_DECODE_KERNEL=off`
/// (or [`set_decode_kernel`]`(false)`).
pub fn decode_kernel_enabled() -> bool {
    DECODE_KERNEL.get()
}

/// Turn the decode kernel on or off for this process (benchmarks compare both).
pub fn set_decode_kernel(on: bool) {
    DECODE_KERNEL.set(on);
}

/// Build now, in parallel, every kernel that decoding steps of `shape` on
/// CUDA device `ordinal` may launch ([`plan::kernels_used`]: the search's
/// candidates, or the fixed rule's kernel under `SIGMA_DECODE_TUNING`), so
/// that the first step finds them built; nothing where the kernel is off,
/// cannot take the shape, or the tuning variable is bad (the step reports
/// that). Failures are reported as at first use.
pub fn prebuild(ordinal: usize, shape: DecodeShape) {
    if !decode_kernel_enabled() || shape.unsupported().is_some() {
        return;
    }
    let Ok(fixed) = tune::env_tuning() else {
        return;
    };
    launch::prepare(ordinal, shape, &plan::kernels_used(&shape, fixed.as_ref()));
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
    let rows = tune::env_rows(shape).map_err(|e| e.to_string())?;
    launch::kernels(ordinal, shape, rows, 1).map(|_| ())
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

/// Write a decoding step's new keys (rotated by RoPE's table rows `cos`
/// and `sin`, [1, d_k]) and values into the caches at the slot that `pos`
/// ([1], int64) holds, in one launch that reads the slot on the device (a
/// CUDA graph replays it at any slot): Ok(false) where the kernel cannot
/// run (the caller then rotates and copies with tensor operations). k [b,
/// 1, n_k * d_k] and v [b, 1, n_v * d_v] as the projections give them, kc
/// [b, n_k, S, d_k] and vc [b, n_v, S, d_v]; `n_q`: the model's query
/// heads (the kernels are compiled per attention shape). The slot must be
/// below S: the kernel cannot check a device value against it (the static
/// decoding step marks the slot filled first, an `index_fill_` that
/// libtorch checks on the device).
pub fn append(
    n_q: i64,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    pos: &Tensor,
    (kc, vc): (&Tensor, &Tensor),
) -> Result<bool> {
    let Device::Cuda(ordinal) = k.device() else {
        return Ok(false);
    };
    let a = launch::Append {
        k,
        v,
        cos,
        sin,
        pos,
        kc,
        vc,
    };
    if !decode_kernel_enabled() || append_refusal(&a).is_some() {
        return Ok(false);
    }
    let shape = DecodeShape {
        n_q,
        n_k: kc.size()[1],
        n_v: vc.size()[1],
        d_k: kc.size()[3],
        d_v: vc.size()[3],
    };
    if shape.unsupported().is_some() {
        return Ok(false);
    }
    let _restore = RestoreContext::save();
    let Ok(kern) = launch::kernels(ordinal, shape, tune::env_rows(shape)?, 1) else {
        return Ok(false);
    };
    launch::append(&kern, ordinal, &a)
}

/// Why [`append`]'s kernel cannot take these operands (None: it can).
fn append_refusal(a: &launch::Append) -> Option<String> {
    let (kc, vc) = (a.kc, a.vc);
    let token = NewToken {
        k: a.k,
        v: a.v,
        pos: a.pos,
    };
    token_refusal(&token, (a.cos, a.sin), (kc, vc))
}

/// Why a new token cannot be written into caches `kc` and `vc` (`[b,
/// heads, slots, d]`, rows contiguous) with RoPE rows `cos` and `sin` by
/// the append kernel or the split kernel's folded append (None: it can).
fn token_refusal(
    t: &NewToken,
    (cos, sin): (&Tensor, &Tensor),
    (kc, vc): (&Tensor, &Tensor),
) -> Option<String> {
    let (k, v, pos) = (t.k, t.v, t.pos);
    let dev = k.device();
    let all = [k, v, cos, sin, pos, kc, vc];
    if !dev.is_cuda() || all.iter().any(|t| t.device() != dev) {
        return Some("not on one CUDA device".into());
    }
    if [k, v, cos, sin, kc, vc]
        .iter()
        .any(|t| t.kind() != Kind::BFloat16)
        || pos.kind() != Kind::Int64
    {
        return Some("not bf16 (or the slot not int64)".into());
    }
    if kc.dim() != 4 || vc.dim() != 4 || pos.numel() != 1 {
        return Some("caches not [b, heads, slots, d] or more than one slot".into());
    }
    let (b, nk, dk) = (kc.size()[0], kc.size()[1], kc.size()[3]);
    let (nv, dv) = (vc.size()[1], vc.size()[3]);
    let rows = |t: &Tensor, d: i64| t.stride()[3] == 1 && t.stride()[2] == d;
    let dense = |t: &Tensor, n: i64| t.is_contiguous() && t.numel() as i64 == n;
    if vc.size()[0] != b || !rows(kc, dk) || !rows(vc, dv) || dk % 2 != 0 {
        return Some("cache rows not contiguous, or the batches differ".into());
    }
    if !dense(k, b * nk * dk) || !dense(v, b * nv * dv) || !dense(cos, dk) || !dense(sin, dk) {
        return Some("new keys, values or table rows not contiguous of the caches' shape".into());
    }
    None
}

/// DiffQKV decode attention by the kernel: Ok(None) where it cannot run
/// (CPU, not bf16, a shape or layout it does not take, NVRTC missing,
/// `SIGMA_DECODE_KERNEL=off`); the caller then uses tensor operations. A
/// malformed `SIGMA_DECODE_TUNING` is an error. The plan comes from tune.rs
/// (searched at the first step of each device, shape, batch and context
/// bucket). Same contract as [`crate::infer::generate::decode_attention`]:
/// -> [b, 1, n_q * d_v].
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    valid: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    step((q, None), k, v, valid, scale, None, None)
}

/// `SIGMA_DECODE_ROPE`.
static ROPE: sigma_data::env::ProcessSwitch =
    sigma_data::env::ProcessSwitch::new(sigma_data::env::DECODE_ROPE);

/// Whether a decoding step leaves its new token's cache write to the
/// attention kernel ([`decode_attention_rotated`] with a [`NewToken`]):
/// only with `SIGMA_DECODE_FOLD_APPEND=on` (off by default until it has
/// been checked and timed on a GPU: docs/inference.md), and only where
/// the kernel is on. The generator asks; the kernel folds whatever
/// token it is given.
pub fn fold_append_enabled() -> bool {
    FOLD_APPEND.get() && decode_kernel_enabled()
}

/// Steps whose new token the attention kernel wrote (the folded append)
/// so far in this process, counted at launch from the host (a CUDA graph's
/// replays launch nothing from the host: a recorded launch counts once).
/// `sigma generate --timing` reports it, so a check can tell that it ran.
pub fn folded_appends() -> u64 {
    FOLDED.load(std::sync::atomic::Ordering::Relaxed)
}

static FOLDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Turn the folded append on or off for this process (benchmarks and tests compare both).
pub fn set_fold_append(on: bool) {
    FOLD_APPEND.set(on);
}

/// `SIGMA_DECODE_FOLD_APPEND`.
static FOLD_APPEND: sigma_data::env::ProcessSwitch =
    sigma_data::env::ProcessSwitch::off_by_default(sigma_data::env::DECODE_FOLD_APPEND);

/// [`decode_attention`] of a query not yet rotated by RoPE: the kernel
/// rotates it by the table rows `rows` (cos and sin, d_k each, bf16,
/// contiguous: one position for every sequence, as a decoding step's),
/// in the training RoPE kernel's arithmetic (fp32, then rounded to bf16),
/// so the result is that of rotating first by that kernel (callers use it
/// where the model would: `kernels::training::rope_kernel_runs`). By the
/// tuned plan, or by `plan` (checked as [`decode_attention_by`] checks
/// it). Ok(None) where the kernel cannot take it (as [`decode_attention`],
/// or rows of another shape, or `SIGMA_DECODE_ROPE=off`): the caller then
/// rotates q itself.
///
/// With `new`, the step's new token (keys as projected, values, the slot,
/// below k's length) is written into k and v (the cache, rotated by the
/// same rows) by the split kernel's block whose chunk holds the slot,
/// before it reads it: the same bits as [`append`] before the call, and one
/// launch less. Ok(None) also where that write cannot be folded (operands
/// [`append`] would refuse): then the caller writes the token itself
/// before it attends (the same bits again where a search had already run
/// the kernel with it before giving up, so no harm).
pub fn decode_attention_rotated(
    q: &Tensor,
    rows: (&Tensor, &Tensor),
    (k, v): (&Tensor, &Tensor),
    valid: Option<&Tensor>,
    scale: f64,
    plan: Option<Plan>,
    new: Option<NewToken>,
) -> Result<Option<Tensor>> {
    let dev = q.device();
    let row_ok = |t: &Tensor| {
        t.device() == dev
            && t.kind() == Kind::BFloat16
            && t.is_contiguous()
            && t.numel() as i64 == q.size().last().copied().unwrap_or(0)
    };
    if !ROPE.get() || !row_ok(rows.0) || !row_ok(rows.1) {
        return Ok(None);
    }
    if let Some(t) = &new {
        if token_refusal(t, rows, (k, v)).is_some() {
            return Ok(None);
        }
    }
    if let Some(p) = plan {
        checked_plan(q, k, v, p)?;
    }
    step((q, Some(rows)), k, v, valid, scale, plan, new)
}

/// [`decode_attention`] by a given plan instead of the tuned one (for
/// checks that must run every kind of plan); a plan that does not cover
/// the context exactly or does not fit the kernel is an error.
pub fn decode_attention_by(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    valid: Option<&Tensor>,
    scale: f64,
    plan: Plan,
) -> Result<Option<Tensor>> {
    checked_plan(q, k, v, plan)?;
    step((q, None), k, v, valid, scale, Some(plan), None)
}

/// A given plan must cover the context exactly and fit the kernel.
fn checked_plan(q: &Tensor, k: &Tensor, v: &Tensor, plan: Plan) -> Result<()> {
    let len = k.size()[2];
    let shape = shape_of(q, k, v);
    let chunk_ok = shape.takes_groups(plan.groups)
        && plan.chunk > 0
        && plan.chunk % 32 == 0
        && shape.grouped(plan.groups).fits(plan.chunk, plan.rows.local);
    let rows_ok = [plan.rows.uk, plan.rows.uv]
        .iter()
        .all(|r| (1..=16).contains(r));
    if !chunk_ok
        || !rows_ok
        || plan != Plan::grouped(plan.chunk, len, plan.fold, plan.groups).with_rows(plan.rows)
        || plan.splits > plan::MAX_SPLITS
    {
        return Err(crate::error::TrainError::Invariant {
            what: format!("decode plan {plan:?} for {len} slots of {shape:?}"),
        });
    }
    Ok(())
}

/// One step by the kernel: q with or without RoPE's rows to rotate it by,
/// and with the new token to write first where given (checked by the caller).
fn step(
    (q, rope): (&Tensor, Option<(&Tensor, &Tensor)>),
    k: &Tensor,
    v: &Tensor,
    valid: Option<&Tensor>,
    scale: f64,
    given: Option<Plan>,
    new: Option<NewToken>,
) -> Result<Option<Tensor>> {
    let Ok((shape, ordinal)) = check(q, k, v, valid) else {
        return Ok(None);
    };
    let _restore = RestoreContext::save();
    let rows = tune::env_rows(shape)?;
    let Ok(kern) = launch::kernels(ordinal, shape, rows, 1) else {
        return Ok(None);
    };
    let (b, len) = (q.size()[0], k.size()[2]);
    let q = q.contiguous();
    let out = Tensor::f_empty([b, 1, shape.n_q * shape.d_v], (Kind::BFloat16, q.device()))?;
    let o = launch::Operands {
        q: &q,
        rope,
        k,
        v,
        valid,
        out: &out,
        scale,
        new,
    };
    let (plan, written) = match given {
        Some(p) => (p, false),
        None => tune::plan_for(&kern, ordinal, shape, &o)?,
    };
    if plan.splits > plan::MAX_SPLITS {
        return Ok(None);
    }
    // The plan may be by another compiled kernel (its rows, form and
    // groups); where that one does not compile (a remembered choice), the
    // same split by this one where its chunk fits this one's block, or
    // else (a plan in groups, whose chunk may not fit one block of all
    // heads) the fixed rule's plan in one group.
    let (kern, plan) = match launch::kernels(ordinal, shape, plan.rows, plan.groups) {
        Ok(k) => (k, plan),
        Err(_) if plan.groups == 1 && shape.fits(plan.chunk, rows.local) => {
            (kern, plan.with_rows(rows))
        }
        Err(_) => {
            let t = tune::env_tuning()?.unwrap_or(Tuning::DEFAULT);
            let one = shape.plan(b, len, kern.sms, &Tuning { groups: 1, ..t });
            (kern, one)
        }
    };
    if written || launch::run(&kern, ordinal, shape, &o, plan)? {
        if o.new.is_some() {
            FOLDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Some(out))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_plan_must_cover_the_context_and_name_a_kernel_the_search_could_compile() {
        let z = |n: i64, len: i64| Tensor::zeros([1, n, len, 64], (Kind::Float, tch::Device::Cpu));
        let (q, k, v) = (z(32, 1), z(4, 1000), z(16, 1000));
        let ok = Plan::new(128, 1000, false);
        assert!(checked_plan(&q, &k, &v, ok).is_ok());
        assert!(checked_plan(&q, &k, &v, ok.with_rows(plan::Rows::DEEP)).is_ok());
        // A chunk of 1,024 fits a block of a quarter of the heads, not of all.
        let grouped = Plan::grouped(1024, 1000, true, 4);
        assert!(checked_plan(&q, &k, &v, grouped).is_ok());
        for bad in [
            ok.with_rows(plan::Rows {
                uk: 0,
                ..plan::Rows::DEFAULT
            }),
            ok.with_rows(plan::Rows {
                uv: 17,
                ..plan::Rows::DEFAULT
            }),
            Plan { splits: 7, ..ok },
            Plan::new(100, 1000, false),
            Plan {
                groups: 1,
                ..grouped
            },
            Plan { groups: 8, ..ok },
            Plan { groups: 3, ..ok },
            // Folding 32 splits is offered in 2 groups or more, not in one.
            Plan {
                fold: true,
                ..Plan::new(32, 1000, false)
            },
        ] {
            let e = checked_plan(&q, &k, &v, bad).unwrap_err().to_string();
            assert!(e.contains("decode plan") && e.contains("1000 slots"), "{e}");
        }
    }

    /// The kernel source compiles (NVRTC, for Hopper and Ampere) for every
    /// kind of shape sigma produces: SIGMA's 32/4/16, one K head (AugQ),
    /// n_k > n_v, compressed K dimensions, GQA-like equal heads, large
    /// groups; by every rows and form the search tries (the warp-local
    /// form where the shape takes it; where its head counts do not suit
    /// that form, its compile fails with the reason) and the largest rows
    /// the override takes, and (on Hopper) in every head groups the shape
    /// takes beyond one, by the default rows in both forms. Both kernels (the split kernel, which also writes
    /// the output of one split and merges the folded combine, and the
    /// combine kernel) are in the PTX, and the folded merge's counter
    /// (an atomic add) with them. Needs a CUDA build of libtorch (NVRTC
    /// beside its runtime), no GPU.
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
            (32, 16, 16, 64, 64),
            (64, 4, 2, 64, 64),
            (8, 2, 4, 8, 8),
            (8, 2, 4, 256, 256),
            (12, 3, 6, 64, 64),
        ];
        for (i, (n_q, n_k, n_v, d_k, d_v)) in shapes.into_iter().enumerate() {
            let s = DecodeShape {
                n_q,
                n_k,
                n_v,
                d_k,
                d_v,
            };
            assert_eq!(s.unsupported(), None, "{s:?}");
            // Every rows the search tries; the most the override allows once.
            let mut rows: Vec<plan::Rows> = plan::ROWS
                .into_iter()
                .filter(|r| !r.local || s.takes_local())
                .collect();
            if i == 0 {
                rows.push(plan::Rows {
                    uk: 16,
                    uv: 16,
                    local: false,
                });
            }
            let mut builds: Vec<(i32, plan::Rows, i64)> = [90, 80]
                .into_iter()
                .flat_map(|a| rows.iter().map(move |r| (a, *r, 1)))
                .collect();
            for g in s.groups().into_iter().skip(1) {
                builds.push((90, plan::Rows::DEFAULT, g));
                if s.grouped(g).takes_local() {
                    builds.push((90, plan::Rows::LOCAL, g));
                }
            }
            // The warp-local form refuses, at compile time, a shape it cannot take.
            if !s.takes_local() {
                let err = compile(
                    DECODE_SOURCE,
                    &s.defines(launch::THREADS, plan::Rows::LOCAL, 1),
                    90,
                )
                .expect_err("the warp-local form compiled for a shape it cannot take");
                assert!(err.contains("warp-local form needs"), "{s:?}: {err}");
            }
            for (arch, rows, groups) in builds {
                let ptx = compile(
                    DECODE_SOURCE,
                    &s.defines(launch::THREADS, rows, groups),
                    arch,
                )
                .unwrap_or_else(|e| panic!("{s:?} sm_{arch} in {groups} groups: {e}"));
                assert!(ptx.contains(".entry diffqkv_decode_split"), "{s:?}");
                assert!(ptx.contains(".entry diffqkv_decode_combine"), "{s:?}");
                assert!(ptx.contains(".entry diffqkv_decode_append"), "{s:?}");
                assert!(ptx.contains("atom.global.add.u32"), "{s:?}: no counter");
                // Dependent launch on Hopper: each of the three kernels waits.
                let waits = ptx.matches("griddepcontrol.wait").count();
                assert_eq!(waits, if arch >= 90 { 3 } else { 0 }, "{s:?} sm_{arch}");
                assert!(
                    ptx.contains("ld.global.cg.f32"),
                    "{s:?}: no L2 read of partials"
                );
                // The split kernel asks L2 for its chunk before it waits.
                let split = ptx_entry(&ptx, "diffqkv_decode_split").expect("the split kernel");
                let prefetch = split.find("prefetch.global.L2").expect("no L2 prefetch");
                if let Some(wait) = split.find("griddepcontrol.wait") {
                    assert!(prefetch < wait, "{s:?}: the prefetch after the wait");
                }
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
