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
