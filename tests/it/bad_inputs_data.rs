//! Bad and odd inputs to the data commands (issue 26), one test per case.
//! Each refusal asserts: exit code 1, one line on stderr that names the
//! input at fault (file, flag, field or variable), no panic, backtrace or
//! C++ frame, and every file the user had (names, sizes, mtimes, contents)
//! as it was. Cases that must now succeed assert what they wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use sigma_tests::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tmp")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Every file under `dir`: relative path -> (size, mtime, content hash).
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime, u64)> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, (u64, std::time::SystemTime, u64)>) {
        for e in std::fs::read_dir(d).expect("read_dir") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(root).expect("prefix").display().to_string();
            let meta = std::fs::symlink_metadata(&p).expect("stat");
            if meta.is_dir() {
                out.insert(format!("{rel}/"), (0, meta.modified().expect("mtime"), 0));
                walk(root, &p, out);
            } else {
                let data = std::fs::read(&p).unwrap_or_default();
                out.insert(
                    rel,
                    (
                        meta.len(),
                        meta.modified().expect("mtime"),
                        xxhash_rust::xxh3::xxh3_64(&data),
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `sigma args...` with the current directory `cwd`.
fn sigma_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = sigma_command();
    c.current_dir(cwd).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run sigma")
}

/// A clean refusal: exit 1, one line on stderr naming every needle, nothing
/// from a panic, a backtrace or libtorch. `Err` says what is wrong.
fn check_refused(o: &Output, needles: &[&str]) -> Result<(), String> {
    let err = stderr(o);
    let fail = |why: String| Err(format!("{why}; stdout:\n{}\nstderr:\n{err}", stdout(o)));
    if o.status.code() != Some(1) {
        return fail(format!("exit code {:?}, expected 1", o.status.code()));
    }
    for bad in [
        "panicked",
        "RUST_BACKTRACE",
        "internal error",
        "frame #",
        "c10::",
        "caused by",
        "os error",
    ] {
        if err.contains(bad) {
            return fail(format!("stderr has {bad:?}"));
        }
    }
    if err.trim().lines().count() != 1 {
        return fail("one line expected on stderr".into());
    }
    if let Some(n) = needles.iter().find(|n| !err.contains(*n)) {
        return fail(format!("stderr does not name {n:?}"));
    }
    Ok(())
}

fn assert_refused(o: &Output, needles: &[&str]) {
    if let Err(e) = check_refused(o, needles) {
        panic!("{e}");
    }
}

/// Run `args` in `dir`: a clean refusal that leaves every file in `dir` as it was.
fn check_refused_unchanged(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    needles: &[&str],
) -> Result<Output, String> {
    let before = snapshot(dir);
    let o = sigma_in(dir, args, env);
    check_refused(&o, needles)?;
    if snapshot(dir) != before {
        return Err(format!(
            "files in {} changed by a refused command",
            dir.display()
        ));
    }
    Ok(o)
}

fn refused_unchanged(dir: &Path, args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> Output {
    check_refused_unchanged(dir, args, env, needles).unwrap_or_else(|e| panic!("{e}"))
}

/// Assert that no case of a table failed, naming every one that did.
fn all_passed(failed: Vec<String>) {
    assert!(failed.is_empty(), "failing cases:\n{}", failed.join("\n\n"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

/// A private copy of the prepared synthetic sample domain (train and valid shards).
fn synthetic_copy(d: &Path) -> PathBuf {
    let dir = d.join("synthetic");
    copy_dir(&sample_shards().join("synthetic"), &dir);
    dir
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("manifest")).expect("json");
    edit(&mut m);
    std::fs::write(&p, serde_json::to_vec_pretty(&m).expect("json")).expect("write");
}

/// Index of the first shard of `split` in a manifest.
fn shard_index(m: &serde_json::Value, split: &str) -> usize {
    m["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .position(|s| s["split"] == split)
        .expect("a shard of that split")
}

/// A `[data]` config over `dir` (the synthetic domain) with `extra` lines.
fn config_over(d: &Path, dir: &Path, extra: &str) -> PathBuf {
    let cfg = d.join("c.toml");
    write_file(
        &cfg,
        format!(
            "[data]\nseq_len = 32\n{extra}[[data.sources]]\nmanifest = {:?}\n[data.mixture]\nsynthetic = 1.0\n",
            s(dir)
        )
        .as_bytes(),
    );
    cfg
}

fn synth_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["data", "synth", "--num-docs", "5", "--output", out];
    a.extend_from_slice(extra);
    a
}

// ---- 1. atomic writes to a bare file name ----

#[test]
fn synth_to_a_bare_file_name_writes_and_replaces_it_in_the_current_directory() {
    let d = tmp();
    let o = sigma_in(d.path(), &synth_args("s.jsonl", &[]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read(d.path().join("s.jsonl")).expect("written");
    assert_eq!(String::from_utf8_lossy(&first).lines().count(), 5);
    let o = sigma_in(
        d.path(),
        &synth_args("s.jsonl", &["--seed", "2", "--overwrite"]),
        &[],
    );
    assert!(o.status.success(), "replace: {}", stderr(&o));
    assert_ne!(
        std::fs::read(d.path().join("s.jsonl")).expect("read"),
        first
    );
    let names: Vec<String> = std::fs::read_dir(d.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["s.jsonl"], "no temporary left behind");
}

#[test]
fn tokenizer_train_to_a_bare_file_name() {
    let d = tmp();
    let input = sample("synthetic.jsonl.zst");
    let args = [
        "data",
        "tokenizer",
        "train",
        "--input",
        &input,
        "--vocab-size",
        "300",
        "--output",
        "tok.json",
    ];
    let o = sigma_in(d.path(), &args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.path().join("tok.json").is_file());
}

// ---- 3. structure cross-checked ----

#[test]
fn prepare_refuses_a_directory_holding_the_users_own_shard() {
    let d = tmp();
    let out = d.path().join("out");
    write_file(
        &out.join("train-00000.parquet"),
        b"my own file, not prepared by sigma",
    );
    let input = sample("system.jsonl.zst");
    let tok = sample("tokenizer.json");
    let args = [
        "data",
        "prepare",
        "--input",
        &input,
        "--domain",
        "system",
        "--tokenizer",
        &tok,
        "--output",
        "out",
        "--quiet",
    ];
    refused_unchanged(
        d.path(),
        &args,
        &[],
        &["out", "train-00000.parquet", "--overwrite"],
    );
}

#[test]
fn prepare_refuses_an_output_that_is_or_is_below_a_file() {
    let d = tmp();
    write_file(&d.path().join("out"), b"a file");
    let input = sample("system.jsonl.zst");
    let tok = sample("tokenizer.json");
    let args = [
        "data",
        "prepare",
        "--input",
        &input,
        "--domain",
        "system",
        "--tokenizer",
        &tok,
        "--output",
        "out",
        "--quiet",
    ];
    refused_unchanged(d.path(), &args, &[], &["--output", "out", "is a file"]);
    // Further below the file: named as given, nothing created.
    let mut deeper = args;
    deeper[9] = "out/a/b";
    refused_unchanged(
        d.path(),
        &deeper,
        &[],
        &["--output", "out/a/b is inside out,", "not a directory"],
    );
}

#[test]
fn inspect_refuses_a_validation_shard_relabelled_as_training_data() {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    edit_manifest(&dir, |m| {
        let i = shard_index(m, "valid");
        m["shards"][i]["split"] = "train".into();
    });
    let args = ["data", "inspect", "synthetic", "--verify"];
    refused_unchanged(
        d.path(),
        &args,
        &[],
        &["synthetic/manifest.json", "split", "valid-00000.parquet"],
    );
}

#[test]
fn inspect_refuses_a_manifest_listing_one_shard_twice() {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    edit_manifest(&dir, |m| {
        let again = m["shards"][0].clone();
        m["shards"].as_array_mut().expect("shards").push(again);
    });
    let args = ["data", "inspect", "synthetic", "--verify"];
    refused_unchanged(
        d.path(),
        &args,
        &[],
        &["synthetic/manifest.json", "listed twice"],
    );
}

#[test]
fn inspect_refuses_a_validation_shard_renamed_into_training_data() {
    // File and manifest renamed consistently: only the file's own metadata can tell.
    let d = tmp();
    let dir = synthetic_copy(d.path());
    std::fs::rename(
        dir.join("valid-00000.parquet"),
        dir.join("train-00009.parquet"),
    )
    .expect("mv");
    edit_manifest(&dir, |m| {
        let i = shard_index(m, "valid");
        m["shards"][i]["split"] = "train".into();
        m["shards"][i]["file"] = "train-00009.parquet".into();
    });
    let o = refused_unchanged(
        d.path(),
        &["data", "inspect", "synthetic"],
        &[],
        &["not healthy"],
    );
    let out = stdout(&o);
    assert!(
        out.contains("train-00009.parquet") && out.contains("split \"valid\""),
        "{out}"
    );
}

#[test]
fn inspect_names_the_field_of_a_mistyped_manifest_value() {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    edit_manifest(&dir, |m| m["shards"][0]["bytes"] = "ten".into());
    refused_unchanged(
        d.path(),
        &["data", "inspect", "synthetic"],
        &[],
        &["manifest.json", "shards[0].bytes"],
    );
}

/// `data preview --show 0` reads no samples: a refusal proves the dataset
/// checked its shards when it was opened.
fn preview_refuses_at_open(damage: impl FnOnce(&Path), needles: &[&str]) {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    damage(&dir);
    config_over(d.path(), &dir, "");
    let args = [
        "data",
        "preview",
        "--config",
        "c.toml",
        "--samples",
        "10",
        "--show",
        "0",
    ];
    refused_unchanged(d.path(), &args, &[], needles);
}

#[test]
fn a_deleted_shard_is_refused_when_the_dataset_opens() {
    preview_refuses_at_open(
        |dir| std::fs::remove_file(dir.join("train-00000.parquet")).expect("rm"),
        &["data.sources[0].manifest", "train-00000.parquet", "missing"],
    );
}

#[test]
fn a_truncated_shard_is_refused_when_the_dataset_opens() {
    preview_refuses_at_open(
        |dir| {
            let p = dir.join("train-00000.parquet");
            let data = std::fs::read(&p).expect("read");
            std::fs::write(&p, &data[..data.len() - 100]).expect("truncate");
        },
        &["data.sources[0].manifest", "train-00000.parquet"],
    );
}

#[test]
fn a_shard_from_another_domain_is_refused_when_the_dataset_opens() {
    // The system domain's first shard put in place of the synthetic one, manifest adjusted.
    let system = sample_shards().join("system");
    preview_refuses_at_open(
        |dir| {
            let src = system.join("train-00000.parquet");
            std::fs::copy(&src, dir.join("train-00000.parquet")).expect("cp");
            let theirs: serde_json::Value =
                serde_json::from_slice(&std::fs::read(system.join("manifest.json")).expect("m"))
                    .expect("json");
            edit_manifest(dir, |m| {
                let i = shard_index(m, "train");
                m["shards"][i] = theirs["shards"][shard_index(&theirs, "train")].clone();
            });
        },
        &["train-00000.parquet", "domain \"system\""],
    );
}

#[test]
fn a_source_listed_twice_is_refused() {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    let cfg = d.path().join("c.toml");
    write_file(
        &cfg,
        format!(
            "[data]\nseq_len = 32\n[[data.sources]]\nmanifest = {:?}\n[[data.sources]]\nmanifest = \"./synthetic/\"\n[data.mixture]\nsynthetic = 1.0\n",
            s(&dir)
        )
        .as_bytes(),
    );
    let args = ["data", "preview", "--config", "c.toml", "--show", "0"];
    refused_unchanged(
        d.path(),
        &args,
        &[],
        &["data.sources[1].manifest", "data.sources[0]"],
    );
}

// ---- 4. sizes bounded before allocation ----

#[test]
fn tokenizer_train_refuses_a_huge_vocabulary_before_reading() {
    let d = tmp();
    let input = sample("synthetic.jsonl.zst");
    let args = [
        "data",
        "tokenizer",
        "train",
        "--input",
        &input,
        "--vocab-size",
        "1000000000",
        "--output",
        "tok.json",
    ];
    let t0 = Instant::now();
    refused_unchanged(
        d.path(),
        &args,
        &[],
        &["--vocab-size", "1048576", "1000000000"],
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn preview_refuses_a_huge_show_and_a_zero_or_huge_samples() {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    config_over(d.path(), &dir, "");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--show", "1000000"], &["--show", "1000000"]),
        (&["--samples", "0"], &["--samples"]),
        (
            &["--samples", "100000000000"],
            &["--samples", "100000000000"],
        ),
    ];
    let mut failed = Vec::new();
    for (extra, needles) in cases {
        let mut args = vec!["data", "preview", "--config", "c.toml"];
        args.extend_from_slice(extra);
        if let Err(e) = check_refused_unchanged(d.path(), &args, &[], needles) {
            failed.push(format!("{extra:?}: {e}"));
        }
    }
    all_passed(failed);
}

#[test]
fn preview_of_a_late_stage_does_not_replay_the_earlier_ones() {
    // Stage 1 starts after 2^50 tokens: replaying the deal up to it would run for days.
    let d = tmp();
    let dir = synthetic_copy(d.path());
    let cfg = d.path().join("c.toml");
    write_file(
        &cfg,
        format!(
            "[data]\nseq_len = 32\n[[data.sources]]\nmanifest = {:?}\n[[data.stages]]\nuntil_tokens = 1125899906842624\nmixture = {{ synthetic = 1.0 }}\n[[data.stages]]\nmixture = {{ synthetic = 1.0 }}\n",
            s(&dir)
        )
        .as_bytes(),
    );
    let mut child = sigma_command()
        .current_dir(d.path())
        .args([
            "data",
            "preview",
            "--config",
            "c.toml",
            "--samples",
            "1000",
            "--show",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("data preview still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().expect("output");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("stage 1") && out.contains("--- sample 1"),
        "{out}"
    );
}

#[test]
fn synth_refuses_a_huge_or_zero_document_count() {
    let d = tmp();
    refused_unchanged(
        d.path(),
        &[
            "data",
            "synth",
            "--num-docs",
            "1000000000000",
            "--output",
            "s.jsonl",
        ],
        &[],
        &["--num-docs", "1000000000000"],
    );
    refused_unchanged(
        d.path(),
        &["data", "synth", "--num-docs", "0", "--output", "s.jsonl"],
        &[],
        &["--num-docs"],
    );
}

#[test]
fn prepare_refuses_size_flags_out_of_bounds() {
    let d = tmp();
    let input = sample("system.jsonl.zst");
    let tok = sample("tokenizer.json");
    let cases: &[(&str, &str)] = &[
        ("--row-group-tokens", "0"),
        ("--row-group-tokens", "18446744073709551615"),
        ("--shard-tokens", "0"),
        ("--shard-tokens", "18446744073709551615"),
        ("--threads", "0"),
        ("--threads", "100000000"),
        ("--valid-fraction", "0.0000001"),
        ("--valid-fraction", "0.9999999"),
        ("--text-field", ""),
    ];
    let mut failed = Vec::new();
    for (flag, value) in cases {
        let args = [
            "data",
            "prepare",
            "--input",
            &input,
            "--domain",
            "system",
            "--tokenizer",
            &tok,
            "--output",
            "out",
            "--quiet",
            flag,
            value,
        ];
        if let Err(e) = check_refused_unchanged(d.path(), &args, &[], &[flag]) {
            failed.push(format!("{flag} {value:?}: {e}"));
        }
    }
    all_passed(failed);
}

#[test]
fn bench_refuses_a_batch_too_large_for_memory() {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    config_over(d.path(), &dir, "");
    let args = [
        "data",
        "bench",
        "--config",
        "c.toml",
        "--global-batch",
        "1000000000000000",
    ];
    refused_unchanged(
        d.path(),
        &args,
        &[],
        &["--global-batch", "1000000000000000"],
    );
    let args = ["data", "bench", "--config", "c.toml", "--batches", "0"];
    refused_unchanged(d.path(), &args, &[], &["--batches"]);
}

// ---- 5. the [data] config validated before use ----

#[test]
fn data_config_values_are_refused_naming_the_field() {
    let d = tmp();
    let dir = synthetic_copy(d.path());
    let m = s(&dir);
    let mix = "[data.mixture]\nsynthetic = 1.0\n";
    let cases: Vec<(String, &[&str])> = vec![
        (format!("[data]\nseq_len = 32\nsources = []\n{mix}"), &["data.sources"]),
        (format!("[data]\nseq_len = 0\n[[data.sources]]\nmanifest = {m:?}\n{mix}"), &["data.seq_len"]),
        (format!("[data]\nseq_len = 100000000000\n[[data.sources]]\nmanifest = {m:?}\n{mix}"), &["data.seq_len", "16777216"]),
        (format!("[data]\nseq_len = 32\nprefetch_batches = 4611686018427387904\n[[data.sources]]\nmanifest = {m:?}\n{mix}"), &["data.prefetch_batches"]),
        (format!("[data]\nseq_len = 32\n[[data.sources]]\nmanifest = \"\"\n{mix}"), &["data.sources[0].manifest"]),
        (format!("[data]\nseq_len = 32\n[[data.sources]]\nmanifest = {m:?}\ndomain = \"a b\"\n{mix}"), &["data.sources[0].domain"]),
        (format!("[data]\nseq_len = 32\ntokenizer = \"\"\n[[data.sources]]\nmanifest = {m:?}\n{mix}"), &["data.tokenizer"]),
        (format!("[data]\nseq_len = 32\n[[data.sources]]\nmanifest = {m:?}\n[data.mixture]\nsynthetic = nan\n"), &["data.mixture.synthetic"]),
        (format!("[data]\nseq_len = 32\n[[data.sources]]\nmanifest = {m:?}\n[[data.stages]]\nuntil_tokens = 0\nmixture = {{ synthetic = 1.0 }}\n"), &["data.stages[0].until_tokens"]),
    ];
    let mut failed = Vec::new();
    for (i, (text, needles)) in cases.iter().enumerate() {
        write_file(&d.path().join("c.toml"), text.as_bytes());
        let args = ["data", "preview", "--config", "c.toml", "--show", "0"];
        if let Err(e) = check_refused_unchanged(d.path(), &args, &[], needles) {
            failed.push(format!("case {i} ({needles:?}): {e}"));
        }
    }
    all_passed(failed);
}

#[test]
fn train_with_empty_data_sources_names_the_field() {
    // The trainer reaches the data through sigma_data::Dataset::open, which
    // validates the [data] section first (it used to index sources[0]).
    let d = tmp();
    let out = s(&d.path().join("run"));
    let o = sigma(
        &[
            "train",
            "--config",
            "configs/tiny.toml",
            "--quiet",
            "--set",
            "data.sources=[]",
            "--set",
            &format!("metrics.output_dir={out:?}"),
        ],
        &[],
    );
    assert_refused(&o, &["data.sources"]);
}

// ---- 6. degenerate values refused, not replaced ----

#[test]
fn tokenizer_train_refuses_to_replace_an_existing_file_without_overwrite() {
    let d = tmp();
    write_file(&d.path().join("tok.json"), b"{\"mine\": true}");
    let input = sample("synthetic.jsonl.zst");
    let args = [
        "data",
        "tokenizer",
        "train",
        "--input",
        &input,
        "--vocab-size",
        "300",
        "--output",
        "tok.json",
    ];
    refused_unchanged(
        d.path(),
        &args,
        &[],
        &["--output", "tok.json", "--overwrite"],
    );
    let mut with = args.to_vec();
    with.push("--overwrite");
    let o = sigma_in(d.path(), &with, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn synth_refuses_to_replace_an_existing_file_without_overwrite() {
    let d = tmp();
    write_file(&d.path().join("s.jsonl"), b"{\"text\": \"mine\"}\n");
    refused_unchanged(
        d.path(),
        &synth_args("s.jsonl", &[]),
        &[],
        &["--output", "s.jsonl", "--overwrite"],
    );
}

#[test]
fn synth_refuses_an_output_name_prepare_would_read_as_plain_text() {
    let d = tmp();
    let mut failed = Vec::new();
    for name in ["x.txt", "x.parquet", "x.jsonl.txt", "x"] {
        if let Err(e) = check_refused_unchanged(
            d.path(),
            &synth_args(name, &[]),
            &[],
            &["--output", name, ".jsonl"],
        ) {
            failed.push(format!("{name}: {e}"));
        }
    }
    all_passed(failed);
    // A name prepare reads as JSONL works, compressed too.
    let o = sigma_in(d.path(), &synth_args("x.ndjson.gz", &[]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn store_environment_variables_out_of_range_are_refused() {
    let d = tmp();
    synthetic_copy(d.path());
    let mut failed = Vec::new();
    for (name, value) in [
        ("SIGMA_STORE_RETRIES", "abc"),
        ("SIGMA_STORE_RETRIES", "-1"),
        ("SIGMA_STORE_RETRIES", "1000000"),
        ("SIGMA_STORE_TIMEOUT_S", "0"),
        ("SIGMA_STORE_TIMEOUT_S", "ten"),
    ] {
        let args = ["data", "inspect", "synthetic"];
        if let Err(e) = check_refused_unchanged(d.path(), &args, &[(name, value)], &[name, value]) {
            failed.push(format!("{name}={value}: {e}"));
        }
    }
    all_passed(failed);
}

// ---- 7. messages about the user's input, in one line ----

#[test]
fn a_missing_config_file_names_the_flag_in_one_line() {
    let d = tmp();
    refused_unchanged(
        d.path(),
        &["data", "preview", "--config", "nope.toml"],
        &[],
        &["--config", "nope.toml"],
    );
}

#[test]
fn a_missing_tokenizer_names_the_file_in_one_line() {
    let d = tmp();
    let input = sample("system.jsonl.zst");
    let args = [
        "data",
        "prepare",
        "--input",
        &input,
        "--domain",
        "system",
        "--tokenizer",
        "missing.json",
        "--output",
        "out",
        "--quiet",
    ];
    refused_unchanged(d.path(), &args, &[], &["missing.json", "not found"]);
}

#[test]
fn a_toml_syntax_error_names_the_file_and_line() {
    let d = tmp();
    write_file(
        &d.path().join("c.toml"),
        b"[data]\nseq_len = 32\nseed = = 3\n",
    );
    refused_unchanged(
        d.path(),
        &["data", "preview", "--config", "c.toml"],
        &[],
        &["c.toml line 3"],
    );
}

/// An input file that decompresses past `SIGMA_MAX_INPUT_MIB` (a
/// decompression bomb, or a file to split) is refused naming the file and
/// the limit, whatever its compression, without decompressing more than the
/// limit; a file within the limit is read. A malformed limit is refused
/// before anything runs.
#[test]
fn prepare_refuses_an_input_that_decompresses_past_the_limit() {
    use std::io::Write;
    let d = tmp();
    let tok = sample("tokenizer.json");
    // 3 MiB of text in JSON lines: a few kB compressed.
    let line = format!("{{\"text\": \"{}\"}}\n", "many words ".repeat(6 << 10));
    let text: String = line.repeat(48);
    let zst = zstd::encode_all(text.as_bytes(), 19).expect("zstd");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(text.as_bytes()).expect("gzip");
    let gz = gz.finish().expect("gzip");
    assert!(zst.len() < 64 << 10 && gz.len() < 64 << 10);
    let inputs = d.path().join("inputs");
    std::fs::create_dir_all(&inputs).expect("mkdir");
    write_file(&inputs.join("bomb.jsonl.zst"), &zst);
    write_file(&inputs.join("bomb.jsonl.gz"), &gz);
    write_file(&inputs.join("big.jsonl"), text.as_bytes());
    let prepare = |name: &str| {
        let input = s(&inputs.join(name));
        vec![
            "data".to_string(),
            "prepare".into(),
            "--input".into(),
            input,
            "--domain".into(),
            "general".into(),
            "--tokenizer".into(),
            tok.clone(),
            "--output".into(),
            "out".into(),
            "--quiet".into(),
        ]
    };
    let mut failed = Vec::new();
    for (name, what) in [
        ("bomb.jsonl.zst", "decompresses (Zstd) to more than 2 MiB"),
        ("bomb.jsonl.gz", "decompresses (Gzip) to more than 2 MiB"),
        ("big.jsonl", "holds more than 2 MiB"),
    ] {
        let a = prepare(name);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let needles = [name, what, "SIGMA_MAX_INPUT_MIB"];
        if let Err(e) =
            check_refused_unchanged(d.path(), &a, &[("SIGMA_MAX_INPUT_MIB", "2")], &needles)
        {
            failed.push(format!("{name}: {e}"));
        }
    }
    all_passed(failed);
    // Within the limit (4 MiB) the same file is read.
    let a = prepare("bomb.jsonl.zst");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = sigma_in(d.path(), &a, &[("SIGMA_MAX_INPUT_MIB", "4")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.path().join("out/manifest.json").is_file());
    // A limit of 0 is refused, naming the variable.
    let a = prepare("big.jsonl");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = sigma_in(d.path(), &a, &[("SIGMA_MAX_INPUT_MIB", "0")]);
    assert_refused(&o, &["SIGMA_MAX_INPUT_MIB"]);
}
