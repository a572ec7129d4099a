//! sigma under a real SLURM (Debian's slurm-wlm, one host): a local cluster
//! from scripts/slurm-local.sh runs these jobs, a few at a time, each with 2
//! CPU ranks of configs/tiny.toml:
//!
//! 1. `time-limit`: launch/slurm/cpu.sbatch with `--time=1
//!    --signal=USR1@50`: SLURM's own signal before the time limit makes the
//!    ranks save; the job requeues itself and continues (again if a run gets
//!    the signal again) and its losses equal bit for bit those of an
//!    uninterrupted `sigma launch` run.
//! 2. `start-up`: the same template, signalled (`scancel --signal=USR1`) as
//!    soon as both ranks have blocked the stop signals, in their first
//!    milliseconds, while libtorch initialises and before any handler
//!    exists: the ranks hold the signal, save after their first step, and the
//!    job requeues and completes.
//!    `early-death`: the templates' rule for a rank that died of the signal
//!    before sigma could hold it (srun exits 138): requeue. Simulated by a
//!    `SIGMA` that kills itself with SIGUSR1 in the job's first run.
//!    `batch-full`, `batch-batch`: `sigma launch` as the batch script itself
//!    (`exec`, no srun), stopped with `scancel --full --signal=USR1` (the
//!    launcher and its ranks) or `scancel --batch --signal=USR1` (the
//!    launcher only): every rank saves once and the launcher exits 75.
//! 3. `launch-a`, `launch-b`: launch/slurm/launch.sbatch (`srun sigma
//!    launch`) twice on the node at once, each with the rendezvous port of
//!    its job id; launch-b is pre-empted with `scancel --signal=USR1`: SLURM
//!    signals the launcher and every rank, the launcher passes the signal on
//!    too, each rank saves once, the launcher exits 75 and the job requeues
//!    and completes.
//!
//! Without SLURM, munge or root: skipped with a message, except under
//! `CI=true`, where that is a failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sigma_tests::*;

/// Steps of the time-limit job and its reference. SLURM sends the
/// `--signal=USR1@50` of a 1-minute job at its first time-limit check (every
/// 30 s, counted from slurmctld's start) at which 50 s or less remain: 10 to
/// 40 s into a run. A run must still be training then, or the job completes
/// unsignalled and the test has nothing to check: 24 steps once finished in
/// 22 s on a quiet 2-core machine. 64 steps take about 50 s there, and the
/// first run shares the cores with the reference run, which lasts as long.
const STEPS: u64 = 64;
/// Longest wait for any one thing a job should do (the jobs share 2 cores).
const WAIT: Duration = Duration::from_secs(300);
/// CPUs the node declares (every job at once; the cores are shared).
const NODE_CPUS: usize = 8;

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

type JobInfo = HashMap<String, String>;

