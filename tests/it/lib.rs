//! Helpers shared by the integration tests: paths, running the `sigma` binary,
//! sample shards prepared once per test process, and a loopback S3 server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sigma_data::prepare::{prepare, PrepareOptions};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn sample(name: &str) -> String {
    repo_root()
        .join("data/sample")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The `sigma` binary next to this test binary (target/<profile>/sigma).
pub fn sigma_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = dir.join("sigma");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release, as scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The CPU kernel choice for every sigma a test starts. libtorch picks its
/// own kernels and MKL its matrix-multiply code by the CPU's instruction set
/// (AVX-512 where the CPU has it), and those round some reductions
/// differently, so numbers recorded on one x86-64 machine (the golden losses)
/// would not reproduce bit for bit on another: libtorch's pinned to AVX2
/// (`ATEN_CPU_CAPABILITY`) and MKL's to its AVX2 path in strict mode
/// (`MKL_CBWR`; without it MKL's sgemm still differs between CPUs that both
/// have AVX-512). AVX2 is on every x86-64 CPU CI runs on; `scripts/test.sh`
/// exports the same for the test process itself.
pub const CPU_PINS: [(&str, &str); 2] =
    [("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2,STRICT")];

/// A `sigma` command in the repository root, with the pinned CPU kernels.
pub fn sigma_command() -> Command {
    let mut c = Command::new(sigma_bin());
    c.current_dir(repo_root()).envs(CPU_PINS);
    c
}

/// Run `sigma args...` with extra environment variables.
pub fn sigma(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = sigma_command();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run sigma")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert a command failed cleanly: non-zero exit, no panic, stderr mentions every needle.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert_eq!(o.status.code(), Some(1), "exit code; stderr:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}:\n{err}");
    }
}

/// A directory that lives for the whole test process.
pub fn process_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
}

/// Shards for the three sample domains, prepared once per process with small
/// row groups (so windows, epochs and ranged reads are exercised). The
/// synthetic domain is kept small (120 documents) so tests cross its epochs.
pub fn sample_shards() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let root = process_dir().join("shards");
        let synth = process_dir().join("synthetic-small.jsonl");
        sigma_data::synth::write(&synth, 7, 120).expect("synth");
        let synth = synth.to_string_lossy().into_owned();
        prepare_domains(
            &root,
            &[
                sample("general.jsonl.zst"),
                sample("system.jsonl.zst"),
                synth,
            ],
            8192,
        );
        root
    })
}

/// Prepare the general, system and synthetic domains (inputs in that order)
/// under `root/<domain>` with the sample tokenizer and 5 % validation.
fn prepare_domains(root: &Path, inputs: &[String], row_group_tokens: u64) {
    for (domain, input) in ["general", "system", "synthetic"].iter().zip(inputs) {
        let mut o = PrepareOptions::new(
            vec![input.clone()],
            domain,
            &sample("tokenizer.json"),
            &root.join(domain).to_string_lossy(),
        );
        o.row_group_tokens = row_group_tokens;
        o.valid_fraction = 0.05;
        prepare(&o).expect("prepare sample shards");
    }
}

/// A `[data]` config over the sample shards.
pub fn sample_config(extra: &str) -> String {
    let root = sample_shards();
    let mut s = String::from("[data]\nseq_len = 64\nseed = 5\nshuffle_window = 4\n");
    s.push_str(extra);
    for d in ["general", "system", "synthetic"] {
        s.push_str(&format!(
            "[[data.sources]]\nmanifest = {:?}\n",
            root.join(d).to_string_lossy()
        ));
    }
    s
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, data).expect("write");
}

/// Python interpreter for test services: $SIGMA_PYTHON, else the repo's .venv, else python3.
pub fn python() -> String {
    if let Ok(p) = std::env::var("SIGMA_PYTHON") {
        return p;
    }
    let venv = repo_root().join(".venv/bin/python");
    if venv.exists() {
        return venv.to_string_lossy().into_owned();
    }
    "python3".into()
}

/// A moto S3 server on a loopback port, stopped on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    pub fn start() -> S3Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let child = Command::new(python())
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto (scripts/setup.sh installs moto[server] into .venv)");
        let s = S3Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto server did not start on port {port} (is moto[server] installed in {}?)",
                python()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// Create a bucket (moto accepts an unsigned PUT /bucket).
    pub fn create_bucket(&self, bucket: &str) {
        let mut c = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        write!(c, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).expect("send");
        let mut resp = String::new();
        c.read_to_string(&mut resp).expect("read");
        assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Shards prepared exactly as scripts/quickstart.sh prepares them (the data the
/// tiny config and its golden losses are defined on).
pub fn quickstart_shards() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let root = process_dir().join("quickstart-shards");
        let inputs = ["general", "system", "synthetic"].map(|d| sample(&format!("{d}.jsonl.zst")));
        prepare_domains(&root, &inputs, 65536);
        root
    })
}

