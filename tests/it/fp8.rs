//! FP8 training on the CPU (docs/precision.md): the scales against hand-
//! computed values, the formats' limits, which weights run in FP8, the FP8
//! copies made once per change of the weights, the emulated linear layer
//! (forward and both gradients) against float64 within a proven bound, the
//! `_scaled_mm` path (tensorwise, which libtorch runs on the CPU) against
//! the emulation, the engine's two gradient routes, a tiny run against the
//! fp32 golden losses, refusals, and resume across precisions.
//!
//! The bound of the linear layer. Rounding a normal value to a format with
//! `m` mantissa bits moves it by at most `u = 2^-(m+1)` of itself (e4m3:
//! 2^-4, e5m2: 2^-3); a value below the smallest normal moves by at most
//! half the subnormal step `h` (e4m3: 2^-10, e5m2: 2^-17), in the scaled
//! domain, i.e. `h * s` once dequantised by the scale `s`. So each operand
//! element is within `u |a| + h s` of its exact value, and a product of
//! sums `sum_k a_k b_k` of dequantised operands is within
//! `(|A|(1+u) + h s_a)(|B|(1+u) + h s_b)^T - |A||B|^T` of the exact one,
//! elementwise. The fp32 accumulation adds at most `K 2^-23` of
//! `sum |a||b|`, the bf16 output at most 2^-8 of the result. The tests
//! hold every element to that sum (times 1.001): a bound that holds for
//! any data, so it cannot be loosened by luck, and one that a wrong scale,
//! a wrong format or a missing dequantisation breaks at once.

use std::collections::BTreeSet;
use std::path::Path;

use sigma_tests::*;
use sigma_trainer::config::{Fp8Config, Fp8Recipe, KCompression, ModelConfig, WeightGrad};
use sigma_trainer::engine::{ExecOptions, Runner};
use sigma_trainer::kernels::fp8::{self, Format, Fp8Opts, Fp8Weight, Gemm, Scaling};
use sigma_trainer::kernels::fused;
use sigma_trainer::model::fp8::{choose_gemm, Fp8Plan};
use sigma_trainer::model::{GradSink, ModelInit};
use sigma_trainer::parallel::tp::TpPlan;
use sigma_trainer::Model;
use tch::{Device, Kind, Tensor};

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).contiguous().view(-1)).expect("to vec")
}

fn t32(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).view(shape)
}

#[test]
fn tensorwise_and_rowwise_scales_match_hand_computed_values() {
    // amax 2: scale 448 / 2 = 224 (dequantisation 1/224), values exact in e4m3.
    let x = t32(&[1.0, -2.0, 0.5, 0.0], &[1, 4]);
    let (q, s) = fp8::quantize(&x, Format::E4m3, false, 0);
    assert_eq!(q.kind(), Kind::Float8e4m3fn);
    assert_eq!(f64s(&q), vec![224.0, -448.0, 112.0, 0.0]);
    assert_eq!(s.size(), Vec::<i64>::new());
    assert_eq!(f64s(&s), vec![(1.0f32 / 224.0) as f64]);
    // A margin of 1 halves the scale.
    let (q, s) = fp8::quantize(&x, Format::E4m3, false, 1);
    assert_eq!(f64s(&q), vec![112.0, -224.0, 56.0, 0.0]);
    assert_eq!(f64s(&s), vec![(1.0f32 / 112.0) as f64]);
    // e5m2: 57344 / 2 = 28672.
    let (q, s) = fp8::quantize(&x, Format::E5m2, false, 0);
    assert_eq!(q.kind(), Kind::Float8e5m2);
    assert_eq!(f64s(&q), vec![28672.0, -57344.0, 14336.0, 0.0]);
    assert_eq!(f64s(&s), vec![(1.0f32 / 28672.0) as f64]);
    // Rowwise: amax 4, 0, 3 per row. Row 1 is all zeros: scale 1, no NaN.
    // Row 2: 448 / 3 = 149.33..; 3 -> 448, 0.5 -> 74.67, which e4m3 (spacing
    // 8 between 64 and 128) rounds to 72.
    let x = t32(&[1.0, -4.0, 0.0, 0.0, 3.0, 0.5], &[3, 2]);
    let (q, s) = fp8::quantize(&x, Format::E4m3, true, 0);
    assert_eq!(s.size(), vec![3, 1]);
    assert_eq!(f64s(&q), vec![112.0, -448.0, 0.0, 0.0, 448.0, 72.0]);
    let want = [1.0f32 / 112.0, 1.0, 1.0 / (448.0f32 / 3.0)];
    assert_eq!(f64s(&s), want.map(|v| v as f64).to_vec());
    // A tensor of zeros: scale 1, zeros out, nothing non-finite.
    let (q, s) = fp8::quantize(
        &Tensor::zeros([4, 8], (Kind::Float, Device::Cpu)),
        Format::E5m2,
        false,
        0,
    );
    assert_eq!(f64s(&s), vec![1.0]);
    assert!(f64s(&q).iter().all(|&v| v == 0.0));
}

