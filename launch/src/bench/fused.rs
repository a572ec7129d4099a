//! `sigma bench fused`: the fused operations of bf16 training on a GPU,
//! checked against an fp32 reference and timed against the tensor operations
//! they replace: the SwiGLU kernels (forward and backward over the merged
//! gate/up activation), the RoPE kernels, the cross-entropy kernels, the
//! RMSNorm kernels (fp32 in, bf16 out) with and without the residual add
//! before the norm, and the weight-gradient GEMM that
//! accumulates in fp32 into the gradient buffer; and decoding's
//! matrix-vector kernels (gemv.rs). Exits non-zero past the tolerance.
//!
//! One function per kernel family prints its table and returns its worst
//! error (of the fused form; the tensor form's errors are printed for scale).

use anyhow::{bail, Result};
use sigma_trainer::kernels::{fused, training as train_kernels};
use tch::{Device, Kind, Tensor};

use super::timing::{device_name, median_time, rel_err};

/// bf16 rounds to 2^-9 of a value; results of one rounding (the kernels) or
/// of a few (the tensor form, the bf16 gradient) stay within a few of those.
const TOLERANCE: f64 = 1e-2;

pub fn run(device: Device, steps: usize) -> Result<()> {
    if !device.is_cuda() {
        bail!("sigma bench fused checks and times GPU kernels: it needs --device cuda (or auto on a GPU machine)");
    }
    if !train_kernels::kernels_enabled() {
        bail!("SIGMA_TRAIN_KERNELS=off: unset it to check the kernels");
    }
    println!("fused training operations on {} (bf16; errors relative to the largest |reference| in fp32; tolerance {TOLERANCE})", device_name(device));
    let mut worst: f64 = 0.0;
    worst = worst.max(swiglu(device, steps)?);
    worst = worst.max(rope(device, steps)?);
    worst = worst.max(cross_entropy(device, steps)?);
    worst = worst.max(rms_norm(device, steps)?);
    worst = worst.max(add_rms_norm(device, steps)?);
    worst = worst.max(weight_grad(device, steps)?);
    worst = worst.max(super::gemv::check(device, steps)?);
    worst = worst.max(super::gemv::check_normed(device, steps)?);
    if worst > TOLERANCE {
        bail!("a fused operation is off by {worst:.3e} of its reference (tolerance {TOLERANCE})");
    }
    println!("fused operations check passed: largest relative error {worst:.2e}");
    Ok(())
}

/// Median seconds of a kernel and of its tensor form, each over `steps` runs.
fn kernel_and_tensor_times(
    device: Device,
    steps: usize,
    mut kernel: impl FnMut() -> Result<()>,
    mut tensor: impl FnMut(),
) -> Result<(f64, f64)> {
    let tk = median_time(device, steps, &mut kernel)?;
    let tt = median_time(device, steps, &mut || {
        tensor();
        Ok(())
    })?;
    Ok((tk, tt))
}

/// A table row: `lead` (the case), each error right-aligned in `width`
/// columns, then the kernel's and the tensor form's milliseconds.
fn row(lead: &str, errs: &[f64], width: usize, (tk, tt): (f64, f64)) -> String {
    let mut r = lead.to_string();
    for e in errs {
        r.push_str(&format!(" {e:>width$.2e}"));
    }
    r + &format!(" {:>10.3} {:>10.3}", tk * 1e3, tt * 1e3)
}

/// The largest of the errors at even positions (the fused form's, each
/// followed by the tensor form's).
fn worst_of_kernel(errs: &[f64]) -> f64 {
    errs.iter().step_by(2).fold(0.0, |a, &e| a.max(e))
}

