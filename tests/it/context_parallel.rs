//! Context parallelism (docs/context-parallel.md): the ring attention alone
//! against full causal attention (values and gradients, float64, n_k < n_v
//! and unequal q·k and v widths, the sequence one document across every
//! piece boundary); the whole model's gradients at cp 2 and 4 against one
//! device (float64, AugQ, projected and native K compression, with and
//! without activation checkpointing), each cp rank a thread; then `sigma
//! train` on several processes: cp 2 and 4 follow one process (losses and
//! validation), with projected K compression, composed with dp (ZeRO-1), tp
//! (sequence parallelism) and pp; a cp 2 checkpoint resumed at cp 1 and cp
//! 4; bad layouts refused naming the keys.
//!
//! Tolerance of the trajectories: context parallelism computes each query's
//! attention as a log-sum-exp merge of up to 2 cp partial softmaxes (in
//! fp32) instead of one, and sums each parameter's gradient over the cp
//! ranks' tokens in another grouping; both regroup fp32 operations, each
//! moving a result by about 2^-24 relative. Measured (each comparison
//! prints its largest relative difference): at most 1.7e-7 over 20 steps
//! of tiny. The tests allow `CP_TOL` = 5e-6, as tensor parallelism's do,
//! about 30 times that; the float64 gradient test is what pins the ring's
//! arithmetic (1e-10), and shifting a piece's RoPE positions fails it.

use std::path::Path;
use std::time::Duration;

use sigma_tests::*;
use sigma_trainer::config::{KCompression, ModelConfig};
use sigma_trainer::dist::{Collectives, StoreClient, StoreCollectives, StoreServer};
use sigma_trainer::engine::{ExecOptions, Ring, Runner};
use sigma_trainer::model::lse;
use sigma_trainer::model::ModelInit;
use sigma_trainer::parallel::tp::TpPlan;
use sigma_trainer::Model;
use tch::{Device, Kind, Tensor};

const CP_TOL: f64 = 5e-6;

/// `f(rank, group)` on every rank of a ring of `n`, each a thread with its
/// own connection to a fresh store; the results in rank order.
fn on_ring<T: Send>(n: usize, f: impl Fn(usize, Box<dyn Collectives>) -> T + Sync) -> Vec<T> {
    let server = StoreServer::start("127.0.0.1:0", "cp").expect("store");
    let addr = server.addr.to_string();
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..n)
            .map(|rank| {
                let (addr, f) = (&addr, &f);
                s.spawn(move || {
                    let t = Duration::from_secs(30);
                    let client = StoreClient::connect(addr, "cp", rank as u32, t).expect("connect");
                    f(
                        rank,
                        Box::new(StoreCollectives::new(client, "cp", rank, n, t)),
                    )
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().expect("rank")).collect()
    })
}

/// Rank `i`'s pieces (`i` and `2n - 1 - i` of `2n`) of `x` along `dim`.
fn pieces(x: &Tensor, dim: i64, n: usize, i: usize) -> Tensor {
    let c = x.size()[dim as usize] / (2 * n as i64);
    let ids = [i as i64, (2 * n - 1 - i) as i64];
    Tensor::cat(&ids.map(|p| x.narrow(dim, p * c, c)), dim)
}

/// A tensor's values on the host, to share with the ring's threads
/// (libtorch tensors are not `Sync`).
struct Host(Vec<f64>, Vec<i64>);

impl Host {
    fn of(t: &Tensor) -> Host {
        let v = Vec::<f64>::try_from(t.detach().reshape([-1])).expect("f64 values");
        Host(v, t.size())
    }
    fn get(&self) -> Tensor {
        Tensor::from_slice(&self.0).view(self.1.as_slice())
    }
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-300)
}

