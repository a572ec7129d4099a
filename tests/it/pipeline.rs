//! Pipeline parallelism on CPU with several processes: 1F1B on 2 and 4
//! stages and the interleaved schedule follow one process (tied and untied
//! embeddings); with data and tensor parallelism and ZeRO-1; checkpoints
//! moved between pipeline layouts and from a 3D layout to ones without a
//! pipeline; a lost rank; the trace.
//!
//! Tolerance: as for tensor parallelism (tests/it/tensor_parallel.rs). A
//! pipeline computes every micro-batch exactly as one device does; only the
//! tied embedding's two gradient halves (first and last stage) are added in
//! another order, and the global norm is summed per stage first. Observed:
//! a few 1e-8 relative.

use std::path::Path;
use std::time::{Duration, Instant};

use sigma_tests::*;

const PP_TOL: f64 = 5e-6;

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= PP_TOL * x.abs(),
            "{what}: step {} loss {x} vs {y}",
            i + 1
        );
    }
}

/// Tiny, 4 micro-batches of 4 samples per step (a global batch of 16).
fn args(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        "train.cpu_threads=1",
        "train.eval_every=0",
        "train.eval_steps=1",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=4",
        "metrics.plot=false",
        "metrics.tensorboard=false",
    ];
    sets.extend_from_slice(extra);
    let mut a = tiny_train_args(out, steps, &sets);
    a.remove(0); // "train"
    a
}

fn run_with(nproc: usize, a: Vec<String>, env: &[(&str, &str)]) -> std::process::Output {
    if nproc == 1 {
        let mut full = vec!["train".to_string()];
        full.extend(a);
        sigma(&full.iter().map(|s| s.as_str()).collect::<Vec<_>>(), env)
    } else {
        launch(nproc, &[], &a, env)
    }
}

fn run(nproc: usize, out: &Path, steps: u64, extra: &[&str]) -> Vec<f64> {
    let o = run_with(nproc, args(out, steps, extra), &[]);
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    losses(&out.join("metrics.jsonl"))
}

#[test]
fn pp_2_and_4_and_interleaved_follow_one_process() {
    let d = tempfile::tempdir().expect("tmp");
    for tied in ["model.tie_embeddings=true", "model.tie_embeddings=false"] {
        let base = run(1, &d.path().join(format!("one-{tied}")), 20, &[tied]);
        let layouts: Vec<(usize, Vec<&str>)> = if tied.ends_with("true") {
            vec![
                (2, vec!["parallel.pp=2"]),
                (4, vec!["parallel.pp=4"]),
                (
                    2,
                    vec!["parallel.pp=2", "parallel.pp_schedule=\"interleaved\""],
                ),
            ]
        } else {
            vec![(
                2,
                vec!["parallel.pp=2", "train.activation_checkpointing=true"],
            )]
        };
        for (n, mut extra) in layouts {
            extra.push(tied);
            let out = d
                .path()
                .join(format!("pp-{}", extra.join("-").replace(['"', '='], "")));
            close(&base, &run(n, &out, 20, &extra), &format!("{extra:?}"));
        }
    }
}

#[test]
fn pipelines_compose_with_data_and_tensor_parallelism() {
    let d = tempfile::tempdir().expect("tmp");
    let base = run(1, &d.path().join("one"), 12, &[]);
    for (n, extra) in [
        (
            4,
            vec![
                "parallel.pp=2",
                "parallel.dp=2",
                "train.micro_batch_size=2",
                "parallel.zero=1",
            ],
        ),
        (4, vec!["parallel.pp=2", "parallel.tp=2", "parallel.zero=1"]),
        (
            8,
            vec![
                "parallel.pp=2",
                "parallel.tp=2",
                "parallel.dp=2",
                "train.micro_batch_size=2",
                "parallel.zero=1",
            ],
        ),
    ] {
        let out = d.path().join(format!("mesh{n}-{}", extra.len()));
        close(&base, &run(n, &out, 12, &extra), &format!("{extra:?}"));
    }
}

