//! Tensor (and sequence) parallelism on CPU with several processes: the loss
//! trajectories of tp = 2 and 4 against one process, key heads replicated
//! (n_k < tp), AugQ with projected K compression, dp2 x tp2 with ZeRO-1, the
//! gradients of the whole model against one device (in f64, with and without
//! sequence parallelism and activation checkpointing), mixed precision with
//! fused weight gradients on dp x tp and pp x tp meshes, and checkpoints
//! moved between (dp, tp) layouts.
//!
//! Tolerance of the trajectories: a split changes only the order of fp32
//! additions (a row-parallel matmul sums its partial products across ranks,
//! the vocabulary-parallel cross-entropy sums exponentials per rank before
//! the all-reduce), each regrouping moving a result by about 2^-24 relative.
//! Over 20 steps at tiny's learning rate these differences grow to a few
//! 1e-7 relative in the loss (observed at most 4e-7); the tests allow 5e-6,
//! ten times the observed spread, far below any real difference (a wrong
//! shard or a missing reduction moves the first step's loss by 1e-3 or more).

use std::path::Path;
use std::time::Duration;

use sigma_tests::*;
use sigma_trainer::config::{KCompression, ModelConfig};
use sigma_trainer::dist::{Collectives, StoreClient, StoreCollectives, StoreServer};
use sigma_trainer::engine::comm::communicate;
use sigma_trainer::engine::{self, ExecOptions, Runner};
use sigma_trainer::model::{GradSink, ModelInit};
use sigma_trainer::parallel::tp::{sync_shared_grads, Comm, TpPlan};
use sigma_trainer::parallel::Layout;
use sigma_trainer::Model;
use tch::{Device, Kind, Tensor};

const TP_TOL: f64 = 5e-6;

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= TP_TOL * x.abs(),
            "{what}: step {} loss {x} vs {y} (relative {:.2e})",
            i + 1,
            (x - y).abs() / x.abs()
        );
    }
}

/// Tiny (8 query, 2 key, 4 value heads, AugQ) for `steps` steps, `extra` overrides.
fn args(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        "train.cpu_threads=1",
        "train.eval_every=0",
        "train.eval_steps=1",
        "metrics.plot=false",
        "metrics.tensorboard=false",
    ];
    sets.extend_from_slice(extra);
    let mut a = tiny_train_args(out, steps, &sets);
    a.remove(0); // "train"
    a
}

fn run(nproc: usize, out: &Path, steps: u64, extra: &[&str]) -> Vec<f64> {
    let a = args(out, steps, extra);
    let o = if nproc == 1 {
        let mut full = vec!["train".to_string()];
        full.extend(a);
        sigma(&full.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[])
    } else {
        launch(nproc, &[], &a, &[])
    };
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    losses(&out.join("metrics.jsonl"))
}

#[test]
fn tp_2_and_4_follow_the_single_process_trajectory() {
    let d = tempfile::tempdir().expect("tmp");
    let base = run(1, &d.path().join("one"), 20, &[]);
    // tp = 2 (sequence parallel by default), tp = 4 (key heads replicated:
    // n_k = 2 < 4), tp = 2 without sequence parallelism, with activation checkpointing.
    for (n, extra) in [
        (2, vec!["parallel.tp=2"]),
        (4, vec!["parallel.tp=4"]),
        (
            2,
            vec![
                "parallel.tp=2",
                "parallel.sequence_parallel=false",
                "train.activation_checkpointing=true",
            ],
        ),
    ] {
        let out = d.path().join(format!("tp{n}-{}", extra.len()));
        close(&base, &run(n, &out, 20, &extra), &format!("{extra:?}"));
    }
}

#[test]
fn augq_with_projected_k_compression_and_untied_head_under_tp() {
    let d = tempfile::tempdir().expect("tmp");
    let m = [
        "model.k_compression=\"projected\"",
        "model.k_dim=8",
        "model.tie_embeddings=false",
    ];
    let base = run(1, &d.path().join("one"), 20, &m);
    let mut tp = m.to_vec();
    tp.push("parallel.tp=4");
    close(
        &base,
        &run(4, &d.path().join("tp4"), 20, &tp),
        "projected K, tp 4",
    );
}

