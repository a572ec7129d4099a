//! The plan against what the trainer builds and runs: state bytes against
//! a built model and its optimizer, activation bytes against the arithmetic
//! written out, the timed schedule against the closed-form bubble, the
//! refusals against `sigma train`'s, and the recorded GPU runs.

use tch::Kind;

use crate::config::RunConfig;
use crate::engine::program::Program;
use crate::model::{Model, ModelInit};
use crate::optim::AdamW;
use crate::parallel::schedule::{simulate, simulate_timed, Action, Schedule};
use crate::parallel::tp::TpPlan;
use crate::parallel::Layout;
use crate::plan::acts::{pass_memory, PassOptions, Tokens};
use crate::plan::layout::Candidate;
use crate::plan::memory::{schedule_peak, State};
use crate::plan::recorded::runs;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

fn tiny() -> RunConfig {
    let path = root().join("configs/tiny.toml");
    RunConfig::load(&path.to_string_lossy(), &[]).expect("configs/tiny.toml")
}

fn cand(tp: usize, pp: usize, v: usize, dp: usize, zero: bool) -> Candidate {
    Candidate {
        tp,
        pp,
        v,
        dp,
        zero,
        micro_batch: 2,
        accum: 4,
        checkpoint: false,
        loss_chunk_tokens: 0,
    }
}

/// Every rank of several layouts: the weights, gradient, moments and bf16
/// copy the plan counts are the bytes `Model::from_share` and
/// `AdamW::new` allocate.
#[test]
fn state_bytes_equal_a_built_model_and_its_optimizer() {
    let base = tiny();
    let layouts = [
        cand(1, 1, 1, 1, false),
        cand(2, 1, 1, 1, false),
        cand(4, 1, 1, 1, false),
        cand(1, 2, 1, 1, false),
        cand(1, 2, 2, 1, false),
        cand(2, 2, 1, 1, false),
        cand(1, 1, 1, 3, true),
        cand(2, 1, 1, 2, true),
    ];
    for c in layouts {
        let cfg = c.check(&base, c.gpus()).expect("a valid layout");
        for rank in 0..c.gpus() {
            let layout = Layout::new(&cfg, rank);
            let share = layout.share(&cfg.model);
            let plan = State::of(&share, c.dp, c.zero, true);
            let mut m = Model::from_share(&cfg.model, share, &ModelInit::cpu(1));
            m.params.enable_work_copy(Kind::BFloat16);
            let zero = c.zero.then_some((layout.coords.dp, c.dp));
            let a = AdamW::new(&cfg.optim, &m.params, zero, c.tp);
            let what = format!("{} rank {rank}", c.describe());
            assert_eq!(plan.weights, 4.0 * m.params.flat.numel() as f64, "{what}");
            assert_eq!(plan.grads + plan.moments, a.state_bytes() as f64, "{what}");
            let copy: i64 = (0..m.params.specs.len())
                .map(|i| {
                    m.params
                        .work_leaf(crate::model::params::ParamId(i))
                        .expect("a copy")
                        .numel() as i64
                })
                .sum();
            assert_eq!(plan.work_copy, 2.0 * copy as f64, "{what}");
        }
    }
}

/// SIGMA-1.5B on one device: what a block keeps per token, written out
/// (fp32 input 8,192; bf16 norm output 4,096; norm statistic 4; q0 4,096;
/// AugQ's gate/up 12,288 and product 6,144; K repeated to 16 heads 2,048;
/// V 2,048; q after RoPE 4,096; SDPA's output 4,096 and log-sum-exp 128;
/// the FFN norm's fp32 sum 8,192 and statistic 4; its bf16 output 4,096;
/// SwiGLU's gate/up 24,576 and product 12,288): 96,392 bytes per token and
/// layer; the head keeps its input's norm statistic, its bf16 input, the
/// bf16 logits and a log-sum-exp per token.
#[test]
fn a_sigma_1_5b_block_keeps_what_its_operations_save() {
    let path = root().join("configs/sigma-1.5b.toml");
    let cfg = RunConfig::load(&path.to_string_lossy(), &[]).expect("config");
    let c = &cfg.model;
    let plan = TpPlan::single(c);
    let t = Tokens::new(2, 4096, &plan);
    let o = PassOptions {
        checkpoint: false,
        loss_chunk_tokens: 0,
        head_logit_buffers: 1,
    };
    let whole = Program::of_config(c, &plan, 0..26, true, true);
    let m = pass_memory(c, &plan, &whole, t, &o);
    let block = 96_392.0;
    let head = 4.0 + 2.0 * 2048.0 + 2.0 * 128_256.0 + 4.0;
    let embed = 8.0 + 4.0 * 2048.0; // token ids, the embedding's output
    assert_eq!(m.kept, t.all * (26.0 * block + embed + head));
    assert_eq!(m.head, t.all * head);
    // With checkpointing a block keeps only its input.
    let ck = PassOptions {
        checkpoint: true,
        ..o
    };
    let m = pass_memory(c, &plan, &whole, t, &ck);
    assert_eq!(m.kept, t.all * (26.0 * 4.0 * 2048.0 + embed + head));
    // Without the head (a first pipeline stage), backward peaks recomputing
    // the last block: all it keeps but its input, which stayed.
    let stage = Program::of_config(c, &plan, 0..26, true, false);
    let m = pass_memory(c, &plan, &stage, t, &ck);
    let recompute = block - 4.0 * 2048.0;
    assert!(
        m.backward_extra >= t.all * recompute,
        "{} < {}",
        m.backward_extra,
        t.all * recompute
    );
    assert!(
        m.backward_extra < t.all * 2.0 * recompute,
        "{}",
        m.backward_extra
    );
}

