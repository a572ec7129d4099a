//! The FP8 weight gradient added into the fp32 gradient buffer by the GEMM
//! itself: one cuBLASLt matmul `main = (gy^T x) * (s_gy * s_x) + main`
//! (beta = 1), where `_scaled_mm` writes the product to a new fp32 tensor
//! that a second pass then adds into `main` (docs/precision.md).
//!
//! csrc/fp8_linear.cpp asks for it through the training kernels' launcher
//! (operation 13, `kernels::training`); it checks the first result against
//! `_scaled_mm` and the add, and keeps to those wherever this fails. The
//! library is libtorch's own cuBLASLt (the file its CUDA build loaded),
//! opened by path: no other copy, and nothing on a CPU-only build.
//!
//! Operands (cuBLASLt's column-major terms; FP8 GEMMs on Hopper need the
//! "TN" form, both operands with the contraction contiguous):
//! - A = x^T as the forward kept it, [K, M] row-major e4m3, read transposed:
//!   k = M tokens, m = K inputs;
//! - B = gy^T, [N, M] row-major (e4m3 or e5m2): n = N outputs;
//! - C = D = main [N, K] row-major fp32, i.e. column-major m x n with ld K.
#![allow(unsafe_code)] // FFI: cuBLASLt through function pointers.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

type Opaque = *mut c_void;

/// cublasLtMatmulAlgo_t.
#[repr(C)]
#[derive(Clone, Copy)]
struct Algo {
    data: [u64; 8],
}

/// cublasLtMatmulHeuristicResult_t.
#[repr(C)]
struct Heuristic {
    algo: Algo,
    workspace_size: usize,
    state: i32,
    waves: f32,
    reserved: [i32; 4],
}

// cuBLAS's and CUDA's enumerations (cublasLt.h, library_types.h).
const COMPUTE_32F: i32 = 68;
const R_32F: i32 = 0;
const R_8F_E4M3: i32 = 28;
const R_8F_E5M2: i32 = 29;
const DESC_TRANSA: i32 = 3;
const DESC_TRANSB: i32 = 4;
const DESC_A_SCALE_POINTER: i32 = 17;
const DESC_B_SCALE_POINTER: i32 = 18;
const OP_N: i32 = 0;
const OP_T: i32 = 1;
const PREF_MAX_WORKSPACE_BYTES: i32 = 1;
/// CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES: 5, 6, 7, 8.
const PREF_MIN_ALIGNMENT_A_BYTES: i32 = 5;

type SetAttr = unsafe extern "C" fn(Opaque, i32, *const c_void, usize) -> i32;
type Heur = unsafe extern "C" fn(
    Opaque,
    Opaque,
    Opaque,
    Opaque,
    Opaque,
    Opaque,
    Opaque,
    i32,
    *mut Heuristic,
    *mut i32,
) -> i32;
type Matmul = unsafe extern "C" fn(
    Opaque,
    Opaque,
    *const c_void,
    *const c_void,
    Opaque,
    *const c_void,
    Opaque,
    *const c_void,
    *const c_void,
    Opaque,
    *mut c_void,
    Opaque,
    *const Algo,
    *mut c_void,
    usize,
    *mut c_void,
) -> i32;

/// The functions used, from libtorch's cuBLASLt.
struct Lt {
    create: unsafe extern "C" fn(*mut Opaque) -> i32,
    desc_create: unsafe extern "C" fn(*mut Opaque, i32, i32) -> i32,
    desc_set: SetAttr,
    layout_create: unsafe extern "C" fn(*mut Opaque, i32, u64, u64, i64) -> i32,
    pref_create: unsafe extern "C" fn(*mut Opaque) -> i32,
    pref_set: SetAttr,
    heuristic: Heur,
    matmul: Matmul,
    _lib: libloading::Library,
}

fn open() -> Result<Lt, String> {
    let path = crate::kernels::cuda_libs::loaded_library("libcublasLt.so.")
        .ok_or("libtorch has not loaded cuBLASLt")?;
    // SAFETY: the very library libtorch loaded (opening it again only takes a
    // reference); each symbol is given the signature cublasLt.h declares.
    unsafe {
        let lib =
            libloading::Library::new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get($name)
                    .map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
            };
        }
        Ok(Lt {
            create: sym!(b"cublasLtCreate"),
            desc_create: sym!(b"cublasLtMatmulDescCreate"),
            desc_set: sym!(b"cublasLtMatmulDescSetAttribute"),
            layout_create: sym!(b"cublasLtMatrixLayoutCreate"),
            pref_create: sym!(b"cublasLtMatmulPreferenceCreate"),
            pref_set: sym!(b"cublasLtMatmulPreferenceSetAttribute"),
            heuristic: sym!(b"cublasLtMatmulAlgoGetHeuristic"),
            matmul: sym!(b"cublasLtMatmul"),
            _lib: lib,
        })
    }
}

