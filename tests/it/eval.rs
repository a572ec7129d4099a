//! `sigma eval`: a checkpoint evaluated later reproduces the validation loss
//! its run logged at that step (bit for bit on one process; within the
//! tensor-parallel reduction-order tolerance for a tp = 2 checkpoint); an
//! export scores exactly what its checkpoint scores; raw files get bits per
//! byte; bad inputs fail cleanly.

use std::collections::BTreeMap;
use std::path::Path;

use sigma_tests::*;

/// Validation losses by domain that a run logged at `step`.
fn logged_val(metrics: &Path, step: u64) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(metrics).expect("metrics.jsonl");
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("json");
        if v["step"].as_u64() == Some(step) {
            if let Some(m) = v.get("val_loss").and_then(|m| m.as_object()) {
                return m
                    .iter()
                    .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
                    .collect();
            }
        }
    }
    panic!("no val_loss at step {step} in {}", metrics.display());
}

/// `sigma eval --json` rows, by domain.
fn eval_json(args: &[&str]) -> BTreeMap<String, serde_json::Value> {
    let mut a = vec!["eval", "--json", "--device", "cpu"];
    a.extend_from_slice(args);
    let o = sigma(&a, &[]);
    assert!(o.status.success(), "{a:?}: {}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).expect("eval --json");
    rows.into_iter()
        .map(|r| (r["domain"].as_str().unwrap().to_string(), r))
        .collect()
}

fn train_sets() -> Vec<&'static str> {
    vec![
        "train.cpu_threads=1",
        "train.eval_steps=2",
        "train.eval_every=3",
        "checkpoint.every_steps=3",
        "metrics.plot=false",
        "metrics.tensorboard=false",
    ]
}