#[test]
fn values_past_the_amax_saturate_at_the_formats_limits() {
    // Scales from an amax below the tensor's: 1000 is past it and saturates
    // to the largest finite value (a plain cast would give NaN in e4m3fn,
    // inf in e5m2), in both formats and in both scale shapes.
    let x = t32(&[1000.0, -1000.0, 1.0, 0.25], &[2, 2]);
    let one = Tensor::from(1.0f32);
    let (q, s) = fp8::quantize_with_amax(&x, Format::E4m3, &(one.shallow_clone() * 448.0), 0);
    assert_eq!(f64s(&q), vec![448.0, -448.0, 1.0, 0.25]);
    assert_eq!(f64s(&s), vec![1.0]);
    let (q, _) = fp8::quantize_with_amax(&(&x * 100.0), Format::E5m2, &(one * 57344.0), 0);
    // 100 and 25 round to e5m2's 96 and 24 (spacing 16 and 4 there).
    assert_eq!(f64s(&q), vec![57344.0, -57344.0, 96.0, 24.0]);
    let rows = t32(&[448.0, 0.0], &[2, 1]);
    let (q, s) = fp8::quantize_with_amax(&x, Format::E4m3, &rows, 0);
    assert_eq!(f64s(&q), vec![448.0, -448.0, 1.0, 0.25]);
    assert_eq!(f64s(&s), vec![1.0, 1.0]);
    // The limits themselves: the largest finite values round-trip, the
    // smallest subnormals too, and half of one rounds to zero (ties to even).
    for f in [Format::E4m3, Format::E5m2] {
        let v = [
            f.max(),
            -f.max(),
            f.min_normal(),
            f.subnormal_step(),
            f.subnormal_step() / 2.0,
        ];
        let t = Tensor::from_slice(&v).to_kind(Kind::Float);
        let back = f64s(&t.to_kind(f.kind()));
        assert_eq!(back, vec![v[0], v[1], v[2], v[3], 0.0], "{f:?}");
    }
    assert_eq!((Format::E4m3.max(), Format::E5m2.max()), (448.0, 57344.0));
    assert_eq!(Format::E4m3.subnormal_step(), 2f64.powi(-9));
    assert_eq!(Format::E5m2.subnormal_step(), 2f64.powi(-16));
}

/// Data for the linear layer: x [48, 64] with an outlier, w [80, 64], the
/// output gradient g [48, 80], all bf16.
fn linear_data() -> (Tensor, Tensor, Tensor) {
    let _rng = sigma_trainer::model::params::global_rng_lock();
    tch::manual_seed(11);
    let bf = |t: Tensor| t.to_kind(Kind::BFloat16);
    let x = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 2.0;
    let _ = x.get(0).get(0).fill_(30.0);
    let w = Tensor::randn([80, 64], (Kind::Float, Device::Cpu)) * 0.05;
    let g = Tensor::randn([48, 80], (Kind::Float, Device::Cpu)) * 1e-3;
    (bf(x), bf(w), bf(g))
}

/// How one operand was quantised: format and dequantisation scale, `[]` or
/// `[rows, 1]` of the operand as passed to [`envelope`].
struct Q {
    f: Format,
    rows: bool,
}

/// Per-row (or whole-tensor) dequantisation scale of `a` [R, C] (f64): amax / fmax.
fn deq_scale(a: &Tensor, q: &Q) -> Tensor {
    let amax = if q.rows {
        a.abs().amax([1], true)
    } else {
        a.abs().max()
    };
    amax / q.f.max()
}

/// An elementwise bound on |deq(quantize(t))| (f64).
fn side(t: &Tensor, q: &Q) -> Tensor {
    let u = 2f64.powi(-(q.f.mantissa_bits() + 1));
    t.abs() * (1.0 + u) + deq_scale(t, q) * (q.f.subnormal_step() / 2.0)
}

/// The bound of the module header on |A~ B~^T - A B^T| for A [M, C], B [N, C] (f64).
fn envelope(a: &Tensor, qa: &Q, b: &Tensor, qb: &Q) -> Tensor {
    let big = side(a, qa).matmul(&side(b, qb).tr());
    let exact = a.abs().matmul(&b.abs().tr());
    let k = a.size()[1] as f64;
    (&big - exact) + big * (k * 2f64.powi(-23))
}

/// Every element of `got` within the bound of `reference` (the output in
/// bf16: plus 2^-8 of the result); returns the normwise relative error.
fn within(got: &Tensor, reference: &Tensor, env: &Tensor, what: &str) -> f64 {
    let got = got.to_kind(Kind::Double);
    let err = (&got - reference).abs();
    let limit = (env * (1.0 + 2f64.powi(-8)) + reference.abs() * 2f64.powi(-8)) * 1.001 + 1e-30;
    let over = (&err - &limit).max().double_value(&[]);
    assert!(over <= 0.0, "{what}: an element is {over:e} past its bound");
    err.norm().double_value(&[]) / reference.norm().double_value(&[])
}

/// The normwise error of a GEMM of two operands each rounded to `formats`
/// is FP8's, within 20 %: rounding to nearest with `m` mantissa bits leaves
/// a relative error of root mean square `2^-(m+1) / sqrt(6)` (uniform over
/// half a spacing, `sqrt(1/2)` for the position in the binade), and the two
/// operands' add in quadrature: 0.036 for e4m3 x e4m3, 0.057 for e5m2 x
/// e4m3. The element bound above is a worst case, loose enough to admit a
/// wrong format; this catches one (and an operand left unquantised).
fn typical(err: f64, formats: &[Format], what: &str) {
    let r = |f: &Format| 2f64.powi(-(f.mantissa_bits() + 1)) / 6f64.sqrt();
    let want = formats.iter().map(|f| r(f).powi(2)).sum::<f64>().sqrt();
    assert!(
        (err / want - 1.0).abs() <= 0.2,
        "{what}: normwise error {err:.4} where FP8 rounding gives {want:.4}"
    );
}

