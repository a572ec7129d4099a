//! The SIGMA model against independent references: plain-Rust f64 loops for
//! DiffQKV attention (with AugQ, both K-compression readings, RoPE), causality,
//! finite-difference gradients, and activation checkpointing bit-equality.

use sigma_trainer::config::{KCompression, ModelConfig};
use sigma_trainer::engine::{self, ExecOptions, Program, Runner};
use sigma_trainer::model::block::LayerWeight;
use sigma_trainer::model::{Exec, GradSink, ModelInit};
use sigma_trainer::parallel::tp::TpPlan;
use sigma_trainer::Model;
use tch::{Device, Kind, Tensor};

fn cfg(nq: usize, nk: usize, nv: usize, dqk: usize, dv: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 40,
        d_model: 16,
        num_layers: 2,
        ffn_dim: 24,
        num_q_heads: nq,
        num_k_heads: nk,
        num_v_heads: nv,
        qk_head_dim: dqk,
        v_head_dim: dv,
        aug_q_dim: 0,
        k_compression: KCompression::None,
        k_dim: None,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        init_std: 0.2,
    }
}

fn model(c: &ModelConfig) -> Model {
    c.validate().expect("valid config");
    Model::new(c, &ModelInit::cpu(7)).to_double()
}

/// Row-major matrix from a 2-D tensor.
fn mat(t: &Tensor) -> (usize, usize, Vec<f64>) {
    let s = t.size();
    let v: Vec<f64> =
        Vec::<f64>::try_from(t.to_kind(Kind::Double).contiguous().view(-1)).expect("to vec");
    (s[0] as usize, s[1] as usize, v)
}

/// x [n, k] times w^T where w is [m, k] (a linear layer without bias).
fn linear(x: &[f64], n: usize, k: usize, w: &Tensor) -> Vec<f64> {
    let (m, k2, wv) = mat(w);
    assert_eq!(k, k2);
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|t| x[i * k + t] * wv[j * k + t]).sum();
        }
    }
    out
}

fn silu(z: f64) -> f64 {
    z / (1.0 + (-z).exp())
}

/// RoPE on one head vector at position p: pairs (j, j + d/2), angle p * theta^(-2j/d).
fn rope(v: &mut [f64], p: usize, theta: f64) {
    let d = v.len();
    for j in 0..d / 2 {
        let ang = p as f64 * theta.powf(-((2 * j) as f64) / d as f64);
        let (a, b) = (v[j], v[j + d / 2]);
        v[j] = a * ang.cos() - b * ang.sin();
        v[j + d / 2] = b * ang.cos() + a * ang.sin();
    }
}