impl Cluster {
    fn up(cpus: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("tmp");
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
        std::fs::create_dir_all(c.jobs_dir()).expect("mkdir");
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn jobs_dir(&self) -> PathBuf {
        self.path("jobs")
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

    /// `sbatch SCRIPT ARGS...` with this environment (the CPU pins included),
    /// `SIGMA` = the sigma under test, and `env` on top; the job id.
    fn submit(
        &self,
        script: &Path,
        opts: &[&str],
        args: &[String],
        env: &[(&str, &str)],
    ) -> String {
        let o = self
            .cmd("sbatch")
            // --export=ALL: the job sees this environment (MKL_CBWR's value
            // holds a comma, which --export=NAME=VALUE cannot carry).
            .args(["--parsable", "--export=ALL"])
            .arg(format!(
                "--output={}",
                self.jobs_dir().join("sigma-%j.out").display()
            ))
            .args(opts)
            .arg(script)
            .arg("configs/tiny.toml")
            .args(args)
            .envs(CPU_PINS)
            .env("SIGMA", sigma_bin())
            .envs(env.iter().copied())
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
    }

    /// The job's output file so far.
    fn output(&self, id: &str) -> String {
        std::fs::read_to_string(self.jobs_dir().join(format!("sigma-{id}.out"))).unwrap_or_default()
    }

    /// `scontrol show job` as key=value pairs (JobState, Restarts, ExitCode, ...).
    fn job(&self, id: &str) -> JobInfo {
        self.run("scontrol", &["show", "job", "-o", id])
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Wait until `done(job)` holds; fail if the job reaches a final state first.
    fn wait_job(&self, id: &str, what: &str, done: impl Fn(&JobInfo) -> bool) -> JobInfo {
        let t0 = Instant::now();
        loop {
            let j = self.job(id);
            if done(&j) {
                return j;
            }
            let state = j.get("JobState").map_or("?", |s| s.as_str());
            assert!(
                !is_final(state),
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

    /// Wait for the job's final state.
    fn wait_end(&self, id: &str) -> JobInfo {
        let t0 = Instant::now();
        loop {
            let j = self.job(id);
            if is_final(&j["JobState"]) {
                return j;
            }
            assert!(t0.elapsed() < WAIT, "job {id} did not end within {WAIT:?}");
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

fn is_final(state: &str) -> bool {
    // Everything else is on its way (PENDING, RUNNING, SIGNALING while SLURM
    // sends a --signal, COMPLETING, REQUEUED, ...).
    matches!(
        state,
        "COMPLETED"
            | "CANCELLED"
            | "FAILED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "BOOT_FAIL"
            | "DEADLINE"
            | "OUT_OF_MEMORY"
            | "SPECIAL_EXIT"
            | "REVOKED"
    )
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

/// The `sigma train` arguments after CONFIG (the templates take CONFIG
/// first): 2 ranks of tiny for `steps` steps, CPU, writing to `out`, `extra`
/// as further `--set`s.
fn train_args(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a = dp_args(out, 2, steps);
    assert_eq!(a[..2], ["--config", "configs/tiny.toml"]);
    a.drain(..2);
    for e in ["train.device=\"cpu\""].iter().chain(extra) {
        a.extend(["--set".to_string(), e.to_string()]);
    }
    a
}

/// The sigma processes (after `exec`) of SLURM job `id`.
fn job_ranks(id: &str, bin: &Path) -> Vec<u32> {
    let want = format!("SLURM_JOB_ID={id}");
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|x| x == bin))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == want.as_bytes()))
        })
        .collect()
}

fn prerequisites() -> bool {
    let missing: Vec<&str> = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol"]
        .into_iter()
        .filter(|b| !on_path(b))
        .collect();
    if !missing.is_empty() {
        skip_unless_ci(&format!(
            "SLURM test needs {} (apt-get install slurm-wlm munge; scripts/setup.sh does this as root)",
            missing.join(", ")
        ));
        return false;
    }
    if !is_root() {
        skip_unless_ci("SLURM test needs root (slurmd runs the jobs)");
        return false;
    }
    true
}

/// A job, the directory it trains into, and a signal to send it once it has
/// logged some steps.
struct Planned {
    name: &'static str,
    id: String,
    out: PathBuf,
    /// (steps logged, scancel arguments before the job id), sent once.
    signal_after: Option<(usize, &'static [&'static str])>,
}

impl Planned {
    fn metrics(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }
}

/// The `SigBlk` (blocked) and `SigCgt` (caught) masks of process `pid`.
fn signal_masks(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
    };
    Some((mask("SigBlk:")?, mask("SigCgt:")?))
}

/// Signal the start-up job as soon as both of its ranks have blocked the
/// stop signals (`sigma`'s pre-initialiser ran), before either has handlers.
fn signal_at_start_up(cluster: &Cluster, id: &str) {
    let bin = std::fs::canonicalize(sigma_bin()).expect("sigma");
    let usr1 = 1u64 << 9;
    let t0 = Instant::now();
    let mut next_look = t0;
    let mut first_seen: Option<Instant> = None;
    loop {
        let r = job_ranks(id, &bin);
        if !r.is_empty() && first_seen.is_none() {
            first_seen = Some(Instant::now());
        }
        let masks: Vec<(u64, u64)> = r.iter().filter_map(|&p| signal_masks(p)).collect();
        if masks.len() == 2 && masks.iter().all(|(blk, _)| blk & usr1 != 0) {
            assert!(
                masks.iter().all(|(_, cgt)| cgt & usr1 == 0),
                "a rank of the start-up job had its handlers before it was seen with SIGUSR1 blocked"
            );
            break;
        }
        if Instant::now() >= next_look {
            // Now and then (scontrol is slow next to this loop).
            next_look = Instant::now() + Duration::from_millis(500);
            let j = cluster.job(id);
            assert!(
                !is_final(&j["JobState"]),
                "start-up job ended before its ranks were seen: {j:?}"
            );
            assert!(
                t0.elapsed() < WAIT,
                "the start-up job's ranks were not seen with the stop signals blocked"
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cluster.run("scancel", &["--signal=USR1", id]);
    eprintln!(
        "start-up job {id}: scancel --signal=USR1 returned {:.0?} after its first rank was seen running sigma (both with the stop signals blocked, no handlers yet)",
        first_seen.map(|t| t.elapsed()).unwrap_or_default()
    );
}

/// Send each job its signal once it has logged enough steps (jobs without
/// one are only watched); fail if one ends first. `together`: two jobs that
/// must be seen running at the same time.
fn signal_when_ready(cluster: &Cluster, jobs: &[&Planned], together: Option<(&Planned, &Planned)>) {
    let mut pending: Vec<&&Planned> = jobs.iter().filter(|j| j.signal_after.is_some()).collect();
    let mut seen_together = together.is_none();
    let t0 = Instant::now();
    while !pending.is_empty() || !seen_together {
        assert!(
            t0.elapsed() < WAIT,
            "jobs {:?} did not get far enough, or two jobs were never seen running together (seen: {seen_together})",
            pending.iter().map(|j| j.name).collect::<Vec<_>>()
        );
        if let Some((a, b)) = together {
            let running = |j: &Planned| cluster.job(&j.id)["JobState"] == "RUNNING";
            seen_together = seen_together || (running(a) && running(b));
        }
        pending.retain(|j| {
            let (after, how) = j.signal_after.expect("planned");
            if steps_logged(&j.metrics()) < after {
                let st = cluster.job(&j.id);
                assert!(
                    !is_final(&st["JobState"]),
                    "{} ended before its signal: {st:?}",
                    j.name
                );
                return true;
            }
            let mut a: Vec<&str> = how.to_vec();
            a.push(&j.id);
            cluster.run("scancel", &a);
            false
        });
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn slurm_templates_pre_emption_start_up_time_limit_and_launch_forms() {
    if !prerequisites() {
        return;
    }
    let t_start = Instant::now();
    // The uninterrupted reference of `time-limit`, while the cluster comes up and the job runs.
    let ref_dir = tempfile::tempdir().expect("tmp");
    let mut ref_args = dp_args(ref_dir.path(), 2, STEPS);
    for e in ["checkpoint.every_steps=5", "train.device=\"cpu\""] {
        ref_args.extend(["--set".to_string(), e.to_string()]);
    }
    let pin = CPU_PINS;
    let reference = std::thread::spawn(move || launch(2, &[], &ref_args, &pin));

    let cluster = Cluster::up(NODE_CPUS);
    let cpu = repo_root().join("launch/slurm/cpu.sbatch");
    let launch_t = repo_root().join("launch/slurm/launch.sbatch");
    for t in [&cpu, &launch_t] {
        let body = std::fs::read_to_string(t).expect("template");
        assert!(body.contains("#SBATCH --signal=USR1@") && !body.contains("--signal=B:"));
        assert!(body.contains("--stopped-exit-code 75") && body.contains("scontrol requeue"));
    }
    let plan = |name: &'static str,
                script: &Path,
                opts: &[&str],
                args: Vec<String>,
                env: &[(&str, &str)],
                signal_after| Planned {
        name,
        id: cluster.submit(script, opts, &args, env),
        out: cluster.path(name),
        signal_after,
    };
    let dir = |name: &str| cluster.path(name);
    // The jobs run a few at a time: the cores are shared (and slurmd and
    // munged must keep up).

    // 1. The time-limit signal (every run of the job gets it 50 s before its
    //    1-minute limit, or earlier): save, requeue, resume, as many times as
    //    it takes, and the losses of an uninterrupted run.
    let time_limit = plan(
        "time-limit",
        &cpu,
        &["--time=1", "--signal=USR1@50"],
        train_args(&dir("time-limit"), STEPS, &["checkpoint.every_steps=5"]),
        &[],
        None,
    );
    check_time_limit(&cluster, &time_limit, reference, ref_dir.path());

    // 2. A signal in the ranks' first milliseconds; the templates' rule for a
    //    rank that died of one; `sigma launch` as the batch script.
    let start_up = plan(
        "start-up",
        &cpu,
        &[],
        train_args(&dir("start-up"), 3, &["checkpoint.every_steps=1000"]),
        &[],
        None,
    );
    signal_at_start_up(&cluster, &start_up.id);
    let early_sigma = dir("die-of-usr1-first.sh");
    write_file(
        &early_sigma,
        b"#!/bin/sh\n# On the job's first run only: die of SIGUSR1 before sigma starts, as a\n# rank signalled before it could block the signal would.\nif [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then kill -USR1 $$; fi\nexec \"$REAL_SIGMA\" \"$@\"\n",
    );
    std::fs::set_permissions(
        &early_sigma,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let real = sigma_bin().to_string_lossy().into_owned();
    let early = plan(
        "early-death",
        &cpu,
        &[],
        train_args(&dir("early-death"), 2, &[]),
        &[
            ("SIGMA", &early_sigma.to_string_lossy()),
            ("REAL_SIGMA", &real),
        ],
        None,
    );
    let batch_script = dir("batch-launch.sbatch");
    write_file(
        &batch_script,
        b"#!/bin/bash\n#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=2\n#SBATCH --open-mode=append\nset -eu\nCONFIG=$1\nshift\nexec \"$SIGMA\" launch --nproc-per-node 2 --log-dir \"$LAUNCH_LOGS\" -- train --config \"$CONFIG\" --stopped-exit-code 75 \"$@\"\n",
    );
    let batch_job = |name: &'static str, how: &'static [&'static str]| {
        let logs = dir(&format!("{name}-logs")).to_string_lossy().into_owned();
        plan(
            name,
            &batch_script,
            &[],
            train_args(&dir(name), 100_000, &["checkpoint.every_steps=1000000"]),
            &[("LAUNCH_LOGS", &logs)],
            Some((2, how)),
        )
    };
    let full = batch_job("batch-full", &["--full", "--signal=USR1"]);
    let batch = batch_job("batch-batch", &["--batch", "--signal=USR1"]);
    signal_when_ready(&cluster, &[&full, &batch], None);
    check_start_up(&cluster, &start_up);
    check_early_death(&cluster, &early);
    check_batch_launch(&cluster, &full);
    check_batch_launch(&cluster, &batch);

    // 3. `srun sigma launch` twice on the node at once, one pre-empted.
    let logs = |n: &str| dir(&format!("{n}-logs")).to_string_lossy().into_owned();
    let (logs_a, logs_b) = (logs("launch-a"), logs("launch-b"));
    let a = plan(
        "launch-a",
        &launch_t,
        &[],
        train_args(&dir("launch-a"), 12, &[]),
        &[("NPROC", "2"), ("LOG_DIR", &logs_a)],
        None,
    );
    let b = plan(
        "launch-b",
        &launch_t,
        &[],
        train_args(&dir("launch-b"), 12, &["checkpoint.every_steps=5"]),
        &[("NPROC", "2"), ("LOG_DIR", &logs_b)],
        Some((3, &["--signal=USR1"][..])),
    );
    signal_when_ready(&cluster, &[&a, &b], Some((&a, &b)));
    check_launch_jobs(&cluster, &a, &b);
    eprintln!("SLURM test: {:.0?} in all", t_start.elapsed());
}

/// `start-up`: the signal sent while the ranks loaded libtorch was held until
/// their handlers were in place: both saved after step 1, the job requeued
/// itself, resumed from step 1 and completed.
fn check_start_up(cluster: &Cluster, p: &Planned) {
    let j = cluster.wait_end(&p.id);
    let out = cluster.output(&p.id);
    assert_eq!(
        (
            j["JobState"].as_str(),
            j["ExitCode"].as_str(),
            j["Restarts"].as_str()
        ),
        ("COMPLETED", "0:0", "1"),
        "start-up: {j:?}\n{out}"
    );
    assert!(
        out.contains("SIGUSR1 received (sent during start-up, held until the handlers were ready)")
            && out.contains("sigma stopped early with a checkpoint saved"),
        "{out}"
    );
    assert!(!out.contains("died of a stop signal"), "{out}");
    assert!(
        out.contains("(step 1,"),
        "the requeued job did not resume from step 1:\n{out}"
    );
    assert_eq!(steps_logged(&p.metrics()), 3, "{out}");
}

/// `time-limit`: SLURM's own signal before the time limit stopped it at a
/// committed checkpoint and it requeued itself (more than once if a run
/// got the signal again), appending to its output; it completed, each run
/// resuming from the step the previous one stopped at, with the losses of
/// the uninterrupted reference.
fn check_time_limit(
    cluster: &Cluster,
    p: &Planned,
    reference: std::thread::JoinHandle<Output>,
    ref_dir: &Path,
) {
    let j = cluster.wait_job(&p.id, "the requeue at the time-limit signal", |j| {
        j.get("Restarts").is_some_and(|r| r != "0")
    });
    let stopped_at = steps_logged(&p.metrics()) as u64;
    let first = cluster.output(&p.id);
    assert!(
        first.contains("SIGUSR1 received") && first.contains("requeueing job"),
        "{j:?}\n{first}"
    );
    assert!(
        stopped_at < STEPS,
        "the job stopped at step {stopped_at} of {STEPS}"
    );
    let ckpts = committed(&p.out.join("checkpoints"));
    assert!(
        ckpts.contains(&stopped_at),
        "no committed checkpoint at the stop step {stopped_at}: {ckpts:?}"
    );
    let j = cluster.wait_end(&p.id);
    let last = cluster.output(&p.id);
    assert_eq!(
        (j["JobState"].as_str(), j["ExitCode"].as_str()),
        ("COMPLETED", "0:0"),
        "{j:?}\n{last}"
    );
    assert!(
        last.contains(&format!("(step {stopped_at},")),
        "the continued job did not resume from step {stopped_at}:\n{last}"
    );
    // --open-mode=append: the requeued run added to the first run's output.
    assert!(last.starts_with(&first[..first.len().min(200)]), "{last}");
    let r = reference.join().expect("reference thread");
    assert!(r.status.success(), "reference run:\n{}", stderr(&r));
    let want = losses(&ref_dir.join("metrics.jsonl"));
    assert_eq!(want.len(), STEPS as usize);
    assert_eq!(
        losses(&p.metrics()),
        want,
        "losses of the job stopped at the time-limit signal (first at step {stopped_at}, {} restart(s)) vs an uninterrupted run",
        j["Restarts"]
    );
}

/// `early-death`: srun exited 138 (its tasks died of SIGUSR1 before sigma
/// started); the template requeued the job, which then completed.
fn check_early_death(cluster: &Cluster, p: &Planned) {
    let j = cluster.wait_end(&p.id);
    let out = cluster.output(&p.id);
    assert_eq!(
        (
            j["JobState"].as_str(),
            j["ExitCode"].as_str(),
            j["Restarts"].as_str()
        ),
        ("COMPLETED", "0:0", "1"),
        "early-death: {j:?}\n{out}"
    );
    assert!(
        out.contains("died of a stop signal (srun exit 138) while starting"),
        "{out}"
    );
    assert_eq!(steps_logged(&p.metrics()), 2, "{out}");
}

/// `launch-a` ran to completion next to `launch-b`; `launch-b` was
/// pre-empted under `srun sigma launch`: every rank saved once (no "exiting
/// now"), the launcher said so, the job requeued and completed every step
/// exactly once from the stop checkpoint.
fn check_launch_jobs(cluster: &Cluster, a: &Planned, b: &Planned) {
    let j = cluster.wait_end(&a.id);
    let out = cluster.output(&a.id);
    assert_eq!(
        (j["JobState"].as_str(), j["ExitCode"].as_str()),
        ("COMPLETED", "0:0"),
        "launch-a: {j:?}\n{out}"
    );
    assert_eq!(steps_logged(&a.metrics()), 12, "{out}");
    let j = cluster.wait_job(&b.id, "the requeue", |j| {
        j.get("Restarts").is_some_and(|r| r != "0")
    });
    let stopped_at = steps_logged(&b.metrics()) as u64;
    let first = cluster.output(&b.id);
    assert!(
        first.contains("every rank saved and stopped (exit status 75)")
            && first.contains("requeueing job"),
        "{first}"
    );
    assert!(!first.contains("exiting now"), "{first}");
    assert!(
        committed(&b.out.join("checkpoints")).contains(&stopped_at),
        "{first}"
    );
    eprintln!(
        "launch-b: rank 0 {} the launcher's copy of SLURM's SIGUSR1",
        if first.contains("a copy of the same stop request") {
            "saw"
        } else {
            "did not see"
        }
    );
    assert_eq!(j["Restarts"], "1", "{j:?}");
    let j = cluster.wait_end(&b.id);
    let out = cluster.output(&b.id);
    assert_eq!(
        (j["JobState"].as_str(), j["ExitCode"].as_str()),
        ("COMPLETED", "0:0"),
        "launch-b: {j:?}\n{out}"
    );
    assert!(out.contains(&format!("(step {stopped_at},")), "{out}");
    assert_eq!(steps_logged(&b.metrics()), 12, "{out}");
}

/// `batch-full` / `batch-batch`: `scancel --full --signal=USR1` (the
/// launcher, which is the batch step, and its ranks) or `--batch` (the
/// launcher only) reached the launcher, which passed it on; each rank saved
/// once and the launcher exited 75. Nothing requeues this form: the job ends
/// with that status.
fn check_batch_launch(cluster: &Cluster, p: &Planned) {
    let j = cluster.wait_end(&p.id);
    let out = cluster.output(&p.id);
    assert_eq!(
        (j["JobState"].as_str(), j["ExitCode"].as_str()),
        ("FAILED", "75:0"),
        "batch-launch: {j:?}\n{out}"
    );
    assert!(
        out.contains("SIGUSR1 passed on to the ranks")
            && out.contains("every rank saved and stopped (exit status 75)"),
        "{out}"
    );
    assert!(!out.contains("exiting now"), "{out}");
    let stopped_at = steps_logged(&p.metrics()) as u64;
    assert_eq!(
        committed(&p.out.join("checkpoints")),
        vec![stopped_at],
        "{out}"
    );
}