/// The ring attention of every rank of cp 2, 3 and 4 equals libtorch's
/// causal attention over the whole sequence, and so do the gradients of
/// the queries, keys and values it returns: 8 query heads, 2 key heads, 4
/// value heads (n_k < n_v), q·k width 8, v width 6, 24 positions.
#[test]
fn ring_attention_equals_full_causal_attention_with_gradients() {
    let (b, nq, nk, nv, t, dd, dv) = (2, 8, 2, 4, 24, 8, 6);
    let opts = (Kind::Double, Device::Cpu);
    tch::manual_seed(7);
    let q = Tensor::randn([b, nq, t, dd], opts).set_requires_grad(true);
    let k = Tensor::randn([b, nk, t, dd], opts).set_requires_grad(true);
    let v = Tensor::randn([b, nv, t, dv], opts).set_requires_grad(true);
    let w = Tensor::randn([b, t, nq * dv], opts);
    let scale = 1.0 / (dd as f64).sqrt();
    let o = Tensor::scaled_dot_product_attention::<&Tensor>(
        &q,
        &k.repeat_interleave_self_int(nq / nk, 1, None),
        &v.repeat_interleave_self_int(nq / nv, 1, None),
        None,
        0.0,
        true,
        scale,
        false,
    )
    .transpose(1, 2)
    .reshape([b, t, nq * dv]);
    (&o * &w).sum(Kind::Double).backward();
    let (gq, gk, gv) = (q.grad(), k.grad(), v.grad());
    let (hq, hk, hv, hw) = (Host::of(&q), Host::of(&k), Host::of(&v), Host::of(&w));
    for n in [2usize, 3, 4] {
        let got = on_ring(n, |rank, comm| {
            let ring = Ring::new(comm);
            let mine = |x: &Host| pieces(&x.get(), 2, n, rank);
            let (ql, kl, vl) = (mine(&hq), mine(&hk), mine(&hv));
            let (out, saved) = ring.forward(&ql, &kl, &vl, scale).expect("forward");
            let g = pieces(&hw.get(), 1, n, rank);
            let grads = ring
                .backward(&g, &ql, &kl, &vl, &saved, scale)
                .expect("backward");
            (out, grads)
        });
        for (rank, (out, (dq, dk, dvv))) in got.into_iter().enumerate() {
            let what = format!("cp {n} rank {rank}");
            let want_o = pieces(&o.detach(), 1, n, rank);
            assert!(
                rel(&out, &want_o) < 1e-12,
                "{what}: output off by {:e}",
                rel(&out, &want_o)
            );
            for (name, got, want) in [("q", dq, &gq), ("k", dk, &gk), ("v", dvv, &gv)] {
                let want = pieces(want, 2, n, rank);
                let r = rel(&got, &want);
                assert!(r < 1e-12, "{what}: gradient of {name} off by {r:e}");
            }
        }
    }
}

/// Merging two partial attentions by their log-sum-exp gives the attention
/// over both key blocks.
#[test]
fn log_sum_exp_merge_of_two_key_blocks_is_attention_over_both() {
    let opts = (Kind::Double, Device::Cpu);
    tch::manual_seed(3);
    let (q, k, v) = (
        Tensor::randn([1, 2, 5, 4], opts),
        Tensor::randn([1, 2, 10, 4], opts),
        Tensor::randn([1, 2, 10, 3], opts),
    );
    let whole = lse::forward(&q, &k, &v, false, 0.5);
    let a = lse::forward(&q, &k.narrow(2, 0, 4), &v.narrow(2, 0, 4), false, 0.5);
    let b = lse::forward(&q, &k.narrow(2, 4, 6), &v.narrow(2, 4, 6), false, 0.5);
    let m = lse::merge(Some(a), b);
    assert!(rel(&m.o, &whole.o) < 1e-14 && rel(&m.lse, &whole.lse) < 1e-14);
}

/// A small float64 SIGMA with AugQ and projected K compression; 4 query
/// heads, 1 K head, 2 V heads.
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

/// Three sequences of 16 positions and their targets.
fn tokens() -> Tensor {
    Tensor::from_slice(&(0..51).map(|i| (i * 11 % 32) as i64).collect::<Vec<_>>()).view([3, 17])
}

