//! `sigma bench fp8`: the FP8 linear layer of `train.precision = "fp8"`
//! (docs/precision.md) on a GPU, at SIGMA-1.5B's block shapes, for each
//! recipe: libtorch's `_scaled_mm` path against the emulation (the same
//! quantised operands multiplied in fp32: equal but for the order and the
//! precision of the sums) and against an fp32 reference (within FP8's
//! rounding), forward, input gradient and weight gradient; then timed
//! against the bf16 layer of bf16 runs (forward and backward, the weight
//! gradient added into an fp32 buffer; the weight's FP8 forms and bf16 copy
//! made before the timing, as training makes them once per optimizer step).
//! Exits non-zero past a tolerance.
//!
//! First, on a GPU, the quantisation kernels (csrc/train_kernels.cu's
//! fp8_amax and fp8_cast) against the tensor form of the same rule: the
//! same bytes for every kind of scale, both formats, odd shapes, zero rows
//! and columns, magnitudes down to FP8's subnormals, NaN kept; and their
//! time against the tensor form's at the layer's largest operands.
//!
//! On the CPU (`--device cpu`) it runs what libtorch runs there, the
//! tensorwise recipe at small shapes: a check of the bench itself, not of
//! FP8 hardware; the timings then mean nothing.
//!
//! First run on a GPU (an H100) on 2026-12-05: docs/benchmarks.md.

use anyhow::{bail, Result};
use sigma_trainer::kernels::fp8::{
    self, Amax, Format, Fp8Opts, Fp8Weight, Gemm, QuantPath, Scaling,
};
use sigma_trainer::kernels::fused;
use tch::{Device, Kind, Tensor};

use super::timing::{device_name, median_time};

/// The `_scaled_mm` path against the emulation, largest |difference| over
/// the largest |emulated value|: the same FP8 products summed in another
/// order (and on Hopper by the tensor cores' accumulator), then rounded to
/// bf16 (2^-8 of a value) or written in fp32.
const TOL_EMULATION: f64 = 1e-2;

/// Either path against fp32, normwise (||a - b|| / ||b||): e4m3 rounds a
/// value by up to 2^-4 of itself, e5m2 by 2^-3, independently per element,
/// so a sum of products is off by about 2^-4 / sqrt(3) (e4m3 x e4m3) to
/// 2^-3 / sqrt(3) (e5m2 x e4m3) of its norm; 0.15 leaves room above both.
const TOL_FP32: f64 = 0.15;

/// (tokens, in, out, what): SIGMA-1.5B's block linears at micro-batch 4 x 2048.
const SHAPES_1_5B: [(i64, i64, i64, &str); 8] = [
    (8192, 2048, 2048, "q_proj"),
    (8192, 2048, 256, "k_proj"),
    (8192, 2048, 1024, "v_proj"),
    (8192, 1024, 2048, "o_proj"),
    (8192, 2048, 3072, "aug_q gate/up"),
    (8192, 3072, 2048, "aug_q down"),
    (8192, 2048, 6144, "ffn gate/up"),
    (8192, 6144, 2048, "ffn down"),
];

const SHAPES_SMALL: [(i64, i64, i64, &str); 2] = [(64, 128, 96, "small"), (48, 64, 80, "small")];

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let e = (a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}

fn norm_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let e = (a - &b).norm().double_value(&[]) / b.norm().double_value(&[]);
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}

/// One layer's inputs: x [rows, in], w [out, in] (fp32 master) and its bf16
/// working copy wb, gy [rows, out].
struct Case {
    x: Tensor,
    w: Tensor,
    wb: Tensor,
    gy: Tensor,
}

impl Case {
    fn new(device: Device, rows: i64, din: i64, dout: i64) -> Case {
        let opts = (Kind::Float, device);
        let w = Tensor::randn([dout, din], opts) * 0.02;
        Case {
            x: Tensor::randn([rows, din], opts).to_kind(Kind::BFloat16),
            wb: w.to_kind(Kind::BFloat16),
            w,
            gy: (Tensor::randn([rows, dout], opts) * 1e-3).to_kind(Kind::BFloat16),
        }
    }

    /// Output, input gradient and weight gradient (added into `main`, an
    /// fp32 buffer) through the weight's FP8 forms `weight`.
    fn fp8(&self, weight: &Fp8Weight, main: &Tensor, o: &Fp8Opts) -> [Tensor; 3] {
        let x = self.x.detach().set_requires_grad(true);
        let y = fp8::linear(&x, &self.wb, weight, Some(main), None, o);
        let g = fused::grad(&[&y], &[&self.gy], &[&x]);
        [y, g[0].shallow_clone(), main.shallow_clone()]
    }

    /// The bf16 layer of bf16 runs, forward and backward.
    fn bf16(&self, main: &Tensor) {
        let x = self.x.detach().set_requires_grad(true);
        let y = fused::linear_accum(&x, &self.wb, main, None);
        let _ = fused::grad(&[&y], &[&self.gy], &[&x]);
    }