/// The emulated layer's output and gradients (x, w, and w's into a sink) for `o`.
fn run_linear(o: &Fp8Opts, x: &Tensor, w: &Tensor, g: &Tensor, sink: bool) -> [Tensor; 3] {
    let x = x.detach().set_requires_grad(true);
    let w = w.detach().set_requires_grad(true);
    let weight = Fp8Weight::new(&w.to_kind(Kind::Float), o.scaling, o.margin);
    let main = Tensor::zeros(w.size(), (Kind::Float, Device::Cpu));
    let y = fp8::linear(&x, &w, &weight, sink.then_some(&main), None, o);
    let gr = fused::grad(&[&y], &[g], &[&x, &w]);
    let gw = if sink { main } else { gr[1].shallow_clone() };
    assert_eq!(gr[1].defined(), !sink, "the weight gradient goes one way");
    [y, gr[0].shallow_clone(), gw]
}

fn opts(scaling: Scaling, grad: Format, wgrad_fp8: bool, gemm: Gemm) -> Fp8Opts {
    Fp8Opts {
        scaling,
        fast_accum: false,
        grad,
        wgrad_fp8,
        margin: 0,
        gemm,
    }
}

/// The emulated FP8 linear layer against float64: every element of the
/// output, the input gradient and the weight gradient within the bound of
/// the module header, for both recipes, both gradient formats, FP8 and bf16
/// weight gradients, into a sink or through autograd; and each error is
/// the size FP8's rounding gives (`typical`), not a bf16 one or another
/// format's.
#[test]
fn emulated_linear_is_within_fp8_rounding_of_float64() {
    let (x, w, g) = linear_data();
    let d = |t: &Tensor| t.to_kind(Kind::Double);
    let (xd, wd, gd) = (d(&x), d(&w), d(&g));
    let (y_ref, gx_ref, gw_ref) = (xd.matmul(&wd.tr()), gd.matmul(&wd), gd.tr().matmul(&xd));
    for scaling in [Scaling::Tensorwise, Scaling::Rowwise] {
        let rows = scaling == Scaling::Rowwise;
        for grad in [Format::E5m2, Format::E4m3] {
            for wgrad_fp8 in [true, false] {
                for sink in [true, false] {
                    let o = opts(scaling, grad, wgrad_fp8, Gemm::Emulated);
                    let what = format!("{o:?}, sink {sink}");
                    let [y, gx, gw] = run_linear(&o, &x, &w, &g, sink);
                    let e4 = |rows| Q {
                        f: Format::E4m3,
                        rows,
                    };
                    let eg = |rows| Q { f: grad, rows };
                    let fwd = within(&y, &y_ref, &envelope(&xd, &e4(rows), &wd, &e4(rows)), &what);
                    typical(fwd, &[Format::E4m3, Format::E4m3], &format!("{what}: y"));
                    let dx = within(
                        &gx,
                        &gx_ref,
                        &envelope(&gd, &eg(rows), &wd.tr(), &e4(rows)),
                        &what,
                    );
                    typical(dx, &[grad, Format::E4m3], &format!("{what}: dx"));
                    let env = if wgrad_fp8 {
                        envelope(&gd.tr(), &eg(rows), &xd.tr(), &e4(rows))
                    } else {
                        // bf16 operands (exact here), fp32 sums, bf16 out.
                        gd.tr().abs().matmul(&xd.abs()) * (48.0 * 2f64.powi(-23))
                    };
                    let dw = within(&gw, &gw_ref, &env, &what);
                    if wgrad_fp8 {
                        typical(dw, &[grad, Format::E4m3], &format!("{what}: dw"));
                    } else {
                        assert!(
                            dw < 2f64.powi(-7),
                            "{what}: a bf16 weight gradient {dw:e} off"
                        );
                    }
                }
            }
        }
    }
}

/// libtorch's `_scaled_mm`, which runs tensorwise FP8 GEMMs on the CPU too,
/// computes what the emulation computes, through the layer's real operand
/// layouts and scales: output and both gradients within one bf16 unit in
/// the last place (2^-7 of the value: the two round sums made in different
/// orders) plus the fp32 sums' order (2 K 2^-23 of `sum |a~| |b~|`).
/// Measured: the output differs by one bf16 ulp in places, the input
/// gradient not at all. Rowwise scales need CUDA (`sigma bench fp8`
/// checks them on a GPU).
#[test]
fn scaled_mm_path_matches_the_emulation_where_the_cpu_runs_it() {
    let (x, w, g) = linear_data();
    let d = |t: &Tensor| t.to_kind(Kind::Double);
    let (xd, wd, gd) = (d(&x), d(&w), d(&g));
    for grad in [Format::E5m2, Format::E4m3] {
        for wgrad_fp8 in [true, false] {
            let emu = run_linear(
                &opts(Scaling::Tensorwise, grad, wgrad_fp8, Gemm::Emulated),
                &x,
                &w,
                &g,
                true,
            );
            let real = run_linear(
                &opts(Scaling::Tensorwise, grad, wgrad_fp8, Gemm::ScaledMm),
                &x,
                &w,
                &g,
                true,
            );
            let e4 = Q {
                f: Format::E4m3,
                rows: false,
            };
            let eg = Q {
                f: grad,
                rows: false,
            };
            // sum |a~| |b~| of each output's GEMM, and its contraction length.
            let sums = [
                (side(&xd, &e4).matmul(&side(&wd, &e4).tr()), 64.0),
                (side(&gd, &eg).matmul(&side(&wd.tr(), &e4).tr()), 80.0),
                (side(&gd.tr(), &eg).matmul(&side(&xd.tr(), &e4).tr()), 48.0),
            ];
            for (i, ((a, b), (sum, k))) in real.iter().zip(&emu).zip(&sums).enumerate() {
                let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
                let tol = a.abs().maximum(&b.abs()) * 2f64.powi(-7) + sum * (k * 2f64.powi(-22));
                let over = ((&a - &b).abs() - tol).max().double_value(&[]);
                assert!(
                    over <= 0.0,
                    "grad {grad:?} wgrad_fp8 {wgrad_fp8}, output {i}: {over:e} past the bound"
                );
            }
        }
    }
    // Rowwise scales are refused on the CPU by libtorch, with its message.
    let o = opts(Scaling::Rowwise, Format::E4m3, true, Gemm::ScaledMm);
    let r = std::panic::catch_unwind(|| run_linear(&o, &x, &w, &g, true));
    assert!(r.is_err(), "rowwise _scaled_mm on the CPU");
}

