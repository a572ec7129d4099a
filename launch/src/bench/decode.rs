//! `sigma bench decode`: one decoding step's attention against a KV cache,
//! DiffQKV (sigma's decode kernel on a GPU, and its tensor-operation path)
//! against GQA through libtorch's SDPA, at several batch sizes and context
//! lengths (`attention`); `--check` compares the kernel with an fp32
//! reference on many shapes (`check`).

use anyhow::{bail, Result};
use sigma_trainer::infer::generate::{decode_attention, decode_attention_ops};
use sigma_trainer::kernels::decode;
use tch::{Device, Kind, Tensor};

use super::args::DecodeArgs;
use super::timing::{device_name, graph_time, median_time, GRAPH_CALLS};

/// Where the kernel is used, "(kernel)"; where not, why.
fn kernel_note(q: &Tensor, k: &Tensor, v: &Tensor) -> String {
    match decode::decode_kernel_available(q, k, v) {
        Ok(()) => "the fused decode kernel".into(),
        Err(why) => format!("tensor operations (the kernel does not run: {why})"),
    }
}

/// The timing table: what is compared, which path DiffQKV takes, the header.
fn print_attention_header(a: &DecodeArgs, kind: Kind, device: Device) {
    let d = a.head_dim;
    let probe = |n: i64| Tensor::zeros([1, n, 1, d], (kind, device));
    println!(
        "decode attention, one new token per sequence: DiffQKV {}/{}/{} vs GQA {}/{}/{} (SDPA), head dim {d}, {kind:?} on {}",
        a.n_q, a.n_k, a.n_v, a.n_q, a.gqa_kv, a.gqa_kv, device_name(device)
    );
    println!(
        "DiffQKV runs through {}; \"ops\" is its tensor-operation path",
        kernel_note(&probe(a.n_q), &probe(a.n_k), &probe(a.n_v))
    );
    if device.is_cuda() && !a.eager {
        println!(
            "ms: device time of one call, {GRAPH_CALLS} calls recorded in a CUDA graph and replayed (no host launch work; --eager: from the host), each on its own copy of the cache up to {} MB of copies, so no call finds the previous one's in L2",
            COPIES_BYTES / 1e6
        );
    }
    println!(
        "{:>6} {:>8} {:>12} {:>9} {:>9} {:>9} {:>12} {:>12}{}",
        "batch",
        "context",
        "DiffQKV ms",
        "ops ms",
        "GQA ms",
        "saving",
        "DiffQKV GB/s",
        "GQA GB/s",
        if a.peak_gbps.is_some() {
            "  of peak (DiffQKV, GQA)"
        } else {
            ""
        }
    );
}

/// Bytes of one attention case's query and caches (both sides), None past
/// i64.
fn case_bytes(a: &DecodeArgs, b: i64, s: i64, elt: i64) -> Option<i64> {
    let heads = a
        .n_k
        .checked_add(a.n_v)?
        .checked_add(a.gqa_kv.checked_mul(2)?)?;
    let cache = s.checked_mul(heads)?;
    let per_row = cache.checked_add(a.n_q)?.checked_mul(a.head_dim)?;
    b.checked_mul(per_row)?.checked_mul(elt)
}

/// Whether `bytes` can be allocated on `device`: on the CPU within the
/// memory available now (Linux lets a larger allocation succeed and kills
/// the process as its pages fill); on a GPU the allocator refuses what
/// does not fit, and the case is skipped then.
fn fits(bytes: Option<i64>, device: Device) -> bool {
    let Some(bytes) = bytes else { return false };
    match device {
        Device::Cpu => sigma_trainer::model::summary::host_memory_available()
            .is_none_or(|have| (bytes as u64) < have / 10 * 9),
        _ => true,
    }
}

