//! `sigma ablate`: the shipped tiny grid runs on the CPU and its report
//! carries exactly what the runs' files say; identical variants give
//! identical numbers; a finished ablation is skipped on rerun; an interrupted
//! one resumes (to the numbers of an uninterrupted run); bad ablation files
//! and flags fail cleanly.

use std::path::Path;
use std::time::{Duration, Instant};

use sigma_tests::*;

/// `sigma ablate` arguments on the quickstart shards, `steps` steps, one thread.
fn ablate_args(grid: &str, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "ablate".into(),
        "--base".into(),
        "configs/tiny.toml".into(),
        "--grid".into(),
        grid.into(),
        "--output".into(),
        out.to_string_lossy().into_owned(),
    ];
    let sets = [
        format!("train.steps={steps}"),
        "train.cpu_threads=1".into(),
        "train.eval_steps=1".into(),
        "train.log_every=1".into(),
        "metrics.tensorboard=false".into(),
        quickstart_sources_set(),
    ];
    for s in sets.iter().map(|s| s.as_str()).chain(extra.iter().copied()) {
        a.push("--set".into());
        a.push(s.into());
    }
    a
}

/// One SIGTERM to a running `sigma ablate`.
fn sigterm(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
}

fn run(a: &[String]) -> std::process::Output {
    sigma(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[])
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("json")
}

fn records(metrics: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics)
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn variant<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no variant {name} in the report"))
}

#[test]
fn tiny_kv_grid_reports_what_the_runs_logged() {
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("ablation");
    let a = ablate_args("configs/ablations/tiny-kv.toml", &out, 5, &[]);
    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = stdout(&o);
    assert!(
        plan.contains("measured step of base"),
        "the plan has a time estimate:\n{plan}"
    );
    assert!(plan.contains("identical data stream"), "{plan}");

    let report = json(&out.join("report.json"));
    let names = [
        "base",
        "base-repeat",
        "k1",
        "k4",
        "v2",
        "kdim8-projected",
        "kdim8-native",
        "no-augq",
    ];
    assert_eq!(
        report["variants"].as_array().map(|v| v.len()),
        Some(names.len())
    );
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    for png in ["loss-curves.png", "val-vs-kv.png"] {
        let bytes = std::fs::read(out.join(png)).expect(png);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
        assert!(md.contains(png));
    }
    let base = variant(&report, "base");
    for name in names {
        let v = variant(&report, name);
        assert!(
            md.contains(&format!("| {name} |")),
            "report.md has a row for {name}"
        );
        assert_eq!(v["finished"], true, "{name}");
        let run = out.join("runs").join(name);
        let recs = records(&run.join("metrics.jsonl"));
        let steps: Vec<&serde_json::Value> =
            recs.iter().filter(|r| r.get("loss").is_some()).collect();
        // Final training loss: the run's last step record.
        assert_eq!(
            v["final_train_loss"],
            steps.last().expect("steps")["loss"],
            "{name}"
        );
        assert_eq!(v["final_step"], 5, "{name}");
        // Tokens/s: the median of the step records after the first.
        let mut tps: Vec<f64> = steps[1..]
            .iter()
            .map(|r| r["tokens_per_s"].as_f64().expect("tokens_per_s"))
            .collect();
        tps.sort_by(|a, b| a.total_cmp(b));
        assert_eq!(tps.len(), 4);
        assert_eq!(
            v["tokens_per_s"].as_f64(),
            Some(0.5 * (tps[1] + tps[2])),
            "{name}: median of 4"
        );
        // Validation: sigma eval on the final checkpoint gives what the run
        // logged at its last step, and the report carries eval.json's numbers.
        let logged = recs
            .iter()
            .rev()
            .find_map(|r| r.get("val_loss"))
            .expect("val_loss")
            .clone();
        let eval = json(&run.join("eval.json"));
        for row in eval.as_array().expect("eval rows") {
            let dom = row["domain"].as_str().expect("domain");
            assert_eq!(row["loss"], logged[dom], "{name}/{dom}: eval vs logged");
            assert_eq!(v["val"][dom]["loss"], row["loss"], "{name}/{dom}");
            assert_eq!(
                v["val"][dom]["bits_per_byte"], row["bits_per_byte"],
                "{name}/{dom}"
            );
            let delta = v["delta"]["val"][dom].as_f64().expect("delta");
            // (serde_json's float parsing may move the last bit)
            let expect = row["loss"].as_f64().unwrap() - base["val"][dom]["loss"].as_f64().unwrap();
            assert!(
                (delta - expect).abs() < 1e-12,
                "{name}/{dom}: delta {delta} vs {expect}"
            );
        }
        // KV cache per token from the run's config: layers x (n_k x cached K dim + n_v x d_v) x 2 bytes.
        let cfg: String = std::fs::read_to_string(run.join("config.toml")).expect("config.toml");
        let get = |k: &str| -> Option<i64> {
            cfg.lines().find_map(|l| {
                l.strip_prefix(&format!("{k} = "))
                    .and_then(|x| x.trim().parse().ok())
            })
        };
        let (l, nk, nv, dqk, dv) = (
            get("num_layers").unwrap(),
            get("num_k_heads").unwrap(),
            get("num_v_heads").unwrap(),
            get("qk_head_dim").unwrap(),
            get("v_head_dim").unwrap(),
        );
        let dk = get("k_dim").unwrap_or(dqk);
        assert_eq!(
            v["kv_cache_bytes_per_token"].as_i64(),
            Some(l * (nk * dk + nv * dv) * 2),
            "{name}"
        );
    }
    // Two variants with identical configs: identical numbers.
    let repeat = variant(&report, "base-repeat");
    for k in [
        "final_train_loss",
        "val",
        "val_mean_loss",
        "val_mean_bits_per_byte",
        "params",
    ] {
        assert_eq!(repeat[k], base[k], "base-repeat {k}");
    }
    assert!(
        variant(&report, "k1")["kv_cache_bytes_per_token"].as_i64()
            < base["kv_cache_bytes_per_token"].as_i64()
    );

    // Rerun: everything is finished and skipped.
    let t = Instant::now();
    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).matches("done, skipped").count(),
        names.len(),
        "{}",
        stdout(&o)
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    // The report regenerates to the same numbers.
    let o = sigma(&["ablate", "report", &out.to_string_lossy()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&out.join("report.json")), report);
    // A finished variant under other settings is refused, naming it.
    let mut changed = a.clone();
    changed.extend(["--set".into(), "optim.lr=1e-3".into()]);
    assert_clean_failure(
        &run(&changed),
        &[
            "variant base",
            "finished with other settings",
            "--only base",
        ],
    );
}