/// Three FP8 layers reading one input (q, k and v) with that input
/// quantised once (`quantize_input`, `linear_with`) compute, bit for bit,
/// what the three layers quantising it each give: outputs, the input's
/// gradient (summed over the three) and each weight gradient in its sink;
/// for both recipes and both kinds of weight gradient, emulated and (for
/// tensorwise) through the CPU's `_scaled_mm`.
#[test]
fn an_input_quantised_once_serves_every_layer_that_reads_it() {
    let (x, w, _) = linear_data();
    let _rng = sigma_trainer::model::params::global_rng_lock();
    tch::manual_seed(12);
    let ws: Vec<Tensor> = [80, 32, 48]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let r = Tensor::randn([n, 64], (Kind::Float, Device::Cpu)) * 0.05;
            if i == 0 { w.to_kind(Kind::Float) } else { r }.to_kind(Kind::BFloat16)
        })
        .collect();
    let gs: Vec<Tensor> = ws
        .iter()
        .map(|w| {
            (Tensor::randn([48, w.size()[0]], (Kind::Float, Device::Cpu)) * 1e-3)
                .to_kind(Kind::BFloat16)
        })
        .collect();
    let run = |o: &Fp8Opts, shared: bool| -> Vec<Tensor> {
        let x = x.detach().set_requires_grad(true);
        let input = shared.then(|| fp8::quantize_input(&x, o));
        let mut out = Vec::new();
        let mut ys = Vec::new();
        let mut mains = Vec::new();
        for w in &ws {
            let weight = Fp8Weight::new(&w.to_kind(Kind::Float), o.scaling, o.margin);
            let main = Tensor::zeros(w.size(), (Kind::Float, Device::Cpu));
            ys.push(fp8::linear_with(
                &x,
                w,
                &weight,
                Some(&main),
                None,
                o,
                input.as_ref(),
            ));
            mains.push(main);
        }
        let y_refs: Vec<&Tensor> = ys.iter().collect();
        let g_refs: Vec<&Tensor> = gs.iter().collect();
        let gx = fused::grad(&y_refs, &g_refs, &[&x]);
        out.extend(ys);
        out.push(gx[0].shallow_clone());
        out.extend(mains);
        out
    };
    let mut cases = vec![];
    for scaling in [Scaling::Tensorwise, Scaling::Rowwise] {
        for wgrad_fp8 in [true, false] {
            cases.push(opts(scaling, Format::E5m2, wgrad_fp8, Gemm::Emulated));
        }
    }
    cases.push(opts(
        Scaling::Tensorwise,
        Format::E5m2,
        true,
        Gemm::ScaledMm,
    ));
    for o in &cases {
        let (each, once) = (run(o, false), run(o, true));
        for (i, (a, b)) in each.iter().zip(&once).enumerate() {
            assert!(a.defined() && a.equal(b), "{o:?}: output {i} differs");
        }
    }
}

/// An FP8 layer multiplies the quantised input it is given (another
/// input's gives another output), and refuses one made for another recipe:
/// no transpose where tensorwise FP8 weight gradients keep one, or one
/// scale where rowwise takes one per row, with the layer's message.
#[test]
fn a_layer_uses_the_quantised_input_given_and_refuses_another_recipes() {
    let (x, w, _) = linear_data();
    let rowwise = opts(Scaling::Rowwise, Format::E5m2, true, Gemm::Emulated);
    let tensorwise = opts(Scaling::Tensorwise, Format::E5m2, true, Gemm::Emulated);
    // The layer multiplies what it is given: another input's quantised form
    // gives another output (x * 3 has the same scale-free bytes only up to
    // rounding, so its product differs).
    let o = &tensorwise;
    let weight = Fp8Weight::new(&w.to_kind(Kind::Float), o.scaling, o.margin);
    let other = fp8::quantize_input(
        &(&x.to_kind(Kind::Float) * 3.0 + 0.25).to_kind(Kind::BFloat16),
        o,
    );
    let y = fp8::linear_with(&x, &w, &weight, None, None, o, None);
    let y_other = fp8::linear_with(&x, &w, &weight, None, None, o, Some(&other));
    assert!(!y.equal(&y_other), "the given quantised input was not used");
    // An input made for rowwise scaling has no transpose: tensorwise FP8
    // weight gradients need one.
    let input = fp8::quantize_input(&x, &rowwise);
    let weight = Fp8Weight::new(&w.to_kind(Kind::Float), Scaling::Tensorwise, 0);
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fp8::linear_with(&x, &w, &weight, None, None, &tensorwise, Some(&input))
    }))
    .expect_err("refused");
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains("quantised beforehand"), "{msg}");
    // And one made for tensorwise scaling (one scale) is not a rowwise
    // layer's (a scale per row).
    let input = fp8::quantize_input(&x, &tensorwise);
    let weight = Fp8Weight::new(&w.to_kind(Kind::Float), Scaling::Rowwise, 0);
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fp8::linear_with(&x, &w, &weight, None, None, &rowwise, Some(&input))
    }));
    assert!(
        refused.is_err(),
        "a tensorwise input taken by a rowwise layer"
    );
}