#[test]
fn dp2_x_tp2_with_zero1_follows_one_process() {
    let d = tempfile::tempdir().expect("tmp");
    let batch = ["train.micro_batch_size=8", "train.grad_accum_steps=2"];
    let base = run(1, &d.path().join("one"), 20, &batch);
    let mesh = [
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        "parallel.dp=2",
        "parallel.tp=2",
        "parallel.zero=1",
    ];
    close(
        &base,
        &run(4, &d.path().join("mesh"), 20, &mesh),
        "dp2 x tp2 ZeRO-1",
    );
}

/// Mixed precision on CPU (`train.precision = "bf16"`: bf16 working weights,
/// each matmul's weight gradient added into the fp32 gradient buffer inside
/// backward, the default `train.fused_weight_grad`) composes with the mesh:
/// dp 2 x tp 2 with ZeRO-1 and pp 2 x tp 2 follow one process, and so does
/// one process that adds bf16 weight gradients after each segment instead.
/// bf16 rounds each split's partial results, so the tolerance is 5e-5
/// relative: the runs differ by at most 1.0e-5 over 8 steps (measured on
/// 2026-11-28), a learning rate 1 % higher moves the losses by 3.7e-4.
#[test]
fn bf16_fused_weight_gradients_on_a_mesh_follow_one_process() {
    const TOL: f64 = 5e-5;
    let d = tempfile::tempdir().expect("tmp");
    let bf16 = "train.precision=\"bf16\"";
    let base = run(1, &d.path().join("one"), 8, &[bf16]);
    for (n, extra) in [
        (1, vec![bf16, "train.fused_weight_grad=false"]),
        (
            4,
            vec![
                bf16,
                "train.micro_batch_size=4",
                "parallel.dp=2",
                "parallel.tp=2",
                "parallel.zero=1",
            ],
        ),
        (4, vec![bf16, "parallel.pp=2", "parallel.tp=2"]),
    ] {
        let got = run(
            n,
            &d.path().join(format!("run{n}-{}", extra.len())),
            8,
            &extra,
        );
        assert_eq!(got.len(), base.len(), "{extra:?}: step counts");
        for (i, (x, y)) in base.iter().zip(&got).enumerate() {
            assert!(
                (x - y).abs() <= TOL * x.abs(),
                "{extra:?}: step {} loss {y} vs one process {x} (relative {:.2e})",
                i + 1,
                (x - y).abs() / x.abs()
            );
        }
    }
}

/// A small f64 model with every DiffQKV feature: 4 query heads, 1 key head
/// (replicated on both ranks at tp = 2), 2 value heads, AugQ, projected K.
fn grad_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 16,
        num_layers: 2,
        ffn_dim: 24,
        num_q_heads: 4,
        num_k_heads: 1,
        num_v_heads: 2,
        qk_head_dim: 4,
        v_head_dim: 6,
        aug_q_dim: 8,
        k_compression: KCompression::Projected,
        k_dim: Some(2),
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        init_std: 0.2,
    }
}

/// Three sequences of 12 positions (and their targets): sequence
/// parallelism's token blocks (18 tokens each at tp 2) straddle sequences.
fn tokens() -> Tensor {
    Tensor::from_slice(&(0..39).map(|i| (i * 11 % 32) as i64).collect::<Vec<_>>()).view([3, 13])
}

/// The whole model of `c` in f64.
fn one_model(c: &ModelConfig) -> Model {
    Model::new(c, &ModelInit::cpu(3)).to_double()
}

/// Rank `rank`'s share of `c` at tp 2 (fp32), from the single model's draws,
/// and its plan.
fn tp_model32(c: &ModelConfig, rank: usize, sp: bool) -> (Model, TpPlan) {
    let layout = Layout::tensor_parallel(c, 2, rank, sp);
    let m = Model::from_share(c, layout.share(c), &ModelInit::cpu(3));
    (m, layout.tp)
}

/// `tp_model32` in f64.
fn tp_model(c: &ModelConfig, rank: usize, sp: bool) -> (Model, TpPlan) {
    let (m, plan) = tp_model32(c, rank, sp);
    (m.to_double(), plan)
}