/// One row of the timing table: batch `b`, context `s` (a note instead
/// when the caches do not fit).
fn attention_case(a: &DecodeArgs, b: i64, s: i64, kind: Kind, device: Device) -> Result<()> {
    let d = a.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let elt = kind.elt_size_in_bytes() as f64;
    let opts = (kind, device);
    if !fits(case_bytes(a, b, s, elt as i64), device) {
        println!("{b:>6} {s:>8}  (does not fit in memory: skipped)");
        return Ok(());
    }
    let alloc = || -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
        Ok((
            Tensor::f_randn([b, a.n_q, 1, d], opts)?,
            Tensor::f_randn([b, a.n_k, s, d], opts)?,
            Tensor::f_randn([b, a.n_v, s, d], opts)?,
            Tensor::f_randn([b, a.gqa_kv, s, d], opts)?,
            Tensor::f_randn([b, a.gqa_kv, s, d], opts)?,
        ))
    };
    let Ok((q, k, v, gk, gv)) = alloc() else {
        println!("{b:>6} {s:>8}  (does not fit in memory: skipped)");
        return Ok(());
    };
    if device.is_cuda() {
        if let Err(why) = decode::decode_kernel_available(&q, &k, &v) {
            println!(
                "{b:>6} {s:>8}  (the kernel does not run here: {why}; timing the tensor path)"
            );
        }
    }
    let bytes_ours = (b * s * d * (a.n_k + a.n_v)) as f64 * elt;
    let bytes_gqa = (b * s * d * 2 * a.gqa_kv) as f64 * elt;
    // Graph timing cycles each side's calls over copies of its cache.
    let graphs = match device {
        Device::Cuda(i) if !a.eager => Some(i),
        _ => None,
    };
    let n = |bytes: f64| {
        if graphs.is_some() {
            copies_of(bytes)
        } else {
            1
        }
    };
    let (Ok(kv), Ok(gkv)) = (
        cache_copies(n(bytes_ours), &[&k, &v]),
        cache_copies(n(bytes_gqa), &[&gk, &gv]),
    ) else {
        println!("{b:>6} {s:>8}  (the copies of the caches do not fit in memory: skipped)");
        return Ok(());
    };
    let time = |f: &mut dyn FnMut(usize) -> Result<()>| match graphs {
        Some(i) => graph_time(i, a.steps, f),
        None => median_time(device, a.steps, &mut || f(0)),
    };
    let ours = time(&mut |i| {
        let c = &kv[i % kv.len()];
        let _ = decode_attention(&q, &c[0], &c[1], None, scale)?;
        Ok(())
    })?;
    let ops = time(&mut |i| {
        let c = &kv[i % kv.len()];
        let _ = decode_attention_ops(&q, &c[0], &c[1], None, scale);
        Ok(())
    })?;
    let gqa = time(&mut |i| {
        let c = &gkv[i % gkv.len()];
        let _ = Tensor::f_scaled_dot_product_attention::<Tensor>(
            &q, &c[0], &c[1], None, 0.0, false, scale, true,
        )?;
        Ok(())
    })?;
    print_row(a, (b, s), (ours, ops, gqa), (bytes_ours, bytes_gqa));
    Ok(())
}

/// A row of the table: seconds of the kernel, its tensor path and SDPA,
/// and the cache bytes each side reads.
fn print_row(
    a: &DecodeArgs,
    (b, s): (i64, i64),
    (ours, ops, gqa): (f64, f64, f64),
    (bytes_ours, bytes_gqa): (f64, f64),
) {
    let (bw_o, bw_g) = (bytes_ours / ours / 1e9, bytes_gqa / gqa / 1e9);
    println!(
        "{b:>6} {s:>8} {:>12.4} {:>9.4} {:>9.4} {:>8.1}% {:>12.0} {:>12.0}{}",
        ours * 1e3,
        ops * 1e3,
        gqa * 1e3,
        100.0 * (1.0 - ours / gqa),
        bw_o,
        bw_g,
        a.peak_gbps
            .map(|p| format!("  {:.0} %, {:.0} %", 100.0 * bw_o / p, 100.0 * bw_g / p))
            .unwrap_or_default()
    );
}

