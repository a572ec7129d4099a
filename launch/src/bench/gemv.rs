//! The decoding matrix-vector kernels (`sigma_trainer::kernels::gemv`) in
//! `sigma bench fused`: checked against an fp32 product of the same bf16
//! operands and timed against libtorch's matmul (cuBLAS) at SIGMA-1.5B's
//! shapes, with the memory bandwidth each reaches. Each timed run reads a
//! different copy of the weights, enough copies to exceed the L2 cache, so
//! the times are the memory's, as in a decoding step.

use anyhow::{bail, Result};
use sigma_trainer::kernels::gemv;
use tch::{Device, Kind, Tensor};

use super::timing::{median_time, rel_err};

/// Bytes of weight copies a timing cycles through (above any L2 cache).
const CYCLE_BYTES: i64 = 256 << 20;

/// One case: `rows` activation rows, the weights' row counts (one to
/// three; or one merged gate/up weight of 2 x `ns[0]` rows when `gated`),
/// the input width `k`, and how x lies in memory.
struct Case {
    name: &'static str,
    rows: i64,
    ns: &'static [i64],
    k: i64,
    gated: bool,
    x: Layout,
}

/// How a case's input lies in memory (the kernels read it in 16-byte
/// pieces, so the last two are copied first).
#[derive(Clone, Copy)]
enum Layout {
    Dense,
    /// Contiguous, 2 bytes past a 16-byte boundary (a slice of a larger tensor).
    Offset,
    /// Rows of a wider tensor.
    Strided,
}

/// Random bf16 input [rows, 1, k] laid out as `layout` says.
fn input(rows: i64, k: i64, layout: Layout, device: Device) -> Tensor {
    let bf = (Kind::BFloat16, device);
    match layout {
        Layout::Dense => Tensor::randn([rows, 1, k], bf),
        Layout::Offset => Tensor::randn([rows * k + 1], bf)
            .narrow(0, 1, rows * k)
            .view([rows, 1, k]),
        Layout::Strided => Tensor::randn([rows, 1, k + 8], bf).narrow(2, 8, k),
    }
}

/// SIGMA-1.5B's products at 1 to 8 rows, then odd widths and column counts
/// (not multiples of the warps' stride or of a block's columns) with an
/// input at a 2-byte offset ("odd") and a strided one ("odd gated").
/// A table row of [`CASES`].
const fn case(
    name: &'static str,
    rows: i64,
    ns: &'static [i64],
    k: i64,
    gated: bool,
    x: Layout,
) -> Case {
    Case {
        name,
        rows,
        ns,
        k,
        gated,
        x,
    }
}

const CASES: &[Case] = &[
    case("q,k,v", 1, &[2048, 256, 1024], 2048, false, Layout::Dense),
    case("ffn gate/up", 1, &[6144], 2048, true, Layout::Dense),
    case("ffn down", 1, &[2048], 6144, false, Layout::Dense),
    case("aug_q down", 1, &[2048], 3072, false, Layout::Dense),
    case("o_proj", 1, &[2048], 2048, false, Layout::Dense),
    case("head", 1, &[128256], 2048, false, Layout::Dense),
    case("q,k,v", 2, &[2048, 256, 1024], 2048, false, Layout::Dense),
    case("ffn gate/up", 2, &[6144], 2048, true, Layout::Dense),
    case("ffn down", 2, &[2048], 6144, false, Layout::Dense),
    case("q,k,v", 4, &[2048, 256, 1024], 2048, false, Layout::Dense),
    case("ffn gate/up", 3, &[6144], 2048, true, Layout::Dense),
    case("ffn down", 8, &[2048], 6144, false, Layout::Dense),
    case("odd", 5, &[37, 3, 11], 296, false, Layout::Offset),
    case("odd gated", 7, &[13], 264, true, Layout::Strided),
];

