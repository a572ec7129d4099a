//! `sigma checkpoint export --format hf`: Hugging Face transformers loads the
//! directory (`trust_remote_code=True`) and its logits equal sigma's own, for
//! DiffQKV with AugQ (tied embeddings) and with projected K compression
//! (untied). Tolerance: both sides compute in fp32 on the CPU with the same
//! libtorch and group the heads the same way (the smaller of K and V
//! repeated to the other's head count, grouped SDPA), so the full forward
//! agrees to the bit here; cached decoding moves logits by ~1e-6; the test
//! allows 1e-4.
//! The exported code's KV cache (dynamic and static) and padding are checked
//! against its own full forward and sigma's logits (tests/py/hf_logits.py).
//! `sigma checkpoint export --init` (a freshly initialised model, no
//! training) gives the weights a run of the config starts from, loads in
//! `sigma generate`, and transformers computes sigma's logits from it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use sigma_tests::*;
use tch::{Device, Kind, Tensor};

fn has_transformers() -> bool {
    Command::new(python())
        .args(["-c", "import transformers, torch"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Train tiny for 3 steps with `extra` overrides and return its checkpoint.
fn checkpoint(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let mut sets = vec![
        "checkpoint.every_steps=3",
        "train.cpu_threads=1",
        "metrics.plot=false",
    ];
    sets.extend_from_slice(extra);
    let a = tiny_train_args(&dir.join("run"), 3, &sets);
    let o = sigma(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    dir.join("run/checkpoints/step-0000003")
}

fn compare(name: &str, extra: &[&str]) {
    let d = tempfile::tempdir().expect("tmp");
    let ck = checkpoint(d.path(), extra);
    let export = d.path().join("hf");
    export_checkpoint(&ck, &export, &["--format", "hf"]);
    same_logits(name, &ck, &export, d.path());
}

/// The files of a Hugging Face export are there; transformers' logits from
/// `export` equal sigma's from `source` (a checkpoint or an export) within
/// 1e-4, and the exported code's cache, padding and generate() checks pass.
fn same_logits(name: &str, source: &Path, export: &Path, dir: &Path) {
    for f in [
        "model.safetensors",
        "config.json",
        "modeling_sigma.py",
        "configuration_sigma.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(export.join(f).is_file(), "{name}: no {f}");
    }
    // sigma's logits for three sequences.
    let loaded = sigma_trainer::infer::eval::load(source, Device::Cpu).expect("load");
    let ids: Vec<Vec<i64>> = (0..3)
        .map(|s| {
            (0..24)
                .map(|i| ((i * 37 + s * 101 + 5) % 8192) as i64)
                .collect()
        })
        .collect();
    let flat: Vec<i64> = ids.iter().flatten().copied().collect();
    let tokens = Tensor::from_slice(&flat).view([3, 24]);
    let logits = tch::no_grad(|| loaded.fwd().forward(&tokens))
        .to_kind(Kind::Float)
        .contiguous();
    let mut bytes = vec![0u8; logits.numel() * 4];
    logits.copy_data_u8(&mut bytes, logits.numel());
    let lf = dir.join("sigma-logits.f32");
    std::fs::write(&lf, bytes).expect("write");
    let tf = dir.join("tokens.json");
    std::fs::write(&tf, serde_json::to_string(&ids).expect("json")).expect("write");
    let o = Command::new(python())
        .arg(repo_root().join("tests/py/hf_logits.py"))
        .args([export, &tf, &lf])
        .arg("1e-4")
        .output()
        .expect("python");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "{name}: transformers disagrees with sigma:\n{out}"
    );
    assert!(out.contains("max |transformers - sigma|"), "{out}");
    assert!(out.contains("static and the dynamic cache"), "{out}");
    eprintln!(
        "{name}:\n{}",
        out.lines()
            .filter(|l| !l.contains("Loading weights"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every weight of a loaded model by name, in fp32.
fn weights(m: &sigma_trainer::model::Model) -> BTreeMap<String, Tensor> {
    m.params
        .specs
        .iter()
        .zip(&m.params.tensors)
        .map(|(s, t)| (s.name(), t.to_kind(Kind::Float)))
        .collect()
}

#[test]
fn transformers_loads_the_export_and_matches_sigmas_logits() {
    assert!(
        has_transformers(),
        "transformers is not installed in {} (scripts/setup.sh installs it)",
        python()
    );
    compare("DiffQKV 8/2/4 + AugQ, tied", &[]);
    compare(
        "projected K compression, untied",
        &[
            "model.k_compression=\"projected\"",
            "model.k_dim=8",
            "model.tie_embeddings=false",
        ],
    );
}

#[test]
fn init_export_is_a_runs_first_weights_and_loads_in_sigma_and_transformers() {
    assert!(
        has_transformers(),
        "transformers is not installed in {} (scripts/setup.sh installs it)",
        python()
    );
    let d = tempfile::tempdir().expect("tmp");
    let config = repo_root().join("configs/tiny.toml");
    let cfg = config.to_string_lossy();
    let export = |out: &Path, extra: &[&str]| {
        let out = out.to_string_lossy();
        let mut a = vec!["checkpoint", "export", "--init", &cfg, "--output", &out];
        a.extend_from_slice(extra);
        let o = sigma(&a, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("initialised with seed"),
            "{}",
            stdout(&o)
        );
    };
    let hf = d.path().join("hf");
    export(&hf, &["--seed", "3", "--format", "hf"]);
    // The weights a one-device run of the config with train.seed = 3 starts from.
    let run = sigma_trainer::RunConfig::load(&cfg, &[]).expect("config");
    let fresh = sigma_trainer::model::Model::new(
        &run.model,
        &sigma_trainer::model::ModelInit {
            seed: 3,
            decay_norms: run.optim.decay_norms,
            decay_embeddings: run.optim.decay_embeddings,
            device: Device::Cpu,
            mixed: false,
        },
    );
    let want = weights(&fresh);
    let loaded = sigma_trainer::infer::eval::load(&hf, Device::Cpu).expect("load the export");
    let got = weights(&loaded.model);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        assert!(
            got[name].equal(w),
            "{name} differs from the run's initial draw"
        );
    }
    // Another seed, other weights; bf16 holds the fp32 draws rounded.
    let other = d.path().join("seed0-bf16");
    export(&other, &["--dtype", "bf16"]);
    let b = weights(
        &sigma_trainer::infer::eval::load(&other, Device::Cpu)
            .expect("load")
            .model,
    );
    let name = "embed.weight";
    assert!(!b[name].equal(&want[name]), "seed 0 drew seed 3's weights");
    let seed3_bf16 = d.path().join("seed3-bf16");
    export(&seed3_bf16, &["--seed", "3", "--dtype", "bf16"]);
    let b = weights(
        &sigma_trainer::infer::eval::load(&seed3_bf16, Device::Cpu)
            .expect("load")
            .model,
    );
    for (name, w) in &want {
        let rounded = w.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        assert!(
            b[name].equal(&rounded),
            "{name}: bf16 export is not the draw rounded"
        );
    }
    // sigma generate reads it.
    let h = hf.to_string_lossy();
    let o = sigma(
        &[
            "generate",
            "--checkpoint",
            &h,
            "--device",
            "cpu",
            "--prompt",
            "The manual page",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("The manual page"), "{}", stdout(&o));
    // transformers computes sigma's logits from it (and passes the cache checks).
    same_logits("--init tiny, seed 3", &hf, &hf, d.path());
}

#[test]
fn init_export_refuses_bad_requests() {
    let d = tempfile::tempdir().expect("tmp");
    let tiny = repo_root().join("configs/tiny.toml");
    let big = repo_root().join("configs/sigma-1.5b.toml");
    let (tiny, big) = (tiny.to_string_lossy(), big.to_string_lossy());
    let out = d.path().join("out");
    let out = out.to_string_lossy();
    let nope = d.path().join("nope.toml");
    let nope = nope.to_string_lossy();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--init", &big],
            vec!["names no tokenizer", "--tokenizer"],
        ),
        (vec!["--init", &nope], vec!["nope.toml", "cannot read"]),
        (
            vec!["--init", &tiny, "--set", "model.vocab_size=100"],
            vec!["model.vocab_size", "smaller than the vocabulary"],
        ),
        (
            vec!["--init", &tiny, "--set", "model.num_k_heads=3"],
            vec!["num_k_heads"],
        ),
        (
            vec![
                "--init",
                &tiny,
                "--tokenizer",
                "/nonexistent/tokenizer.json",
            ],
            vec!["--tokenizer", "not found"],
        ),
        (
            vec![
                "--init",
                &tiny,
                "--set",
                "model.num_layers=4000",
                "--set",
                "model.d_model=8192",
            ],
            vec!["host memory"],
        ),
        (vec!["--seed", "3"], vec!["--init"]),
        (
            vec!["some/checkpoint", "--init", &tiny],
            vec!["cannot be used with"],
        ),
    ];
    for (extra, needles) in cases {
        let mut a = vec!["checkpoint", "export", "--output", &out];
        a.extend_from_slice(&extra);
        assert_clean_failure(&sigma(&a, &[]), &needles);
        assert!(!Path::new(&*out).exists(), "{extra:?} wrote {out}");
    }
}
