//! Object storage against a real S3-compatible server (moto) on loopback.

use sigma_tests::*;

#[test]
fn prepare_inspect_and_load_through_s3() {
    let server = S3Server::start();
    server.create_bucket("sigma-test");
    let env_owned = server.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = tempfile::tempdir().expect("tmp");
    let synth = d.path().join("synthetic.jsonl.zst");
    let o = sigma(
        &[
            "data",
            "synth",
            "--seed",
            "3",
            "--num-docs",
            "150",
            "--output",
            &synth.to_string_lossy(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // Tokenizer read from S3 as well as the inputs.
    let o = sigma(
        &[
            "data",
            "tokenizer",
            "train",
            "--input",
            &synth.to_string_lossy(),
            "--vocab-size",
            "400",
            "--output",
            "s3://sigma-test/tok/tokenizer.json",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut outs = Vec::new();
    for (i, out) in [
        "s3://sigma-test/shards/synthetic",
        &d.path().join("local").to_string_lossy(),
    ]
    .iter()
    .enumerate()
    {
        let o = sigma(
            &[
                "data",
                "prepare",
                "--input",
                &synth.to_string_lossy(),
                "--domain",
                "synthetic",
                "--tokenizer",
                "s3://sigma-test/tok/tokenizer.json",
                "--output",
                out,
                "--row-group-tokens",
                "4096",
                "--quiet",
            ],
            &env,
        );
        assert!(o.status.success(), "prepare #{i} to {out}: {}", stderr(&o));
        outs.push(out.to_string());
    }
    let o = sigma(
        &[
            "data",
            "inspect",
            "s3://sigma-test/shards/synthetic",
            "--verify",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("sha256 verified"), "{}", stdout(&o));

    // The same data read from S3 and from local files gives the same samples.
    let mut previews = Vec::new();
    for out in &outs {
        let cfg = d.path().join(format!("c{}.toml", previews.len()));
        write_file(&cfg, format!("[data]\nseq_len = 32\n[[data.sources]]\nmanifest = {out:?}\n[data.mixture]\nsynthetic = 1.0\n").as_bytes());
        let o = sigma(
            &[
                "data",
                "preview",
                "--config",
                &cfg.to_string_lossy(),
                "--show",
                "4",
            ],
            &env,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        previews.push(stdout(&o));
    }
    assert_eq!(previews[0], previews[1]);
    assert!(previews[0].contains("Exercise"));
}

/// Download `s3://bucket/key` with boto3 (an independent S3 client) into `dest`.
fn boto3_get(server: &S3Server, bucket: &str, key: &str, dest: &std::path::Path) {
    let script = format!(
        "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1').download_file('{bucket}', '{key}', '{}')",
        server.port,
        dest.display()
    );
    let o = std::process::Command::new(python())
        .args(["-c", &script])
        .output()
        .expect("python");
    assert!(
        o.status.success(),
        "boto3 get {key}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn committed_checkpoints_are_uploaded_to_s3() {
    let server = S3Server::start();
    server.create_bucket("sigma-ck");
    let env_owned = server.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = tempfile::tempdir().expect("tmp");
    let a = tiny_train_args(
        d.path(),
        2,
        &[
            "train.cpu_threads=1",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=1",
            "train.eval_every=0",
            "metrics.plot=false",
            "checkpoint.every_steps=2",
            "checkpoint.async=true",
            "checkpoint.upload=\"s3://sigma-ck/runs/tiny\"",
        ],
    );
    let v: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let o = sigma(&v, &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("uploaded"), "{}", stderr(&o));
    let local = d.path().join("checkpoints/step-0000002");
    for f in [
        "COMMITTED",
        "metadata.json",
        "tokenizer.json",
        "shard-00000-of-00001.safetensors",
    ] {
        let got = d.path().join(format!("downloaded-{f}"));
        boto3_get(
            &server,
            "sigma-ck",
            &format!("runs/tiny/step-0000002/{f}"),
            &got,
        );
        assert_eq!(
            std::fs::read(&got).expect("downloaded"),
            std::fs::read(local.join(f)).expect("local"),
            "{f}"
        );
    }
}