/// The reference and the two timed forms of one case over one weight set.
fn reference(c: &Case, x: &Tensor, ws: &[Tensor]) -> Vec<Tensor> {
    let xf = x.to_kind(Kind::Float);
    if c.gated {
        let gu = xf.matmul(&ws[0].to_kind(Kind::Float).tr());
        let n = c.ns[0];
        return vec![gu.narrow(-1, 0, n).silu() * gu.narrow(-1, n, n)];
    }
    ws.iter()
        .map(|w| xf.matmul(&w.to_kind(Kind::Float).tr()))
        .collect()
}

fn kernel(c: &Case, x: &Tensor, ws: &[Tensor], v: gemv::Variant) -> Result<Vec<Tensor>> {
    let refs: Vec<&Tensor> = ws.iter().collect();
    match gemv::gemv_by(x, &refs, c.gated, v) {
        Some(y) => Ok(y),
        None => bail!(
            "the gemv kernel did not run for {} ({:?})",
            c.name,
            gemv::refusal(x, &refs, c.gated)
        ),
    }
}

fn cublas(c: &Case, x: &Tensor, ws: &[Tensor]) -> Vec<Tensor> {
    if c.gated {
        let gu = x.linear::<Tensor>(&ws[0], None);
        let n = c.ns[0];
        return vec![gu.narrow(-1, 0, n).silu() * gu.narrow(-1, n, n)];
    }
    ws.iter().map(|w| x.linear::<Tensor>(w, None)).collect()
}

/// Launches per timed run: back to back, as in a decoding step, so that
/// the events' own cost is spread over them.
const LAUNCHES: usize = 20;

/// Median seconds of one of `f`'s launches, over weight copies in turn.
fn per_launch(
    device: Device,
    steps: usize,
    sets: &[Vec<Tensor>],
    f: &mut dyn FnMut(&[Tensor]) -> Result<()>,
) -> Result<f64> {
    let mut i = 0usize;
    let t = median_time(device, steps, &mut || {
        for _ in 0..LAUNCHES {
            i += 1;
            f(&sets[i % sets.len()])?;
        }
        Ok(())
    })?;
    Ok(t / LAUNCHES as f64)
}

/// Checks every case (every variant against the fp32 product) and times
/// it; returns the largest relative error.
pub fn check(device: Device, steps: usize) -> Result<f64> {
    if !gemv::gemv_kernel_enabled() {
        println!("decoding matrix-vector kernels: not checked (SIGMA_GEMV_KERNEL=off)");
        return Ok(0.0);
    }
    println!("decoding matrix-vector kernels (bf16, fp32 sums; {LAUNCHES} launches back to back over weights beyond the L2 cache; GB/s of weights read; us per launch of each variant u<unroll>w<warps per column>, * the one picked):");
    let _guard = tch::no_grad_guard();
    let mut worst: f64 = 0.0;
    for c in CASES {
        let bf = (Kind::BFloat16, device);
        let wrows: Vec<i64> = if c.gated {
            vec![2 * c.ns[0]]
        } else {
            c.ns.to_vec()
        };
        let bytes: i64 = wrows.iter().map(|n| n * c.k * 2).sum();
        let copies = (CYCLE_BYTES / bytes).clamp(2, 64);
        let sets: Vec<Vec<Tensor>> = (0..copies)
            .map(|_| {
                wrows
                    .iter()
                    .map(|&n| Tensor::randn([n, c.k], bf) * 0.05)
                    .collect()
            })
            .collect();
        let x = input(c.rows, c.k, c.x, device);
        let want = reference(c, &x, &sets[0]);
        let err = |ys: &[Tensor]| {
            ys.iter()
                .zip(&want)
                .fold(0.0f64, |a, (y, r)| a.max(rel_err(y, r)))
        };
        let picked = gemv::Variant::pick(c.gated, c.k);
        let mut cells = Vec::new();
        let (mut best, mut t_picked, mut case_err) = (f64::INFINITY, 0.0, 0.0f64);
        for v in gemv::VARIANTS {
            case_err = case_err.max(err(&kernel(c, &x, &sets[0], v)?));
            let t = per_launch(device, steps, &sets, &mut |ws| {
                kernel(c, &x, ws, v).map(|_| ())
            })?;
            best = best.min(t);
            if v == picked {
                t_picked = t;
            }
            let mark = if v == picked { "*" } else { "" };
            cells.push(format!(
                "u{}w{}{mark} {:.1}",
                v.unroll,
                v.warps_per_column,
                t * 1e6
            ));
        }
        worst = worst.max(case_err);
        let ec = err(&cublas(c, &x, &sets[0]));
        let tc = per_launch(device, steps, &sets, &mut |ws| {
            let _ = cublas(c, &x, ws);
            Ok(())
        })?;
        let cols =
            c.ns.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("+");
        let cols = if c.gated { format!("2x{cols}") } else { cols };
        let gbps = |t: f64| bytes as f64 / t / 1e9;
        println!(
            "{:<12} rows {} cols {cols} k {}: err {:.2e} (cuBLAS {:.2e}); picked {:.1} us {:.0} GB/s, best {:.1} us {:.0} GB/s, cuBLAS {:.1} us {:.0} GB/s | {}",
            c.name, c.rows, c.k, case_err, ec, t_picked * 1e6, gbps(t_picked), best * 1e6, gbps(best), tc * 1e6, gbps(tc), cells.join(", ")
        );
    }
    Ok(worst)
}