/// Options of a training pass, with or without activation checkpointing.
fn opts(checkpoint: bool) -> ExecOptions {
    ExecOptions {
        checkpoint,
        ..ExecOptions::default()
    }
}

/// `f(rank, group)` on the two ranks of a tensor-parallel group, each a
/// thread with its own connection to a fresh store; the results in rank order.
fn on_two_ranks<T: Send>(f: impl Fn(usize, &mut dyn Collectives) -> T + Sync) -> Vec<T> {
    let server = StoreServer::start("127.0.0.1:0", "tp2").expect("store");
    let addr = server.addr.to_string();
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let (addr, f) = (&addr, &f);
                s.spawn(move || {
                    let t = Duration::from_secs(30);
                    let client =
                        StoreClient::connect(addr, "tp2", rank as u32, t).expect("connect");
                    let mut c = StoreCollectives::new(client, "tp", rank, 2, t);
                    f(rank, &mut c)
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().expect("rank")).collect()
    })
}

/// The validation loss under tp 2 (vocabulary-parallel head and loss) with
/// the head in chunks of 5 tokens or at once equals the single device's.
#[test]
fn tp2_validation_loss_in_token_chunks_equals_the_single_device_loss() {
    let c = grad_cfg();
    let one = one_model(&c);
    let want = engine::loss_sum(&one, &tokens()).double_value(&[]);
    for chunk in [0usize, 5] {
        let ranks = on_two_ranks(|rank, tp| {
            let (m, plan) = tp_model(&c, rank, true);
            let o = ExecOptions {
                loss_chunk_tokens: chunk,
                ..ExecOptions::default()
            };
            Runner::new(&m, &plan, o)
                .loss_sum(Some(tp), &tokens())
                .expect("loss")
                .double_value(&[])
        });
        for got in ranks {
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "chunk {chunk}: tp 2 loss {got} vs single device {want}"
            );
        }
    }
}

/// The collectives of sequence parallelism move contiguous token blocks:
/// a reduce-scatter gives rank r block r of the micro-batch's b x t tokens
/// (flattened) of the sum, viewed as [b, t / 2, d], and an all-gather of the
/// blocks restores [b, t, d] in order; along the features (AugQ), rank r
/// gets its slice of the last dimension and the gather puts the slices side
/// by side. Every result is contiguous: a permuted one (a feature scatter
/// runs on the last dimension moved to the front) reached SDPA as a query
/// whose head dimension was not the fastest, which sends it to the O(t^2)
/// math path in fp32 (tp 2 ran 3.4x slower on H200s).
#[test]
fn tensor_parallel_scatters_and_gathers_move_contiguous_blocks() {
    let input = |rank: i64| {
        Tensor::arange(2 * 6 * 8, (Kind::Double, Device::Cpu)).view([2, 6, 8]) * (rank + 1) as f64
    };
    let ranks = on_two_ranks(|rank, c| {
        let x = input(rank as i64);
        let [seq, feat] = [Comm::ScatterSeq, Comm::ScatterFeat]
            .map(|op| communicate(c, op, &x, false).expect("scatter"));
        let back = [(Comm::GatherSeq, &seq), (Comm::GatherFeat, &feat)]
            .map(|(op, part)| communicate(c, op, part, false).expect("gather"));
        (seq, feat, back)
    });
    let sum = input(0) + input(1);
    for (rank, (seq, feat, back)) in ranks.into_iter().enumerate() {
        let r = rank as i64;
        for (what, got, want) in [
            (
                "token block",
                &seq,
                sum.view([-1]).narrow(0, 48 * r, 48).view([2, 3, 8]),
            ),
            ("features", &feat, sum.narrow(2, 4 * r, 4)),
            ("gathered token blocks", &back[0], sum.shallow_clone()),
            ("gathered features", &back[1], sum.shallow_clone()),
        ] {
            assert!(
                got.is_contiguous(),
                "rank {rank}: {what}: strides {:?}",
                got.stride()
            );
            assert_eq!(got.size(), want.size(), "rank {rank}: {what}");
            assert!(got.equal(&want), "rank {rank}: {what}: wrong values");
        }
    }
}