/// The `--set` value that points a config's data at the quickstart shards.
pub fn quickstart_sources_set() -> String {
    let root = quickstart_shards();
    let sources: Vec<String> = ["general", "system", "synthetic"]
        .iter()
        .map(|d| format!("{{manifest = {:?}}}", root.join(d).to_string_lossy()))
        .collect();
    format!("data.sources=[{}]", sources.join(", "))
}

/// `sigma checkpoint export CK --output OUT` (plus `extra`), which must succeed.
pub fn export_checkpoint(ck: &Path, out: &Path, extra: &[&str]) {
    let (ck, out) = (ck.to_string_lossy(), out.to_string_lossy());
    let mut a = vec!["checkpoint", "export", &ck, "--output", &out];
    a.extend_from_slice(extra);
    let o = sigma(&a, &[]);
    assert!(o.status.success(), "export: {}", stderr(&o));
}

/// `sigma train` arguments for configs/tiny.toml on the quickstart shards.
pub fn tiny_train_args(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        "--config".into(),
        "configs/tiny.toml".into(),
        "--quiet".into(),
    ];
    for s in [
        format!("train.steps={steps}"),
        "train.log_every=1".into(),
        format!("metrics.output_dir={:?}", out.to_string_lossy()),
        quickstart_sources_set(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    for e in extra {
        a.push("--set".into());
        a.push(e.to_string());
    }
    a
}

/// Losses of the step records in a metrics.jsonl.
pub fn losses(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .expect("metrics.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

/// Tolerance between data-parallel layouts: ranks reduce gradients in rank
/// order, so a data-parallel run adds the same per-sample contributions in a
/// different grouping than one process does; each regrouped fp32 addition can
/// move a result by 2^-24 relative (about 6e-8). Over the first steps that
/// stays far below 1e-5 relative in the loss, which is what the tests allow.
pub const REL_TOL: f64 = 1e-5;

pub fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

/// Training arguments (after `train`) for tiny with a global batch of 16 samples.
pub fn dp_args(out: &std::path::Path, dp: usize, steps: u64) -> Vec<String> {
    let mbs = if dp == 1 { 8 } else { 16 / dp };
    let accum = 16 / (mbs * dp);
    let mut a = tiny_train_args(
        out,
        steps,
        &[
            &format!("parallel.dp={dp}"),
            &format!("train.micro_batch_size={mbs}"),
            &format!("train.grad_accum_steps={accum}"),
            "train.cpu_threads=1",
            "train.eval_every=0",
            // Several gradient buckets even for the tiny model.
            "parallel.bucket_mb=0.2",
            "metrics.plot=false",
        ],
    );
    a.remove(0); // "train"
    a
}

pub fn launch(
    nproc: usize,
    extra: &[&str],
    train: &[String],
    env: &[(&str, &str)],
) -> std::process::Output {
    let logs = tempfile::tempdir().expect("tmp");
    let mut args: Vec<String> = vec![
        "launch".into(),
        "--nproc-per-node".into(),
        nproc.to_string(),
        "--master-port".into(),
        port().to_string(),
        "--log-dir".into(),
        logs.path().to_string_lossy().into_owned(),
        "--grace-s".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.push("train".into());
    args.extend(train.iter().cloned());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    sigma(&a, env)
}

/// Start rank `rank` of a 2-process job by hand (no launcher), srun-style.
pub fn spawn_rank(
    args: &[String],
    rank: usize,
    port: &str,
    secret: &str,
    extra_env: &[(&str, &str)],
) -> std::process::Child {
    let mut c = sigma_command();
    c.arg("train")
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .env("SIGMA_JOB_SECRET", secret)
        .env("SIGMA_DIST_TIMEOUT_S", "5")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.spawn().expect("spawn rank")
}

pub fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= REL_TOL * x.abs(),
            "{what}: step {} loss {x} vs {y}",
            i + 1
        );
    }
}

// ---------------------------------------------------------------------------
// Prerequisites of tests that need root or system packages (SLURM, network
// namespaces). CI has every one of them, so there a missing one is a failure,
// not a skip.

/// True when running under CI (`CI=true`, as CI services set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// A test that cannot run on this machine for `why`: under CI that fails the
/// test (every prerequisite is installed there); elsewhere it prints
/// `skipped: <why>` and the caller returns.
pub fn skip_unless_ci(why: &str) {
    assert!(
        !in_ci(),
        "CI=true, but this test cannot run: {why} (CI has every prerequisite: install it, or fix the machine)"
    );
    eprintln!("skipped: {why}");
}