/// A 4-layer model with every block weight (AugQ, K up-projection), sizes multiples of 16.
fn model_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        d_model: 32,
        num_layers: 4,
        ffn_dim: 48,
        num_q_heads: 2,
        num_k_heads: 1,
        num_v_heads: 2,
        qk_head_dim: 32,
        v_head_dim: 16,
        aug_q_dim: 32,
        k_compression: KCompression::Projected,
        k_dim: Some(16),
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        init_std: 0.1,
    }
}

fn fp8_config(first: usize, last: usize, recipe: Fp8Recipe, wg: WeightGrad) -> Fp8Config {
    Fp8Config {
        recipe,
        weight_grad: wg,
        bf16_first_layers: first,
        bf16_last_layers: last,
        ..Fp8Config::default()
    }
}

/// The mixed-precision model of `model_cfg` (bf16 working copy), with FP8 per `f`.
fn mixed_model(f: Option<&Fp8Config>) -> Model {
    let c = model_cfg();
    c.validate().expect("valid");
    let init = ModelInit {
        mixed: true,
        ..ModelInit::cpu(5)
    };
    let mut m = Model::new(&c, &init);
    m.params.enable_work_copy(Kind::BFloat16);
    if let Some(f) = f {
        m.enable_fp8(Fp8Plan::new(f, c.num_layers, Gemm::Emulated), 32)
            .expect("shapes");
    }
    m
}

fn fp8_names(m: &Model) -> BTreeSet<String> {
    let f = m.fp8().expect("fp8 on");
    f.ids().iter().map(|&id| m.params.spec(id).name()).collect()
}

/// Which weights run in FP8: every matmul weight of the blocks between the
/// bf16 ones at either end, nothing else (embedding, norms, head). And the
/// blocks behave so: the bf16 blocks compute bit for bit what a model
/// without FP8 computes, the FP8 blocks do not.
#[test]
fn the_block_linears_between_the_bf16_ends_run_in_fp8_and_nothing_else() {
    let linears = [
        "attn.q_proj",
        "attn.aug_q.gate",
        "attn.aug_q.up",
        "attn.aug_q.down",
        "attn.k_proj",
        "attn.k_up",
        "attn.v_proj",
        "attn.o_proj",
        "ffn.gate",
        "ffn.up",
        "ffn.down",
    ];
    let names = |layers: &[usize]| -> BTreeSet<String> {
        layers
            .iter()
            .flat_map(|l| {
                linears
                    .iter()
                    .map(move |w| format!("layers.{l}.{w}.weight"))
            })
            .collect()
    };
    let tw = |a, b| fp8_config(a, b, Fp8Recipe::Tensorwise, WeightGrad::Fp8);
    assert_eq!(fp8_names(&mixed_model(Some(&tw(1, 1)))), names(&[1, 2]));
    assert_eq!(
        fp8_names(&mixed_model(Some(&tw(0, 0)))),
        names(&[0, 1, 2, 3])
    );
    assert_eq!(fp8_names(&mixed_model(Some(&tw(2, 1)))), names(&[2]));
    assert_eq!(fp8_names(&mixed_model(Some(&tw(0, 3)))), names(&[0]));

    let (plain, fp8) = (mixed_model(None), mixed_model(Some(&tw(1, 1))));
    let x = {
        let _rng = sigma_trainer::model::params::global_rng_lock();
        tch::manual_seed(3);
        Tensor::randn([2, 16, 32], (Kind::Float, Device::Cpu))
    };
    tch::no_grad(|| {
        for l in 0..4 {
            let (a, b) = (plain.plain().block(l, &x), fp8.plain().block(l, &x));
            let same = a.equal(&b);
            assert_eq!(same, l == 0 || l == 3, "layer {l}: same as bf16 {same}");
            let rel = ((&a - &b).norm() / (&a - &x).norm()).double_value(&[]);
            assert!(
                rel < 0.1,
                "layer {l}: the FP8 block is {rel} away from bf16"
            );
        }
    });
}

/// Gate and up read one input and are one FP8 weight: the layer's output
/// is, bit for bit, SwiGLU of the FP8 linear layer by their merged matrix
/// quantised as one (one tensorwise scale for both), and not what two FP8
/// layers with a scale each compute.
#[test]
fn gate_and_up_are_one_fp8_weight() {
    use sigma_trainer::model::block::LayerWeight;
    let m = mixed_model(Some(&fp8_config(
        0,
        0,
        Fp8Recipe::Tensorwise,
        WeightGrad::Fp8,
    )));
    let f = m.fp8().expect("fp8");
    // (gate, up, their rows, their input's width: d_model, or AugQ's q)
    for (gate, up, n, width) in [
        (LayerWeight::FfnGate, LayerWeight::FfnUp, 48, 32),
        (LayerWeight::AugQGate, LayerWeight::AugQUp, 32, 64),
    ] {
        let x = {
            let _rng = sigma_trainer::model::params::global_rng_lock();
            tch::manual_seed(11);
            Tensor::randn([2, 16, width], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)
        };
        let (g, u) = (m.lid(1, gate), m.lid(1, up));
        let got = m.plain().gated(&x, g, u);
        let w = Tensor::cat(&[m.params.tensor(g), m.params.tensor(u)], 0).detach();
        let q = Fp8Weight::new(&w, Scaling::Tensorwise, f.plan.opts.margin);
        let y = fp8::linear(&x, &w.to_kind(Kind::BFloat16), &q, None, None, &f.plan.opts);
        let want = y.narrow(-1, 0, n).silu() * y.narrow(-1, n, n);
        assert!(
            got.equal(&want),
            "{gate:?}/{up:?}: not the merged FP8 layer"
        );
        let two = m.plain().linear(&x, g).silu() * m.plain().linear(&x, u);
        assert!(!got.equal(&two), "{gate:?}/{up:?}: the same as two scales");
        let rel = ((&got - &two).to_kind(Kind::Double).norm() / two.to_kind(Kind::Double).norm())
            .double_value(&[]);
        assert!(rel < 0.1, "{gate:?}/{up:?}: {rel} from two FP8 layers");
    }
}