/// Under tensor and sequence parallelism with AugQ every attention call
/// reaches a fused SDPA backend, as on one device: on the CPU, libtorch's
/// choice of backend depends on the layout the same way (a query whose
/// head dimension is not the fastest gets the math path).
#[test]
fn attention_under_tensor_parallelism_never_falls_back_to_sdpas_math_path() {
    let mut c = grad_cfg();
    (c.num_q_heads, c.num_k_heads, c.num_v_heads) = (4, 2, 2);
    (c.qk_head_dim, c.v_head_dim, c.k_compression, c.k_dim) = (8, 8, KCompression::None, None);
    let one = one_model(&c);
    let mut g = one.params.flat.zeros_like();
    let before = sigma_trainer::model::sdpa_calls_on_this_thread();
    let _ = engine::forward_backward(&one, &tokens(), 0.1, false, &mut g, &mut |_, _| Ok(()))
        .expect("backward");
    let after = sigma_trainer::model::sdpa_calls_on_this_thread();
    assert!(after.0 > before.0, "one device: no attention call counted");
    assert_eq!(
        after.1, before.1,
        "one device: this shape itself gets the math path"
    );
    for (sp, ac) in [(true, false), (true, true), (false, false)] {
        let ranks = on_two_ranks(|rank, tp| {
            let (m, plan) = tp_model(&c, rank, sp);
            let _ = tp_grads(&m, &plan, tp, ac);
            sigma_trainer::model::sdpa_calls_on_this_thread()
        });
        for (rank, (calls, math)) in ranks.into_iter().enumerate() {
            assert!(
                calls > 0,
                "sp {sp} ckpt {ac} rank {rank}: no attention call counted"
            );
            assert_eq!(math, 0, "sp {sp} ckpt {ac} rank {rank}: {math} of {calls} attention calls ran SDPA's math path");
        }
    }
}

/// This rank's gradients (its local flat buffer) of `tokens()` at loss scale
/// 0.1, with or without activation checkpointing.
fn tp_grads(m: &Model, plan: &TpPlan, tp: &mut dyn Collectives, checkpoint: bool) -> Tensor {
    let mut g = m.params.flat.zeros_like();
    let _ = Runner::new(m, plan, opts(checkpoint))
        .forward_backward(Some(tp), &tokens(), 0.1, &mut g, &mut |_, _| Ok(()))
        .expect("backward");
    g
}

/// Gradients of rank `rank` of 2 (its local flat buffer), made whole for shared parameters.
fn tp_rank_grads(
    addr: String,
    rank: usize,
    sp: bool,
    ac: bool,
) -> (Vec<f64>, Vec<(String, Vec<i64>, Vec<(i64, i64)>, i64)>) {
    let c = grad_cfg();
    let t = Duration::from_secs(30);
    let connect = || StoreClient::connect(&addr, "g", rank as u32, t).expect("connect");
    let mut tp = StoreCollectives::new(connect(), &format!("tp{sp}{ac}"), rank, 2, t);
    let shared: Box<dyn Collectives> = Box::new(StoreCollectives::new(
        connect(),
        &format!("rep{sp}{ac}"),
        rank,
        2,
        t,
    ));
    let mut replicas = vec![(2usize, shared)];
    let (m, plan) = tp_model(&c, rank, sp);
    let g = tp_grads(&m, &plan, &mut tp, ac);
    sync_shared_grads(&m.params, &g, &mut tp, &mut replicas).expect("sync");
    let layout = m
        .params
        .specs
        .iter()
        .zip(&m.params.offsets)
        .map(|(s, &o)| (s.name(), s.global_shape.clone(), s.block.clone(), o))
        .collect();
    (Vec::<f64>::try_from(g).expect("grads"), layout)
}