/// Loss sum and gradient (flat) of `tokens()` through `run`.
fn grads(run: Runner<'_>) -> (f64, Tensor) {
    let mut g = run.model.params.flat.zeros_like();
    let loss = run
        .forward_backward(None, &tokens(), 0.1, &mut g, &mut |_, _| Ok(()))
        .expect("backward");
    (loss.double_value(&[]), g)
}

/// Summed over the ranks of cp 2 and 4, the loss sums and gradients of
/// every parameter equal one device's (float64, 1e-10 relative), with and
/// without activation checkpointing, with projected K compression (1 K head
/// for 2 V heads) and with native K compression (q·k 2 wide, v 6
/// wide): RoPE positions of the pieces, the pieces of inputs and targets,
/// the ring and its backward.
#[test]
fn model_gradients_at_cp_2_and_4_equal_one_device() {
    let projected = grad_cfg();
    let mut native = grad_cfg();
    native.k_compression = KCompression::Native;
    for (c, layouts) in [
        (projected, vec![(2usize, false), (2, true), (4, false)]),
        (native, vec![(2, false)]),
    ] {
        for (n, checkpoint) in layouts {
            let what = format!("{:?}, cp {n}, checkpointing {checkpoint}", c.k_compression);
            cp_grads_equal_one_device(&c, n, checkpoint, &what);
        }
    }
}

fn cp_grads_equal_one_device(c: &ModelConfig, n: usize, checkpoint: bool, what: &str) {
    let model = || Model::new(c, &ModelInit::cpu(3)).to_double();
    let one = model();
    let plan = TpPlan::single(c);
    let (want_loss, want) = grads(Runner::new(&one, &plan, ExecOptions::default()));
    let got = on_ring(n, |_, comm| {
        let (m, ring) = (model(), Ring::new(comm));
        let opts = ExecOptions {
            checkpoint,
            ..ExecOptions::default()
        };
        grads(Runner::new(&m, &plan, opts).with_ring(Some(&ring)))
    });
    let loss: f64 = got.iter().map(|(l, _)| l).sum();
    let g = got.iter().skip(1).fold(got[0].1.copy(), |a, (_, g)| a + g);
    assert!(
        (loss - want_loss).abs() < 1e-10 * want_loss,
        "{what}: loss {loss} vs {want_loss}"
    );
    for (spec, off) in one.params.specs.iter().zip(&one.params.offsets) {
        let (a, b) = (
            g.narrow(0, *off, spec.numel()),
            want.narrow(0, *off, spec.numel()),
        );
        let r = rel(&a, &b);
        assert!(r < 1e-10, "{what}: gradient of {:?} off by {r:e}", spec.key);
    }
}

// ---------------------------------------------------------------------------
// Several processes.

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs())
        .fold(0.0, f64::max);
    eprintln!(
        "{what}: largest relative difference over {} values {worst:.2e}",
        a.len()
    );
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= CP_TOL * x.abs(),
            "{what}: value {} (the step's loss, or a domain's validation loss): {x} vs {y} (relative {:.2e})",
            i + 1,
            (x - y).abs() / x.abs()
        );
    }
}

/// Tiny (8 query, 2 key, 4 value heads, AugQ) at 256 tokens per sequence,
/// 4 sequences per step, for `steps` steps, `extra` overrides.
fn args(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        "data.seq_len=256",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=1",
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

fn run_with(nproc: usize, a: Vec<String>) -> std::process::Output {
    if nproc == 1 {
        let mut full = vec!["train".to_string()];
        full.extend(a);
        sigma(&full.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[])
    } else {
        launch(nproc, &[], &a, &[])
    }
}

fn run(nproc: usize, out: &Path, steps: u64, extra: &[&str]) -> Vec<f64> {
    let o = run_with(nproc, args(out, steps, extra));
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    losses(&out.join("metrics.jsonl"))
}

/// The validation losses (per domain) of the run's final validation.
fn val_losses(out: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    let last = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("val_loss").cloned())
        .next_back()
        .expect("a validation record");
    let map = last.as_object().expect("losses by domain");
    map.values().map(|v| v.as_f64().expect("a loss")).collect()
}

