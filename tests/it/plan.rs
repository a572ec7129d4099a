//! `sigma plan`: the ranked layouts of a config on a job, one layout in
//! detail, a layout `sigma train` refuses refused with the same message,
//! bad flags refused in one line naming the flag (exit code 1), `plan
//! calibrate` refused without a GPU, `plan validate` over the recorded runs.

use sigma_tests::{assert_clean_failure, sigma, stderr, stdout};

/// SIGMA-10B on 16 H100s (two nodes of 8), 1 M tokens per step: a ranked
/// table of the layouts that fit, and the refused ones with their reasons.
#[test]
fn plan_ranks_the_layouts_of_sigma_10b_on_16_gpus() {
    let o = sigma(
        &[
            "plan",
            "--config",
            "configs/sigma-10b.toml",
            "--gpus",
            "16",
            "--gpu",
            "h100",
            "--global-batch",
            "1048576",
            "--top",
            "5",
        ],
        &[],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(
        out.contains("on 16 x NVIDIA H100 80GB HBM3 (8 per node"),
        "{out}"
    );
    assert!(
        out.contains("context parallelism (parallel.cp) is not modelled"),
        "{out}"
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains("tp="))
        .collect();
    assert_eq!(rows.len(), 5, "five ranked layouts:\n{out}");
    // Ranked by tokens/s, best first; every MFU plausible.
    let tps: Vec<f64> = rows
        .iter()
        .map(|r| {
            r.split_whitespace()
                .nth(6)
                .and_then(|x| x.parse().ok())
                .expect("tokens/s")
        })
        .collect();
    assert!(tps.windows(2).all(|w| w[0] >= w[1]), "{out}");
    let mfu: f64 = rows[0]
        .split_whitespace()
        .nth(8)
        .and_then(|x| x.trim_end_matches('%').parse().ok())
        .expect("MFU");
    assert!(mfu > 10.0 && mfu < 70.0, "{out}");
    // SIGMA-10B does not fit one 80 GB card with its optimizer state whole.
    assert!(
        out.contains("tp=1,pp=1,v=1,dp=16,zero=0,mbs=1,ckpt=off,chunk=0: does not fit"),
        "{out}"
    );
}

/// Every key given: that layout in detail, every pipeline rank's memory by
/// part and its time.
#[test]
fn one_layout_in_detail() {
    let o = sigma(
        &[
            "plan",
            "--config",
            "configs/sigma-10b.toml",
            "--gpus",
            "4",
            "--gpus-per-node",
            "4",
            "--gpu",
            "h200",
            "--layout",
            "tp=1,pp=4,v=1,dp=1,zero=0,mbs=1,ckpt=off,chunk=0",
            "--global-batch",
            "131072",
        ],
        &[],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("1 layout(s) considered: 1 fit"), "{out}");
    for r in 0..4 {
        assert!(out.contains(&format!("pipeline rank {r} (")), "{out}");
    }
    for part in [
        "weights",
        "gradients",
        "optimizer moments",
        "bf16 copy",
        "activations",
        "head and loss",
        "pipeline sends held",
        "NCCL",
        "fragmentation",
        "CUDA context",
        "tokens/s",
        "MFU",
        "theory",
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
}

/// The same refusal as `sigma train`'s start-up, word for word.
#[test]
fn a_layout_sigma_train_refuses_is_refused_with_its_message() {
    let train = sigma(
        &[
            "train",
            "--config",
            "configs/tiny.toml",
            "--set",
            "parallel.tp=3",
        ],
        &[],
    );
    assert_clean_failure(&train, &["parallel.tp"]);
    let reason = stderr(&train)
        .trim()
        .trim_start_matches("error: ")
        .to_string();
    let plan = sigma(
        &[
            "plan",
            "--config",
            "configs/tiny.toml",
            "--gpus",
            "3",
            "--layout",
            "tp=3,pp=1,v=1,dp=1,zero=0,mbs=8,ckpt=off,chunk=0",
        ],
        &[],
    );
    let out = stdout(&plan);
    assert!(plan.status.success(), "{out}\n{}", stderr(&plan));
    assert!(
        out.contains(&format!(
            "tp=3,pp=1,v=1,dp=1,zero=0,mbs=8,ckpt=off,chunk=0: {reason}"
        )),
        "{reason}\n{out}"
    );
}

/// One line naming the flag, exit code 1.
#[test]
fn bad_flags_are_refused_in_one_line_naming_the_flag() {
    let base = ["plan", "--config", "configs/sigma-1.5b.toml", "--gpus", "8"];
    for (extra, needle) in [
        (&["--gpu", "h300"][..], "--gpu"),
        (&["--gpus-per-node", "0"][..], "--gpus-per-node"),
        (&["--layout", "tp=two"][..], "--layout"),
        (&["--layout", "cp=2"][..], "--layout"),
        (&["--layout", "tp=2,tp=4"][..], "tp is given twice"),
        (
            &["--gpu", "h200", "--calibration", "x.toml"][..],
            "--calibration",
        ),
        (
            &["--set", "train.micro_batch_size=1000000000"][..],
            "train.micro_batch_size",
        ),
        (&["--global-batch", "0"][..], "--global-batch"),
        (&["--bogus"][..], "--bogus"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let o = sigma(&args, &[]);
        assert_clean_failure(&o, &[needle]);
        assert_eq!(
            stderr(&o).trim().lines().count(),
            1,
            "{extra:?}: {}",
            stderr(&o)
        );
    }
    let o = sigma(
        &["plan", "--config", "configs/sigma-1.5b.toml", "--gpus", "0"],
        &[],
    );
    assert_clean_failure(&o, &["--gpus"]);
    let o = sigma(&["plan", "--gpus", "8"], &[]);
    assert_clean_failure(&o, &["--config"]);
    // Precisions and context parallelism the model has no rates for are
    // refused, not planned as bf16 without cp.
    for p in ["fp8", "fp32"] {
        let set = format!("train.precision=\"{p}\"");
        let args: Vec<&str> = base.iter().copied().chain(["--set", &set]).collect();
        let o = sigma(&args, &[]);
        assert_clean_failure(&o, &["train.precision", p, "bf16"]);
    }
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--set", "parallel.cp=2"])
        .collect();
    assert_clean_failure(&sigma(&args, &[]), &["parallel.cp", "context parallelism"]);
}

/// `plan calibrate` measures on a GPU and says so where there is none.
#[test]
fn calibrate_refuses_without_a_gpu() {
    if tch::Cuda::is_available() {
        eprintln!("a GPU is here: calibrate would measure it; not run");
        return;
    }
    let out = sigma_tests::process_dir().join("calibration.toml");
    let o = sigma(
        &["plan", "calibrate", "--output", &out.to_string_lossy()],
        &[],
    );
    assert_clean_failure(&o, &["sigma plan calibrate", "CUDA GPU"]);
    assert!(!out.exists());
}

/// `plan validate` predicts every run of trainer/assets/plan/recorded.toml.
#[test]
fn validate_predicts_every_recorded_run() {
    let o = sigma(&["plan", "validate"], &[]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    let runs = sigma_trainer::plan::recorded::runs().expect("recorded runs");
    assert!(runs.len() >= 15);
    for r in runs {
        assert!(out.contains(&r.name), "{}: {out}", r.name);
    }
}