/// Attention of layer 0 on h [t, d], written with explicit per-head loops.
fn reference_attention(m: &Model, h: &[f64], t: usize) -> Vec<f64> {
    let c = &m.cfg;
    let p = |n: &str| {
        m.params
            .get(&format!("layers.0.attn.{n}.weight"))
            .shallow_clone()
    };
    let (nq, nk, nv) = (c.num_q_heads, c.num_k_heads, c.num_v_heads);
    let (dd, dk, dv, d) = (c.dot_dim(), c.k_cache_dim(), c.v_head_dim, c.d_model);
    let mut q = linear(h, t, d, &p("q_proj"));
    if c.aug_q_dim > 0 {
        let g = linear(&q, t, nq * dd, &p("aug_q.gate"));
        let u = linear(&q, t, nq * dd, &p("aug_q.up"));
        let gu: Vec<f64> = g.iter().zip(&u).map(|(a, b)| silu(*a) * b).collect();
        q = linear(&gu, t, c.aug_q_dim, &p("aug_q.down"));
    }
    let k_raw = linear(h, t, d, &p("k_proj"));
    let v = linear(h, t, d, &p("v_proj"));
    // Heads as [head][pos] -> vector.
    let mut qh = vec![vec![vec![0.0; dd]; t]; nq];
    let mut kh = vec![vec![vec![0.0; dd]; t]; nk];
    for pos in 0..t {
        for i in 0..nq {
            qh[i][pos].copy_from_slice(&q[pos * nq * dd + i * dd..pos * nq * dd + (i + 1) * dd]);
            rope(&mut qh[i][pos], pos, c.rope_theta);
        }
        for j in 0..nk {
            let kc = &k_raw[pos * nk * dk + j * dk..pos * nk * dk + (j + 1) * dk];
            kh[j][pos] = if c.k_compression == KCompression::Projected {
                linear(kc, 1, dk, &p("k_up"))
            } else {
                kc.to_vec()
            };
            rope(&mut kh[j][pos], pos, c.rope_theta);
        }
    }
    let mut o = vec![0.0; t * nq * dv];
    for i in 0..nq {
        let (kj, vj) = (i / (nq / nk), i / (nq / nv));
        for a in 0..t {
            let scores: Vec<f64> = (0..=a)
                .map(|b| {
                    qh[i][a]
                        .iter()
                        .zip(&kh[kj][b])
                        .map(|(x, y)| x * y)
                        .sum::<f64>()
                        / (dd as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
            for (b, s) in scores.iter().enumerate() {
                let w = (s - mx).exp() / z;
                for e in 0..dv {
                    o[a * nq * dv + i * dv + e] += w * v[b * nv * dv + vj * dv + e];
                }
            }
        }
    }
    linear(&o, t, nq * dv, &p("o_proj"))
}

fn check_attention(c: &ModelConfig) {
    let m = model(c);
    let t = 7;
    let h = {
        let _rng = sigma_trainer::model::params::global_rng_lock();
        tch::manual_seed(3);
        Tensor::randn([1, t as i64, c.d_model as i64], (Kind::Double, Device::Cpu))
    };
    let got = tch::no_grad(|| m.plain().attention(0, &h));
    let (_, _, hv) = mat(&h.view([t as i64, -1]));
    let want = reference_attention(&m, &hv, t);
    let (_, _, gv) = mat(&got.view([t as i64, -1]));
    let err = gv
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-10, "{c:?}: max abs error {err}");
}

#[test]
fn diffqkv_attention_matches_a_per_head_reference() {
    for (nq, nk, nv, dqk, dv) in [
        (4, 4, 4, 4, 4), // MHA
        (4, 2, 2, 4, 4), // GQA
        (8, 2, 4, 4, 4), // DiffQKV: fewer K than V heads
        (8, 4, 2, 4, 6), // more K than V heads, v dim != qk dim
        (8, 1, 8, 6, 2), // one K head, MQA-like keys with full V
    ] {
        check_attention(&cfg(nq, nk, nv, dqk, dv));
    }
}

#[test]
fn augq_and_both_k_compression_readings_match_the_reference() {
    let mut c = cfg(8, 2, 4, 8, 4);
    c.aug_q_dim = 12;
    check_attention(&c);
    c.k_compression = KCompression::Projected;
    c.k_dim = Some(4);
    check_attention(&c);
    c.k_compression = KCompression::Native;
    check_attention(&c);
    assert_eq!(c.dot_dim(), 4);
}

#[test]
fn mha_and_gqa_equal_a_plain_implementation() {
    // GQA 8/2/2 equals MHA with each K/V head repeated: build the MHA weights by repetition.
    let g = model(&cfg(8, 2, 2, 4, 4));
    let mut mc = cfg(8, 8, 8, 4, 4);
    mc.num_layers = 2;
    let mha = model(&mc);
    tch::no_grad(|| {
        for name in ["k_proj", "v_proj"] {
            let src = g
                .params
                .get(&format!("layers.0.attn.{name}.weight"))
                .view([2, 4, 16]);
            let rep = src.repeat_interleave_self_int(4, 0, None).reshape([32, 16]);
            mha.params
                .get(&format!("layers.0.attn.{name}.weight"))
                .shallow_clone()
                .copy_(&rep);
        }
        for name in ["q_proj", "o_proj"] {
            mha.params
                .get(&format!("layers.0.attn.{name}.weight"))
                .shallow_clone()
                .copy_(g.params.get(&format!("layers.0.attn.{name}.weight")));
        }
        let h = {
            let _rng = sigma_trainer::model::params::global_rng_lock();
            Tensor::randn([2, 5, 16], (Kind::Double, Device::Cpu))
        };
        let d = (g.plain().attention(0, &h) - mha.plain().attention(0, &h))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-12, "{d}");
    });
}

#[test]
fn changing_future_tokens_never_changes_past_logits() {
    let mut c = cfg(8, 2, 4, 4, 4);
    c.aug_q_dim = 10;
    let m = model(&c);
    let a = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 2, 8, 4]).view([1, 8]);
    let b = a.copy();
    let _ = b.narrow(1, 5, 3).fill_(11);
    tch::no_grad(|| {
        let (la, lb) = (m.plain().forward(&a), m.plain().forward(&b));
        let past = (la.narrow(1, 0, 5) - lb.narrow(1, 0, 5))
            .abs()
            .max()
            .double_value(&[]);
        let future = (la.narrow(1, 5, 3) - lb.narrow(1, 5, 3))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(past, 0.0);
        assert!(future > 1e-6);
    });
}