/// The FP8 copies are made once per change of the master weights (the
/// optimizer's announcement or an in-place write), not per micro-batch.
#[test]
fn fp8_copies_are_made_once_per_change_of_the_weights() {
    let m = mixed_model(Some(&fp8_config(1, 1, Fp8Recipe::Rowwise, WeightGrad::Fp8)));
    let f = m.fp8().expect("fp8");
    let tokens =
        Tensor::from_slice(&(0..34).map(|i| (i * 5 % 64) as i64).collect::<Vec<_>>()).view([2, 17]);
    let loss = |m: &Model| sigma_trainer::engine::loss_sum(m, &tokens).double_value(&[]);
    assert_eq!(f.refreshes(), 0);
    let l0 = loss(&m);
    let _ = loss(&m);
    assert_eq!(f.refreshes(), 1, "three micro-batches, one copy");
    m.params.mark_changed();
    assert_eq!(
        loss(&m),
        l0,
        "announced, unchanged weights: the same copy's numbers"
    );
    assert_eq!(f.refreshes(), 2);
    tch::no_grad(|| {
        let _ = m.params.flat.shallow_clone().g_mul_scalar_(0.5);
    });
    let l2 = loss(&m);
    assert_eq!(f.refreshes(), 3);
    assert_ne!(l2, l0, "the halved weights reach the FP8 copies");
}

/// Gradients of an FP8 model through the engine: into the gradient sink
/// (fp32 buffer) or through autograd and the working copy, with and
/// without activation checkpointing. With bf16 weight gradients the two
/// routes give the same bits (the same bf16 GEMM, added into fp32); with
/// FP8 ones the autograd route rounds each to bf16 first; checkpointing
/// changes nothing.
#[test]
fn fp8_gradients_reach_the_buffer_by_either_route() {
    let tokens =
        Tensor::from_slice(&(0..66).map(|i| (i * 7 % 64) as i64).collect::<Vec<_>>()).view([2, 33]);
    for wg in [WeightGrad::Bf16, WeightGrad::Fp8] {
        for recipe in [Fp8Recipe::Tensorwise, Fp8Recipe::Rowwise] {
            // Every block in FP8: the bf16 blocks' gate and up run as one
            // matmul with the sink only, which moves the gradients upstream
            // by bf16 roundings (and those move FP8 roundings).
            let f = fp8_config(0, 0, recipe, wg);
            let m = mixed_model(Some(&f));
            let plan = TpPlan::single(&m.cfg);
            let grads = |sink: bool, checkpoint: bool| {
                let mut g = m.params.flat.zeros_like();
                let s = sink.then(|| GradSink::new(&m, &g)).flatten();
                let o = ExecOptions {
                    checkpoint,
                    ..ExecOptions::default()
                };
                let loss = Runner::new(&m, &plan, o)
                    .with_sink(s.as_ref())
                    .forward_backward(None, &tokens, 0.5, &mut g, &mut |_, _| Ok(()))
                    .expect("step");
                (g, loss)
            };
            let (a, la) = grads(true, false);
            let (b, lb) = grads(false, false);
            let (c, lc) = grads(true, true);
            assert!(la.equal(&lb) && la.equal(&lc), "{wg:?} {recipe:?}: losses");
            assert!(
                a.equal(&c),
                "{wg:?} {recipe:?}: checkpointing changed the gradients"
            );
            let ids = m.fp8().expect("fp8").ids();
            for id in ids {
                let (o, n) = (m.params.offsets[id.0], m.params.spec(id).numel());
                let (ga, gb) = (a.narrow(0, o, n), b.narrow(0, o, n));
                assert!(ga.abs().sum(Kind::Double).double_value(&[]) > 0.0);
                let rel = ((&ga - &gb).abs().max() / ga.abs().max()).double_value(&[]);
                match wg {
                    WeightGrad::Bf16 => {
                        assert_eq!(rel, 0.0, "{}: routes differ", m.params.spec(id).name())
                    }
                    WeightGrad::Fp8 => {
                        assert!(rel <= 2f64.powi(-8), "{}: {rel}", m.params.spec(id).name())
                    }
                }
            }
        }
    }
}

#[test]
fn fp8_needs_a_gpu_of_compute_capability_8_9_or_the_emulation() {
    let refused = |cuda, cc| {
        choose_gemm(cuda, cc, false)
            .expect_err("refused")
            .to_string()
    };
    let e = refused(false, None);
    assert!(
        e.contains("train.precision")
            && e.contains("CPU")
            && e.contains("8.9")
            && e.contains("fp8.emulate"),
        "{e}"
    );
    for cc in [70, 80, 86] {
        let e = refused(true, Some(cc));
        assert!(
            e.contains(&format!("{}.{}", cc / 10, cc % 10)) && e.contains("8.9"),
            "{e}"
        );
    }
    for cc in [89, 90, 100] {
        assert_eq!(
            choose_gemm(true, Some(cc), false).expect("ok"),
            Gemm::ScaledMm
        );
    }
    assert_eq!(
        choose_gemm(false, None, true).expect("emulated"),
        Gemm::Emulated
    );
    assert_eq!(
        choose_gemm(true, Some(80), true).expect("emulated"),
        Gemm::Emulated
    );
}

