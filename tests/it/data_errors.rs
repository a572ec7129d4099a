//! Bad inputs: each ends in a clear message naming the file or field, exit code 1, no panic.

use std::path::Path;

use sigma_tests::*;

fn prepare_args<'a>(input: &'a str, out: &'a str, tok: &'a str) -> Vec<&'a str> {
    vec![
        "data",
        "prepare",
        "--input",
        input,
        "--domain",
        "general",
        "--tokenizer",
        tok,
        "--output",
        out,
        "--quiet",
    ]
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tmp")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn missing_text_column_in_parquet() {
    let d = tmp();
    let p = d.path().join("dump.parquet");
    crate::data_pipeline::write_parquet(&p, "body", &["a document"]);
    let o = sigma(
        &prepare_args(&s(&p), &s(&d.path().join("out")), &sample("tokenizer.json")),
        &[],
    );
    assert_clean_failure(
        &o,
        &["dump.parquet", "no column `text`", "body", "--text-field"],
    );
}

#[test]
fn missing_text_field_in_jsonl_and_invalid_utf8() {
    let d = tmp();
    let p = d.path().join("in.jsonl");
    write_file(&p, b"{\"text\": \"fine\"}\n{\"content\": \"x\"}\n");
    let o = sigma(
        &prepare_args(&s(&p), &s(&d.path().join("out")), &sample("tokenizer.json")),
        &[],
    );
    assert_clean_failure(&o, &["in.jsonl:2", "`text`"]);
    let p = d.path().join("bad.txt");
    write_file(&p, b"caf\xe9 au lait");
    let o = sigma(
        &prepare_args(&s(&p), &s(&d.path().join("out")), &sample("tokenizer.json")),
        &[],
    );
    assert_clean_failure(&o, &["bad.txt", "invalid UTF-8 at byte 3"]);
}

#[test]
fn empty_inputs_and_unmatched_globs() {
    let d = tmp();
    let p = d.path().join("empty.jsonl");
    write_file(&p, b"\n\n");
    let o = sigma(
        &prepare_args(&s(&p), &s(&d.path().join("out")), &sample("tokenizer.json")),
        &[],
    );
    assert_clean_failure(&o, &["no documents", "empty.jsonl"]);
    let glob = format!("{}/*.parquet", d.path().display());
    let o = sigma(
        &prepare_args(&glob, &s(&d.path().join("out")), &sample("tokenizer.json")),
        &[],
    );
    assert_clean_failure(&o, &["*.parquet", "no input files"]);
    assert!(!d.path().join("out/manifest.json").exists());
}

#[test]
fn corrupt_parquet_input() {
    let d = tmp();
    let p = d.path().join("broken.parquet");
    write_file(&p, b"PAR1 this is not really parquet at all PAR1");
    let o = sigma(
        &prepare_args(&s(&p), &s(&d.path().join("out")), &sample("tokenizer.json")),
        &[],
    );
    assert_clean_failure(&o, &["broken.parquet", "not a readable Parquet file"]);
}

/// A copy of the prepared synthetic sample domain that a test may damage.
fn copy_of_synthetic(d: &Path) -> std::path::PathBuf {
    let src = sample_shards().join("synthetic");
    let dst = d.join("synthetic");
    std::fs::create_dir_all(&dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read dir").flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
    dst
}

#[test]
fn shard_checksum_mismatch_is_reported_by_inspect_and_loader() {
    let d = tmp();
    let dir = copy_of_synthetic(d.path());
    let ok = sigma(&["data", "inspect", &s(&dir), "--verify"], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("sha256 verified"));
    // Flip one byte in the middle of the training shard.
    let shard = dir.join("train-00000.parquet");
    let mut bytes = std::fs::read(&shard).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&shard, &bytes).expect("write");
    let o = sigma(&["data", "inspect", &s(&dir), "--verify"], &[]);
    assert_clean_failure(&o, &["not healthy"]);
    assert!(
        stdout(&o).contains("train-00000.parquet: sha256 mismatch"),
        "{}",
        stdout(&o)
    );

    // A manifest whose row-group checksum disagrees with the data: the loader refuses it.
    let dir2 = copy_of_synthetic(&d.path().join("second"));
    let mpath = dir2.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mpath).expect("manifest")).expect("json");
    m["shards"][0]["row_groups"][0]["xxh3"] = "0123456789abcdef".into();
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).expect("json")).expect("write");
    let cfg = d.path().join("c.toml");
    write_file(&cfg, format!("[data]\nseq_len = 64\n[[data.sources]]\nmanifest = {:?}\n[data.mixture]\nsynthetic = 1.0\n", s(&dir2)).as_bytes());
    let o = sigma(
        &["data", "bench", "--config", &s(&cfg), "--batches", "5"],
        &[],
    );
    assert_clean_failure(
        &o,
        &["checksum mismatch", "train-00000.parquet", "row group 0"],
    );
}