/// Under tensor parallelism each rank keeps its shards, and every value
/// that crossed a collective twice: the gathered inputs of the
/// column-parallel matmuls and the partial sums before each scatter.
#[test]
fn tensor_parallel_slots_hold_shards_and_gathered_inputs() {
    let cfg = tiny();
    let c = &cfg.model;
    let one = TpPlan::single(c);
    let two = TpPlan::new(c, 2, 0, true);
    let o = PassOptions {
        checkpoint: false,
        loss_chunk_tokens: 0,
        head_logit_buffers: 1,
    };
    let kept = |p: &TpPlan| {
        let prog = Program::of_config(c, p, 0..1, false, false);
        pass_memory(c, p, &prog, Tokens::new(8, 128, p), &o).kept
    };
    let (k1, k2) = (kept(&one), kept(&two));
    assert!(
        k2 < k1 && k2 > k1 / 2.0,
        "tp 2 keeps between half and all: {k2} of {k1}"
    );
}

/// The pipeline schedules the trainer runs, timed with a forward of 1 and a
/// backward of 2 per chunk (1/v and 2/v with v chunks) and free messages:
/// the first rank idles exactly (p - 1) / (v m + p - 1) of its stretch, the
/// closed form of 1F1B and of interleaved 1F1B.
#[test]
fn timed_schedules_idle_as_the_closed_form_says() {
    for pp in 1..=6 {
        for v in 1..=3 {
            for m in 1..=12 {
                let Ok(s) = Schedule::new(pp, v, m) else {
                    continue;
                };
                if v > 1 && m < pp {
                    continue;
                }
                let dur = |_: usize, a: Action| match a {
                    Action::Forward { .. } => 1.0 / v as f64,
                    Action::Backward { .. } => 2.0 / v as f64,
                };
                let tl = simulate_timed(&s, &dur, &|_, _| 0.0).expect("runs");
                let want = s.bubble();
                let got = tl.bubble(0);
                assert!(
                    (got - want).abs() < 1e-9,
                    "pp {pp} v {v} m {m}: {got} against {want}"
                );
            }
        }
    }
}

/// The memory walk of a schedule keeps as many passes in flight as the
/// schedule's own simulation counts.
#[test]
fn the_memory_walk_keeps_the_schedule_s_passes_in_flight() {
    let pass = crate::plan::acts::PassMemory {
        kept: 1.0,
        ..Default::default()
    };
    for (pp, v, m) in [(4, 1, 8), (4, 2, 8), (2, 1, 3), (3, 3, 6)] {
        let s = Schedule::new(pp, v, m).expect("a schedule");
        let sim = simulate(&s).expect("runs");
        for r in 0..pp {
            let peak = schedule_peak(&s, r, &vec![pass; v]);
            assert_eq!(
                peak.in_flight, sim.peak_in_flight[r],
                "pp {pp} v {v} m {m} rank {r}"
            );
        }
    }
}

/// A layout `sigma train` refuses is refused with `sigma train`'s message.
#[test]
fn bad_layouts_are_refused_with_the_trainer_s_reason() {
    let base = tiny();
    for (c, gpus) in [
        (cand(3, 1, 1, 1, false), 3),
        (cand(1, 8, 1, 1, false), 8),
        (cand(1, 2, 2, 1, false), 2),
    ] {
        let mut c = c;
        if c.v == 2 {
            c.accum = 3; // not a multiple of pp
        }
        let got = c.check(&base, gpus).expect_err("refused").to_string();
        let want = Layout::check(&c.apply(&base))
            .and_then(|_| c.apply(&base).validate())
            .expect_err("refused by the trainer")
            .to_string();
        assert_eq!(got, want);
    }
}

/// Every recorded GPU run of docs/benchmarks.md: the allocator peak within
/// 5 % and tokens/s within 10 % (docs/plan.md).
#[test]
fn recorded_runs_are_predicted_within_the_targets() {
    for r in runs().expect("recorded runs") {
        let p = r.predict(&root()).expect("predicts");
        if let Some(m) = r.memory_mib {
            let got = p.ranks[0].allocated / 1048576.0;
            assert!(
                (got - m).abs() / m < 0.05,
                "{}: {got:.0} MiB against {m}",
                r.name
            );
        }
        if let Some(t) = r.tokens_per_s {
            let e = (p.tokens_per_s - t) / t;
            assert!(
                e.abs() < 0.10,
                "{}: {:.0} tokens/s against {t} ({e:+.3})",
                r.name,
                p.tokens_per_s
            );
        }
    }
}