/// tiny with `[fp8]` emulated, 20 steps, against the fp32 golden losses.
fn fp8_run(out: &Path, steps: u64, extra: &[&str]) -> std::process::Output {
    let mut e = vec![
        "train.precision=\"fp8\"",
        "fp8.emulate=true",
        "train.eval_every=0",
        "train.eval_steps=1",
        "metrics.plot=false",
        "metrics.tensorboard=false",
    ];
    e.extend_from_slice(extra);
    let a = tiny_train_args(out, steps, &e);
    let v: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    sigma(&v, &[])
}

fn golden() -> Vec<f64> {
    let text =
        std::fs::read_to_string(repo_root().join("tests/golden/tiny-losses.json")).expect("golden");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|x| x.as_f64().expect("f64"))
        .collect()
}

/// The FP8 path end to end: tiny's first 20 losses with the emulated
/// tensorwise recipe follow the fp32 ones (tests/golden/tiny-losses.json)
/// within 2e-3 relative at every step and 1e-3 in the mean of the last 10
/// (measured on an x86-64 CPU: 6.0e-4 at most, at step 20, and 1.4e-4;
/// bf16 alone: 1.7e-4 and 5.5e-6; docs/precision.md); the recipe is in
/// the metrics and the saved config.
#[test]
fn a_tiny_fp8_run_follows_the_fp32_losses() {
    let d = tempfile::tempdir().expect("tmp");
    let o = fp8_run(d.path(), 20, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("fp8: tensorwise scaling") && err.contains("EMULATED"),
        "{err}"
    );
    let got = losses(&d.path().join("metrics.jsonl"));
    let want = golden();
    assert_eq!(got.len(), 20);
    let rel: Vec<f64> = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / b)
        .collect();
    eprintln!("fp8 emulated vs fp32, relative per step: {rel:?}");
    assert!(rel.iter().all(|&r| r <= 2e-3), "{rel:?}");
    let mean = |v: &[f64]| v[10..].iter().sum::<f64>() / 10.0;
    let drift = (mean(&got) - mean(&want)).abs() / mean(&want);
    assert!(drift <= 1e-3, "mean of the last 10: {drift}");
    assert!(got != want, "FP8 changed nothing");
    let metrics = std::fs::read_to_string(d.path().join("metrics.jsonl")).expect("metrics");
    let first: serde_json::Value =
        serde_json::from_str(metrics.lines().next().expect("a line")).expect("json");
    assert_eq!(first["step"], 0);
    assert_eq!(first["fp8"]["recipe"], "tensorwise");
    assert_eq!(first["fp8"]["grad_format"], "e5m2");
    assert_eq!(first["fp8"]["gemm"], "emulated");
    assert_eq!(first["fp8"]["fp8_layers"], serde_json::json!([1, 2]));
    let saved = std::fs::read_to_string(d.path().join("config.toml")).expect("config.toml");
    assert!(
        saved.contains("[fp8]") && saved.contains("grad_format = \"e5m2\""),
        "{saved}"
    );
}

fn refused(extra: &[&str], needles: &[&str]) {
    let d = tempfile::tempdir().expect("tmp");
    let a = tiny_train_args(d.path(), 2, extra);
    let v: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    assert_clean_failure(&sigma(&v, &[]), needles);
}

/// Real FP8 on the CPU, shapes FP8 GEMMs cannot take and bad `[fp8]` values
/// are refused with one line naming the key (or the layer) and the rule.
#[test]
fn fp8_configs_that_cannot_run_are_refused() {
    let fp8 = "train.precision=\"fp8\"";
    refused(&[fp8], &["train.precision", "CPU", "8.9", "fp8.emulate"]);
    refused(
        &[fp8, "fp8.emulate=true", "model.ffn_dim=200"],
        &["layers.1.ffn.gate.weight", "[200, 128]", "divisible by 16"],
    );
    refused(
        &[
            fp8,
            "fp8.emulate=true",
            "data.seq_len=100",
            "train.micro_batch_size=1",
        ],
        &["fp8.weight_grad", "100", "divisible by 16"],
    );
    refused(&[fp8, "fp8.margin=9"], &["fp8.margin", "more than 8"]);
    refused(
        &[fp8, "fp8.forward_format=\"e5m2\""],
        &["fp8.forward_format", "e4m3"],
    );
    refused(
        &[fp8, "fp8.bf16_first_layers=2", "fp8.bf16_last_layers=2"],
        &["fp8.bf16_first_layers", "no block would run in FP8"],
    );
    refused(
        &[fp8, "fp8.recipe=\"blockwise\""],
        &["fp8.recipe", "tensorwise", "rowwise"],
    );
    refused(
        &[fp8, "fp8.amax_history=16"],
        &["`fp8.amax_history`", "unknown field"],
    );
}