#[test]
fn an_interrupted_ablation_resumes_to_the_uninterrupted_numbers() {
    let d = tempfile::tempdir().expect("tmp");
    let grid = d.path().join("two.toml");
    write_file(
        &grid,
        b"[[variant]]\nname = \"first\"\n\n[[variant]]\nname = \"second\"\n",
    );
    let out = d.path().join("ablation");
    let a = ablate_args(
        &grid.to_string_lossy(),
        &out,
        16,
        &["checkpoint.every_steps=4"],
    );
    let mut c = sigma_command();
    c.args(&a[..]).arg("--no-estimate");
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    // Stop once the first variant has saved its first checkpoint.
    let ck = out.join("runs/first/checkpoints/step-0000004");
    let t = Instant::now();
    while !ck.is_dir() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint at step 4"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "ablate ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sigterm(&child);
    let o = child.wait_with_output().expect("wait");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("rerun the same command to resume"), "{err}");
    assert!(!out.join("runs/first/done.json").exists());
    assert!(
        !out.join("runs/second").exists(),
        "nothing after the interrupted variant started"
    );

    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("resume at"), "{}", stdout(&o));
    let log = std::fs::read_to_string(out.join("runs/first/train.log")).expect("train.log");
    assert!(
        log.contains("resume:"),
        "the first variant resumed from its checkpoint:\n{log}"
    );
    let report = json(&out.join("report.json"));
    let (first, second) = (variant(&report, "first"), variant(&report, "second"));
    for k in ["final_train_loss", "val", "val_mean_loss"] {
        assert_eq!(
            first[k], second[k],
            "interrupted + resumed vs uninterrupted: {k}"
        );
    }
}