/// Gradient of `sum of token losses * scale` through the segment engine, flat.
fn engine_grads(m: &Model, tokens: &Tensor, scale: f64, checkpoint: bool) -> (Tensor, Tensor) {
    let mut g = m.params.flat.zeros_like();
    let loss =
        engine::forward_backward(m, tokens, scale, checkpoint, &mut g, &mut |_, _| Ok(())).unwrap();
    (g, loss)
}

/// `engine_grads` under options `o` (one device).
fn engine_grads_with(m: &Model, o: ExecOptions, tokens: &Tensor, scale: f64) -> (Tensor, Tensor) {
    let plan = TpPlan::single(&m.cfg);
    let mut g = m.params.flat.zeros_like();
    let loss = Runner::new(m, &plan, o)
        .forward_backward(None, tokens, scale, &mut g, &mut |_, _| Ok(()))
        .unwrap();
    (g, loss)
}

/// The loss sum without gradients under options `o` (one device).
fn loss_with(m: &Model, o: ExecOptions, tokens: &Tensor) -> f64 {
    let plan = TpPlan::single(&m.cfg);
    Runner::new(m, &plan, o)
        .loss_sum(None, tokens)
        .unwrap()
        .double_value(&[])
}

#[test]
fn gradients_match_finite_differences() {
    let mut c = cfg(4, 1, 2, 4, 4);
    c.aug_q_dim = 6;
    c.k_compression = KCompression::Projected;
    c.k_dim = Some(2);
    c.tie_embeddings = false;
    let m = model(&c);
    let tokens = Tensor::from_slice(&[3i64, 17, 5, 29, 11, 2, 38, 6, 1, 23, 14, 9]).view([2, 6]);
    let (g, _) = engine_grads(&m, &tokens, 1.0, false);
    let n = m.params.numel();
    let mut flat = m.params.flat.shallow_clone();
    let mut rng = sigma_data::rng::SplitMix64::new(5);
    let eps = 1e-6;
    for _ in 0..40 {
        let i = rng.below(n as u64) as i64;
        let mut e = flat.narrow(0, i, 1);
        let f = |m: &Model| engine::loss_sum(m, &tokens).double_value(&[]);
        tch::no_grad(|| {
            let _ = e.g_add_scalar_(eps);
        });
        let up = f(&m);
        tch::no_grad(|| {
            let _ = e.g_add_scalar_(-2.0 * eps);
        });
        let down = f(&m);
        tch::no_grad(|| {
            let _ = e.g_add_scalar_(eps);
        });
        let fd = (up - down) / (2.0 * eps);
        let an = g.double_value(&[i]);
        assert!(
            (fd - an).abs() <= 1e-6 * (1.0 + an.abs()),
            "param element {i}: finite difference {fd}, autograd {an}"
        );
    }
    let _ = &mut flat;
}

