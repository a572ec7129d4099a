//! `sigma generate`: greedy decoding and seeded sampling reproduce, an export
//! generates what its checkpoint does, a prompts file gives one JSON line per
//! prompt, and bad requests fail cleanly. (Cached decoding against the full
//! forward pass, for every DiffQKV shape, is tested in trainer/src/generate.rs.)

use std::path::{Path, PathBuf};

use sigma_tests::*;

fn checkpoint(dir: &Path) -> PathBuf {
    let sets = [
        "checkpoint.every_steps=3",
        "train.cpu_threads=1",
        "metrics.plot=false",
        "metrics.tensorboard=false",
    ];
    let a = tiny_train_args(&dir.join("run"), 3, &sets);
    let o = sigma(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    dir.join("run/checkpoints/step-0000003")
}

fn generate(ck: &Path, extra: &[&str]) -> std::process::Output {
    let ck = ck.to_string_lossy();
    let mut a = vec!["generate", "--checkpoint", &ck, "--device", "cpu"];
    a.extend_from_slice(extra);
    sigma(&a, &[])
}

fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

#[test]
fn generation_reproduces_and_exports_generate_the_same() {
    let d = tempfile::tempdir().expect("tmp");
    let ck = checkpoint(d.path());
    let greedy = [
        "--prompt",
        "The manual page",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let a = ok(generate(&ck, &greedy));
    assert!(a.starts_with("The manual page"), "{a}");
    assert!(a.len() > "The manual page\n".len(), "new text: {a:?}");
    assert_eq!(
        ok(generate(&ck, &greedy)),
        a,
        "greedy decoding is deterministic"
    );
    let sampled = [
        "--prompt",
        "The manual page",
        "--max-new-tokens",
        "12",
        "--seed",
        "5",
    ];
    assert_eq!(
        ok(generate(&ck, &sampled)),
        ok(generate(&ck, &sampled)),
        "a seed fixes the sample"
    );

    // The CUDA-graph step's arithmetic without recording (slot on the
    // device, attention over a bucket under the mask) picks the same tokens;
    // graphs asked for on a CPU decode eagerly.
    let with = |mode: &str| {
        let mut g = greedy.to_vec();
        g.extend(["--cuda-graph", mode]);
        ok(generate(&ck, &g))
    };
    assert_eq!(with("static"), a, "static steps");
    assert_eq!(with("off"), a, "eager steps");

    let export = d.path().join("export");
    export_checkpoint(&ck, &export, &["--format", "hf"]);
    assert_eq!(
        ok(generate(&export, &greedy)),
        a,
        "the export generates what its checkpoint does"
    );

    let prompts = d.path().join("prompts.txt");
    write_file(
        &prompts,
        b"first prompt\n\n{\"prompt\": \"second prompt\"}\nthird\n",
    );
    let out = ok(generate(
        &ck,
        &[
            "--prompts",
            &prompts.to_string_lossy(),
            "--max-new-tokens",
            "5",
            "--batch",
            "2",
        ],
    ));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    for (i, (r, p)) in rows
        .iter()
        .zip(["first prompt", "second prompt", "third"])
        .enumerate()
    {
        assert_eq!(r["index"], i);
        assert_eq!(r["prompt"], p);
        let n = r["new_tokens"].as_u64().expect("new_tokens");
        assert!((1..=5).contains(&n));
        // Fewer than asked only on EOS.
        let stop = r["stop"].as_str().expect("stop");
        assert!(stop == "eos" || (stop == "length" && n == 5), "{r}");
    }
}

/// `--timing` reports each batch's prefill and steps on stderr (one JSON
/// line per batch), and `--ignore-eos` generates exactly the tokens asked for.
#[test]
fn generation_reports_its_timing_and_can_ignore_eos() {
    let d = tempfile::tempdir().expect("tmp");
    let ck = checkpoint(d.path());
    let prompts = d.path().join("prompts.txt");
    write_file(&prompts, b"one\ntwo three\nfour\n");
    let o = generate(
        &ck,
        &[
            "--prompts",
            &prompts.to_string_lossy(),
            "--max-new-tokens",
            "7",
            "--batch",
            "2",
            "--ignore-eos",
            "--timing",
            "--temperature",
            "0",
        ],
    );
    let out = ok(o.clone());
    for l in out.lines() {
        let r: serde_json::Value = serde_json::from_str(l).expect("json line");
        assert_eq!(
            (r["new_tokens"].as_u64(), r["stop"].as_str()),
            (Some(7), Some("length")),
            "{l}"
        );
    }
    let times: Vec<serde_json::Value> = stderr(&o)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("timing json"))
        .collect();
    assert_eq!(times.len(), 2, "two batches: {}", stderr(&o));
    for (t, b) in times.iter().zip([2, 1]) {
        assert_eq!(t["batch"], b, "{t}");
        assert_eq!(
            t["decode_steps"], 6,
            "7 tokens: one from the prefill, 6 steps: {t}"
        );
        assert_eq!(t["steps"], "eager", "no graphs on a CPU: {t}");
        assert_eq!(t["cuda_graphs"], 0, "{t}");
        assert_eq!(t["recording_ms"], 0.0, "{t}");
        assert_eq!(
            t["matvec_launches"], 0,
            "no matrix-vector kernels on a CPU: {t}"
        );
        let steady = t["steady_ms_per_step"].as_f64().expect("steady");
        let all = t["decode_ms_per_step"].as_f64().expect("ms");
        assert!((steady - all).abs() < 1e-9, "no recordings: {t}");
        let ms = t["decode_ms_per_step"].as_f64().expect("ms");
        let tps = t["tokens_per_s"].as_f64().expect("tok/s");
        assert!(
            ms > 0.0 && t["prefill_ms"].as_f64().expect("prefill") > 0.0,
            "{t}"
        );
        assert!((tps - b as f64 / (ms / 1e3)).abs() < 1e-6 * tps, "{t}");
    }
}

#[test]
fn bad_generation_requests_fail_cleanly() {
    let d = tempfile::tempdir().expect("tmp");
    let ck = checkpoint(d.path());
    // tiny trains at 128 tokens.
    let o = generate(&ck, &["--prompt", "hello", "--max-new-tokens", "200"]);
    assert_clean_failure(
        &o,
        &["exceeds the maximum context of 128 tokens", "--max-context"],
    );
    assert!(stdout(&o).is_empty(), "nothing printed before the error");
    assert_clean_failure(
        &generate(&ck, &["--prompt", "x", "--temperature=-1"]),
        &["--temperature -1"],
    );
    assert_clean_failure(
        &generate(&ck, &["--prompt", "x", "--top-p", "0"]),
        &["--top-p 0"],
    );
    // A prompts file whose second prompt is too long, one prompt a batch:
    // the command fails naming it before it generates for the first
    // (nothing on stdout; until 5716c10 the first batch's line was written).
    let long = d.path().join("long.txt");
    let words = "word ".repeat(200);
    write_file(&long, format!("hello\n{words}\n").as_bytes());
    let o = generate(
        &ck,
        &[
            "--prompts",
            &long.to_string_lossy(),
            "--batch",
            "1",
            "--max-new-tokens",
            "8",
        ],
    );
    assert_clean_failure(
        &o,
        &["prompt 2:", "exceeds the maximum context of 128 tokens"],
    );
    assert!(stdout(&o).is_empty(), "nothing printed before the error");
    let bad = d.path().join("bad.txt");
    write_file(&bad, b"ok\n{\"text\": \"no prompt field\"}\n");
    assert_clean_failure(
        &generate(&ck, &["--prompts", &bad.to_string_lossy()]),
        &["bad.txt:2", "\"prompt\""],
    );
    let o = sigma(
        &[
            "generate",
            "--checkpoint",
            &d.path().join("none").to_string_lossy(),
            "--prompt",
            "x",
        ],
        &[],
    );
    assert_clean_failure(&o, &["neither a checkpoint"]);
}

#[test]
fn bench_decode_times_each_case_and_checks_its_arguments() {
    let o = sigma(
        &[
            "bench",
            "decode",
            "--device",
            "cpu",
            "--batch",
            "1,2",
            "--context",
            "32,64",
            "--steps",
            "2",
        ],
        &[],
    );
    let out = ok(o);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<i64>().is_ok())
        })
        .collect();
    assert_eq!(rows.len(), 4, "one row per (batch, context):\n{out}");
    for r in &rows {
        let ms: Vec<f64> = r
            .split_whitespace()
            .skip(2)
            .take(2)
            .map(|w| w.parse().expect("ms"))
            .collect();
        assert!(ms.iter().all(|&t| t > 0.0 && t.is_finite()), "{r}");
    }
    // 4 + 16 against 2 x 16 heads of the default shapes.
    assert!(out.contains("37.5 % smaller"), "{out}");
    assert_clean_failure(
        &sigma(&["bench", "decode", "--device", "cpu", "--n-k", "5"], &[]),
        &["--n-k 5", "must divide --n-q 32"],
    );
    for (flag, value, says) in [
        ("--n-q", "0", "--n-q 0: must be 1 to 1024"),
        ("--n-q", "99999999", "--n-q 99999999: must be 1 to 1024"),
        ("--head-dim", "4096", "--head-dim 4096: must be 1 to 1024"),
        ("--steps", "0", "--steps 0: must be 1 to 1000000"),
        (
            "--steps",
            "4294967296",
            "--steps 4294967296: must be 1 to 1000000",
        ),
        ("--peak-gbps", "nan", "--peak-gbps NaN: must be a positive"),
        ("--peak-gbps", "0", "--peak-gbps 0: must be a positive"),
        ("--peak-gbps", "inf", "--peak-gbps inf: must be a positive"),
    ] {
        assert_clean_failure(
            &sigma(&["bench", "decode", "--device", "cpu", flag, value], &[]),
            &[says],
        );
    }
    // Caches past the machine's memory (or past i64 bytes) are skipped
    // before anything is allocated, and the other cases still run.
    let o = sigma(
        &[
            "bench",
            "decode",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--context",
            "8",
            "--batch",
            "1,9223372036854775807,1000000000000",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(
        out.matches("(does not fit in memory: skipped)").count(),
        2,
        "{out}"
    );
    // The kernel check needs a GPU and says so.
    assert_clean_failure(
        &sigma(&["bench", "decode", "--device", "cpu", "--check"], &[]),
        &["--check", "needs --device cuda"],
    );
}

#[test]
fn bench_decode_model_times_the_config_and_its_gqa_counterpart() {
    let cfg = repo_root()
        .join("configs/tiny.toml")
        .to_string_lossy()
        .into_owned();
    let args = |gqa: &str| {
        vec![
            "bench".to_string(),
            "decode".into(),
            "--device".into(),
            "cpu".into(),
            "--model".into(),
            cfg.clone(),
            "--gqa-kv".into(),
            gqa.into(),
            "--batch".into(),
            "2".into(),
            "--context".into(),
            "16,32".into(),
            "--steps".into(),
            "2".into(),
        ]
    };
    let run = |extra: &[&str]| {
        let mut a = args("4");
        a.extend(extra.iter().map(|s| s.to_string()));
        ok(sigma(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
        ))
    };
    let out = run(&[]);
    let rows = |out: &str| -> Vec<Vec<f64>> {
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|w| w.first().is_some_and(|m| *m == "DiffQKV" || *m == "GQA"))
            .map(|w| {
                w[2..]
                    .iter()
                    .map(|x| match *x {
                        "-" => f64::NAN, // no graph column off a GPU
                        x => x.trim_end_matches('%').parse().expect("a number"),
                    })
                    .collect()
            })
            .collect()
    };
    let heads: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(1)
                .filter(|_| l.starts_with("DiffQKV") || l.starts_with("GQA"))
        })
        .collect();
    // tiny: 8 query heads, DiffQKV 2 K / 4 V heads against GQA 4 / 4.
    assert_eq!(
        heads,
        ["8/2/4", "8/2/4", "8/4/4", "8/4/4"],
        "two models x two contexts:\n{out}"
    );
    // The CPU has no table entry: the bandwidth is measured, and said so.
    assert!(out.contains("(measured on cpu: a copy of 64 MiB"), "{out}");
    let gbps = |out: &str| -> f64 {
        let l = out
            .lines()
            .find(|l| l.starts_with("memory bandwidth"))
            .expect("bandwidth line");
        l.split_whitespace()
            .nth(2)
            .expect("GB/s")
            .parse()
            .expect("GB/s")
    };
    // batch, context, weights MB, cache MB, kernel tok/s, ops tok/s, graph
    // tok/s, kernel ms, graph ms, bound ms, of bound %.
    let check = |out: &str| {
        let g = gbps(out);
        for r in rows(out) {
            let [b, s, w_mb, c_mb, tok_s, ops_tok_s, graph_tok_s, ms, graph_ms, bound_ms, share] =
                r[..]
            else {
                panic!("{r:?}\n{out}");
            };
            // CUDA graphs run on a GPU only.
            assert!(graph_tok_s.is_nan() && graph_ms.is_nan(), "{r:?}\n{out}");
            assert_eq!((b, [16.0, 32.0].contains(&s)), (2.0, true), "{out}");
            assert!(tok_s > 0.0 && ops_tok_s > 0.0 && tok_s.is_finite(), "{r:?}");
            // A step gives one token per sequence.
            let want = b / (ms / 1e3);
            assert!((want - tok_s).abs() < 0.06 + 0.02 * want, "{r:?}: {want}");
            // The bound: (weights + cache) / bandwidth, and the share of it reached.
            let want = (w_mb + c_mb) * 1e6 / (g * 1e9) * 1e3;
            assert!((bound_ms / want - 1.0).abs() < 0.02, "{r:?}: {want}");
            let want = 100.0 * bound_ms / ms;
            assert!((share - want).abs() < 0.006 + 0.02 * want, "{r:?}: {want}");
        }
        // tiny's 2.1 M parameters in fp32 on the CPU (tied embeddings: read by the head).
        assert!(
            rows(out).iter().all(|r| (8.0..9.5).contains(&r[2])),
            "{out}"
        );
    };
    check(&out);
    // --peak-gbps replaces the measurement.
    let out = run(&["--peak-gbps", "1000"]);
    assert!(
        out.contains("memory bandwidth 1000.0 GB/s (--peak-gbps)"),
        "{out}"
    );
    check(&out);
    // A malformed SIGMA_DECODE_TUNING is refused before anything runs, naming the field.
    let a = args("4");
    assert_clean_failure(
        &sigma(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &[("SIGMA_DECODE_TUNING", "max_chunk=256,uv=40")],
        ),
        &["SIGMA_DECODE_TUNING", "uv = 40 is out of range (1 to 16)"],
    );
    let mut a = args("4");
    a.push("--profile".into());
    assert_clean_failure(
        &sigma(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]),
        &["--profile", "needs --device cuda"],
    );
    let a = args("3");
    assert_clean_failure(
        &sigma(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]),
        &["--gqa-kv 3", "must divide the model's 8 query heads"],
    );
}