/// `n` copies of the tensors `first` (the first copy: those tensors).
fn cache_copies(n: usize, first: &[&Tensor]) -> Result<Vec<Vec<Tensor>>> {
    let copy = |t: &&Tensor| -> Result<Tensor, tch::TchError> {
        let mut c = t.f_empty_like()?;
        c.f_copy_(t)?;
        Ok(c)
    };
    let mut all = vec![first.iter().map(|t| t.shallow_clone()).collect::<Vec<_>>()];
    for _ in 1..n {
        all.push(first.iter().map(copy).collect::<Result<_, _>>()?);
    }
    Ok(all)
}

/// The bytes of cache copies one graph timing cycles over at least (where
/// [`GRAPH_CALLS`] copies allow): several times any current GPU's L2.
const COPIES_BYTES: f64 = 256e6;

/// Copies of a cache of `bytes` that make [`COPIES_BYTES`]: a power of two
/// (so a replay's last call and the next replay's first read different
/// copies), at most one per call.
fn copies_of(bytes: f64) -> usize {
    ((COPIES_BYTES / bytes).ceil() as usize)
        .clamp(1, GRAPH_CALLS)
        .next_power_of_two()
        .min(GRAPH_CALLS)
}

/// Time DiffQKV (kernel and tensor path) and GQA at every batch size and
/// context length, then print how much smaller the DiffQKV cache is.
pub fn attention(a: &DecodeArgs, device: Device) -> Result<()> {
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    print_attention_header(a, kind, device);
    for &b in &a.batch {
        for &s in &a.context {
            attention_case(a, b, s, kind, device)?;
        }
    }
    let d = a.head_dim;
    println!(
        "bound: the DiffQKV cache is {:.1} % smaller than GQA's ({} vs {} elements per token per layer)",
        100.0 * (1.0 - (a.n_k + a.n_v) as f64 / (2 * a.gqa_kv) as f64),
        (a.n_k + a.n_v) * d,
        2 * a.gqa_kv * d
    );
    Ok(())
}

/// The largest absolute difference between two tensors, in f64.
fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// bf16 output rounding is at most 2^-9 of a value: 1 % of the largest
/// output is five times that, and far below what a lost row or chunk costs.
const CHECK_TOLERANCE: f64 = 1e-2;

/// One shape of the kernel check: (n_q, n_k, n_v, d_k, d_v, batch, len, masked).
type Case = (i64, i64, i64, i64, i64, i64, i64, bool);

/// Shapes of every kind sigma produces (a flat table).
const CHECK_CASES: &[Case] = &[
    (32, 4, 16, 64, 64, 1, 1, false),
    (32, 4, 16, 64, 64, 2, 100, true),
    (32, 4, 16, 64, 64, 16, 4096, false),
    (32, 4, 16, 64, 64, 3, 5000, true),
    (32, 4, 16, 64, 64, 1, 65536, false),
    (32, 1, 16, 64, 64, 2, 777, true),
    (8, 8, 2, 64, 64, 4, 1500, true),
    (32, 4, 16, 32, 64, 2, 2049, false),
    (32, 4, 16, 16, 64, 2, 333, true),
    (16, 16, 16, 128, 128, 2, 1024, false),
    (32, 16, 16, 64, 64, 8, 8192, false),
    (64, 4, 2, 64, 64, 2, 3000, true),
    (8, 2, 4, 8, 8, 3, 700, true),
    (8, 2, 4, 256, 256, 2, 1100, false),
    (12, 3, 6, 64, 64, 2, 999, true),
    (32, 4, 16, 64, 64, 64, 2000, true),
];