/// (name, rows, columns, k, gated, with the add): [`NORMED`].
type NormedCase = (&'static str, i64, &'static [i64], i64, bool, bool);

/// A case of the normed kernels: rows, the weights' row counts (gated: one
/// merged weight of 2 x `ns[0]`), k, and whether a branch output is added
/// before the norm (a block's later norms) or not (the first block's).
const NORMED: &[NormedCase] = &[
    ("q,k,v", 1, &[2048, 256, 1024], 2048, false, true),
    ("ffn gate/up", 1, &[6144], 2048, true, true),
    ("q,k,v first", 1, &[2048, 256, 1024], 2048, false, false),
    ("ffn gate/up", 2, &[6144], 2048, true, true),
    ("odd", 2, &[37, 3, 11], 296, false, true),
    ("odd gated", 1, &[13], 264, true, false),
];

/// The normed kernels (`gemv::gemv_normed`: the RMSNorm, after a residual
/// add, run by the matrix-vector kernel) against the norm kernel followed
/// by the plain kernel (`add_rms_norm_bf16` / `rms_norm_bf16`, then
/// `gemv_by`), which they must equal bit for bit, sum included, and
/// against fp32 (the norm and products of the same operands); each timed
/// against the two launches. Returns the largest relative error against
/// fp32; a difference from the two launches is an error.
pub fn check_normed(device: Device, steps: usize) -> Result<f64> {
    if !gemv::gemv_kernel_enabled() || !gemv::norm_enabled() || !train_kernels_on() {
        println!(
            "normed matrix-vector kernels: not checked (SIGMA_GEMV_KERNEL, SIGMA_GEMV_NORM or SIGMA_TRAIN_KERNELS off)"
        );
        return Ok(0.0);
    }
    println!("normed matrix-vector kernels (the norm in the kernel, against the norm kernel and the plain kernel: must be equal bit for bit; us per launch pair, weights beyond the L2 cache):");
    let _guard = tch::no_grad_guard();
    let mut worst: f64 = 0.0;
    for &(name, rows, ns, k, gated, with_add) in NORMED {
        let c = Case {
            name,
            rows,
            ns,
            k,
            gated,
            x: Layout::Dense,
        };
        worst = worst.max(normed_case(&c, with_add, device, steps)?);
    }
    Ok(worst)
}

/// Whether the training kernels (the norm kernel among them) are on.
fn train_kernels_on() -> bool {
    sigma_trainer::kernels::training::kernels_enabled()
}