/// Checkpoints hold the fp32 master weights whatever the precision: a run
/// saved in FP8 resumes in FP8 bit for bit (its FP8 copies are made anew
/// from the loaded weights) and in bf16; one saved in bf16 resumes in FP8.
#[test]
fn checkpoints_resume_across_fp8_and_bf16() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = [
        "checkpoint.every_steps=2",
        "train.cpu_threads=1",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=1",
    ];
    let bf16 = ["train.precision=\"bf16\""];
    let run = |name: &str, fp8: bool, more: &[&str], flags: &[&str]| {
        let out = tmp.path().join(name);
        let mut e: Vec<&str> = ck.to_vec();
        e.extend_from_slice(more);
        if !fp8 {
            e.extend_from_slice(&bf16);
        }
        let mut a = tiny_train_args(&out, 4, &e);
        if fp8 {
            a.extend(
                [
                    "--set",
                    "train.precision=\"fp8\"",
                    "--set",
                    "fp8.emulate=true",
                ]
                .map(String::from),
            );
        }
        a.extend(flags.iter().map(|s| s.to_string()));
        let v: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let o = sigma(&v, &[]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        (out, stderr(&o))
    };
    let (full, _) = run("full", true, &[], &[]);
    let reference = losses(&full.join("metrics.jsonl"));
    // FP8 -> FP8: bit-identical.
    let (same, _) = run("same", true, &[], &["--stop-after", "2"]);
    let (_, log) = run("same", true, &[], &["--resume", "auto"]);
    assert!(log.contains("resume:") && log.contains("step 2"), "{log}");
    assert_eq!(losses(&same.join("metrics.jsonl")), reference);
    // The checkpoint: fp32 weights, the recipe in its config.
    let c =
        sigma_trainer::checkpoint::load::Checkpoint::open(&same.join("checkpoints/step-0000002"))
            .expect("open");
    assert_eq!(c.meta.config["train"]["precision"], "fp8");
    assert_eq!(c.meta.config["fp8"]["recipe"], "tensorwise");
    assert!(!c.meta.tensors.is_empty());
    for (name, e) in &c.meta.tensors {
        assert_eq!(e.dtype, "F32", "{name}");
    }
    // FP8 -> bf16 and bf16 -> FP8: resumed, close to the FP8 run.
    let from = |name: &str, saved_fp8: bool| {
        let (out, _) = run(name, saved_fp8, &[], &["--stop-after", "2"]);
        let (_, log) = run(name, !saved_fp8, &[], &["--resume", "auto"]);
        assert!(
            log.contains("resume:") && log.contains("step 2") && log.contains("precision"),
            "{log}"
        );
        losses(&out.join("metrics.jsonl"))
    };
    for (name, saved_fp8) in [("fp8-to-bf16", true), ("bf16-to-fp8", false)] {
        let l = from(name, saved_fp8);
        assert_eq!(l.len(), 4, "{name}");
        for (s, (a, b)) in l.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() / b <= 0.01,
                "{name}, step {}: {a} vs {b}",
                s + 1
            );
        }
    }
}

/// FP8 under tensor parallelism (2 ranks, sequence parallel; each rank
/// scales its own shards), pipeline parallelism (2 stages, interleaved,
/// activation checkpointing) and data parallelism with ZeRO-1 (2 ranks, half
/// the micro-batch each: the same global batch, tensorwise scales from half
/// the tokens): the first 4 losses within 5e-3 of one process's FP8 run.
#[test]
fn fp8_runs_under_tensor_pipeline_and_data_parallelism() {
    let tmp = tempfile::tempdir().expect("tmp");
    let common = [
        "train.precision=\"fp8\"",
        "fp8.emulate=true",
        "train.cpu_threads=1",
        "train.eval_every=0",
        "train.eval_steps=1",
        "metrics.plot=false",
        "metrics.tensorboard=false",
    ];
    let args = |name: &str, more: &[&str]| {
        let mut e = common.to_vec();
        e.extend_from_slice(more);
        let mut a = tiny_train_args(&tmp.path().join(name), 4, &e);
        a.remove(0); // "train"
        a
    };
    let one = args("one", &[]);
    let v: Vec<String> = std::iter::once("train".to_string()).chain(one).collect();
    let o = sigma(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = losses(&tmp.path().join("one/metrics.jsonl"));
    for (name, more) in [
        ("tp2", vec!["parallel.tp=2"]),
        (
            "pp2",
            vec![
                "parallel.pp=2",
                "parallel.pp_schedule=\"interleaved\"",
                "train.activation_checkpointing=true",
            ],
        ),
        (
            "dp2",
            vec![
                "parallel.dp=2",
                "parallel.zero=1",
                "train.micro_batch_size=4",
            ],
        ),
    ] {
        let o = launch(2, &[], &args(name, &more), &[]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let l = losses(&tmp.path().join(name).join("metrics.jsonl"));
        assert_eq!(l.len(), 4, "{name}");
        for (s, (a, b)) in l.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() / b <= 5e-3,
                "{name}, step {}: {a} vs {b}",
                s + 1
            );
        }
        eprintln!("{name}: {l:?} vs {reference:?}");
    }
}

/// `sigma bench fp8` runs what the CPU can (tensorwise `_scaled_mm` against
/// the emulation and fp32) and passes its own tolerances; the weight
/// gradients reach the buffer by `_scaled_mm` and an add there (cuBLASLt's
/// GEMM is for CUDA tensors only).
#[test]
fn bench_fp8_checks_itself_on_the_cpu() {
    let o = sigma(&["bench", "fp8", "--device", "cpu", "--steps", "1"], &[]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("Tensorwise scaling") && out.contains("fp8 check passed"),
        "{out}"
    );
    assert!(
        out.contains("weight gradients by _scaled_mm and an add (cuBLASLt's GEMM not tried)"),
        "{out}"
    );
}