#[test]
fn eval_reproduces_the_logged_validation_loss_and_an_export_scores_the_same() {
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("run");
    let a = tiny_train_args(&out, 3, &train_sets());
    let o = sigma(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let logged = logged_val(&out.join("metrics.jsonl"), 3);
    assert_eq!(logged.len(), 3, "{logged:?}");

    let ck = out.join("checkpoints/step-0000003");
    let ck_s = ck.to_string_lossy().into_owned();
    let scored = eval_json(&["--checkpoint", &ck_s]);
    for (domain, loss) in &logged {
        let r = &scored[domain];
        // One code path, same windows, same threads: the very same number.
        assert_eq!(r["loss"].as_f64().unwrap(), *loss, "{domain}");
        // train.eval_steps x micro_batch_size windows of seq_len targets.
        assert_eq!(r["windows"].as_u64(), Some(2 * 8), "{domain}");
        assert_eq!(r["tokens"].as_u64(), Some(2 * 8 * 128), "{domain}");
        let (bpb, bytes) = (
            r["bits_per_byte"].as_f64().unwrap(),
            r["bytes"].as_f64().unwrap(),
        );
        let expect = loss * 2048.0 / std::f64::consts::LN_2 / bytes;
        assert!(
            (bpb - expect).abs() < 1e-9 * expect,
            "{domain}: {bpb} vs {expect}"
        );
    }

    // An export (no run config: the data come from --config) scores the same.
    let export = d.path().join("export");
    export_checkpoint(&ck, &export, &[]);
    let cfg = out.join("config.toml");
    let from_export = eval_json(&[
        "--checkpoint",
        &export.to_string_lossy(),
        "--config",
        &cfg.to_string_lossy(),
    ]);
    for (domain, loss) in &logged {
        assert_eq!(
            from_export[domain]["loss"].as_f64().unwrap(),
            *loss,
            "export, {domain}"
        );
    }
    // Without a config an export has no validation data: a clear error.
    let o = sigma(&["eval", "--checkpoint", &export.to_string_lossy()], &[]);
    assert_clean_failure(&o, &["is an export", "--config"]);

    // --max-tokens bounds the windows per domain.
    let few = eval_json(&["--checkpoint", &ck_s, "--max-tokens", "256"]);
    for r in few.values() {
        assert_eq!(r["windows"].as_u64(), Some(2));
        assert_eq!(r["tokens"].as_u64(), Some(256));
    }

    // Raw files: a text file and a JSONL file, each one "domain".
    let txt = d.path().join("essay.txt");
    let sample_text = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    write_file(&txt, sample_text.as_bytes());
    let jsonl = d.path().join("docs.jsonl");
    let docs: String = sample_text
        .split("\n\n")
        .map(|p| serde_json::json!({ "body": p }).to_string() + "\n")
        .collect();
    write_file(&jsonl, docs.as_bytes());
    let files = eval_json(&[
        "--checkpoint",
        &ck_s,
        "--input",
        &txt.to_string_lossy(),
        "--max-tokens",
        "512",
    ]);
    let r = &files[&txt.to_string_lossy().into_owned()];
    assert_eq!(r["tokens"].as_u64(), Some(512));
    let bpb = r["bits_per_byte"].as_f64().unwrap();
    // English prose under a byte-level BPE of 8k: 2-6 bytes per token.
    let bytes_per_token = r["bytes"].as_f64().unwrap() / 512.0;
    assert!((2.0..6.0).contains(&bytes_per_token), "{bytes_per_token}");
    assert!(bpb.is_finite() && bpb > 0.0);
    let o = sigma(
        &[
            "eval",
            "--json",
            "--checkpoint",
            &ck_s,
            "--input",
            &jsonl.to_string_lossy(),
            "--text-field",
            "body",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The wrong field names the field.
    let o = sigma(
        &[
            "eval",
            "--checkpoint",
            &ck_s,
            "--input",
            &jsonl.to_string_lossy(),
        ],
        &[],
    );
    assert_clean_failure(&o, &["text"]);
}

#[test]
fn eval_of_a_tensor_parallel_checkpoint_matches_its_logged_validation() {
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("tp2");
    let mut sets = train_sets();
    sets.push("parallel.tp=2");
    let mut a = tiny_train_args(&out, 3, &sets);
    a.remove(0);
    let o = launch(2, &[], &a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let logged = logged_val(&out.join("metrics.jsonl"), 3);
    let ck = out.join("checkpoints/step-0000003");
    let scored = eval_json(&["--checkpoint", &ck.to_string_lossy()]);
    for (domain, loss) in &logged {
        // tp = 2 sums partial products and softmax terms across ranks: the
        // tensor-parallel tests' 5e-6 relative tolerance.
        let got = scored[domain]["loss"].as_f64().unwrap();
        assert!(
            (got - loss).abs() <= 5e-6 * loss,
            "{domain}: eval {got} vs logged {loss}"
        );
    }
}

#[test]
fn eval_bad_inputs_fail_cleanly() {
    let d = tempfile::tempdir().expect("tmp");
    let missing = d.path().join("nope");
    let o = sigma(&["eval", "--checkpoint", &missing.to_string_lossy()], &[]);
    assert_clean_failure(&o, &["nope", "neither a checkpoint"]);
    let o = sigma(
        &[
            "eval",
            "--checkpoint",
            &missing.to_string_lossy(),
            "--device",
            "tpu",
        ],
        &[],
    );
    assert_clean_failure(&o, &["--device tpu"]);
}

/// A value outside a closed choice (`--device` of eval, generate and bench;
/// `--dtype` and `--format` of checkpoint export) is a usage error: exit code
/// 1 and one line naming the flag, the value and the valid values. Other
/// usage errors exit 1 too; `--help` succeeds and lists the values.
#[test]
fn closed_choices_name_the_flag_and_its_valid_values() {
    let d = tempfile::tempdir().expect("tmp");
    let ck = d.path().join("ck").to_string_lossy().into_owned();
    let out = d.path().join("out").to_string_lossy().into_owned();
    let device = ("--device gpu", "(valid values: auto, cpu, cuda)");
    let cases: [(Vec<&str>, (&str, &str)); 6] = [
        (vec!["eval", "--checkpoint", &ck, "--device", "gpu"], device),
        (
            vec![
                "generate",
                "--checkpoint",
                &ck,
                "--prompt",
                "x",
                "--device",
                "gpu",
            ],
            device,
        ),
        (vec!["bench", "decode", "--device", "gpu"], device),
        (vec!["bench", "fused", "--device", "gpu"], device),
        (
            vec![
                "checkpoint",
                "export",
                &ck,
                "--output",
                &out,
                "--dtype",
                "f16",
            ],
            ("--dtype f16", "(valid values: f32, bf16)"),
        ),
        (
            vec![
                "checkpoint",
                "export",
                &ck,
                "--output",
                &out,
                "--format",
                "onnx",
            ],
            ("--format onnx", "(valid values: sigma, hf)"),
        ),
    ];
    for (args, (flag, valid)) in cases {
        let o = sigma(&args, &[]);
        assert_clean_failure(&o, &[flag, valid]);
        let err = stderr(&o);
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line:\n{err}"
        );
    }
    assert!(!Path::new(&out).exists(), "a usage error wrote {out}");
    let o = sigma(&["eval", "--checkpoint", &ck, "--bogus"], &[]);
    assert_clean_failure(&o, &["--bogus"]);
    let o = sigma(&["checkpoint", "export", "-h"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for values in [
        "[possible values: f32, bf16]",
        "[possible values: sigma, hf]",
    ] {
        assert!(
            stdout(&o).contains(values),
            "help lists {values}:\n{}",
            stdout(&o)
        );
    }
}
