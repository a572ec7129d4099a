//! sigma under a real SLURM (Debian's slurm-wlm, one host): a local cluster
//! from scripts/slurm-local.sh, a 2-task CPU job through
//! launch/slurm/cpu.sbatch, pre-empted with SIGUSR1, continued (the template
//! requeues itself; by hand where sigma has no `--stopped-exit-code` yet), and
//! its losses compared bit for bit with an uninterrupted `sigma launch` run.
//!
//! Skipped (with a message) where SLURM or munge is not installed or the test
//! does not run as root (slurmd must be root).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sigma_tests::*;

const STEPS: u64 = 24;
/// Pre-empt once this many steps are in metrics.jsonl.
const PREEMPT_AFTER: usize = 7;
const WAIT: Duration = Duration::from_secs(150);

fn on_path(bin: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(bin).is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// A cluster from scripts/slurm-local.sh in a temp dir; torn down on drop.
/// A failing test prints the jobs' output files and the daemons' log tails.
struct Cluster {
    dir: tempfile::TempDir,
    conf: String,
}

impl Cluster {
    fn up() -> Cluster {
        let dir = tempfile::tempdir().expect("tmp");
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let o = Command::new(repo_root().join("scripts/slurm-local.sh"))
            .args(["up", &dir.path().to_string_lossy()])
            .args(["--cpus", &cpus.to_string()])
            .output()
            .expect("run scripts/slurm-local.sh");
        // From here on, a failure tears down whatever was started.
        let mut c = Cluster {
            dir,
            conf: String::new(),
        };
        assert!(
            o.status.success(),
            "slurm-local.sh up failed:\n{}",
            text(&o)
        );
        c.conf = stdout(&o)
            .lines()
            .find_map(|l| l.strip_prefix("export SLURM_CONF=").map(str::to_string))
            .unwrap_or_else(|| panic!("no SLURM_CONF in:\n{}", text(&o)));
        c
    }

    fn jobs_dir(&self) -> PathBuf {
        self.dir.path().join("jobs")
    }

    /// A SLURM client command for this cluster.
    fn cmd(&self, bin: &str) -> Command {
        let mut c = Command::new(bin);
        c.env("SLURM_CONF", &self.conf).current_dir(repo_root());
        c
    }

    fn run(&self, bin: &str, args: &[&str]) -> String {
        let o = self
            .cmd(bin)
            .args(args)
            .output()
            .expect("run a SLURM command");
        assert!(o.status.success(), "{bin} {args:?}:\n{}", text(&o));
        stdout(&o)
    }

    /// `scontrol show job` as key=value pairs (JobState, Restarts, ExitCode, ...).
    fn job(&self, id: &str) -> HashMap<String, String> {
        self.run("scontrol", &["show", "job", "-o", id])
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Wait until `done(job)` holds; fail if the job reaches a final state first.
    fn wait_job(&self, id: &str, what: &str, done: impl Fn(&HashMap<String, String>) -> bool) {
        let t0 = Instant::now();
        loop {
            let j = self.job(id);
            if done(&j) {
                return;
            }
            let state = j.get("JobState").map_or("?", |s| s.as_str());
            assert!(
                matches!(
                    state,
                    "PENDING" | "RUNNING" | "COMPLETING" | "REQUEUED" | "CONFIGURING"
                ),
                "job {id} ended ({state}, exit code {}) while waiting for {what}",
                j.get("ExitCode").map_or("?", |s| s.as_str())
            );
            assert!(
                t0.elapsed() < WAIT,
                "job {id}: no {what} within {WAIT:?} (state {state})"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn report(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.jobs_dir()) {
            for e in rd.flatten() {
                let body = std::fs::read_to_string(e.path()).unwrap_or_default();
                s += &format!("--- job output {}:\n{body}\n", e.path().display());
            }
        }
        if let Ok(o) = Command::new(repo_root().join("scripts/slurm-local.sh"))
            .args(["logs", &self.dir.path().to_string_lossy(), "30"])
            .output()
        {
            s += &text(&o);
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        let o = Command::new(repo_root().join("scripts/slurm-local.sh"))
            .args(["down", &self.dir.path().to_string_lossy()])
            .output();
        match o {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("slurm-local.sh down failed:\n{}", text(&o)),
            Err(e) => eprintln!("slurm-local.sh down: {e}"),
        }
    }
}

/// Steps in a metrics.jsonl so far (0 while it does not exist).
fn steps_logged(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics)
        .map(|s| s.lines().filter(|l| l.contains("\"loss\"")).count())
        .unwrap_or(0)
}

/// Committed checkpoint steps under `dir`.
fn committed(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("COMMITTED").is_file())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

#[test]
fn cpu_template_preempted_and_continued_matches_an_uninterrupted_run() {
    let missing: Vec<&str> = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol"]
        .into_iter()
        .filter(|b| !on_path(b))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipped: SLURM test needs {} (apt-get install slurm-wlm munge; scripts/setup.sh does this as root)",
            missing.join(", ")
        );
        return;
    }
    if !is_root() {
        eprintln!("skipped: SLURM test needs root (slurmd runs the jobs)");
        return;
    }
    // Every sigma started here uses the same CPU kernels (bit-identical losses).
    let pin = CPU_PINS;
    let extra = ["checkpoint.every_steps=5", "train.device=\"cpu\""];
    let with_extra = |mut a: Vec<String>| {
        for e in extra {
            a.extend(["--set".to_string(), e.to_string()]);
        }
        a
    };

    // The uninterrupted reference, while the cluster comes up and the job runs.
    let ref_dir = tempfile::tempdir().expect("tmp");
    let ref_args = with_extra(dp_args(ref_dir.path(), 2, STEPS));
    let reference = std::thread::spawn(move || launch(2, &[], &ref_args, &pin));

    let cluster = Cluster::up();
    let template = repo_root().join("launch/slurm/cpu.sbatch");
    let body = std::fs::read_to_string(&template).expect("cpu.sbatch");
    assert!(body.contains("#SBATCH --signal=USR1@") && !body.contains("--signal=B:"));
    assert!(body.contains("--stopped-exit-code 75") && body.contains("scontrol requeue"));
    let help = stdout(&sigma(&["train", "--help"], &[]));
    let self_requeue = help.contains("--stopped-exit-code");
    let script = if self_requeue {
        template
    } else {
        eprintln!(
            "note: this sigma has no --stopped-exit-code: the job is submitted without it and resubmitted by hand"
        );
        let p = cluster.dir.path().join("cpu-no-stopped-exit-code.sbatch");
        write_file(&p, body.replace(" --stopped-exit-code 75", "").as_bytes());
        p
    };

    let out = cluster.dir.path().join("run");
    // The template takes CONFIG first, then `sigma train` arguments.
    let mut train = with_extra(dp_args(&out, 2, STEPS));
    assert_eq!(train[..2], ["--config", "configs/tiny.toml"]);
    train.drain(..2);
    std::fs::create_dir_all(cluster.jobs_dir()).expect("mkdir");
    let output = cluster.jobs_dir().join("sigma-%j.out");
    let submit = || -> String {
        let o = cluster
            .cmd("sbatch")
            // --export=ALL: the job sees this environment, the CPU pins included
            // (MKL_CBWR's value holds a comma, which --export=NAME=VALUE cannot).
            .args(["--parsable", "--export=ALL"])
            .envs(CPU_PINS)
            .arg(format!("--output={}", output.display()))
            .arg(&script)
            .arg("configs/tiny.toml")
            .args(&train)
            .env("SIGMA", sigma_bin())
            .output()
            .expect("sbatch");
        assert!(o.status.success(), "sbatch:\n{}", text(&o));
        let id = stdout(&o)
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .to_string();
        assert!(!id.is_empty(), "sbatch printed no job id:\n{}", text(&o));
        id
    };
    let id = submit();
    let metrics = out.join("metrics.jsonl");
    cluster.wait_job(&id, &format!("{PREEMPT_AFTER} steps"), |_| {
        steps_logged(&metrics) >= PREEMPT_AFTER
    });

    // SIGUSR1 to the tasks, as `--signal=USR1@T` sends it (without --full: not the batch shell).
    cluster.run("scancel", &["--signal=USR1", &id]);
    let job_out = cluster.jobs_dir().join(format!("sigma-{id}.out"));
    let final_id = if self_requeue {
        // The script sees srun exit 75 and requeues the job: it waits (cred_expire) as PENDING.
        cluster.wait_job(&id, "the requeue", |j| {
            j.get("Restarts").is_some_and(|r| r != "0")
        });
        let j = cluster.job(&id);
        assert_eq!(j["Restarts"], "1", "{j:?}");
        id
    } else {
        cluster.wait_job(&id, "the end of the job", |j| {
            !matches!(j["JobState"].as_str(), "PENDING" | "RUNNING" | "COMPLETING")
        });
        let j = cluster.job(&id);
        assert_eq!(
            (j["JobState"].as_str(), j["ExitCode"].as_str()),
            ("COMPLETED", "0:0"),
            "a job stopped by SIGUSR1 ends cleanly"
        );
        submit()
    };
    let stopped_at = steps_logged(&metrics) as u64;
    let ckpts = committed(&out.join("checkpoints"));
    assert!(
        stopped_at >= PREEMPT_AFTER as u64 && stopped_at < STEPS,
        "the job stopped at step {stopped_at} of {STEPS}"
    );
    assert!(
        ckpts.contains(&stopped_at),
        "no committed checkpoint at the stop step {stopped_at}: {ckpts:?}"
    );
    let first = std::fs::read_to_string(&job_out).expect("job output");
    if self_requeue {
        assert!(first.contains("requeueing job"), "{first}");
    }

    cluster.wait_job(&final_id, "completion", |j| j["JobState"] == "COMPLETED");
    let j = cluster.job(&final_id);
    assert_eq!(j["ExitCode"], "0:0", "{j:?}");
    let last = std::fs::read_to_string(cluster.jobs_dir().join(format!("sigma-{final_id}.out")))
        .expect("job output");
    assert!(
        last.contains(&format!("(step {stopped_at},")),
        "the continued job did not resume from step {stopped_at}:\n{last}"
    );
    if self_requeue {
        // --open-mode=append: the requeued run added to the first run's output.
        assert!(last.starts_with(&first[..first.len().min(200)]), "{last}");
    }

    let r = reference.join().expect("reference thread");
    assert!(r.status.success(), "reference run:\n{}", stderr(&r));
    let want = losses(&ref_dir.path().join("metrics.jsonl"));
    let got = losses(&metrics);
    assert_eq!(want.len(), STEPS as usize);
    assert_eq!(
        got, want,
        "losses of the pre-empted SLURM job (stopped at step {stopped_at}) vs an uninterrupted run"
    );
}