/// Train on `nproc` ranks with `saved` overrides, stop after step 4, then
/// resume that checkpoint on each of `layouts` (ranks, overrides): each must
/// say it resumes a checkpoint "saved with `saved_as`" and follow the run
/// that never stopped.
fn resume_elsewhere(nproc: usize, saved: &[&str], saved_as: &str, layouts: &[(usize, Vec<&str>)]) {
    let d = tempfile::tempdir().expect("tmp");
    let reference = run(1, &d.path().join("ref"), 8, &[]);
    let dir = d.path().join("saved");
    let mut a = args(&dir, 8, saved);
    a.extend(["--stop-after".into(), "4".into()]);
    let o = run_with(nproc, a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = dir.join("checkpoints/step-0000004");
    for (i, (n, extra)) in layouts.iter().enumerate() {
        let out = d.path().join(format!("to{i}"));
        std::fs::create_dir_all(&out).expect("mkdir");
        std::fs::copy(dir.join("metrics.jsonl"), out.join("metrics.jsonl")).expect("copy");
        let mut a = args(&out, 8, extra);
        a.extend(["--resume".into(), ck.to_string_lossy().into_owned()]);
        let o = run_with(*n, a, &[]);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("saved with {saved_as}")),
            "{}",
            stderr(&o)
        );
        close(
            &reference,
            &losses(&out.join("metrics.jsonl")),
            &format!("{saved:?} -> {extra:?}"),
        );
    }
}

#[test]
fn a_pipeline_checkpoint_resumes_on_other_pipeline_layouts() {
    resume_elsewhere(
        2,
        &["parallel.pp=2"],
        "dp 1 tp 1 pp 2",
        &[
            (1, vec![]),
            (4, vec!["parallel.pp=4"]),
            (4, vec!["parallel.pp=2", "parallel.tp=2"]),
        ],
    );
}

/// A checkpoint of a 3D layout (tp 2 x pp 2) resumes without a pipeline: at
/// tp 4 (the 2 key heads then replicated on 2 ranks each) and at tp 2 x dp 2
/// with ZeRO-1, following the run that never stopped (the CPU analogue of
/// SIGMA-10B's tp 4 x pp 2 -> tp 8 and tp 4 x dp 2).
#[test]
fn a_3d_checkpoint_resumes_on_layouts_without_a_pipeline() {
    resume_elsewhere(
        4,
        &["parallel.pp=2", "parallel.tp=2"],
        "dp 1 tp 2 pp 2",
        &[
            (4, vec!["parallel.tp=4"]),
            (
                4,
                vec![
                    "parallel.tp=2",
                    "parallel.dp=2",
                    "train.micro_batch_size=2",
                    "parallel.zero=1",
                ],
            ),
        ],
    );
}

#[test]
fn a_lost_pipeline_rank_stops_the_job_naming_it() {
    let d = tempfile::tempdir().expect("tmp");
    let t0 = Instant::now();
    let o = run_with(
        2,
        args(d.path(), 50, &["parallel.pp=2"]),
        &[
            ("SIGMA_FAULT_ABORT", "1:2"),
            ("SIGMA_LIVENESS_TIMEOUT_S", "3"),
        ],
    );
    assert_clean_failure(&o, &["rank 1 failed", "signal 6"]);
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn the_trace_records_every_pass_and_the_bubble() {
    let d = tempfile::tempdir().expect("tmp");
    let o = run_with(
        2,
        args(d.path(), 5, &["parallel.pp=2", "metrics.trace=true"]),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("pipeline trace:"), "{}", stderr(&o));
    for r in 0..2 {
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.path().join(format!("trace-rank{r}.json"))).expect("trace"),
        )
        .expect("json");
        let ev = v["traceEvents"].as_array().expect("events");
        // Steps 2-4, each with 4 forwards and 4 backwards of this rank's stage.
        for cat in ["forward", "backward"] {
            let n = ev.iter().filter(|e| e["cat"] == cat).count();
            assert_eq!(n, 3 * 4, "rank {r}: {cat} events");
        }
        assert!(ev.iter().any(|e| e["cat"] == "optimizer"));
        let b = v["otherData"]["bubble"].as_f64().expect("bubble");
        assert!((0.0..1.0).contains(&b), "bubble {b}");
    }
    let text = std::fs::read_to_string(d.path().join("metrics.jsonl")).expect("metrics");
    assert!(text.contains("pipeline_bubble_theory"), "{text}");
    let o = sigma(&["trace", "plot", &d.path().to_string_lossy()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let png = std::fs::read(d.path().join("trace.png")).expect("png");
    assert_eq!(&png[1..4], b"PNG");
}