/// The kernel against an fp32 reference (the tensor path on the same bf16
/// values upcast) and, for scale, the bf16 tensor path against the same
/// reference: shapes of every kind sigma produces, left-padding masks,
/// contexts that are and are not a multiple of the chunk, K and V read
/// through a larger cache (as decoding does); each case by its tuned plan
/// and by every candidate plan (one split, the combine folded into the
/// split kernel, the combine kernel), one after another on one stream, so
/// a folded launch that left its counters wrong spoils the next. Then the
/// query rotated by RoPE in the kernel against the query rotated first by
/// the training RoPE kernel, by the same plans: the same bits (where the
/// kernel's sums have a fixed order: at least 4 V heads). Then the cache
/// append kernel against RoPE in fp32, and the append folded into the
/// attention kernel against that kernel, bit for bit.
pub fn check(device: Device) -> Result<()> {
    if !device.is_cuda() {
        bail!("--check compares the GPU decode kernel with its reference: it needs --device cuda (or auto on a GPU machine)");
    }
    println!(
        "decode kernel vs fp32 reference on {} (bf16 operands; errors relative to the largest |output|, tolerance {CHECK_TOLERANCE})",
        device_name(device)
    );
    println!(
        "plans: the tuned one and every candidate (one launch: one split or the combine folded; + two: the combine kernel); kernel err: the worst of them"
    );
    println!(
        "{:<24} {:>5} {:>7} {:>6} {:>9} {:>10} {:>12} {:>12} {:>10}",
        "n_q/n_k/n_v d_k/d_v",
        "batch",
        "context",
        "masked",
        "plans",
        "max |out|",
        "kernel err",
        "ops err",
        "rotated"
    );
    let mut worst: f64 = 0.0;
    let mut rotation_differs = Vec::new();
    for &case in CHECK_CASES {
        let (err, rotated) = check_case(case, device)?;
        worst = worst.max(err);
        if rotated == Rotated::Differs {
            rotation_differs.push(format!("{case:?}"));
        }
    }
    worst = worst.max(check_append(device)?);
    check_folded_append(device)?;
    if worst > CHECK_TOLERANCE {
        bail!(
            "the decode kernel is off by {worst:.3e} of the largest output (tolerance {CHECK_TOLERANCE})"
        );
    }
    if !rotation_differs.is_empty() {
        bail!(
            "the query rotated in the decode kernel gave other bits than rotated first, in {}",
            rotation_differs.join(", ")
        );
    }
    println!("decode kernel check passed: largest relative error {worst:.2e}");
    Ok(())
}

/// The cache append (`kernels::decode::append`) against RoPE in fp32 and
/// copies: keys within bf16's rounding of the largest, values and every
/// other slot exact. Returns the keys' relative error.
fn check_append(device: Device) -> Result<f64> {
    println!(
        "cache append (new keys rotated by RoPE, values copied, at a slot held on the device):"
    );
    let mut worst: f64 = 0.0;
    for (nq, nk, nv, d, b, cap, slot) in [
        (32, 4, 16, 64, 1, 300, 257),
        (8, 2, 4, 128, 3, 64, 0),
        (12, 3, 6, 64, 2, 40, 39),
    ] {
        let bf = (Kind::BFloat16, device);
        let k = Tensor::randn([b, 1, nk * d], bf);
        let v = Tensor::randn([b, 1, nv * d], bf);
        let ang = Tensor::rand([1, d / 2], (Kind::Float, device)) * 6.0;
        let cos = Tensor::cat(&[ang.cos(), ang.cos()], 1).to_kind(Kind::BFloat16);
        let sin = Tensor::cat(&[-ang.sin(), ang.sin()], 1).to_kind(Kind::BFloat16);
        let pos = Tensor::from_slice(&[slot]).to_device(device);
        let kc = Tensor::zeros([b, nk, cap, d], bf);
        let vc = Tensor::zeros([b, nv, cap, d], bf);
        let ran =
            sigma_trainer::kernels::decode::append(nq, &k, &v, (&cos, &sin), &pos, (&kc, &vc))?;
        if !ran {
            bail!("the cache append kernel did not run for {nq}/{nk}/{nv} d {d}");
        }
        // The reference: [x1 c1 + x2 s1, x2 c2 + x1 s2] in fp32.
        let x = k.to_kind(Kind::Float).view([b, nk, d]);
        let swapped = Tensor::cat(&[x.narrow(2, d / 2, d / 2), x.narrow(2, 0, d / 2)], 2);
        let want = &x * cos.to_kind(Kind::Float) + swapped * sin.to_kind(Kind::Float);
        let got = kc.narrow(2, slot, 1).squeeze_dim(2).to_kind(Kind::Float);
        let top = want.abs().max().double_value(&[]);
        let err = (&got - &want).abs().max().double_value(&[]) / top;
        let v_exact = vc
            .narrow(2, slot, 1)
            .squeeze_dim(2)
            .equal(&v.view([b, nv, d]));
        let others = kc.abs().sum(Kind::Float).double_value(&[])
            - got.abs().sum(Kind::Float).double_value(&[]);
        let v_others = vc.abs().sum(Kind::Float).double_value(&[])
            - v.to_kind(Kind::Float)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]);
        let untouched = others.abs() < 1e-3 * top && v_others.abs() < 1e-3 * top;
        println!("  {nq}/{nk}/{nv} d {d} batch {b} slot {slot} of {cap}: keys err {err:.2e}, values exact {v_exact}, other slots untouched {untouched}");
        if !v_exact || !untouched {
            bail!("the cache append wrote wrong values or outside its slot");
        }
        worst = worst.max(if err.is_nan() { f64::INFINITY } else { err });
    }
    Ok(worst)
}