/// One GEMM's shape, B format, workspace and the alignment of its
/// pointers (A, B, C = D): the heuristic assumes 256 bytes unless told.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    device: i32,
    m: i64,
    n: i64,
    k: i64,
    b_e5m2: bool,
    workspace: usize,
    align: [u32; 3],
}

/// The largest power of two, at most 256, that divides the address `p`.
fn alignment(p: *const c_void) -> u32 {
    1u32 << (p as usize).trailing_zeros().min(8)
}

/// Descriptors and the algorithm of one [`Key`], made once (never freed:
/// a handful per model).
struct Plan {
    desc: Opaque,
    a: Opaque,
    b: Opaque,
    c: Opaque,
    algo: Algo,
}

struct State {
    lt: Lt,
    handles: HashMap<i32, Opaque>,
    plans: HashMap<Key, Plan>,
}

// SAFETY: the raw handles are only used under the mutex below, one call at a time.
unsafe impl Send for State {}

fn ok(rc: i32, what: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("cuBLASLt {what}: status {rc}"))
    }
}

/// The weight-gradient GEMM of [`accumulate`].
pub struct Accum {
    pub device: i32,
    /// x^T [k_in, tokens] e4m3 and its dequantisation scale (fp32 on the device).
    pub x_t: *const c_void,
    pub x_scale: *const c_void,
    /// gy^T [n_out, tokens] (e4m3 or e5m2) and its scale.
    pub gy_t: *const c_void,
    pub gy_scale: *const c_void,
    pub gy_e5m2: bool,
    /// main [n_out, k_in] fp32, added into.
    pub main: *mut c_void,
    pub tokens: i64,
    pub k_in: i64,
    pub n_out: i64,
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
}

fn plan(s: &mut State, key: Key) -> Result<&Plan, String> {
    if !s.plans.contains_key(&key) {
        let lt = &s.lt;
        let handle = *s.handles.get(&key.device).ok_or("no cuBLASLt handle")?;
        let mut p = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: Algo { data: [0; 8] },
        };
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let b_type = if key.b_e5m2 { R_8F_E5M2 } else { R_8F_E4M3 };
        let ws = key.workspace as u64;
        // SAFETY: cuBLASLt's documented calls on out-pointers of this frame;
        // attribute buffers of the types cublasLt.h gives (int32, uint64).
        unsafe {
            ok(
                (lt.desc_create)(&mut p.desc, COMPUTE_32F, R_32F),
                "descriptor",
            )?;
            let set = |attr: i32, v: &i32| {
                ok(
                    (lt.desc_set)(p.desc, attr, (v as *const i32).cast(), 4),
                    "transpose",
                )
            };
            set(DESC_TRANSA, &OP_T)?;
            set(DESC_TRANSB, &OP_N)?;
            ok(
                (lt.layout_create)(&mut p.a, R_8F_E4M3, k, m, k as i64),
                "layout A",
            )?;
            ok(
                (lt.layout_create)(&mut p.b, b_type, k, n, k as i64),
                "layout B",
            )?;
            ok(
                (lt.layout_create)(&mut p.c, R_32F, m, n, m as i64),
                "layout C",
            )?;
            let mut pref: Opaque = std::ptr::null_mut();
            ok((lt.pref_create)(&mut pref), "preference")?;
            let wsp = (&ws as *const u64).cast();
            ok(
                (lt.pref_set)(pref, PREF_MAX_WORKSPACE_BYTES, wsp, 8),
                "workspace",
            )?;
            // A, B, C and D (= C): the alignments of this call's pointers.
            for (i, v) in [key.align[0], key.align[1], key.align[2], key.align[2]]
                .iter()
                .enumerate()
            {
                let attr = PREF_MIN_ALIGNMENT_A_BYTES + i as i32;
                let v = (v as *const u32).cast();
                ok((lt.pref_set)(pref, attr, v, 4), "alignment")?;
            }
            let mut h = std::mem::MaybeUninit::<Heuristic>::zeroed();
            let mut found = 0;
            let (d, a, b, c) = (p.desc, p.a, p.b, p.c);
            let rc = (lt.heuristic)(handle, d, a, b, c, c, pref, 1, h.as_mut_ptr(), &mut found);
            ok(rc, "heuristic")?;
            if found == 0 || h.assume_init_ref().state != 0 {
                return Err(format!(
                    "cuBLASLt has no FP8 algorithm for m {m} n {n} k {k}"
                ));
            }
            p.algo = h.assume_init_ref().algo;
        }
        s.plans.insert(key, p);
    }
    Ok(&s.plans[&key])
}