#[test]
fn activation_checkpointing_gives_bit_identical_gradients() {
    let mut c = cfg(8, 2, 4, 4, 4);
    c.aug_q_dim = 12;
    let m = Model::new(&c, &ModelInit::cpu(11));
    let tokens =
        Tensor::from_slice(&(0..40).map(|i| (i * 7 % 40) as i64).collect::<Vec<_>>()).view([4, 10]);
    let (g1, l1) = engine_grads(&m, &tokens, 0.01, false);
    let (g2, l2) = engine_grads(&m, &tokens, 0.01, true);
    assert!(g1.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    assert!(
        g1.equal(&g2),
        "gradients differ with activation checkpointing"
    );
    assert!(l1.equal(&l2));
    // And the segment engine equals one ordinary backward pass.
    let t = 9;
    let f = m.plain();
    let loss = f.head_loss_sum(
        &{
            let mut x = f.embed(&tokens.narrow(1, 0, t));
            for l in 0..c.num_layers {
                x = f.block(l, &x);
            }
            x
        },
        &tokens.narrow(1, 1, t),
    );
    let per_param = Tensor::run_backward(&[&loss * 0.01], &m.params.tensors, false, false);
    let g3 = Tensor::cat(
        &per_param
            .iter()
            .map(|g| g.reshape([-1]))
            .collect::<Vec<_>>(),
        0,
    );
    let rel = ((&g3 - &g1).abs().max() / g1.abs().max()).double_value(&[]);
    assert!(
        rel < 1e-5,
        "segment engine vs plain backward: relative difference {rel}"
    );
}

/// Records what a bucketed reduction would send: each started range, the
/// gradient values it held at that moment, and when it was started.
struct Recorder {
    started: Vec<(i64, i64, Tensor, usize)>,
    pos: usize,
    base: usize,
}

impl sigma_trainer::dist::Collectives for Recorder {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _: &mut Tensor) -> sigma_trainer::Result<()> {
        unreachable!("the buckets start reductions, they do not block")
    }
    fn start_all_reduce_sum(&mut self, t: &Tensor) -> sigma_trainer::Result<()> {
        // `t` is a view of the flat (f64) gradient: its offset from the buffer's start.
        let off = (t.data_ptr() as usize - self.base) as i64 / 8;
        self.started
            .push((off, t.numel() as i64, t.copy(), self.pos));
        Ok(())
    }
    fn broadcast(&mut self, _: &mut Tensor, _: usize) -> sigma_trainer::Result<()> {
        unreachable!()
    }
    fn all_gather(&mut self, _: &Tensor) -> sigma_trainer::Result<Vec<Tensor>> {
        unreachable!()
    }
    fn reduce_scatter_sum(&mut self, _: &Tensor) -> sigma_trainer::Result<Tensor> {
        unreachable!()
    }
    fn send(&mut self, _: &Tensor, _: usize) -> sigma_trainer::Result<()> {
        unreachable!()
    }
    fn recv(&mut self, _: &mut Tensor, _: usize) -> sigma_trainer::Result<()> {
        unreachable!()
    }
    fn barrier(&mut self) -> sigma_trainer::Result<()> {
        unreachable!()
    }
}