/// One case of the folded append's check: (n_q, n_k, n_v, d_k, d_v,
/// batch, cache capacity, slots read, the new slot).
type FoldCase = (i64, i64, i64, i64, i64, i64, i64, i64, i64);

/// Slots first, middle and last of what is read, K and V of other widths,
/// and caches read through a larger capacity (head strides that are not
/// the slots read times the width), as decoding reads them.
const FOLD_CASES: &[FoldCase] = &[
    (32, 4, 16, 64, 64, 1, 300, 300, 257),
    (8, 2, 4, 128, 128, 3, 64, 64, 0),
    (32, 4, 16, 32, 64, 2, 437, 400, 333),
    (12, 3, 6, 64, 64, 2, 80, 40, 39),
];

/// The new token written by the attention kernel (the folded append,
/// `decode_attention_rotated` with a `NewToken`) against the append kernel
/// followed by the same attention, by every candidate plan over a random
/// cache with the new slot among the slots read: the same caches (every
/// slot of the capacity) and the same outputs, bit for bit. Prints one line
/// a case; where the kernel does not rotate the query (so does not take a
/// token), says so instead of checking.
fn check_folded_append(device: Device) -> Result<()> {
    println!("cache append folded into the attention kernel, against the append kernel before it:");
    for &case in FOLD_CASES {
        let (nq, nk, nv, dk, dv, b, cap, len, slot) = case;
        let name =
            format!("{nq}/{nk}/{nv} {dk}/{dv} batch {b} slot {slot} of {len} read ({cap} cached)");
        match check_fold_case(case, device, &name)? {
            Some(n) => println!("  {name}: the same caches and outputs by {n} plans"),
            None => println!("  {name}: not checked (the kernel does not rotate the query: SIGMA_DECODE_ROPE=off)"),
        }
    }
    Ok(())
}

