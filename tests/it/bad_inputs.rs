//! Bad inputs and faults, as a new user meets them: one table, a case a few
//! lines. Every case runs `sigma` on a fresh copy of a small fixture (sample
//! shards, a run with committed checkpoints, a config pointing at both) and
//! asserts: exit code 1, every expected word in the message (the file, field
//! or rank at fault), no panic and no C++ frames in the output, and every file
//! of the fixture byte for byte as it was (nothing written on refusal).
//!
//! To add a case: a `Case` with the arguments (`{F}` stands for the fixture
//! directory), optional environment and preparation, and the words expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sigma_tests::*;

/// The small model of the fixture: tiny's layout at a fraction of the size,
/// so its checkpoints copy in milliseconds.
const SMALL: &[&str] = &[
    "model.d_model=32",
    "model.num_layers=2",
    "model.ffn_dim=64",
    "model.num_q_heads=4",
    "model.num_k_heads=2",
    "model.num_v_heads=4",
    "model.qk_head_dim=8",
    "model.v_head_dim=8",
    "model.aug_q_dim=48",
    "train.micro_batch_size=2",
    "train.grad_accum_steps=1",
    "train.cpu_threads=1",
    "train.eval_steps=1",
    "metrics.plot=false",
    "metrics.tensorboard=false",
];

/// The fixture, built once: `shards/<domain>`, `config.toml` (tiny + SMALL over
/// those shards, output in `run/`), and `run/` after 4 steps with checkpoints
/// at steps 2 and 4.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = process_dir().join("bad-inputs-fixture");
        copy_dir(quickstart_shards(), &dir.join("shards"));
        let mut text = std::fs::read_to_string(repo_root().join("configs/tiny.toml"))
            .expect("configs/tiny.toml");
        let sources = ["general", "system", "synthetic"]
            .iter()
            .map(|d| format!("{{manifest = {:?}}}", dir.join("shards").join(d)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sets: Vec<String> = SMALL.iter().map(|s| s.to_string()).collect();
        sets.push(format!("data.sources=[{sources}]"));
        sets.push(format!("metrics.output_dir={:?}", dir.join("run")));
        sets.push("train.steps=4".into());
        sets.push("checkpoint.every_steps=2".into());
        // Bake the overrides into the fixture's config file.
        let o = sigma(
            &[
                &["train", "--config", "configs/tiny.toml", "--quiet"][..],
                &with_sets(&sets),
            ]
            .concat(),
            &[],
        );
        assert!(o.status.success(), "fixture run: {}", stderr(&o));
        text = std::fs::read_to_string(dir.join("run/config.toml")).unwrap_or(text);
        write_file(&dir.join("config.toml"), text.as_bytes());
        dir
    })
}

fn with_sets(sets: &[String]) -> Vec<&str> {
    sets.iter().flat_map(|s| ["--set", s.as_str()]).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

/// Every file under `dir` (relative path -> content hash).
fn snapshot(dir: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, u64>) {
        for e in std::fs::read_dir(d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("prefix").display().to_string();
                let data = std::fs::read(&p).unwrap_or_default();
                out.insert(rel, xxhash_rust::xxh3::xxh3_64(&data));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

struct Case {
    name: &'static str,
    /// `sigma` arguments; `{F}` is the case's fixture directory.
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    /// Damage done to the fixture before the run.
    prepare: fn(&Path),
    needles: &'static [&'static str],
}

const NONE: fn(&Path) = |_| {};

/// `sigma generate` of one short prompt on the CPU from the fixture's
/// export, and from its last checkpoint.
const GENERATE_EXPORT: &[&str] = &[
    "generate",
    "--checkpoint",
    "{F}/export",
    "--prompt",
    "hi",
    "--device",
    "cpu",
];
const GENERATE_CHECKPOINT: &[&str] = &[
    "generate",
    "--checkpoint",
    "{F}/run/checkpoints/step-0000004",
    "--prompt",
    "hi",
    "--device",
    "cpu",
];

fn train(extra: &'static [&'static str]) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--config", "{F}/config.toml", "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Flip one byte in the middle of `p`.
fn flip(p: &Path) {
    let mut d = std::fs::read(p).expect("read");
    let i = d.len() / 2;
    d[i] ^= 0x5a;
    std::fs::write(p, d).expect("write");
}

fn shard_of(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.extension()
                .is_some_and(|x| x == "safetensors" || x == "parquet")
        })
        .expect("a shard")
}