#[test]
fn gradient_buckets_start_only_final_gradients_and_cover_the_buffer_once() {
    use sigma_trainer::dist::buckets::GradBuckets;
    let mut c = cfg(4, 1, 2, 4, 4);
    c.num_layers = 4;
    c.tie_embeddings = false;
    let m = model(&c);
    let tokens = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 2, 8, 4, 6, 0, 11, 12]).view([2, 6]);
    // Small buckets: several per layer.
    let ready = Program::new(&m, &TpPlan::single(&c)).final_positions(&m);
    let mut buckets = GradBuckets::new(&m.params.layout(), &ready, 300);
    assert!(
        buckets.buckets.len() > 6,
        "{} buckets",
        buckets.buckets.len()
    );
    // One step's backward with the buckets reporting to a recorder.
    let mut backward = || {
        let mut g = m.params.flat.zeros_like();
        let mut rec = Recorder {
            started: Vec::new(),
            pos: 0,
            base: g.data_ptr() as usize,
        };
        let _ = engine::forward_backward(&m, &tokens, 0.1, false, &mut g, &mut |pos, g| {
            rec.pos = pos;
            buckets.segment_done(pos, g, &mut rec)
        })
        .unwrap();
        rec.pos = usize::MAX;
        buckets.finish(&g, &mut rec).unwrap();
        (g, rec)
    };
    let (g, rec) = backward();
    // Every bucket's values when started equal the final gradient: nothing wrote to it later.
    for (off, n, snap, _) in &rec.started {
        let fin = g.narrow(0, *off, *n);
        assert_eq!(f64::try_from((&fin - snap).abs().max()).unwrap(), 0.0);
    }
    // The ranges tile the buffer exactly once.
    let mut ranges: Vec<(i64, i64)> = rec.started.iter().map(|r| (r.0, r.1)).collect();
    ranges.sort();
    let mut end = 0;
    for (o, n) in ranges {
        assert_eq!(o, end, "gap or overlap at {o}");
        end = o + n;
    }
    assert_eq!(end, m.params.numel());
    // Overlap: most buckets start before the embedding's backward (the last segment).
    let early = rec
        .started
        .iter()
        .filter(|r| r.3 < c.num_layers + 1)
        .count();
    assert!(
        early * 2 > rec.started.len(),
        "{early} of {} started early",
        rec.started.len()
    );
    // Order of starts is the same on every call (all ranks issue the same sequence).
    let order: Vec<i64> = rec.started.iter().map(|r| r.0).collect();
    let (_, rec2) = backward();
    assert_eq!(order, rec2.started.iter().map(|r| r.0).collect::<Vec<_>>());
}