/// A stop signal that comes while the runner starts (loading libtorch,
/// planning, the probe run that times a step) is not lost and does not kill
/// it with its default action: the runner stops before any variant starts,
/// with the interrupted exit status and a message, and no variant's
/// directory exists.
#[test]
fn a_stop_while_the_ablation_starts_ends_it_before_any_variant() {
    let d = tempfile::tempdir().expect("tmp");
    let grid = d.path().join("one.toml");
    write_file(&grid, b"[[variant]]\nname = \"only\"\n");
    let out = d.path().join("ablation");
    let a = ablate_args(&grid.to_string_lossy(), &out, 8, &[]);
    // (Not at once: a process has a few milliseconds of loading before it
    // blocks the signals, launch/src/early_signals.rs.)
    for delay_ms in [150u64, 600, 2000] {
        let mut c = sigma_command();
        c.args(&a[..]);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let child = c.spawn().expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        sigterm(&child);
        let o = child.wait_with_output().expect("wait");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(130), "after {delay_ms} ms: {err}");
        assert!(
            err.contains("stopped before any variant started"),
            "after {delay_ms} ms: {err}"
        );
        assert!(
            !out.join("runs/only").exists(),
            "after {delay_ms} ms: a variant started"
        );
    }
}

#[test]
fn bad_ablations_fail_cleanly() {
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("ablation");
    let case = |name: &str, text: &str, extra: &[&str], needles: &[&str]| {
        let grid = d.path().join(format!("{name}.toml"));
        write_file(&grid, text.as_bytes());
        let mut a = ablate_args(&grid.to_string_lossy(), &out, 2, &[]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push("--dry-run".into());
        a.push("--no-estimate".into());
        assert_clean_failure(&run(&a), needles);
    };
    let two = "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"b\"\nset = { \"model.num_k_heads\" = 1 }\n";
    case(
        "unknown",
        "[[variant]]\nname = \"a\"\nsett = {}\n",
        &[],
        &["unknown.toml", "sett"],
    );
    case(
        "empty",
        "[ablation]\nname = \"x\"\n",
        &[],
        &["no [[variant]]"],
    );
    case(
        "dup",
        "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"a\"\n",
        &[],
        &["two variants are named \"a\""],
    );
    case(
        "slash",
        "[[variant]]\nname = \"a/b\"\n",
        &[],
        &["\"a/b\"", "names a directory"],
    );
    case(
        "base",
        "[ablation]\nbase = \"zz\"\n[[variant]]\nname = \"a\"\n",
        &[],
        &["base = \"zz\" names no variant"],
    );
    case(
        "unfair",
        "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"b\"\nset = { \"data.seed\" = 7 }\n",
        &[],
        &[
            "variant b changes the [data] section",
            "identical data stream",
        ],
    );
    case(
        "batch",
        "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"b\"\nset = { \"train.grad_accum_steps\" = 1 }\n",
        &[],
        &["variant b changes the global batch"],
    );
    case(
        "owned",
        "[[variant]]\nname = \"a\"\nset = { \"metrics.output_dir\" = \"x\" }\n",
        &[],
        &["metrics.output_dir is set by the runner"],
    );
    case(
        "conflict",
        two,
        &["--set", "model.num_k_heads=2"],
        &["sets model.num_k_heads", "--set model.num_k_heads=2"],
    );
    case(
        "only",
        two,
        &["--only", "c"],
        &["--only c", "variants: a, b"],
    );
    case(
        "badval",
        "[[variant]]\nname = \"a\"\nset = { \"model.num_k_heads\" = 3 }\n",
        &[],
        &["variant a", "num_k_heads"],
    );
    assert!(!out.exists(), "a refused ablation writes nothing");
    let o = sigma(&["ablate", "report", &d.path().to_string_lossy()], &[]);
    assert_clean_failure(&o, &["plan.json", "not an ablation directory"]);
    let o = sigma(&["ablate", "--base", "configs/tiny.toml"], &[]);
    assert_clean_failure(&o, &["--grid", "--output"]);
}