#[test]
fn gradients_of_a_tp2_model_equal_the_single_device_gradients() {
    let c = grad_cfg();
    let one = one_model(&c);
    let mut g1 = one.params.flat.zeros_like();
    let _ = engine::forward_backward(&one, &tokens(), 0.1, false, &mut g1, &mut |_, _| Ok(()))
        .expect("backward");
    let server = StoreServer::start("127.0.0.1:0", "g").expect("store");
    for (sp, ac) in [(true, false), (false, false), (true, true)] {
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let addr = server.addr.to_string();
                std::thread::spawn(move || tp_rank_grads(addr, r, sp, ac))
            })
            .collect();
        let ranks: Vec<_> = ranks.into_iter().map(|h| h.join().expect("rank")).collect();
        for (i, spec) in one.params.specs.iter().enumerate() {
            let want = g1
                .narrow(0, one.params.offsets[i], spec.numel())
                .view(spec.shape.as_slice());
            for (grads, layout) in &ranks {
                let (_, shape, block, off) = layout
                    .iter()
                    .find(|l| l.0 == spec.name())
                    .expect("same parameter");
                assert_eq!(shape, &spec.global_shape);
                let n: i64 = block.iter().map(|b| b.1).product();
                let dims: Vec<i64> = block.iter().map(|b| b.1).collect();
                let got = Tensor::from_slice(&grads[*off as usize..(*off + n) as usize])
                    .view(dims.as_slice());
                let mut w = want.shallow_clone();
                for (d, &(o, l)) in block.iter().enumerate() {
                    w = w.narrow(d as i64, o, l);
                }
                let err = (&got - &w).abs().max().double_value(&[]);
                let scale = w.abs().max().double_value(&[]).max(1e-12);
                assert!(
                    err <= 1e-10 * scale,
                    "sp {sp} ac {ac}: {} block {block:?}: max difference {err:e} (max {scale:e})",
                    spec.name()
                );
            }
        }
    }
    let _ = Kind::Double;
}

