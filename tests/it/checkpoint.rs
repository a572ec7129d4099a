//! Checkpoints: exact resume (after --stop-after, SIGTERM, and twelve kill -9s
//! landing at random moments and during saves), resharding between
//! data-parallel layouts, retention, upload, export against an independent
//! safetensors reader, and clear refusals of damaged or mismatched checkpoints.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sigma_tests::*;
use sigma_trainer::checkpoint::{self, load::Checkpoint};

/// tiny on one thread, global batch 16 samples (2,048 tokens) per step.
fn args(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut e = vec![
        "train.cpu_threads=1",
        "train.eval_every=0",
        "train.eval_steps=1",
        "metrics.plot=false",
        "metrics.tensorboard=false",
    ];
    e.extend_from_slice(extra);
    tiny_train_args(out, steps, &e)
}

fn run_ok(a: &[String], env: &[(&str, &str)]) -> String {
    let v: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let o = sigma(&v, env);
    assert!(o.status.success(), "sigma {}:\n{}", a.join(" "), stderr(&o));
    stdout(&o) + &stderr(&o)
}

fn with(mut a: Vec<String>, more: &[&str]) -> Vec<String> {
    a.extend(more.iter().map(|s| s.to_string()));
    a
}

fn ck_root(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Every file under `dir` with its bytes, for "nothing was overwritten" checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(snapshot(&p));
        } else {
            v.push((p.clone(), std::fs::read(&p).expect("read")));
        }
    }
    v.sort();
    v
}

/// tiny.toml with two data stages instead of one mixture; stage 0 ends after 7 steps.
fn staged_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("configs/tiny.toml")).expect("tiny");
    let start = text.find("[data.mixture]").expect("mixture");
    let end = start + text[start..].find("[train]").expect("train");
    let staged = format!(
        "{}[[data.stages]]\nuntil_tokens = {}\nmixture = {{ general = 0.7, system = 0.2, synthetic = 0.1 }}\n\n[[data.stages]]\nmixture = {{ general = 0.1, system = 0.3, synthetic = 0.6 }}\n\n{}",
        &text[..start],
        7 * 16 * 128,
        &text[end..]
    );
    let p = dir.join("staged.toml");
    std::fs::write(&p, staged).expect("write config");
    p
}

fn set_config(a: &mut [String], path: &Path) {
    let i = a.iter().position(|s| s == "--config").expect("--config");
    a[i + 1] = path.to_string_lossy().into_owned();
}

#[test]
fn resume_after_stop_or_sigterm_is_bit_identical_across_a_stage_boundary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = staged_config(tmp.path());
    let common = [
        "train.micro_batch_size=8",
        "train.grad_accum_steps=2",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "checkpoint.keep_every=4",
    ];
    let mk = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut e = common.to_vec();
        e.extend_from_slice(extra);
        let mut a = args(&out, 12, &e);
        set_config(&mut a, &cfg);
        (out, a)
    };
    let (full, a) = mk("full", &[]);
    run_ok(&a, &[]);
    let reference = losses(&full.join("metrics.jsonl"));
    assert_eq!(reference.len(), 12);

    // Stop after step 5 (stage 0), resume: crosses the boundary at step 7.
    let upload = tmp.path().join("uploaded");
    let up = format!(
        "checkpoint.upload={:?}",
        format!("file://{}", upload.display())
    );
    let (stopped, a) = mk("stopped", &[&up]);
    let log = run_ok(&with(a.clone(), &["--stop-after", "5"]), &[]);
    assert!(log.contains("stopped after step 5"), "{log}");
    let steps: Vec<u64> = checkpoint::committed(&ck_root(&stopped))
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![4, 5]);
    let meta = Checkpoint::open(&ck_root(&stopped).join("step-0000005"))
        .expect("open")
        .meta;
    assert_eq!(meta.data.stage, 0);
    assert_eq!(meta.progress.consumed_samples, 5 * 16);
    let log = run_ok(&with(a, &["--resume", "auto"]), &[]);
    assert!(log.contains("resume:") && log.contains("step 5"), "{log}");
    assert_eq!(losses(&stopped.join("metrics.jsonl")), reference);
    // Retention: keep the last 2, plus every multiple of 4.
    let steps: Vec<u64> = checkpoint::committed(&ck_root(&stopped))
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![4, 8, 10, 12]);
    let end = Checkpoint::open(&ck_root(&stopped).join("step-0000012"))
        .expect("open")
        .meta;
    assert_eq!(end.data.stage, 1, "the run ends in stage 1");
    // Upload: the committed checkpoint, byte for byte, marker included.
    let local = ck_root(&stopped).join("step-0000012");
    for f in [
        "COMMITTED",
        "metadata.json",
        "shard-00000-of-00001.safetensors",
        "tokenizer.json",
    ] {
        assert_eq!(
            std::fs::read(upload.join("step-0000012").join(f)).expect("uploaded"),
            std::fs::read(local.join(f)).expect("local"),
            "{f}"
        );
    }

    // SIGTERM mid-run: the process saves, exits 0, and the resumed run matches.
    let (sig, a) = mk("sigterm", &["checkpoint.every_steps=0"]);
    let mut child = sigma_command()
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while losses_or_empty(&sig.join("metrics.jsonl")).len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "SIGTERM exit: {status:?}");
    let (at, _) = checkpoint::latest(&ck_root(&sig)).expect("a checkpoint on SIGTERM");
    assert!((3..12).contains(&at), "saved at step {at}");
    run_ok(&with(a, &["--resume", "auto"]), &[]);
    assert_eq!(losses(&sig.join("metrics.jsonl")), reference);
}