/// One case of [`check_normed`]: its error against fp32.
fn normed_case(c: &Case, with_add: bool, device: Device, steps: usize) -> Result<f64> {
    let (name, rows, k, gated, eps) = (c.name, c.rows, c.k, c.gated, 1e-5);
    let (bf, f32) = ((Kind::BFloat16, device), (Kind::Float, device));
    let wrows: Vec<i64> = if gated {
        vec![2 * c.ns[0]]
    } else {
        c.ns.to_vec()
    };
    let bytes: i64 = wrows.iter().map(|n| n * k * 2).sum();
    let copies = (CYCLE_BYTES / bytes).clamp(2, 64);
    let sets: Vec<Vec<Tensor>> = (0..copies)
        .map(|_| {
            wrows
                .iter()
                .map(|&n| Tensor::randn([n, k], bf) * 0.05)
                .collect()
        })
        .collect();
    let x = Tensor::randn([rows, 1, k], f32) * 3.0;
    let add = with_add.then(|| Tensor::randn([rows, 1, k], bf));
    let w = Tensor::randn([k], f32) * 0.1 + 1.0;
    let norm = gemv::Norm {
        x: &x,
        add: add.as_ref(),
        w: &w,
        eps,
    };
    let fused = |ws: &[Tensor]| -> Result<(Option<Tensor>, Vec<Tensor>)> {
        let refs: Vec<&Tensor> = ws.iter().collect();
        gemv::gemv_normed(&norm, &refs, gated)
            .ok_or_else(|| anyhow::anyhow!("the normed kernel did not run for {name}"))
    };
    let apart = |ws: &[Tensor]| -> Result<(Tensor, Vec<Tensor>)> {
        let refs: Vec<&Tensor> = ws.iter().collect();
        let (s, h) = match &add {
            Some(a) => sigma_trainer::kernels::training::add_rms_norm_bf16(&x, a, &w, eps),
            None => sigma_trainer::kernels::training::rms_norm_bf16(&x, &w, eps)
                .map(|h| (x.shallow_clone(), h)),
        }
        .ok_or_else(|| anyhow::anyhow!("the norm kernel did not run for {name}"))?;
        let ys = gemv::gemv_by(&h, &refs, gated, gemv::Variant::pick(gated, k))
            .ok_or_else(|| anyhow::anyhow!("the plain kernel did not run for {name}"))?;
        Ok((s, ys))
    };
    let (sum, ys) = fused(&sets[0])?;
    let (s2, ys2) = apart(&sets[0])?;
    let same = |a: &Tensor, b: &Tensor| a.equal(b);
    if !ys.iter().zip(&ys2).all(|(a, b)| same(a, b)) || !sum.as_ref().is_none_or(|s| same(s, &s2)) {
        bail!("the normed kernel differs from the norm kernel and the plain kernel for {name} ({rows} rows)");
    }
    // fp32: the norm of the same sum, the products of the same bf16 weights.
    let s = add
        .as_ref()
        .map_or_else(|| x.shallow_clone(), |a| &x + a.to_kind(Kind::Float));
    let h = &s * (s.square().mean_dim(-1, true, Kind::Float) + eps).rsqrt() * &w;
    let want = reference(c, &h, &sets[0]);
    let err = ys
        .iter()
        .zip(&want)
        .fold(0.0f64, |a, (y, r)| a.max(rel_err(y, r)));
    let t_fused = per_launch(device, steps, &sets, &mut |ws| fused(ws).map(|_| ()))?;
    let t_apart = per_launch(device, steps, &sets, &mut |ws| apart(ws).map(|_| ()))?;
    println!(
        "{name:<12} rows {rows} k {k}{}: equal to the two launches; err {err:.2e} against fp32; normed {:.1} us, norm + plain {:.1} us",
        if with_add { " (+ add)" } else { "" },
        t_fused * 1e6,
        t_apart * 1e6
    );
    Ok(err)
}