fn model_tensors(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let data = std::fs::read(dir.join("model.safetensors")).expect("export");
    let st = safetensors::SafeTensors::deserialize(&data).expect("safetensors");
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn checkpoints_move_between_dp_and_tp_layouts() {
    let d = tempfile::tempdir().expect("tmp");
    let batch = ["train.micro_batch_size=4", "train.grad_accum_steps=2"];
    let reference = run(1, &d.path().join("ref"), 8, &batch);
    // Saved after step 4 by each layout, then continued by another.
    let layouts: [(usize, &[&str]); 4] = [
        (2, &["parallel.tp=2"]),
        (1, &[]),
        (
            4,
            &[
                "parallel.dp=2",
                "parallel.tp=2",
                "train.micro_batch_size=2",
                "parallel.zero=1",
            ],
        ),
        (4, &["parallel.dp=4", "train.micro_batch_size=1"]),
    ];
    let moves = [(0, 1), (1, 0), (1, 2), (2, 3), (3, 2)];
    let saved: Vec<std::path::PathBuf> = layouts
        .iter()
        .enumerate()
        .take(4)
        .map(|(i, (n, extra))| {
            let out = d.path().join(format!("save{i}"));
            let mut a = args(&out, 8, &[batch.as_slice(), extra].concat());
            a.extend(["--stop-after".into(), "4".into()]);
            let o = if *n == 1 {
                let mut full = vec!["train".to_string()];
                full.extend(a);
                sigma(&full.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[])
            } else {
                launch(*n, &[], &a, &[])
            };
            assert!(o.status.success(), "save {i}: {}", stderr(&o));
            out
        })
        .collect();
    for (from, to) in moves {
        let out = d.path().join(format!("move{from}{to}"));
        std::fs::create_dir_all(&out).expect("mkdir");
        for f in ["metrics.jsonl"] {
            std::fs::copy(saved[from].join(f), out.join(f)).expect("copy");
        }
        let ck = saved[from].join("checkpoints/step-0000004");
        let (n, extra) = layouts[to];
        let mut a = args(&out, 8, &[batch.as_slice(), extra].concat());
        a.extend(["--resume".into(), ck.to_string_lossy().into_owned()]);
        let o = if n == 1 {
            let mut full = vec!["train".to_string()];
            full.extend(a);
            sigma(&full.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[])
        } else {
            launch(n, &[], &a, &[])
        };
        assert!(o.status.success(), "{from} -> {to}: {}", stderr(&o));
        close(
            &reference,
            &losses(&out.join("metrics.jsonl")),
            &format!("layout {from} -> {to}"),
        );
    }
    // The same state saved under tp 2 and re-saved under tp 4 (`--stop-after`
    // the resumed step writes the loaded state in the new layout) exports identically.
    let out = d.path().join("resaved");
    let mut a = args(&out, 8, &[batch.as_slice(), &["parallel.tp=4"]].concat());
    a.extend([
        "--resume".into(),
        saved[0]
            .join("checkpoints/step-0000004")
            .to_string_lossy()
            .into_owned(),
    ]);
    a.extend(["--stop-after".into(), "4".into()]);
    let o = launch(4, &[], &a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e1 = d.path().join("export-tp2");
    let e2 = d.path().join("export-tp4");
    for (ck, e) in [
        (saved[0].join("checkpoints/step-0000004"), &e1),
        (out.join("checkpoints/step-0000004"), &e2),
    ] {
        let o = sigma(
            &[
                "checkpoint",
                "export",
                &ck.to_string_lossy(),
                "--output",
                &e.to_string_lossy(),
            ],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(model_tensors(&e1), model_tensors(&e2));
}

/// Overlapping the backward collectives of tensor parallelism with the weight
/// gradients of the segment before them (`parallel.tp_comm_overlap`: with
/// the gradient sink, those GEMMs are put off until the collective has
/// started) changes no number: every rank's gradients are bit-identical to
/// the run without it; the put-off GEMMs ran (counted, so the path was
/// taken); and every parameter's gradient is final when the engine reports
/// its last segment done (the hook that starts data-parallel reductions),
/// so none is added after its bucket left. With and without sequence
/// parallelism and activation checkpointing.
#[test]
fn overlapping_tp_collectives_with_weight_gradients_changes_no_gradient() {
    let c = grad_cfg();
    for (sp, ac) in [(true, false), (true, true), (false, false)] {
        let ranks = on_two_ranks(|rank, tp| {
            let mut run = |overlap: bool| {
                let (mut m, plan) = tp_model32(&c, rank, sp);
                // Master weights in fp32, matmuls on f64 working copies: the sink applies.
                m.compute = Kind::Double;
                m.params.enable_work_copy(Kind::Double);
                let mut g = m.params.flat.zeros_like();
                let sink = GradSink::new(&m, &g);
                let o = ExecOptions {
                    tp_comm_overlap: overlap,
                    ..opts(ac)
                };
                let runner = Runner::new(&m, &plan, o).with_sink(sink.as_ref());
                let last = runner.program().final_positions(&m);
                let p = &m.params;
                let mut at_hook: Vec<Option<Tensor>> = (0..p.specs.len()).map(|_| None).collect();
                let _ = runner
                    .forward_backward(Some(&mut *tp), &tokens(), 0.1, &mut g, &mut |pos, grads| {
                        for (id, _) in last.iter().enumerate().filter(|(_, &l)| l == pos) {
                            at_hook[id] =
                                Some(grads.narrow(0, p.offsets[id], p.specs[id].numel()).copy());
                        }
                        Ok(())
                    })
                    .expect("backward");
                let drained = runner.wgrad_queue().map_or(0, |q| q.drained());
                let names: Vec<String> = p.specs.iter().map(|s| s.name()).collect();
                (g, at_hook, drained, names, p.offsets.clone())
            };
            (run(false), run(true))
        });
        for (rank, (off, on)) in ranks.into_iter().enumerate() {
            let what = format!("sp {sp} ckpt {ac} rank {rank}");
            assert_eq!(off.2, 0, "{what}: GEMMs put off without the overlap");
            assert!(on.2 > 0, "{what}: no weight-gradient GEMM was put off");
            assert!(
                on.0.equal(&off.0),
                "{what}: gradients differ with the overlap (max {})",
                (&on.0 - &off.0).abs().max().double_value(&[])
            );
            let (names, offsets) = (&on.3, &on.4);
            for (id, snap) in on.1.iter().enumerate() {
                let snap = snap.as_ref().expect("every parameter has a last segment");
                let fin = on.0.narrow(0, offsets[id], snap.numel() as i64);
                assert!(
                    snap.equal(&fin),
                    "{what}: {} changed after the hook reported its last segment done",
                    names[id]
                );
            }
        }
    }
}