/// One case of [`check_folded_append`]: the plans checked, or None where
/// the kernel does not rotate the query (so takes no token).
fn check_fold_case(case: FoldCase, device: Device, name: &str) -> Result<Option<usize>> {
    let (nq, nk, nv, dk, dv, b, cap, len, slot) = case;
    let bf = (Kind::BFloat16, device);
    let k = Tensor::randn([b, 1, nk * dk], bf);
    let v = Tensor::randn([b, 1, nv * dv], bf);
    let ang = Tensor::rand([1, dk / 2], (Kind::Float, device)) * 6.0;
    let cos = Tensor::cat(&[ang.cos(), ang.cos()], 1).to_kind(Kind::BFloat16);
    let sin = Tensor::cat(&[-ang.sin(), ang.sin()], 1).to_kind(Kind::BFloat16);
    let rows = (&cos, &sin);
    let pos = Tensor::from_slice(&[slot]).to_device(device);
    let kc0 = Tensor::randn([b, nk, cap, dk], bf);
    let vc0 = Tensor::randn([b, nv, cap, dv], bf);
    let q = Tensor::randn([b, nq, 1, dk], bf);
    let valid = Tensor::ones([b, cap], (Kind::Bool, device)).narrow(1, 0, len);
    let scale = 1.0 / (dk as f64).sqrt();
    let shape = decode::DecodeShape {
        n_q: nq,
        n_k: nk,
        n_v: nv,
        d_k: dk,
        d_v: dv,
    };
    let plans = decode::plan::candidates(&shape, len);
    let token = decode::NewToken {
        k: &k,
        v: &v,
        pos: &pos,
    };
    let read = |t: &Tensor| t.narrow(2, 0, len);
    for &p in &plans {
        let (ka, va) = (kc0.copy(), vc0.copy());
        if !decode::append(nq, &k, &v, rows, &pos, (&ka, &va))? {
            bail!("the cache append kernel did not run for {name}");
        }
        let kv = (&read(&ka), &read(&va));
        let Some(after) =
            decode::decode_attention_rotated(&q, rows, kv, Some(&valid), scale, Some(p), None)?
        else {
            return Ok(None);
        };
        let (kb, vb) = (kc0.copy(), vc0.copy());
        let kv = (&read(&kb), &read(&vb));
        let folded = decode::decode_attention_rotated(
            &q,
            rows,
            kv,
            Some(&valid),
            scale,
            Some(p),
            Some(token),
        )?
        .ok_or_else(|| {
            anyhow::anyhow!("the decode kernel did not take the new token for {name} by {p:?}")
        })?;
        if !ka.equal(&kb) || !va.equal(&vb) || !after.equal(&folded) {
            bail!("the append folded into the attention kernel gave other bits than the append kernel before it, for {name} by {p:?}");
        }
    }
    Ok(Some(plans.len()))
}

/// How the query rotated in the kernel compared with the query rotated first.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rotated {
    /// The same bits by every plan.
    Same,
    /// Within the tolerance of each other (no fixed order of sums to hold bits to).
    Close,
    /// Not the same bits where they must be, or past the tolerance.
    Differs,
    /// The kernel does not rotate for this shape (the model rotates first).
    NotTaken,
}

/// The kernel rotating the query by RoPE rows against the query rotated
/// first by the training RoPE kernel, by each of `plans`.
fn check_rotated(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    m: Option<&Tensor>,
    scale: f64,
    plans: &[decode::Plan],
) -> Result<Rotated> {
    let (b, nq, dk, nv) = (q.size()[0], q.size()[1], q.size()[3], v.size()[1]);
    let device = q.device();
    let ang = Tensor::rand([1, dk / 2], (Kind::Float, device)) * 6.0;
    let cos = Tensor::cat(&[ang.cos(), ang.cos()], 1).to_kind(Kind::BFloat16);
    let sin = Tensor::cat(&[-ang.sin(), ang.sin()], 1).to_kind(Kind::BFloat16);
    let Some(first) =
        sigma_trainer::kernels::training::rope(&q.view([b, 1, nq, dk]), &cos, &sin, 0)
    else {
        return Ok(Rotated::NotTaken);
    };
    let first = first.view([b, nq, 1, dk]);
    let mut same = true;
    let mut worst: f64 = 0.0;
    for &p in plans {
        let rows = (&cos, &sin);
        let Some(got) = decode::decode_attention_rotated(q, rows, (k, v), m, scale, Some(p), None)?
        else {
            return Ok(Rotated::NotTaken);
        };
        let want = decode::decode_attention_by(&first, k, v, m, scale, p)?
            .ok_or_else(|| anyhow::anyhow!("the kernel did not run on the rotated query"))?;
        same &= got.equal(&want);
        worst = worst.max(max_abs(&got, &want) / want.abs().max().double_value(&[]));
    }
    // With fewer than 4 V heads, 4 or more warps add into one output in no fixed order.
    Ok(if same {
        Rotated::Same
    } else if nv < 4 && worst <= CHECK_TOLERANCE {
        Rotated::Close
    } else {
        Rotated::Differs
    })
}