/// SwiGLU over the merged gate/up activation gu [rows, 2F], forward + backward.
fn swiglu(device: Device, steps: usize) -> Result<f64> {
    println!("SwiGLU over gu [rows, 2F], forward + backward:");
    println!(
        "{:>6} {:>5} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "rows", "F", "kernel y", "tensor y", "kernel dgu", "tensor dgu", "kernel ms", "tensor ms"
    );
    let mut worst: f64 = 0.0;
    for (rows, f) in [(8192, 6144), (8192, 3072), (16384, 6144), (37, 24)] {
        let gu =
            (Tensor::randn([rows, 2 * f], (Kind::Float, device)) * 2.0).to_kind(Kind::BFloat16);
        let dy = Tensor::randn([rows, f], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let fused = |gu: &Tensor| {
            let x = gu.detach().set_requires_grad(true);
            let y = train_kernels::swiglu(&x);
            let g = Tensor::run_backward(&[(&y * &dy).sum(Kind::Float)], &[&x], false, false);
            (y, g[0].shallow_clone())
        };
        let tensor = |gu: &Tensor, dy: &Tensor| {
            let x = gu.detach().set_requires_grad(true);
            let y = x.narrow(-1, 0, f).silu() * x.narrow(-1, f, f);
            let g = Tensor::run_backward(&[(&y * dy).sum(Kind::Float)], &[&x], false, false);
            (y, g[0].shallow_clone())
        };
        let (y_ref, g_ref) = tensor(&gu.to_kind(Kind::Float), &dy.to_kind(Kind::Float));
        let (yk, gk) = fused(&gu);
        let (yt, gt) = tensor(&gu, &dy);
        let errs = [
            rel_err(&yk, &y_ref),
            rel_err(&yt, &y_ref),
            rel_err(&gk, &g_ref),
            rel_err(&gt, &g_ref),
        ];
        worst = worst.max(worst_of_kernel(&errs));
        let times = kernel_and_tensor_times(
            device,
            steps,
            || {
                let _ = fused(&gu);
                Ok(())
            },
            || {
                let _ = tensor(&gu, &dy);
            },
        )?;
        println!("{}", row(&format!("{rows:>6} {f:>5}"), &errs, 11, times));
    }
    Ok(worst)
}

/// RoPE tables as the model makes them: [cos, cos] and [-sin, sin] of the
/// angles p / 50000^(2i/dim), for positions 0..len, in bf16.
fn rope_tables(len: i64, dim: i64, device: Device) -> (Tensor, Tensor) {
    let inv = (Tensor::arange_start_step(0, dim, 2, (Kind::Double, device)) / dim as f64
        * -(50_000f64.ln()))
    .exp();
    let ang = Tensor::arange(len, (Kind::Double, device)).unsqueeze(1) * inv.unsqueeze(0);
    let cs = Tensor::cat(&[ang.cos(), ang.cos()], 1).to_kind(Kind::BFloat16);
    let sn = Tensor::cat(&[-ang.sin(), ang.sin()], 1).to_kind(Kind::BFloat16);
    (cs, sn)
}

/// RoPE of x [b, t, heads, dim] at positions start.., forward + backward.
fn rope(device: Device, steps: usize) -> Result<f64> {
    println!("RoPE of x [b, t, heads, dim] at positions start.., forward + backward:");
    println!(
        "{:>22} {:>5} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "b, t, heads, dim",
        "start",
        "kernel y",
        "tensor y",
        "kernel dx",
        "tensor dx",
        "kernel ms",
        "tensor ms"
    );
    let mut worst: f64 = 0.0;
    for (shape, start) in [
        ([2, 4096, 32, 64], 0),
        ([2, 4096, 4, 64], 0),
        ([1, 1, 32, 64], 100),
        ([2, 100, 8, 128], 7),
        ([3, 64, 4, 16], 0),
    ] {
        let [b, t, heads, dim] = shape;
        let (cs, sn) = rope_tables(start + t, dim, device);
        let x = Tensor::randn([b, t, heads, dim], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let dy = Tensor::randn([b, t, heads, dim], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let tensor = |x: &Tensor, dy: &Tensor, k: Kind| {
            let xg = x.detach().set_requires_grad(true);
            let (c, s) = (
                cs.narrow(0, start, t).unsqueeze(1).to_kind(k),
                sn.narrow(0, start, t).unsqueeze(1).to_kind(k),
            );
            let swapped = xg
                .reshape([b, t, heads, 2, dim / 2])
                .flip([3])
                .view([b, t, heads, dim]);
            let y = &xg * c + swapped * s;
            let g = Tensor::run_backward(&[(&y * dy).sum(Kind::Float)], &[&xg], false, false);
            (y, g[0].shallow_clone())
        };
        let kernel = |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let xg = x.detach().set_requires_grad(true);
            let Some(y) = train_kernels::rope(&xg, &cs, &sn, start) else {
                bail!("the RoPE kernel did not run for {shape:?}");
            };
            let g = Tensor::run_backward(&[(&y * &dy).sum(Kind::Float)], &[&xg], false, false);
            Ok((y, g[0].shallow_clone()))
        };
        let float = |t: &Tensor| t.to_kind(Kind::Float);
        let (y_ref, g_ref) = tensor(&float(&x), &float(&dy), Kind::Float);
        let (yk, gk) = kernel(&x)?;
        let (yt, gt) = tensor(&x, &dy, Kind::BFloat16);
        let errs = [
            rel_err(&yk, &y_ref),
            rel_err(&yt, &y_ref),
            rel_err(&gk, &g_ref),
            rel_err(&gt, &g_ref),
        ];
        worst = worst.max(worst_of_kernel(&errs));
        let times = kernel_and_tensor_times(
            device,
            steps,
            || kernel(&x).map(|_| ()),
            || {
                let _ = tensor(&x, &dy, Kind::BFloat16);
            },
        )?;
        let lead = format!("{:>22} {start:>5}", format!("{b}, {t}, {heads}, {dim}"));
        println!("{}", row(&lead, &errs, 11, times));
    }
    Ok(worst)
}

/// Cross-entropy sum of bf16 logits [rows, vocab] (every 7th target ignored), forward + backward.
fn cross_entropy(device: Device, steps: usize) -> Result<f64> {
    println!("cross-entropy sum of bf16 logits [rows, vocab] (every 7th target ignored), forward + backward:");
    println!(
        "{:>6} {:>7} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "rows",
        "vocab",
        "kernel loss",
        "tensor loss",
        "kernel d",
        "tensor d",
        "kernel ms",
        "tensor ms"
    );
    let mut worst: f64 = 0.0;
    for (rows, vocab) in [(8192, 128256), (4096, 32000), (37, 40)] {
        let logits =
            (Tensor::randn([rows, vocab], (Kind::Float, device)) * 3.0).to_kind(Kind::BFloat16);
        let targets = Tensor::randint(vocab, [rows], (Kind::Int64, device));
        let ignored = Tensor::arange(rows, (Kind::Int64, device))
            .remainder(7)
            .eq(0);
        let targets = targets.masked_fill(&ignored, -100);
        let tensor = |l: &Tensor| {
            let lg = l.detach().set_requires_grad(true);
            let loss = lg.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                &targets,
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            );
            let g = Tensor::run_backward(&[&loss], &[&lg], false, false);
            (loss, g[0].shallow_clone())
        };
        let kernel = |l: &Tensor| -> Result<(Tensor, Tensor)> {
            let lg = l.detach().set_requires_grad(true);
            let Some(loss) = train_kernels::cross_entropy_sum(&lg, &targets, -100) else {
                bail!("the cross-entropy kernel did not run for {rows} x {vocab}");
            };
            let g = Tensor::run_backward(&[&loss], &[&lg], false, false);
            Ok((loss, g[0].shallow_clone()))
        };
        let (l_ref, g_ref) = tensor(&logits.to_kind(Kind::Float));
        let (lk, gk) = kernel(&logits)?;
        cross_entropy_in_place(&logits, &targets, &gk, (rows, vocab))?;
        let (lt, gt) = tensor(&logits);
        let errs = [
            rel_err(&lk, &l_ref),
            rel_err(&lt, &l_ref),
            rel_err(&gk, &g_ref),
            rel_err(&gt, &g_ref),
        ];
        worst = worst.max(worst_of_kernel(&errs));
        let times = kernel_and_tensor_times(
            device,
            steps,
            || kernel(&logits).map(|_| ()),
            || {
                let _ = tensor(&logits);
            },
        )?;
        println!(
            "{}",
            row(&format!("{rows:>6} {vocab:>7}"), &errs, 11, times)
        );
    }
    Ok(worst)
}

/// Logits the graph made (as the head's matmul makes them) take the
/// gradient over their own buffer in backward: the same numbers as `apart`,
/// the gradient the kernel wrote into a buffer of its own.
fn cross_entropy_in_place(
    logits: &Tensor,
    targets: &Tensor,
    apart: &Tensor,
    (rows, vocab): (i64, i64),
) -> Result<()> {
    let lg = logits.detach().set_requires_grad(true);
    let made = &lg * 1.0;
    let Some(loss) = train_kernels::cross_entropy_sum(&made, targets, -100) else {
        bail!("the cross-entropy kernel did not run for {rows} x {vocab}");
    };
    let gm = Tensor::run_backward(&[&loss], &[&lg], false, false);
    if !gm[0].equal(apart) {
        bail!("cross-entropy: the gradient written over the logits differs from the one written apart ({rows} x {vocab})");
    }
    if !made.equal(&gm[0]) {
        bail!("cross-entropy: the gradient of logits made by the graph was not written over them ({rows} x {vocab})");
    }
    Ok(())
}

/// (y, dx, dw) of the sum of y * dy, for y = RMSNorm(x, w) from the leaves x and w.
fn norm_grads(y: &Tensor, xg: &Tensor, wg: &Tensor, dy: &Tensor) -> (Tensor, Tensor, Tensor) {
    let kind = y.kind();
    let g = Tensor::run_backward(&[(y * dy.to_kind(kind)).sum(kind)], &[xg, wg], false, false);
    (
        y.shallow_clone(),
        g[0].shallow_clone(),
        g[1].shallow_clone(),
    )
}

/// RMSNorm of fp32 x [rows, d] into bf16, forward + backward.
fn rms_norm(device: Device, steps: usize) -> Result<f64> {
    println!("RMSNorm of fp32 x [rows, d] into bf16, forward + backward (gradients of x and the weight in fp32):");
    println!(
        "{:>6} {:>5} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "rows",
        "d",
        "kernel y",
        "tensor y",
        "kernel dx",
        "tensor dx",
        "kernel dw",
        "tensor dw",
        "kernel ms",
        "tensor ms"
    );
    let mut worst: f64 = 0.0;
    for (rows, d) in [
        (8192, 2048),
        (16384, 4096),
        (5, 8192),
        (1000, 1028),
        (600, 8188),
        (37, 24),
    ] {
        let x = Tensor::randn([rows, d], (Kind::Float, device)) * 3.0;
        let w = Tensor::rand([d], (Kind::Float, device)) + 0.5;
        let dy = Tensor::randn([rows, d], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let eps = 1e-5;
        let leaves = |x: &Tensor, w: &Tensor| {
            (
                x.detach().set_requires_grad(true),
                w.detach().set_requires_grad(true),
            )
        };
        let tensor = |x: &Tensor, w: &Tensor, out: Kind| {
            let (xg, wg) = leaves(x, w);
            let y = xg.rms_norm([d], Some(&wg), eps).to_kind(out);
            norm_grads(&y, &xg, &wg, &dy)
        };
        let kernel = || -> Result<(Tensor, Tensor, Tensor)> {
            let (xg, wg) = leaves(&x, &w);
            let Some(y) = train_kernels::rms_norm_bf16(&xg, &wg, eps) else {
                bail!("the RMSNorm kernel did not run for {rows} x {d}");
            };
            Ok(norm_grads(&y, &xg, &wg, &dy))
        };
        let dbl = |t: &Tensor| t.to_kind(Kind::Double);
        let r = tensor(&dbl(&x), &dbl(&w), Kind::Double);
        let k = kernel()?;
        let t = tensor(&x, &w, Kind::BFloat16);
        let errs = [
            rel_err(&k.0, &r.0),
            rel_err(&t.0, &r.0),
            rel_err(&k.1, &r.1),
            rel_err(&t.1, &r.1),
            rel_err(&k.2, &r.2),
            rel_err(&t.2, &r.2),
        ];
        worst = worst.max(worst_of_kernel(&errs));
        let times = kernel_and_tensor_times(
            device,
            steps,
            || kernel().map(|_| ()),
            || {
                let _ = tensor(&x, &w, Kind::BFloat16);
            },
        )?;
        println!("{}", row(&format!("{rows:>6} {d:>5}"), &errs, 11, times));
    }
    Ok(worst)
}

/// One add + RMSNorm case: fp32 x, bf16 y [rows, d], the fp32 weight, and
/// the upstream gradients of the sum (fp32) and of the norm (bf16).
struct AddNormCase {
    rows: i64,
    d: i64,
    x: Tensor,
    y: Tensor,
    w: Tensor,
    up_s: Tensor,
    up_h: Tensor,
}

impl AddNormCase {
    fn new(rows: i64, d: i64, device: Device) -> Self {
        AddNormCase {
            rows,
            d,
            x: Tensor::randn([rows, d], (Kind::Float, device)) * 3.0,
            y: Tensor::randn([rows, d], (Kind::Float, device)).to_kind(Kind::BFloat16),
            w: Tensor::rand([d], (Kind::Float, device)) + 0.5,
            up_s: Tensor::randn([rows, d], (Kind::Float, device)),
            up_h: Tensor::randn([rows, d], (Kind::Float, device)).to_kind(Kind::BFloat16),
        }
    }

    /// (s, h, dx, dy, dw) of the sum of s * up_s + h * up_h, where (s, h) =
    /// (x + y, RMSNorm(x + y)) by the kernel (`fused`) or by tensor
    /// operations (in f64 throughout when x is f64, else writing bf16 as the
    /// kernel does).
    fn pass(&self, x: &Tensor, y: &Tensor, w: &Tensor, fused: bool) -> Result<[Tensor; 5]> {
        let (rows, d) = (self.rows, self.d);
        let eps = 1e-5;
        let (xg, yg, wg) = (
            x.detach().set_requires_grad(true),
            y.detach().set_requires_grad(true),
            w.detach().set_requires_grad(true),
        );
        let (s, h) = if fused {
            let Some(r) = train_kernels::add_rms_norm_bf16(&xg, &yg, &wg, eps) else {
                bail!("the add + RMSNorm kernel did not run for {rows} x {d}");
            };
            r
        } else {
            let s = &xg + &yg;
            // The reference in f64 throughout; the tensor form writes bf16.
            let out = if x.kind() == Kind::Double {
                Kind::Double
            } else {
                Kind::BFloat16
            };
            let h = s.rms_norm([d], Some(&wg), eps).to_kind(out);
            (s, h)
        };
        let k = s.kind();
        let total =
            (&s * self.up_s.to_kind(k)).sum(k) + (h.to_kind(k) * self.up_h.to_kind(k)).sum(k);
        let g = Tensor::run_backward(&[total], &[&xg, &yg, &wg], false, false);
        Ok([
            s,
            h,
            g[0].shallow_clone(),
            g[1].shallow_clone(),
            g[2].shallow_clone(),
        ])
    }
}

/// Residual add and RMSNorm: (x + y, RMSNorm(x + y)), forward + backward.
fn add_rms_norm(device: Device, steps: usize) -> Result<f64> {
    println!("residual add and RMSNorm: (x + y, RMSNorm(x + y)) for fp32 x and bf16 y [rows, d], forward + backward (gradients of x, y and the weight):");
    println!(
        "{:>6} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "rows", "d", "kernel s", "tensor s", "kernel h", "tensor h", "kernel dx", "tensor dx",
        "kernel dy", "tensor dy", "kernel dw", "tensor dw", "kernel ms", "tensor ms"
    );
    let mut worst: f64 = 0.0;
    for (rows, d) in [(16384, 2048), (1000, 1028), (37, 24)] {
        let c = AddNormCase::new(rows, d, device);
        let (x, y, w) = (&c.x, &c.y, &c.w);
        let dbl = |t: &Tensor| t.to_kind(Kind::Double);
        let r = c.pass(&dbl(x), &dbl(y), &dbl(w), false)?;
        let k = c.pass(x, y, w, true)?;
        let t = c.pass(x, y, w, false)?;
        let mut errs = Vec::new();
        for i in 0..5 {
            errs.push(rel_err(&k[i], &r[i]));
            errs.push(rel_err(&t[i], &r[i]));
        }
        worst = worst.max(worst_of_kernel(&errs));
        let times = kernel_and_tensor_times(
            device,
            steps,
            || c.pass(x, y, w, true).map(|_| ()),
            || {
                let _ = c.pass(x, y, w, false);
            },
        )?;
        println!("{}", row(&format!("{rows:>6} {d:>5}"), &errs, 10, times));
    }
    Ok(worst)
}

/// The weight gradient of x [rows, in] w^T added into an fp32 buffer by one
/// GEMM, against the bf16 weight gradient computed and then added.
fn weight_grad(device: Device, steps: usize) -> Result<f64> {
    println!("weight gradient of x [rows, in] w^T: added into an fp32 buffer by one GEMM vs computed in bf16 and added (forward + backward, input gradient included):");
    println!(
        "{:>6} {:>5} {:>5} {:>11} {:>11} {:>10} {:>10} {:>6}",
        "rows", "in", "out", "fused err", "bf16 err", "fused ms", "bf16 ms", "GEMM"
    );
    let mut worst: f64 = 0.0;
    for (rows, din, dout) in [
        (8192, 2048, 6144),
        (8192, 6144, 2048),
        (8192, 2048, 256),
        (37, 24, 40),
    ] {
        let x = Tensor::randn([rows, din], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let w = (Tensor::randn([dout, din], (Kind::Float, device)) * 0.02).to_kind(Kind::BFloat16);
        let gy = Tensor::randn([rows, dout], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let start = Tensor::randn([dout, din], (Kind::Float, device));
        let reference = &start
            + gy.to_kind(Kind::Double)
                .transpose(0, 1)
                .matmul(&x.to_kind(Kind::Double))
                .to_kind(Kind::Float);
        let fused_grad = |main: &Tensor| {
            let xg = x.detach().set_requires_grad(true);
            let y = fused::linear_accum(&xg, &w, main, None);
            let _ = Tensor::run_backward(&[(&y * &gy).sum(Kind::Float)], &[&xg], false, false);
        };
        let bf16_grad = |main: &mut Tensor| {
            let (xg, wg) = (
                x.detach().set_requires_grad(true),
                w.detach().set_requires_grad(true),
            );
            let y = xg.linear::<Tensor>(&wg, None);
            let g = Tensor::run_backward(&[(&y * &gy).sum(Kind::Float)], &[&xg, &wg], false, false);
            let _ = main.g_add_(&g[1]);
        };
        let main = start.copy();
        fused_grad(&main);
        let mut plain = start.copy();
        bf16_grad(&mut plain);
        let delta = &reference - &start;
        let errs = [
            rel_err(&(&main - &start), &delta),
            rel_err(&(&plain - &start), &delta),
        ];
        worst = worst.max(worst_of_kernel(&errs));
        let scratch = start.copy();
        let mut scratch2 = start.copy();
        let times = kernel_and_tensor_times(
            device,
            steps,
            || {
                fused_grad(&scratch);
                Ok(())
            },
            || bf16_grad(&mut scratch2),
        )?;
        let gemm = if fused::linear_accum_fused_gemm() {
            "fp32"
        } else {
            "add"
        };
        let lead = format!("{rows:>6} {din:>5} {dout:>5}");
        println!("{} {gemm:>6}", row(&lead, &errs, 11, times));
    }
    Ok(worst)
}