fn ck(f: &Path) -> PathBuf {
    f.join("run/checkpoints/step-0000004")
}

/// Export the fixture's last checkpoint to `{F}/export`, returned.
fn export(f: &Path) -> PathBuf {
    let out = f.join("export");
    let ck = ck(f).display().to_string();
    let o = sigma(
        &[
            "checkpoint",
            "export",
            &ck,
            "--output",
            &out.display().to_string(),
        ],
        &[],
    );
    assert!(o.status.success(), "export: {}", stderr(&o));
    out
}

/// [`export`], then replace `from` with `to` in the export's config.json.
fn export_edited(f: &Path, from: &str, to: &str) {
    let c = export(f).join("config.json");
    let text = std::fs::read_to_string(&c).expect("config.json");
    let edited = text.replacen(from, to, 1);
    assert_ne!(text, edited, "{from} in config.json");
    std::fs::write(&c, edited).expect("write");
}

/// Replace `from` with `to` in the fixture checkpoint's metadata.json.
fn metadata_edited(f: &Path, from: &str, to: &str) {
    let m = ck(f).join("metadata.json");
    let text = std::fs::read_to_string(&m).expect("metadata");
    let edited = text.replacen(from, to, 1);
    assert_ne!(text, edited, "{from} in metadata.json");
    std::fs::write(&m, edited).expect("write");
}

/// Set `layout.{key}` in the fixture checkpoint's metadata.json.
fn layout_edited(f: &Path, key: &str, value: u64) {
    let m = ck(f).join("metadata.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&m).expect("metadata")).expect("json");
    v["layout"][key] = serde_json::json!(value);
    std::fs::write(&m, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
}

/// Run one case; Err(why) when it fails any of its checks.
fn run_case(c: &Case, args: Vec<String>) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("fx");
    copy_dir(fixture(), &f);
    // The copied config points at the shared fixture: repoint it at this copy.
    let cfg = std::fs::read_to_string(f.join("config.toml"))
        .expect("config")
        .replace(&fixture().display().to_string(), &f.display().to_string());
    std::fs::write(f.join("config.toml"), cfg).expect("config");
    (c.prepare)(&f);
    let before = snapshot(&f);
    let fs = f.display().to_string();
    let args: Vec<String> = args.iter().map(|a| a.replace("{F}", &fs)).collect();
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = sigma(&a, c.env);
    let (out, err) = (stdout(&o), stderr(&o));
    let all = format!("{out}\n{err}");
    let mut why = Vec::new();
    if o.status.code() != Some(1) {
        why.push(format!("exit code {:?}, not 1", o.status.code()));
    }
    for bad in ["panicked", "frame #", "c10::", "RUST_BACKTRACE"] {
        if all.contains(bad) {
            why.push(format!("`{bad}` in the output"));
        }
    }
    for n in c.needles {
        let n = n.replace("{F}", &fs);
        if !all.contains(&n) {
            why.push(format!("the output does not mention {n:?}"));
        }
    }
    let after = snapshot(&f);
    if before != after {
        let changed: Vec<&String> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        why.push(format!("files changed on disk: {changed:?}"));
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}\n    output: {}",
            why.join("; "),
            all.trim().replace('\n', "\n    ")
        ))
    }
}