/// One row of the kernel check; returns the kernel's relative error (NaN as
/// infinity) and how the query rotated in the kernel compared.
fn check_case(case: Case, device: Device) -> Result<(f64, Rotated)> {
    let (nq, nk, nv, dk, dv, b, len, masked) = case;
    let opts = (Kind::BFloat16, device);
    let cap = len + 37; // read through a larger cache, as decoding does
    let q = Tensor::randn([b, nq, 1, dk], opts);
    let k = Tensor::randn([b, nk, cap, dk], opts).narrow(2, 0, len);
    let v = Tensor::randn([b, nv, cap, dv], opts).narrow(2, 0, len);
    // Left padding: sequence i has its first (i * len / (b + 1)) slots masked.
    let valid = Tensor::ones([b, cap], (Kind::Bool, device));
    if masked {
        for i in 0..b {
            let pad = i * len / (b + 1);
            let _ = valid.get(i).narrow(0, 0, pad).fill_(0);
        }
    }
    let valid = valid.narrow(1, 0, len);
    let m = masked.then_some(&valid);
    let scale = 1.0 / (dk as f64).sqrt();
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let reference = decode_attention_ops(&f(&q), &f(&k), &f(&v), m, scale);
    let ops = decode_attention_ops(&q, &k, &v, m, scale);
    let top = reference.abs().max().double_value(&[]);
    let err = |t: &Tensor| {
        let e = max_abs(t, &reference) / top;
        if e.is_nan() {
            f64::INFINITY
        } else {
            e
        }
    };
    // The tuned plan, then every plan the search would time: one split,
    // the combine folded and separate, chunks that do and do not divide.
    let not_run = || {
        anyhow::anyhow!(
            "the kernel did not run for n_q {nq}, n_k {nk}, n_v {nv}, d_k {dk}, d_v {dv}: {}",
            decode::decode_kernel_available(&q, &k, &v)
                .err()
                .unwrap_or_default()
        )
    };
    let tuned = decode::decode_attention(&q, &k, &v, m, scale)?.ok_or_else(not_run)?;
    let mut ek = err(&tuned);
    let shape = decode::DecodeShape {
        n_q: nq,
        n_k: nk,
        n_v: nv,
        d_k: dk,
        d_v: dv,
    };
    let plans = decode::plan::candidates(&shape, len);
    for &p in &plans {
        let o = decode::decode_attention_by(&q, &k, &v, m, scale, p)?.ok_or_else(not_run)?;
        ek = ek.max(err(&o));
    }
    let launches = |n: u32| plans.iter().filter(|p| p.launches() == n).count();
    let eo = max_abs(&ops, &reference) / top;
    let rotated = check_rotated(&q, (&k, &v), m, scale, &plans)?;
    let shown = match rotated {
        Rotated::Same => "same bits",
        Rotated::Close => "close",
        Rotated::Differs => "DIFFERS",
        Rotated::NotTaken => "-",
    };
    println!(
        "{:<24} {b:>5} {len:>7} {:>6} {:>5}+{:<3} {top:>10.3e} {ek:>12.2e} {eo:>12.2e} {shown:>10}",
        format!("{nq}/{nk}/{nv} {dk}/{dv}"),
        if masked { "yes" } else { "no" },
        launches(1),
        launches(2),
    );
    Ok((ek, rotated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_timing_cycles_a_power_of_two_of_copies_that_make_256_mb_where_16_allow() {
        for (bytes, want) in [
            (1e3, 16),
            (42e6, 8),
            (64e6, 4),
            (67e6, 4),
            (128e6, 2),
            (200e6, 2),
            (256e6, 1),
            (3e9, 1),
        ] {
            let n = copies_of(bytes);
            assert_eq!(n, want, "{bytes}");
            assert!(n.is_power_of_two() && n <= GRAPH_CALLS);
            assert!(
                n == GRAPH_CALLS || n as f64 * bytes >= COPIES_BYTES,
                "{bytes}"
            );
        }
    }
}