fn losses_or_empty(p: &Path) -> Vec<f64> {
    if p.exists() {
        losses(p)
    } else {
        Vec::new()
    }
}

#[test]
fn kill_9_at_random_moments_and_during_saves_always_leaves_a_loadable_checkpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let steps = 80;
    let base = [
        "train.micro_batch_size=8",
        "train.grad_accum_steps=1",
        "checkpoint.keep_last=2",
    ];
    let full = tmp.path().join("full");
    run_ok(&args(&full, steps, &base), &[]);
    let reference = losses(&full.join("metrics.jsonl"));

    let out = tmp.path().join("crashy");
    let root = ck_root(&out);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let has_tmp = |root: &Path| {
        std::fs::read_dir(root)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            })
            .unwrap_or(false)
    };
    let newest = |root: &Path| checkpoint::latest(root).map(|c| c.0).unwrap_or(0);
    let (mut kills, mut mid_save, mut last_step) = (0, 0, 0);
    while kills < 12 {
        // Alternate synchronous and asynchronous saves, one save per step, each
        // slowed down by 100 ms so that kills land inside saves.
        let asynchronous = if kills % 2 == 0 {
            "checkpoint.async=true"
        } else {
            "checkpoint.async=false"
        };
        let mut e = base.to_vec();
        e.extend(["checkpoint.every_steps=1", asynchronous]);
        let a = with(args(&out, steps, &e), &["--resume", "auto"]);
        let before = newest(&root);
        let mut child = sigma_command()
            .args(&a)
            .env("SIGMA_FAULT_SAVE_DELAY_MS", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let t0 = Instant::now();
        let wait_for = |cond: &dyn Fn() -> bool| {
            while t0.elapsed() < Duration::from_secs(60) && !cond() {
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        match kills % 3 {
            // A random moment 0.1 .. 1 s after start (startup, training or saving).
            0 => std::thread::sleep(Duration::from_millis(100 + next() % 900)),
            // While a save is in progress: soon after its temporary directory shows up.
            1 => {
                wait_for(&|| has_tmp(&root));
                std::thread::sleep(Duration::from_millis(next() % 60));
            }
            // Shortly after a new checkpoint was committed (so the run makes progress).
            _ => {
                wait_for(&|| newest(&root) > before);
                std::thread::sleep(Duration::from_millis(next() % 300));
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            panic!("the run finished before kill {kills}; make it longer");
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        kills += 1;
        let leftovers = std::fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
                    .count()
            })
            .unwrap_or(0);
        mid_save += usize::from(leftovers > 0);
        // The newest committed checkpoint opens and verifies.
        if let Some((step, dir)) = checkpoint::latest(&root) {
            let ck = Checkpoint::open(&dir).expect("newest committed checkpoint opens");
            ck.verify_all().expect("and its checksums hold");
            assert!(step >= last_step, "went back from {last_step} to {step}");
            last_step = step;
        }
    }
    assert!(mid_save >= 3, "only {mid_save} kills landed during a save");
    assert!(last_step > 0, "no checkpoint was ever committed");
    // Training continues from the newest checkpoint to the end, exactly as if never killed.
    run_ok(&with(args(&out, steps, &base), &["--resume", "auto"]), &[]);
    assert_eq!(losses(&out.join("metrics.jsonl")), reference);
    // Leftovers of the interrupted saves were cleaned up by the next save.
    let names: Vec<String> = std::fs::read_dir(&root)
        .expect("root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| checkpoint::parse_step_dir(n).is_some()),
        "{names:?}"
    );
}

#[test]
fn zero1_dp2_checkpoint_resumes_on_dp1_and_dp4() {
    let tmp = tempfile::tempdir().expect("tmp");
    let zero = ["--set".to_string(), "parallel.zero=1".to_string()];
    let ck = ["--set".to_string(), "checkpoint.every_steps=3".to_string()];
    let dp2 = |out: &Path| {
        let mut a = dp_args(out, 2, 8);
        a.extend(zero.iter().cloned());
        a.extend(ck.iter().cloned());
        a
    };
    let full = tmp.path().join("full");
    let o = launch(2, &[], &dp2(&full), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = losses(&full.join("metrics.jsonl"));
    let saved = tmp.path().join("saved");
    let o = launch(2, &[], &with(dp2(&saved), &["--stop-after", "3"]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = ck_root(&saved).join("step-0000003");
    let meta = Checkpoint::open(&dir).expect("open").meta;
    assert_eq!((meta.layout.dp, meta.layout.zero), (2, 1));
    let shards = meta
        .files
        .keys()
        .filter(|k| k.ends_with(".safetensors"))
        .count();
    assert_eq!(shards, 2, "one shard per rank");
    for dp in [1usize, 4] {
        let out = tmp.path().join(format!("dp{dp}"));
        std::fs::create_dir_all(&out).expect("mkdir");
        std::fs::copy(saved.join("metrics.jsonl"), out.join("metrics.jsonl")).expect("copy");
        let a = with(
            dp_args(&out, dp, 8),
            &["--resume", dir.to_str().expect("utf8")],
        );
        let o = if dp == 1 {
            let v: Vec<&str> = std::iter::once("train")
                .chain(a.iter().map(|s| s.as_str()))
                .collect();
            sigma(&v, &[])
        } else {
            launch(dp, &[], &a, &[])
        };
        assert!(o.status.success(), "dp {dp}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("saved with dp 2 tp 1 pp 1 zero 1, now dp"),
            "{}",
            stderr(&o)
        );
        let l = losses(&out.join("metrics.jsonl"));
        assert_eq!(l[..3], reference[..3]);
        assert_close(&l, &reference, &format!("dp 2 + ZeRO-1 resumed on dp {dp}"));
    }
}

#[test]
fn damaged_or_mismatched_checkpoints_are_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("run");
    let base = [
        "checkpoint.every_steps=2",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=1",
    ];
    run_ok(&args(&out, 2, &base), &[]);
    let good = ck_root(&out).join("step-0000002");
    let shard = "shard-00000-of-00001.safetensors";
    let resume = |dir: &Path, extra: &[&str]| {
        let a = with(
            args(&out, 4, &[&base[..], extra].concat()),
            &["--resume", dir.to_str().expect("utf8")],
        );
        let v: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        sigma(&v, &[])
    };
    let damaged = |name: &str, f: &dyn Fn(&Path)| {
        let d = tmp.path().join(name).join("step-0000002");
        std::fs::create_dir_all(&d).expect("mkdir");
        for e in std::fs::read_dir(&good).expect("good").flatten() {
            std::fs::copy(e.path(), d.join(e.file_name())).expect("copy");
        }
        f(&d);
        d
    };
    let cases: Vec<(PathBuf, Vec<&str>, Vec<&str>)> = vec![
        (
            damaged("truncated", &|d| {
                let p = d.join(shard);
                let len = std::fs::metadata(&p).expect("len").len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .expect("open")
                    .set_len(len - 100)
                    .expect("truncate");
            }),
            vec![],
            vec![shard, "truncated"],
        ),
        (
            damaged("corrupt", &|d| {
                let p = d.join(shard);
                let mut b = std::fs::read(&p).expect("read");
                let n = b.len();
                b[n - 10] ^= 0x40;
                std::fs::write(&p, b).expect("write");
            }),
            vec![],
            vec![shard, "checksum mismatch"],
        ),
        (
            damaged("unmarked", &|d| {
                std::fs::remove_file(d.join("COMMITTED")).expect("rm")
            }),
            vec![],
            vec!["not committed", "COMMITTED"],
        ),
        (
            good.clone(),
            vec!["model.num_k_heads=4"],
            vec![
                "layers.0.attn.k_proj.weight",
                "shape [32, 128]",
                "[64, 128]",
            ],
        ),
    ];
    for (dir, extra, needles) in cases {
        let before = snapshot(dir.parent().expect("parent"));
        let ck_before = snapshot(&ck_root(&out));
        let o = resume(&dir, &extra);
        assert_clean_failure(&o, &needles);
        assert_eq!(
            snapshot(dir.parent().expect("parent")),
            before,
            "{} changed",
            dir.display()
        );
        assert_eq!(
            snapshot(&ck_root(&out)),
            ck_before,
            "the run's checkpoints changed"
        );
    }
    // A compatible change (learning rate, steps) is accepted and named.
    let o = resume(&good, &["optim.lr=1e-3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("optim.lr: 0.003 -> 0.001"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("train.steps: 2 -> 4"), "{}", stderr(&o));
}

#[test]
fn inspect_and_export_describe_the_checkpoint_for_outside_readers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("run");
    run_ok(
        &args(
            &out,
            2,
            &[
                "checkpoint.every_steps=2",
                "train.micro_batch_size=4",
                "train.grad_accum_steps=1",
            ],
        ),
        &[],
    );
    let dir = ck_root(&out).join("step-0000002");
    let d = dir.to_str().expect("utf8");
    let report = run_ok(&["checkpoint".into(), "inspect".into(), d.into()], &[]);
    for n in [
        "step 2 of 2",
        "1024 tokens",
        "dp 1 tp 1 pp 1 zero 0",
        "layers.3.attn.k_proj.weight",
        "[32, 128]",
        "checksums match",
        "finite",
    ] {
        assert!(report.contains(n), "inspect should show {n:?}:\n{report}");
    }
    let mut ck = Checkpoint::open(&dir).expect("open");
    for dtype in ["f32", "bf16"] {
        let exp = tmp.path().join(format!("export-{dtype}"));
        run_ok(
            &[
                "checkpoint".into(),
                "export".into(),
                d.into(),
                "--output".into(),
                exp.to_string_lossy().into_owned(),
                "--dtype".into(),
                dtype.into(),
            ],
            &[],
        );
        // Read with the safetensors crate, not sigma's reader.
        let bytes = std::fs::read(exp.join("model.safetensors")).expect("export");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let names: Vec<String> = ck
            .meta
            .tensors
            .keys()
            .filter(|k| k.starts_with("model/"))
            .cloned()
            .collect();
        assert_eq!(st.names().len(), names.len());
        for name in &names {
            let v = st
                .tensor(name.trim_start_matches("model/"))
                .expect("tensor");
            let want = ck.read(name).expect("read");
            assert_eq!(
                v.shape().iter().map(|&x| x as i64).collect::<Vec<_>>(),
                want.size()
            );
            let got: Vec<f32> = match dtype {
                "f32" => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                _ => v
                    .data()
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u32::from(u16::from_le_bytes([c[0], c[1]]))) << 16))
                    .collect(),
            };
            let want: Vec<f32> = Vec::try_from(
                want.to_kind(if dtype == "f32" {
                    tch::Kind::Float
                } else {
                    tch::Kind::BFloat16
                })
                .to_kind(tch::Kind::Float)
                .view([-1]),
            )
            .expect("vec");
            assert_eq!(got, want, "{name} ({dtype})");
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(exp.join("config.json")).expect("config"))
                .expect("json");
        assert_eq!(cfg["num_k_heads"], 2);
        assert_eq!(cfg["aug_q_dim"], 192);
        assert_eq!(cfg["model_type"], "sigma");
        assert_eq!(
            std::fs::read(exp.join("tokenizer.json")).expect("tokenizer"),
            std::fs::read(repo_root().join("data/sample/tokenizer.json"))
                .expect("sample tokenizer")
        );
        // A second export into the same place is refused.
        let o = sigma(
            &[
                "checkpoint",
                "export",
                d,
                "--output",
                exp.to_str().expect("utf8"),
            ],
            &[],
        );
        assert_clean_failure(&o, &["not empty", "refusing to overwrite"]);
    }
}

/// `--stop-after 0` does what it says: it saves the initial state as the
/// checkpoint of step 0 and stops without training; a run resumed from it
/// follows the run that never stopped bit for bit.
#[test]
fn stop_after_0_saves_the_initial_state() {
    let tmp = tempfile::tempdir().expect("tmp");
    let common = ["train.micro_batch_size=4", "train.grad_accum_steps=1"];
    let full = tmp.path().join("full");
    run_ok(&args(&full, 3, &common), &[]);
    let reference = losses(&full.join("metrics.jsonl"));
    assert_eq!(reference.len(), 3);
    let stopped = tmp.path().join("stopped");
    let a = args(&stopped, 3, &common);
    let log = run_ok(&with(a.clone(), &["--stop-after", "0"]), &[]);
    assert!(
        log.contains("--stop-after 0: saved the checkpoint of step 0"),
        "{log}"
    );
    let steps: Vec<u64> = checkpoint::committed(&ck_root(&stopped))
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![0], "the initial state alone");
    assert!(losses_or_empty(&stopped.join("metrics.jsonl")).is_empty());
    run_ok(&with(a, &["--resume", "auto"]), &[]);
    assert_eq!(losses(&stopped.join("metrics.jsonl")), reference);
}