    /// The fp32 reference: x w^T, gy w, gy^T x.
    fn reference(&self) -> [Tensor; 3] {
        let (x, gy) = (self.x.to_kind(Kind::Float), self.gy.to_kind(Kind::Float));
        [
            x.matmul(&self.w.tr()),
            gy.matmul(&self.w),
            gy.tr().matmul(&x),
        ]
    }
}

fn opts(scaling: Scaling, gemm: Gemm) -> Fp8Opts {
    Fp8Opts {
        scaling,
        fast_accum: false,
        grad: match scaling {
            Scaling::Tensorwise => Format::E5m2,
            Scaling::Rowwise => Format::E4m3,
        },
        wgrad_fp8: true,
        margin: 0,
        gemm,
    }
}

/// Check and time one shape under one recipe: (worst vs emulation, worst vs fp32).
fn case(
    device: Device,
    steps: usize,
    shape: (i64, i64, i64, &str),
    s: Scaling,
) -> Result<(f64, f64)> {
    let (rows, din, dout, what) = shape;
    let c = Case::new(device, rows, din, dout);
    let (real_o, emu_o) = (opts(s, Gemm::ScaledMm), opts(s, Gemm::Emulated));
    // The weight's FP8 forms are made once, as training makes them once per
    // optimizer step: the timings are a micro-batch's.
    let weight = Fp8Weight::new(&c.w, s, 0);
    let (real, emu, reference) = (
        c.fp8(&weight, &c.w.zeros_like(), &real_o),
        c.fp8(&weight, &c.w.zeros_like(), &emu_o),
        c.reference(),
    );
    let vs_emu: Vec<f64> = real.iter().zip(&emu).map(|(a, b)| max_rel(a, b)).collect();
    let vs_fp32: Vec<f64> = real
        .iter()
        .zip(&reference)
        .map(|(a, b)| norm_rel(a, b))
        .collect();
    let scratch = c.w.zeros_like();
    let t_fp8 = median_time(device, steps, &mut || {
        let _ = c.fp8(&weight, &scratch, &real_o);
        Ok(())
    })?;
    let t_bf16 = median_time(device, steps, &mut || {
        c.bf16(&scratch);
        Ok(())
    })?;
    let e = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:>9.2e}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{what:>14} {rows:>5} {din:>5} {dout:>5}  {}  {}  {:>8.3} {:>8.3} {:>6.2}x",
        e(&vs_emu),
        e(&vs_fp32),
        t_fp8 * 1e3,
        t_bf16 * 1e3,
        t_bf16 / t_fp8
    );
    let worst = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    Ok((worst(&vs_emu), worst(&vs_fp32)))
}

/// The inputs the quantisation check runs over, each in bf16 (activations,
/// gradients) and in fp32 (master weights): (what, tensor).
fn quant_inputs(device: Device) -> Vec<(String, Tensor)> {
    quant_inputs_f32(device)
        .into_iter()
        .flat_map(|(what, t)| {
            [
                (format!("{what} bf16"), t.to_kind(Kind::BFloat16)),
                (format!("{what} fp32"), t),
            ]
        })
        .collect()
}

/// [`quant_inputs`] in fp32.
fn quant_inputs_f32(device: Device) -> Vec<(String, Tensor)> {
    let opts = (Kind::Float, device);
    let mut v = Vec::new();
    for (rows, cols) in [(64, 64), (48, 80), (208, 136), (8192, 2048), (1000, 24)] {
        let normal = Tensor::randn([rows, cols], opts);
        // Magnitudes over 2^-40..2^40: scaled values reach FP8's subnormals.
        let wide = &normal * (Tensor::randn([rows, cols], opts) * 8.0).exp();
        let holes = &normal * 1e-3;
        let _ = holes.narrow(0, rows / 3, 1).fill_(0.0);
        let _ = holes.narrow(1, cols / 2, 1).fill_(0.0);
        for (what, t) in [("normal", normal), ("wide", wide), ("zero row/col", holes)] {
            v.push((format!("{rows}x{cols} {what}"), t));
        }
        v.push((
            format!("{rows}x{cols} zeros"),
            Tensor::zeros([rows, cols], opts),
        ));
    }
    let nan = Tensor::randn([64, 64], opts);
    let _ = nan.narrow(0, 5, 1).narrow(1, 7, 1).fill_(f64::NAN);
    v.push(("64x64 one NaN".into(), nan));
    v
}

/// Whether two FP8 tensors hold the same bytes (or are both undefined),
/// NaN aside: a NaN in one must be a NaN in the other, whichever of the
/// format's NaN encodings each conversion picks.
fn same_bytes(a: &Tensor, b: &Tensor) -> bool {
    match (a.defined(), b.defined()) {
        (false, false) => true,
        (true, true) => {
            let (na, nb) = (
                a.to_kind(Kind::Float).isnan(),
                b.to_kind(Kind::Float).isnan(),
            );
            let bytes = |t: &Tensor, nan: &Tensor| {
                t.view_dtype(Kind::Uint8).masked_select(&nan.logical_not())
            };
            a.size() == b.size() && na.equal(&nb) && bytes(a, &na).equal(&bytes(b, &nb))
        }
        _ => false,
    }
}

