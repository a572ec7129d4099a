//! `sigma checkpoint export --format hf`: Hugging Face transformers loads the
//! directory (`trust_remote_code=True`) and its logits equal sigma's own, for
//! DiffQKV with AugQ (tied embeddings) and with projected K compression
//! (untied). Tolerance: both sides compute in fp32 on the CPU with the same
//! libtorch; the attention kernels group the heads differently (sigma repeats
//! the smaller of K and V and uses grouped SDPA, the exported code repeats
//! both to the query heads), which moves logits by ~1e-6; the test allows 1e-4.
//! The exported code's KV cache and padding are checked against its own full
//! forward and sigma's logits (tests/py/hf_logits.py).

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
    // sigma's logits for three sequences, from the checkpoint.
    let loaded = sigma_trainer::infer::eval::load(&ck, Device::Cpu).expect("load");
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
    let lf = d.path().join("sigma-logits.f32");
    std::fs::write(&lf, bytes).expect("write");
    let tf = d.path().join("tokens.json");
    std::fs::write(&tf, serde_json::to_string(&ids).expect("json")).expect("write");
    let o = Command::new(python())
        .arg(repo_root().join("tests/py/hf_logits.py"))
        .args([&export, &tf, &lf])
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
    eprintln!(
        "{name}:\n{}",
        out.lines()
            .filter(|l| !l.contains("Loading weights"))
            .collect::<Vec<_>>()
            .join("\n")
    );
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