#[test]
fn tokenizer_with_a_different_vocabulary_is_refused() {
    let d = tmp();
    let small = d.path().join("small-tokenizer.json");
    let o = sigma(
        &[
            "data",
            "tokenizer",
            "train",
            "--input",
            &sample("synthetic.jsonl.zst"),
            "--vocab-size",
            "300",
            "--output",
            &s(&small),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = d.path().join("c.toml");
    let text = sample_config(&format!(
        "tokenizer = {:?}\n[data.mixture]\ngeneral = 1.0\n",
        s(&small)
    ));
    write_file(&cfg, text.as_bytes());
    let o = sigma(&["data", "preview", "--config", &s(&cfg)], &[]);
    assert_clean_failure(
        &o,
        &["data.tokenizer", "300", "8192", "small-tokenizer.json"],
    );
}

#[test]
fn bad_mixtures_name_the_field() {
    let d = tmp();
    let cases: &[(&str, &[&str])] = &[
        (
            "[data.mixture]\ngeneral = -0.2\nsystem = 1.2\n",
            &["data.mixture.general", "non-negative"],
        ),
        (
            "[data.mixture]\ngeneral = 0.5\nsystem = 0.3\n",
            &["data.mixture", "sum to 0.8"],
        ),
        (
            "[data.mixture]\ngeneral = 0.5\ncode = 0.5\n",
            &["data.mixture.code", "no source"],
        ),
        (
            "typo_key = 3\n[data.mixture]\ngeneral = 1.0\n",
            &["typo_key"],
        ),
    ];
    for (i, (extra, needles)) in cases.iter().enumerate() {
        let cfg = d.path().join(format!("c{i}.toml"));
        write_file(&cfg, sample_config(extra).as_bytes());
        let o = sigma(&["data", "preview", "--config", &s(&cfg)], &[]);
        assert_clean_failure(&o, needles);
    }
}

#[test]
fn missing_manifest_and_unreachable_object_store() {
    let d = tmp();
    let o = sigma(
        &["data", "inspect", &s(&d.path().join("nothing-here"))],
        &[],
    );
    assert_clean_failure(&o, &["nothing-here/manifest.json", "not found"]);
    let t0 = std::time::Instant::now();
    let env = [
        ("AWS_ENDPOINT", "http://127.0.0.1:1"),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "x"),
        ("AWS_SECRET_ACCESS_KEY", "x"),
        ("AWS_REGION", "us-east-1"),
        ("SIGMA_STORE_RETRIES", "1"),
        ("SIGMA_STORE_TIMEOUT_S", "5"),
    ];
    let o = sigma(&["data", "inspect", "s3://no-such-bucket/shards"], &env);
    assert_clean_failure(&o, &["s3://no-such-bucket/shards/manifest.json"]);
    assert!(t0.elapsed().as_secs() < 60, "took {:?}", t0.elapsed());
    let o = sigma(&["data", "inspect", "ftp://host/x"], &[]);
    assert_clean_failure(&o, &["ftp://host/x", "unsupported scheme"]);
}

#[test]
fn existing_output_needs_overwrite() {
    let d = tmp();
    let p = d.path().join("in.jsonl");
    write_file(&p, b"{\"text\": \"one\"}\n");
    let out = s(&d.path().join("out"));
    let (input, tok) = (s(&p), sample("tokenizer.json"));
    let args = prepare_args(&input, &out, &tok);
    assert!(sigma(&args, &[]).status.success());
    assert_clean_failure(
        &sigma(&args, &[]),
        &["already holds prepared data", "--overwrite"],
    );
    let mut args = args.clone();
    args.push("--overwrite");
    assert!(sigma(&args, &[]).status.success());
}