/// The quantisation kernels against the tensor form on the GPU: how many of
/// the cases differed (each printed).
fn check_quantisation(device: Device, steps: usize) -> Result<usize> {
    let mut bad = 0;
    let mut cases = 0;
    let kinds = [
        (Amax::Tensor, (true, true)),
        (Amax::Tensor, (true, false)),
        (Amax::Rows, (true, false)),
        (Amax::Cols, (false, true)),
    ];
    for (what, x) in quant_inputs(device) {
        for fmt in [Format::E4m3, Format::E5m2] {
            for (kind, want) in kinds {
                if want.1 && x.size()[0] % 16 != 0 {
                    continue; // the kernels write a transpose for rows in 16s
                }
                for margin in [0, 2] {
                    cases += 1;
                    let k = fp8::quantize_2d(&x, fmt, kind, margin, want, QuantPath::Kernels);
                    let t = fp8::quantize_2d(&x, fmt, kind, margin, want, QuantPath::TensorForm);
                    let scales = k.2.size() == t.2.size()
                        && k.2.view_dtype(Kind::Int).equal(&t.2.view_dtype(Kind::Int));
                    if !(same_bytes(&k.0, &t.0) && same_bytes(&k.1, &t.1) && scales) {
                        bad += 1;
                        println!("  MISMATCH {what} {} {kind:?} margin {margin}: q {} qt {} scales {scales}",
                            fmt.name(), same_bytes(&k.0, &t.0), same_bytes(&k.1, &t.1));
                    }
                }
            }
        }
    }
    println!(
        "quantisation kernels vs tensor form: {} of {cases} cases the same bytes",
        cases - bad
    );
    for (rows, cols, kind, what) in [
        (8192, 2048, Kind::BFloat16, "x of q/k/v"),
        (8192, 6144, Kind::BFloat16, "gy of ffn gate/up"),
        (12288, 2048, Kind::Float, "the fp32 master of ffn gate/up"),
    ] {
        let x = Tensor::randn([rows, cols], (Kind::Float, device)).to_kind(kind);
        let t = |path| {
            median_time(device, steps, &mut || {
                let _ = fp8::quantize_2d(&x, Format::E4m3, Amax::Tensor, 0, (true, true), path);
                Ok(())
            })
        };
        let (k, f) = (t(QuantPath::Kernels)?, t(QuantPath::TensorForm)?);
        println!(
            "  tensorwise q and q^T of {what} [{rows}, {cols}]: kernels {:.3} ms, tensor form {:.3} ms ({:.1}x)",
            k * 1e3,
            f * 1e3,
            f / k
        );
    }
    Ok(bad)
}

pub fn run(device: Device, steps: usize) -> Result<()> {
    if device.is_cuda() {
        let bad = check_quantisation(device, steps)?;
        if bad > 0 {
            bail!("the FP8 quantisation kernels differ from the tensor form in {bad} cases");
        }
    } else {
        println!("on the CPU: the quantisation kernels need a GPU (not checked)");
    }
    let (shapes, recipes): (&[_], &[_]) = match device {
        Device::Cuda(_) => (&SHAPES_1_5B, &[Scaling::Tensorwise, Scaling::Rowwise]),
        _ => {
            println!("on the CPU: libtorch's _scaled_mm takes tensorwise scales only; small shapes; the times mean nothing");
            (&SHAPES_SMALL, &[Scaling::Tensorwise])
        }
    };
    println!(
        "FP8 linear layer on {} (_scaled_mm vs emulation: largest |difference| / largest |value|, tolerance {TOL_EMULATION}; vs fp32: normwise, tolerance {TOL_FP32}; y, dx, dw each; forward + backward times, FP8 vs bf16)",
        device_name(device)
    );
    let (mut worst_emu, mut worst_fp32) = (0f64, 0f64);
    for &s in recipes {
        println!(
            "{s:?} scaling (gradients in {}):",
            opts(s, Gemm::Emulated).grad.name()
        );
        println!(
            "{:>14} {:>5} {:>5} {:>5}  {:>29}  {:>29}  {:>8} {:>8} {:>7}",
            "layer",
            "rows",
            "in",
            "out",
            "vs emulation (y dx dw)",
            "vs fp32 (y dx dw)",
            "fp8 ms",
            "bf16 ms",
            "speedup"
        );
        for &shape in shapes {
            let (e, f) = case(device, steps, shape, s)?;
            worst_emu = worst_emu.max(e);
            worst_fp32 = worst_fp32.max(f);
        }
    }
    if worst_emu > TOL_EMULATION || worst_fp32 > TOL_FP32 {
        bail!("the FP8 layer is off: {worst_emu:.3e} from the emulation (tolerance {TOL_EMULATION}), {worst_fp32:.3e} from fp32 (tolerance {TOL_FP32})");
    }
    println!(
        "fp8 check passed: largest difference {worst_emu:.2e} from the emulation, {worst_fp32:.2e} from fp32; tensorwise weight gradients by {}",
        fp8::weight_grad_gemm()
    );
    Ok(())
}