/// `main += (gy^T x) * (s_gy * s_x)` on `stream` (libtorch's current one)
/// by one cuBLASLt FP8 GEMM with fp32 accumulation and beta = 1.
///
/// # Safety
/// `g`'s pointers must be live device memory of device `g.device` with the
/// extents `g` states (x^T and gy^T contiguous, `main` contiguous fp32,
/// each scale one fp32, a workspace of `g.workspace_bytes`), and `stream`
/// a live CUDA stream of that device on which they are ordered.
pub unsafe fn accumulate(g: &Accum, stream: *mut c_void) -> Result<(), String> {
    static STATE: OnceLock<Result<Mutex<State>, String>> = OnceLock::new();
    let state = STATE
        .get_or_init(|| {
            open().map(|lt| {
                Mutex::new(State {
                    lt,
                    handles: HashMap::new(),
                    plans: HashMap::new(),
                })
            })
        })
        .as_ref()
        .map_err(|e| e.clone())?;
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    if !s.handles.contains_key(&g.device) {
        let mut h: Opaque = std::ptr::null_mut();
        // SAFETY: cublasLtCreate writes the new handle into `h`.
        ok(unsafe { (s.lt.create)(&mut h) }, "create")?;
        s.handles.insert(g.device, h);
    }
    let key = Key {
        device: g.device,
        m: g.k_in,
        n: g.n_out,
        k: g.tokens,
        b_e5m2: g.gy_e5m2,
        workspace: g.workspace_bytes,
        align: [g.x_t, g.gy_t, g.main.cast_const()].map(alignment),
    };
    if key.align.iter().any(|&a| a < 16) {
        return Err(format!(
            "operands must be 16-byte aligned for FP8 GEMMs (alignments {:?})",
            key.align
        ));
    }
    let handle = s.handles[&g.device];
    let (desc, a, b, c, algo) = {
        let p = plan(&mut s, key)?;
        (p.desc, p.a, p.b, p.c, p.algo)
    };
    let (alpha, beta) = (1.0f32, 1.0f32);
    let lt = &s.lt;
    // SAFETY: the shim passes live device tensors of the extents above on
    // this device (x^T and gy^T contiguous, main contiguous fp32, the scales
    // one fp32 each, a workspace of `workspace_bytes`), ordered on `stream`;
    // the scale pointers are set on this plan's descriptor for this call
    // under the lock.
    unsafe {
        let ptr = |p: &*const c_void| (p as *const *const c_void).cast();
        ok(
            (lt.desc_set)(desc, DESC_A_SCALE_POINTER, ptr(&g.x_scale), 8),
            "scale A",
        )?;
        ok(
            (lt.desc_set)(desc, DESC_B_SCALE_POINTER, ptr(&g.gy_scale), 8),
            "scale B",
        )?;
        let rc = (lt.matmul)(
            handle,
            desc,
            (&alpha as *const f32).cast(),
            g.x_t,
            a,
            g.gy_t,
            b,
            (&beta as *const f32).cast(),
            g.main,
            c,
            g.main,
            c,
            &algo,
            g.workspace,
            g.workspace_bytes,
            stream,
        );
        ok(rc, "matmul")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU the call is refused with a message (libtorch's cuBLASLt
    /// not loaded, or no device for its handle), never a panic or a crash.
    #[test]
    fn without_a_gpu_the_gemm_is_refused_with_a_message() {
        if tch::Cuda::is_available() {
            return; // the null operands below are for a machine without a GPU
        }
        let null = std::ptr::null_mut();
        let g = Accum {
            device: 0,
            x_t: null,
            x_scale: null,
            gy_t: null,
            gy_scale: null,
            gy_e5m2: true,
            main: null,
            tokens: 32,
            k_in: 16,
            n_out: 16,
            workspace: null,
            workspace_bytes: 0,
        };
        // SAFETY: without a GPU the call is refused before any pointer is used.
        let e = unsafe { accumulate(&g, null) }.expect_err("no GPU");
        eprintln!("refused: {e}");
        assert!(e.contains("cuBLASLt"), "{e}");
    }
}