fn cases() -> Vec<(Case, Vec<String>)> {
    let t = |name, extra: &'static [&'static str], needles| {
        (
            Case {
                name,
                args: &[],
                env: &[],
                prepare: NONE,
                needles,
            },
            train(extra),
        )
    };
    let raw = |name, args: &'static [&'static str], env, prepare, needles| {
        (
            Case {
                name,
                args,
                env,
                prepare,
                needles,
            },
            args.iter().map(|s| s.to_string()).collect(),
        )
    };
    let tp = |name, extra: &'static [&'static str], prepare, needles| {
        (
            Case {
                name,
                args: &[],
                env: &[],
                prepare,
                needles,
            },
            train(extra),
        )
    };
    vec![
        // --- config ---
        raw(
            "missing config file",
            &["train", "--config", "{F}/nope.toml"],
            &[],
            NONE,
            &["{F}/nope.toml", "cannot read"],
        ),
        tp(
            "TOML syntax error",
            &[],
            |f| std::fs::write(f.join("config.toml"), "[train\nsteps = 1").expect("w"),
            &["config.toml", "line"],
        ),
        t(
            "unknown key",
            &["--set", "train.stepz=3"],
            &["train.stepz", "unknown field", "from --set train.stepz=3"],
        ),
        t(
            "empty output directory",
            &["--set", "metrics.output_dir=\"\""],
            &["metrics.output_dir", "is empty"],
        ),
        t(
            "checkpoint directory is a file",
            &["--set", "checkpoint.dir=\"{F}/config.toml\""],
            &["checkpoint.dir", "{F}/config.toml", "not a directory"],
        ),
        t(
            "checkpoint directory below a file",
            &["--set", "checkpoint.dir=\"{F}/config.toml/a/b\""],
            &[
                "checkpoint.dir",
                "{F}/config.toml/a/b is inside {F}/config.toml",
                "not a directory",
            ],
        ),
        t(
            "zero CPU threads",
            &["--set", "train.cpu_threads=0"],
            &["train.cpu_threads", "at least 1"],
        ),
        t(
            "validation that scores nothing",
            &["--set", "train.eval_steps=0", "--set", "train.eval_every=2"],
            &["train.eval_steps", "score nothing"],
        ),
        t(
            "a billion layers",
            &["--set", "model.num_layers=1000000000"],
            &["model.num_layers", "larger than sigma supports"],
        ),
        t(
            "--stop-after past the last step",
            &["--stop-after", "100"],
            &["--stop-after", "100", "train.steps = 4"],
        ),
        t(
            "--stop-after before the checkpoint resumed from",
            &["--resume", "auto", "--stop-after", "1"],
            &["--stop-after", "before step 4"],
        ),
        tp(
            "checkpoint metadata disagreeing with its name and marker",
            &["--resume", "auto"],
            |f| {
                let m = ck(f).join("metadata.json");
                let text = std::fs::read_to_string(&m).expect("metadata");
                let edited = text.replacen("\"step\": 4", "\"step\": 40", 1);
                assert_ne!(text, edited, "the step field");
                std::fs::write(&m, edited).expect("write");
            },
            &["step-0000004", "step 4", "step 40", "metadata.json"],
        ),
        raw(
            "model summary of a model too large to count",
            &[
                "model",
                "summary",
                "--config",
                "{F}/config.toml",
                "--set",
                "model.vocab_size=100000000000000",
            ],
            &[],
            NONE,
            &["model.vocab_size", "larger than sigma supports"],
        ),
        raw(
            "an export whose config.json does not match its weights",
            &["eval", "--checkpoint", "{F}/export", "--device", "cpu"],
            &[],
            |f| export_edited(f, "\"ffn_dim\": 64", "\"ffn_dim\": 96"),
            &["model.safetensors", "config.json", "not one export"],
        ),
        raw(
            "an export whose weights hold layers its config.json does not",
            GENERATE_EXPORT,
            &[],
            |f| export_edited(f, "\"num_layers\": 2", "\"num_layers\": 1"),
            &[
                "model.safetensors",
                "layers.1.",
                "config.json",
                "not one export",
            ],
        ),
        raw(
            "an export of another model type",
            &["eval", "--checkpoint", "{F}/export", "--device", "cpu"],
            &[],
            |f| export_edited(f, "\"model_type\": \"sigma\"", "\"model_type\": \"llama\""),
            &["config.json", "model_type \"llama\"", "not a sigma model"],
        ),
        raw(
            "an export whose tokenizer has more tokens than the model",
            GENERATE_EXPORT,
            &[],
            |f| export_edited(f, "\"vocab_size\": 8192", "\"vocab_size\": 100"),
            &["tokenizer.json", "8192 tokens", "vocab_size of 100"],
        ),
        raw(
            "export of a checkpoint whose config names more layers than it holds",
            &[
                "checkpoint",
                "export",
                "{F}/run/checkpoints/step-0000004",
                "--output",
                "{F}/out",
            ],
            &[],
            |f| metadata_edited(f, "\"num_layers\": 2", "\"num_layers\": 3"),
            &["step-0000004", "has no tensor", "layers.2."],
        ),
        raw(
            "inspect of a checkpoint whose layout names two tensor-parallel ranks over one shard",
            &["checkpoint", "inspect", "{F}/run/checkpoints/step-0000004"],
            &[],
            |f| layout_edited(f, "tp", 2),
            &[
                "step-0000004",
                "metadata.json",
                "shard-00000-of-00001.safetensors is not a shard of its layout dp 1 x cp 1 x tp 2 x pp 1 = 2 rank(s)",
            ],
        ),
        raw(
            "inspect of a checkpoint whose layout and file table name two data-parallel ranks but one shard",
            &["checkpoint", "inspect", "{F}/run/checkpoints/step-0000004"],
            &[],
            |f| {
                layout_edited(f, "dp", 2);
                let m = ck(f).join("metadata.json");
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&m).expect("metadata")).expect("json");
                let files = v["files"].as_object_mut().expect("files");
                let entry = files
                    .remove("shard-00000-of-00001.safetensors")
                    .expect("the fixture's shard");
                files.insert("shard-00000-of-00002.safetensors".into(), entry);
                std::fs::write(&m, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
            },
            &[
                "metadata.json",
                "its layout dp 2 x cp 1 x tp 1 x pp 1 = 2 rank(s), but it lists 1 shard file(s)",
            ],
        ),
        raw(
            "export of a checkpoint whose layout has no data-parallel rank",
            &[
                "checkpoint",
                "export",
                "{F}/run/checkpoints/step-0000004",
                "--output",
                "{F}/out",
            ],
            &[],
            |f| layout_edited(f, "dp", 0),
            &["metadata.json", "layout.dp is 0"],
        ),
        raw(
            "generate from a checkpoint whose layout has ZeRO stage 3",
            GENERATE_CHECKPOINT,
            &[],
            |f| layout_edited(f, "zero", 3),
            &["metadata.json", "layout.zero is 3; it is 0 or 1"],
        ),
        raw(
            "export of a checkpoint with an --init option",
            &[
                "checkpoint",
                "export",
                "{F}/run/checkpoints/step-0000004",
                "--output",
                "{F}/out",
                "--set",
                "model.num_layers=1",
            ],
            &[],
            NONE,
            &["--set applies to --init only"],
        ),
        raw(
            "an export written where a file stands",
            &[
                "checkpoint",
                "export",
                "--init",
                "{F}/config.toml",
                "--output",
                "{F}/config.toml/x",
            ],
            &[],
            NONE,
            &[
                "{F}/config.toml/x",
                "cannot be written",
                "{F}/config.toml is not a directory",
            ],
        ),
        raw(
            "an export written further below a file",
            &[
                "checkpoint",
                "export",
                "--init",
                "{F}/config.toml",
                "--output",
                "{F}/config.toml/a/b/x",
            ],
            &[],
            NONE,
            &[
                "{F}/config.toml/a/b/x",
                "cannot be written",
                "{F}/config.toml is not a directory",
            ],
        ),
        raw(
            "an empty checkpoint path",
            &["generate", "--checkpoint", "", "--prompt", "hi"],
            &[],
            NONE,
            &["--checkpoint: needs a value"],
        ),
        raw(
            "generation past any context",
            &[
                "generate",
                "--checkpoint",
                "{F}/run/checkpoints/step-0000004",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "18446744073709551615",
                "--device",
                "cpu",
            ],
            &[],
            NONE,
            &[
                "--max-new-tokens",
                "18446744073709551615",
                "maximum context",
            ],
        ),
        raw(
            "model summary of a negative sequence length",
            &[
                "model",
                "summary",
                "--config",
                "{F}/config.toml",
                "--set",
                "data.seq_len=-1",
            ],
            &[],
            NONE,
            &["data.seq_len -1", "from 1 to"],
        ),
        t(
            "more micro-batches a step than sigma schedules",
            &["--set", "train.grad_accum_steps=100000000"],
            &["train.grad_accum_steps", "larger than sigma supports"],
        ),
        t(
            "resume of a checkpoint of another model",
            &["--resume", "auto", "--set", "model.ffn_dim=96"],
            &["ffn", "checkpoint"],
        ),
        raw(
            "an export whose tokenizer.json was swapped",
            &["eval", "--checkpoint", "{F}/export", "--device", "cpu"],
            &[],
            |f| {
                let t = export(f).join("tokenizer.json");
                let mut text = std::fs::read(&t).expect("tokenizer.json");
                text.extend_from_slice(b"\n");
                std::fs::write(&t, text).expect("write");
            },
            &[
                "tokenizer.json",
                "not the tokenizer this export was made with",
            ],
        ),
        raw(
            "eval of no tokens",
            &[
                "eval",
                "--checkpoint",
                "{F}/run/checkpoints/step-0000004",
                "--max-tokens",
                "0",
                "--device",
                "cpu",
            ],
            &[],
            NONE,
            &["--max-tokens 0"],
        ),
        raw(
            "eval in batches of nothing",
            &[
                "eval",
                "--checkpoint",
                "{F}/run/checkpoints/step-0000004",
                "--batch",
                "0",
                "--device",
                "cpu",
            ],
            &[],
            NONE,
            &["--batch 0"],
        ),
        raw(
            "a KV cache larger than this machine's memory",
            &[
                "generate",
                "--checkpoint",
                "{F}/run/checkpoints/step-0000004",
                "--prompts",
                "{F}/prompts.txt",
                "--batch",
                "64",
                "--max-new-tokens",
                "16000000",
                "--max-context",
                "16777216",
                "--device",
                "cpu",
            ],
            &[],
            // 64 sequences of 16 M tokens: about 390 GB of cache.
            |f| write_file(&f.join("prompts.txt"), "hello\n".repeat(64).as_bytes()),
            &["KV cache", "GB of host memory"],
        ),
        t(
            "loss chunks with a vocabulary-parallel head",
            &[
                "--set",
                "train.loss_chunk_tokens=64",
                "--set",
                "parallel.tp=2",
            ],
            &["train.loss_chunk_tokens", "vocabulary-parallel"],
        ),
        t(
            "infinite lr from --set",
            &["--set", "optim.lr=inf"],
            &["optim.lr", "not a finite number", "--set optim.lr=inf"],
        ),
        tp(
            "NaN lr in the file",
            &[],
            |f| {
                let p = f.join("config.toml");
                let s: Vec<String> = std::fs::read_to_string(&p)
                    .expect("r")
                    .lines()
                    .map(|l| {
                        if l.starts_with("lr = ") {
                            "lr = nan".to_string()
                        } else {
                            l.to_string()
                        }
                    })
                    .collect();
                std::fs::write(p, s.join("\n")).expect("w");
            },
            &["optim.lr", "not a finite number", "config.toml"],
        ),
        t(
            "NaN inside an array",
            &["--set", "optim.betas=[0.9, nan]"],
            &["optim.betas[1]", "finite"],
        ),
        t(
            "type error in --set",
            &["--set", "train.steps=abc"],
            &["train.steps", "expected u64", "--set train.steps=abc"],
        ),
        t(
            "override without =",
            &["--set", "train.steps"],
            &["--set", "section.key=value"],
        ),
        t(
            "override into a value",
            &["--set", "train.steps.x=1"],
            &["--set", "not a section"],
        ),
        t(
            "unknown enum value",
            &["--set", "train.precision=\"fp16\""],
            &["train.precision", "unknown variant"],
        ),
        t(
            "K heads do not divide Q heads",
            &["--set", "model.num_k_heads=3"],
            &["model.num_k_heads", "divisible"],
        ),
        t(
            "beta out of range",
            &["--set", "optim.betas=[0.9, 1.5]"],
            &["optim.betas"],
        ),
        t(
            "negative weight decay",
            &["--set", "optim.weight_decay=-0.1"],
            &["optim.weight_decay"],
        ),
        t(
            "zero Adam eps",
            &["--set", "optim.eps=0.0"],
            &["optim.eps", "positive"],
        ),
        t(
            "negative peak FLOP/s",
            &["--set", "metrics.peak_flops=-1.0"],
            &["metrics.peak_flops"],
        ),
        t(
            "zero RoPE theta",
            &["--set", "model.rope_theta=0.0"],
            &["model.rope_theta"],
        ),
        t(
            "infinite norm eps",
            &["--set", "model.norm_eps=inf"],
            &["model.norm_eps", "finite"],
        ),
        t(
            "negative init std",
            &["--set", "model.init_std=-0.02"],
            &["model.init_std"],
        ),
        t(
            "min_lr above lr",
            &["--set", "optim.min_lr=1.0"],
            &["optim.lr", "min_lr"],
        ),
        t(
            "zero steps",
            &["--set", "train.steps=0"],
            &["train", "positive"],
        ),
        t(
            "keep_last 0",
            &["--set", "checkpoint.keep_last=0"],
            &["checkpoint.keep_last"],
        ),
        t(
            "negative save interval",
            &["--set", "checkpoint.every_minutes=-1.0"],
            &["checkpoint.every_minutes"],
        ),
        t(
            "negative mixture ratio",
            &["--set", "data.mixture.general=-0.5"],
            &["data.mixture", "non-negative"],
        ),
        t(
            "odd head dim for RoPE",
            &["--set", "model.qk_head_dim=7"],
            &["model.qk_head_dim", "even"],
        ),
        t(
            "dp without processes",
            &["--set", "parallel.dp=2"],
            &["parallel.dp", "WORLD_SIZE"],
        ),
        t(
            "ZeRO stage 3",
            &["--set", "parallel.zero=3"],
            &["parallel.zero"],
        ),
        t(
            "vocabulary smaller than the tokenizer's",
            &["--set", "model.vocab_size=100"],
            &["model.vocab_size", "tokenizer"],
        ),
        t(
            "missing data source",
            &[
                "--set",
                "data.sources=[{manifest = \"/nonexistent/shards\"}]",
            ],
            &["data.sources[0].manifest", "/nonexistent/shards"],
        ),
        t(
            "sequence longer than a domain",
            &["--set", "data.seq_len=10000000"],
            &["data.mixture", "seq_len"],
        ),
        // --- data ---
        tp(
            "corrupt tokenizer next to the shards",
            &[],
            |f| {
                let p = f.join("shards/general/tokenizer.json");
                let s = std::fs::read_to_string(&p).expect("r").replacen(
                    "\"<|endoftext|>\"",
                    "\"<|end|>\"",
                    1,
                );
                std::fs::write(p, s).expect("w");
            },
            &["shards/general/tokenizer.json", "sha256", "manifest"],
        ),
        raw(
            "inspect --verify: edited token count",
            &["data", "inspect", "{F}/shards/system", "--verify"],
            &[],
            |f| {
                let p = f.join("shards/system/manifest.json");
                let mut m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&p).expect("r")).expect("json");
                // Edited consistently (row group and shard total), so only the data can tell.
                let sh = &mut m["shards"][0];
                sh["tokens"] = serde_json::json!(sh["tokens"].as_u64().expect("tokens") + 7);
                let rg = &mut sh["row_groups"][0]["tokens"];
                *rg = serde_json::json!(rg.as_u64().expect("tokens") + 7);
                std::fs::write(p, serde_json::to_vec_pretty(&m).expect("json")).expect("w");
            },
            &[
                "not healthy",
                "shards/system",
                "row group 0",
                "counts were edited",
            ],
        ),
        raw(
            "inspect --verify: edited shard total",
            &["data", "inspect", "{F}/shards/system", "--verify"],
            &[],
            |f| {
                let p = f.join("shards/system/manifest.json");
                let mut m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&p).expect("r")).expect("json");
                m["shards"][0]["documents"] = serde_json::json!(1);
                std::fs::write(p, serde_json::to_vec_pretty(&m).expect("json")).expect("w");
            },
            &["manifest.json", "add up to"],
        ),
        raw(
            "inspect --verify: damaged tokenizer",
            &["data", "inspect", "{F}/shards/system", "--verify"],
            &[],
            |f| {
                let p = f.join("shards/system/tokenizer.json");
                let s = std::fs::read_to_string(&p).expect("r").replacen(
                    "\"<|endoftext|>\"",
                    "\"<|end|>\"",
                    1,
                );
                std::fs::write(p, s).expect("w");
            },
            &["not healthy", "tokenizer.json", "sha256"],
        ),
        raw(
            "inspect a directory that is not prepared",
            &["data", "inspect", "{F}/run"],
            &[],
            NONE,
            &["{F}/run", "manifest"],
        ),
        raw(
            "prepare from a missing input",
            &[
                "data",
                "prepare",
                "--input",
                "{F}/none.jsonl",
                "--domain",
                "x",
                "--tokenizer",
                "data/sample/tokenizer.json",
                "--output",
                "{F}/out",
                "--quiet",
            ],
            &[],
            NONE,
            &["{F}/none.jsonl"],
        ),
        raw(
            "prepare over prepared data without --overwrite",
            &[
                "data",
                "prepare",
                "--input",
                "data/sample/general.jsonl.zst",
                "--domain",
                "general",
                "--tokenizer",
                "data/sample/tokenizer.json",
                "--output",
                "{F}/shards/general",
                "--quiet",
            ],
            &[],
            NONE,
            &["{F}/shards/general", "--overwrite"],
        ),
        // Found mid-run: the run's own files go elsewhere, the shards must stay as they are.
        tp(
            "damaged shard",
            &["--set", "metrics.output_dir=\"{F}/../out\""],
            |f| flip(&shard_of(&f.join("shards/synthetic"))),
            &["synthetic"],
        ),
        // --- checkpoints ---
        t(
            "resume from a missing path",
            &["--resume", "/nonexistent/step-0000009"],
            &["/nonexistent/step-0000009", "no such directory"],
        ),
        t(
            "resume with another model",
            &["--resume", "auto", "--set", "model.num_k_heads=4"],
            &["checkpoint", "shape"],
        ),
        tp(
            "resume from an uncommitted save",
            &["--resume", "{F}/run/checkpoints/step-0000004"],
            |f| {
                std::fs::remove_file(ck(f).join("COMMITTED")).expect("rm");
            },
            &["step-0000004", "not committed"],
        ),
        tp(
            "resume from a damaged shard",
            &["--resume", "auto"],
            |f| flip(&shard_of(&ck(f))),
            &["checksum mismatch", "step-0000004"],
        ),
        tp(
            "resume from a truncated shard",
            &["--resume", "auto"],
            |f| {
                let p = shard_of(&ck(f));
                let d = std::fs::read(&p).expect("r");
                std::fs::write(&p, &d[..d.len() / 2]).expect("w");
            },
            &["step-0000004", "truncated"],
        ),
        tp(
            "resume with unreadable metadata",
            &["--resume", "auto"],
            |f| {
                std::fs::write(ck(f).join("metadata.json"), "{ not json").expect("w");
            },
            &["metadata.json"],
        ),
        raw(
            "export into a non-empty directory",
            &[
                "checkpoint",
                "export",
                "{F}/run/checkpoints/step-0000004",
                "--output",
                "{F}/shards",
            ],
            &[],
            NONE,
            &["{F}/shards", "not empty"],
        ),
        raw(
            "export with an unknown dtype",
            &[
                "checkpoint",
                "export",
                "{F}/run/checkpoints/step-0000004",
                "--output",
                "{F}/exp",
                "--dtype",
                "f16",
            ],
            &[],
            NONE,
            &["--dtype f16"],
        ),
        raw(
            "export with a damaged tokenizer",
            &[
                "checkpoint",
                "export",
                "{F}/run/checkpoints/step-0000004",
                "--output",
                "{F}/exp",
            ],
            &[],
            |f| flip(&ck(f).join("tokenizer.json")),
            &["tokenizer.json", "checksum mismatch"],
        ),
        raw(
            "inspect a missing checkpoint",
            &["checkpoint", "inspect", "{F}/run/checkpoints/step-0000099"],
            &[],
            NONE,
            &["step-0000099"],
        ),
        // --- launch and environment ---
        raw(
            "launch with no processes",
            &[
                "launch",
                "--nproc-per-node",
                "0",
                "--",
                "train",
                "--config",
                "{F}/config.toml",
            ],
            &[],
            NONE,
            &["--nproc-per-node"],
        ),
        raw(
            "launch of two nodes without a secret",
            &[
                "launch",
                "--nproc-per-node",
                "1",
                "--nnodes",
                "2",
                "--",
                "train",
                "--config",
                "{F}/config.toml",
            ],
            &[("SIGMA_JOB_SECRET", "")],
            NONE,
            &["SIGMA_JOB_SECRET"],
        ),
        raw(
            "rank not below the world size",
            &["train", "--config", "{F}/config.toml"],
            &[
                ("RANK", "3"),
                ("WORLD_SIZE", "2"),
                ("SIGMA_JOB_SECRET", "x"),
            ],
            NONE,
            &["RANK", "rank 3"],
        ),
        raw(
            "several processes without a secret",
            &[
                "train",
                "--config",
                "{F}/config.toml",
                "--set",
                "parallel.dp=2",
            ],
            &[("RANK", "0"), ("WORLD_SIZE", "2")],
            NONE,
            &["SIGMA_JOB_SECRET"],
        ),
        raw(
            "bad MASTER_PORT",
            &[
                "train",
                "--config",
                "{F}/config.toml",
                "--set",
                "parallel.dp=2",
            ],
            &[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("SIGMA_JOB_SECRET", "x"),
                ("MASTER_PORT", "http"),
            ],
            NONE,
            &["MASTER_PORT", "\"http\""],
        ),
        raw(
            "bad timeout variable",
            &[
                "train",
                "--config",
                "{F}/config.toml",
                "--set",
                "parallel.dp=2",
            ],
            &[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("SIGMA_JOB_SECRET", "x"),
                ("SIGMA_DIST_TIMEOUT_S", "soon"),
            ],
            NONE,
            &["SIGMA_DIST_TIMEOUT_S"],
        ),
        // --- faults ---
        t(
            "a model larger than sigma supports",
            &["--set", "model.ffn_dim=100000000000"],
            &["model.ffn_dim", "larger than sigma supports"],
        ),
        t(
            "a model larger than this machine's memory",
            &[
                "--set",
                "model.d_model=65536",
                "--set",
                "model.ffn_dim=1048576",
            ],
            &[
                "initialising the model needs about",
                "GB of host memory",
                "available",
            ],
        ),
        t(
            "output directory is a file",
            &["--set", "metrics.output_dir=\"{F}/config.toml\""],
            &["metrics.output_dir", "{F}/config.toml", "not a directory"],
        ),
    ]
}

/// Every case, each reported on its own: the test fails naming every case
/// that failed and why.
#[test]
fn bad_inputs_fail_cleanly_and_change_nothing() {
    let all = cases();
    assert!(all.len() >= 40, "{} cases", all.len());
    let mut names = std::collections::BTreeSet::new();
    let mut failed = Vec::new();
    // A case may name its arguments directly (`raw`) or be a `train` run.
    for (c, args) in &all {
        assert!(names.insert(c.name), "two cases named `{}`", c.name);
        let args = if c.args.is_empty() {
            args.clone()
        } else {
            c.args.iter().map(|s| s.to_string()).collect()
        };
        match run_case(c, args) {
            Ok(()) => eprintln!("ok      {}", c.name),
            Err(why) => {
                eprintln!("FAILED  {}", c.name);
                failed.push(format!("case `{}`: {why}", c.name));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} bad-input cases failed:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
}