/// cp 2 and cp 4 follow one process for 20 steps, and their final
/// validation losses (each cp rank scores its pieces of the same batches)
/// are one process's; with projected K compression cp 2 follows too.
#[test]
fn cp_2_and_4_follow_one_process() {
    let d = tempfile::tempdir().expect("tmp");
    let one = d.path().join("one");
    let base = run(1, &one, 20, &[]);
    for n in [2usize, 4] {
        let cp = format!("parallel.cp={n}");
        let out = d.path().join(format!("cp{n}"));
        close(&base, &run(n, &out, 20, &[&cp]), &cp);
        let what = format!("{cp}, validation");
        close(&val_losses(&one), &val_losses(&out), &what);
    }
    let proj = ["model.k_compression=\"projected\"", "model.k_dim=8"];
    let base = run(1, &d.path().join("one-proj"), 20, &proj);
    let mut extra = proj.to_vec();
    extra.push("parallel.cp=2");
    close(
        &base,
        &run(2, &d.path().join("cp2-proj"), 20, &extra),
        "cp 2, projected K",
    );
}

/// cp 2 composed with dp 2 (ZeRO-1), with tp 2 (sequence parallelism) and
/// with pp 2 follows one process.
#[test]
fn cp_composes_with_dp_tp_and_pp() {
    let d = tempfile::tempdir().expect("tmp");
    let base = run(1, &d.path().join("one"), 8, &[]);
    for extra in [
        vec![
            "parallel.dp=2",
            "train.micro_batch_size=2",
            "parallel.zero=1",
        ],
        vec!["parallel.tp=2"],
        vec!["parallel.pp=2"],
    ] {
        let mut e = extra.clone();
        e.push("parallel.cp=2");
        let out = d.path().join(extra.join("-").replace('=', ""));
        close(&base, &run(4, &out, 8, &e), &format!("{e:?}"));
    }
}

/// A checkpoint saved at cp 2 resumes at cp 1 and at cp 4 and follows the
/// run that never stopped.
#[test]
fn a_cp_2_checkpoint_resumes_at_cp_1_and_4() {
    let d = tempfile::tempdir().expect("tmp");
    let reference = run(1, &d.path().join("ref"), 8, &[]);
    let dir = d.path().join("saved");
    let mut a = args(&dir, 8, &["parallel.cp=2", "parallel.zero=1"]);
    a.extend(["--stop-after".into(), "4".into()]);
    let o = run_with(2, a);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = dir.join("checkpoints/step-0000004");
    for n in [1usize, 4] {
        let out = d.path().join(format!("to{n}"));
        std::fs::create_dir_all(&out).expect("mkdir");
        std::fs::copy(dir.join("metrics.jsonl"), out.join("metrics.jsonl")).expect("copy");
        let cp = format!("parallel.cp={n}");
        let mut a = args(&out, 8, &[&cp]);
        a.extend(["--resume".into(), ck.to_string_lossy().into_owned()]);
        let o = run_with(n, a);
        assert!(o.status.success(), "{cp}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("saved with dp 1 cp 2 tp 1"),
            "{}",
            stderr(&o)
        );
        close(
            &reference,
            &losses(&out.join("metrics.jsonl")),
            &format!("cp 2 -> {cp}"),
        );
    }
}

/// A sequence length that does not split into 2 x cp pieces, and a job
/// whose size is not the product of the axes, stop at start-up naming the keys.
#[test]
fn bad_context_parallel_layouts_are_refused_naming_the_keys() {
    let d = tempfile::tempdir().expect("tmp");
    let mut a = args(
        &d.path().join("a"),
        1,
        &["parallel.cp=3", "data.seq_len=128"],
    );
    a.insert(0, "train".into());
    let o = sigma(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert_clean_failure(&o, &["data.seq_len", "128", "2 x parallel.cp (6)"]);
    let mut a = args(&d.path().join("b"), 1, &["parallel.cp=2"]);
    a.insert(0, "train".into());
    let o = sigma(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert_clean_failure(&o, &["parallel.cp (2)", "= 2 but the job has 1"]);
}