/// `train.loss_chunk_tokens`: the head in chunks (recomputed in backward)
/// gives the loss and gradients of the whole head, up to the order of the
/// additions (f64: 1e-12 relative), with and without activation
/// checkpointing, for tied and untied heads; so does the loss without gradients.
#[test]
fn a_chunked_head_gives_the_whole_heads_loss_and_gradients() {
    for tied in [true, false] {
        let mut c = cfg(4, 1, 2, 4, 4);
        c.aug_q_dim = 6;
        c.tie_embeddings = tied;
        let m = model(&c);
        // 2 x 12 = 24 target tokens: chunks of 5 leave a shorter last one.
        let tokens = Tensor::from_slice(&(0..26).map(|i| (i * 13 % 40) as i64).collect::<Vec<_>>())
            .view([2, 13]);
        let (g0, l0) = engine_grads(&m, &tokens, 0.25, false);
        let e0 = engine::loss_sum(&m, &tokens).double_value(&[]);
        let chunked = |checkpoint| ExecOptions {
            checkpoint,
            loss_chunk_tokens: 5,
            ..ExecOptions::default()
        };
        for checkpoint in [false, true] {
            let (g1, l1) = engine_grads_with(&m, chunked(checkpoint), &tokens, 0.25);
            let rel = |a: &Tensor, b: &Tensor| {
                (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
            };
            assert!(rel(&l1, &l0) < 1e-12, "tied {tied}: loss {l1:?} vs {l0:?}");
            assert!(
                rel(&g1, &g0) < 1e-12,
                "tied {tied}, checkpoint {checkpoint}: gradients differ by {:e}",
                rel(&g1, &g0)
            );
        }
        let e1 = loss_with(&m, chunked(false), &tokens);
        assert!((e1 - e0).abs() < 1e-12 * e0, "validation loss {e1} vs {e0}");
        // The whole-head gradient is not trivially zero where chunks meet.
        assert!(g0.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }
}

/// bf16 working weights cast once per change of the master weights give
/// exactly the numbers of casting every weight at its matmul (the gradient
/// of a bf16 weight is bf16 either way), and follow the master weights.
#[test]
fn bf16_working_weights_match_casting_at_each_matmul_bit_for_bit() {
    let mut c = cfg(4, 1, 2, 4, 4);
    c.aug_q_dim = 6;
    c.k_compression = KCompression::Projected;
    c.k_dim = Some(2);
    for tied in [true, false] {
        c.tie_embeddings = tied;
        c.validate().expect("valid config");
        let mixed = || {
            Model::new(
                &c,
                &ModelInit {
                    seed: 7,
                    decay_norms: false,
                    decay_embeddings: false,
                    device: Device::Cpu,
                    mixed: true,
                },
            )
        };
        let cast = mixed();
        let mut work = mixed();
        work.params.enable_work_copy(Kind::BFloat16);
        let tokens = Tensor::from_slice(&(0..26).map(|i| (i * 7 % 40) as i64).collect::<Vec<_>>())
            .view([2, 13]);
        for checkpoint in [false, true] {
            let (g0, l0) = engine_grads(&cast, &tokens, 0.5, checkpoint);
            let (g1, l1) = engine_grads(&work, &tokens, 0.5, checkpoint);
            assert!(l1.equal(&l0), "tied {tied}: loss {l1:?} vs {l0:?}");
            assert!(
                g1.equal(&g0),
                "tied {tied}, checkpoint {checkpoint}: gradients differ"
            );
            assert!(g0.abs().sum(Kind::Double).double_value(&[]) > 0.0);
        }
        // An in-place change of the master weights (as the optimizer makes)
        // reaches the working copy before the next matmul.
        tch::no_grad(|| {
            for m in [&cast, &work] {
                let _ = m.params.flat.shallow_clone().g_mul_scalar_(0.5);
            }
        });
        let (a, b) = (
            engine::loss_sum(&cast, &tokens),
            engine::loss_sum(&work, &tokens),
        );
        assert!(a.equal(&b), "tied {tied}: after the update {a:?} vs {b:?}");
    }
}

/// Weight gradients added into the gradient buffer inside backward
/// (`Model::set_grad_sink`, with SwiGLU's and AugQ's gate and up as one
/// matmul) land where the plain path puts them, each exactly once: with f64
/// matmuls over fp32 master weights the two agree to fp32 rounding, with and
/// without activation checkpointing, tied or not; and backward refuses a
/// buffer that is not the sink.
#[test]
fn fused_weight_gradients_match_the_plain_path() {
    let mut c = cfg(4, 1, 2, 4, 4);
    c.aug_q_dim = 6;
    c.k_compression = KCompression::Projected;
    c.k_dim = Some(2);
    let tokens =
        Tensor::from_slice(&(0..26).map(|i| (i * 7 % 40) as i64).collect::<Vec<_>>()).view([2, 13]);
    for tied in [true, false] {
        c.tie_embeddings = tied;
        c.validate().expect("valid config");
        let make = || {
            let mut m = Model::new(&c, &ModelInit::cpu(7));
            m.compute = Kind::Double;
            m.params.enable_work_copy(Kind::Double);
            let g = m.params.flat.zeros_like();
            (m, g)
        };
        let (plain, _) = make();
        let (fused, mut g1) = make();
        let sink = GradSink::new(&fused, &g1);
        assert!(sink.is_some(), "a model with a working copy takes a sink");
        let plan = TpPlan::single(&c);
        let fused_run = |checkpoint| {
            let o = ExecOptions {
                checkpoint,
                ..ExecOptions::default()
            };
            Runner::new(&fused, &plan, o).with_sink(sink.as_ref())
        };
        for checkpoint in [false, true] {
            let (g0, l0) = engine_grads(&plain, &tokens, 0.5, checkpoint);
            let _ = g1.zero_();
            let l1 = fused_run(checkpoint)
                .forward_backward(None, &tokens, 0.5, &mut g1, &mut |_, _| Ok(()))
                .unwrap();
            assert!(l1.equal(&l0), "tied {tied}: loss {l1:?} vs {l0:?}");
            for (s, &o) in plain.params.specs.iter().zip(&plain.params.offsets) {
                let (a, b) = (g0.narrow(0, o, s.numel()), g1.narrow(0, o, s.numel()));
                let scale = a.abs().max().double_value(&[]);
                let diff = (&a - &b).abs().max().double_value(&[]);
                assert!(scale > 0.0, "{}: no gradient", s.name());
                assert!(
                    diff <= 1e-6 * scale,
                    "tied {tied}, checkpoint {checkpoint}, {}: fused and plain gradients differ by {diff} (max {scale})",
                    s.name()
                );
            }
        }
        let mut other = fused.params.flat.zeros_like();
        let err = fused_run(false)
            .forward_backward(None, &tokens, 0.5, &mut other, &mut |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gradient sink"), "{err}");
    }
}

/// Without a gradient sink, SwiGLU's and AugQ's gate and up read their
/// working weights as one matmul only in a frozen model (evaluation,
/// generation) under `no_grad`: there the merged matmul gives the separate
/// ones' numbers; with gradients on, both weights still get theirs (the
/// merged view of the working copy would give them none); and a training
/// model computes the same way with and without gradients, so that a
/// checkpointed segment's recompute repeats its forward.
#[test]
fn merged_gating_without_a_sink_runs_only_frozen_under_no_grad() {
    use sigma_trainer::model::frozen_merged_calls_on_this_thread as merged;
    let mut c = cfg(4, 1, 2, 4, 4);
    c.aug_q_dim = 6;
    c.validate().expect("valid config");
    // fp32 master weights with an f64 working copy (what bf16 training
    // keeps, in a dtype whose matmuls agree to rounding).
    let mut m = Model::new(&c, &ModelInit::cpu(7));
    m.compute = Kind::Double;
    m.params.enable_work_copy(Kind::Double);
    let x = Tensor::randn([2, 5, 16], (Kind::Double, Device::Cpu));
    let q0 = Tensor::randn([2, 5, 16], (Kind::Double, Device::Cpu));
    let w = |w| m.lid(0, w);
    let ffn = (w(LayerWeight::FfnGate), w(LayerWeight::FfnUp));
    let aug = (w(LayerWeight::AugQGate), w(LayerWeight::AugQUp));
    let training = m.fwd(Exec {
        sink: None,
        frozen: false,
        pieces: None,
    });
    let frozen = m.fwd(Exec {
        sink: None,
        frozen: true,
        pieces: None,
    });
    for (input, (gate, up)) in [(&x, ffn), (&q0, aug)] {
        assert!(
            m.params.merged_weight(gate, up).is_some(),
            "gate and up are adjacent"
        );
        let separate = tch::no_grad(|| {
            input.linear::<Tensor>(m.w(gate), None).silu() * input.linear::<Tensor>(m.w(up), None)
        });
        // Training model: never merged without the sink, gradients or not.
        let before = merged();
        let _ = tch::no_grad(|| training.gated(input, gate, up));
        assert_eq!(merged(), before, "a training model merged under no_grad");
        // Frozen, no_grad: merged, with the separate matmuls' numbers.
        let out = tch::no_grad(|| frozen.gated(input, gate, up));
        assert_eq!(
            merged(),
            before + 1,
            "a frozen model did not merge under no_grad"
        );
        let diff = (&out - &separate).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "merged and separate gating differ by {diff}");
        // Frozen with gradients on: separate, and both weights get gradients.
        let y = frozen.gated(input, gate, up);
        assert_eq!(merged(), before + 1, "merged with gradients on");
        y.sum(Kind::Double).backward();
        for w in [gate, up] {
            let g = m.w(w).grad();
            assert!(
                g.defined() && g.abs().max().double_value(&[]) > 0.0,
                "no gradient reached a gating weight with gradients on"
            );
        }
    }
}
