//! Restarts and signals: `sigma launch --max-restarts` brings a job back after
//! a rank is killed (on one node and across two), and the finished job's
//! losses equal an uninterrupted run's bit for bit; Ctrl-C saves and stops
//! (a second one exits at once); a signal during start-up is not lost; losing
//! the rendezvous store's host stops the others with one message.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sigma_tests::*;

/// Pid of the `sigma` process of rank `rank`, attempt `attempt`, of the job on `port`.
fn rank_pid(port: u16, rank: usize, attempt: usize) -> Option<i32> {
    let want = [
        format!("RANK={rank}"),
        format!("MASTER_PORT={port}"),
        format!("SIGMA_RESTART_COUNT={attempt}"),
    ];
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = env
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if want.iter().all(|w| vars.contains(w)) {
            return Some(pid);
        }
    }
    None
}

fn wait_for_steps(metrics: &Path, n: usize, limit: Duration) {
    let t0 = Instant::now();
    while losses_or_none(metrics) < n {
        assert!(
            t0.elapsed() < limit,
            "no {n} steps in {}",
            metrics.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn losses_or_none(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics)
        .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
        .unwrap_or(0)
}

/// `sigma launch` of one node of `nproc` ranks (`node` of `nnodes`), not waited for.
fn start_node(
    nproc: usize,
    nnodes: usize,
    node: usize,
    port: u16,
    extra: &[&str],
    train: &[String],
) -> Child {
    let logs = tempfile::tempdir().expect("tmp").keep();
    sigma_command()
        .args(["launch", "--nproc-per-node", &nproc.to_string()])
        .args([
            "--nnodes",
            &nnodes.to_string(),
            "--node-rank",
            &node.to_string(),
        ])
        .args(["--master-port", &port.to_string(), "--grace-s", "2"])
        .args(["--log-dir", &logs.to_string_lossy()])
        .args(extra)
        .arg("--")
        .arg("train")
        .args(train)
        .env("SIGMA_JOB_SECRET", "restart-test")
        .env("SIGMA_LIVENESS_TIMEOUT_S", "3")
        .env("SIGMA_HEARTBEAT_S", "0.5")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch")
}

fn with_checkpoints(out: &Path, dp: usize, steps: u64) -> Vec<String> {
    let mut a = dp_args(out, dp, steps);
    a.extend(["--set".into(), "checkpoint.every_steps=3".into()]);
    a
}

#[test]
fn a_killed_rank_is_restarted_from_the_checkpoint_and_the_losses_match() {
    const STEPS: u64 = 14;
    // Reference: uninterrupted, 4 ranks on one node.
    let r = tempfile::tempdir().expect("tmp");
    let o = launch(4, &[], &dp_args(r.path(), 4, STEPS), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = losses(&r.path().join("metrics.jsonl"));

    // One node of 4: rank 2 is killed once 5 steps are logged.
    let d = tempfile::tempdir().expect("tmp");
    let p = port();
    let restarts = ["--max-restarts", "1", "--restart-backoff-s", "1"];
    let node = start_node(4, 1, 0, p, &restarts, &with_checkpoints(d.path(), 4, STEPS));
    wait_for_steps(&d.path().join("metrics.jsonl"), 5, Duration::from_secs(120));
    let pid = rank_pid(p, 2, 0).expect("rank 2 running");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    let out = node.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("rank 2 failed (killed by signal 9)") && err.contains("restart 1 of 1"),
        "{err}"
    );
    assert!(err.contains("resume: "), "{err}");
    assert_eq!(losses(&d.path().join("metrics.jsonl")), reference);

    // Two nodes of 2 on loopback: rank 3 (node 1) is killed; both launchers restart.
    let d = tempfile::tempdir().expect("tmp");
    let p = port();
    let train = with_checkpoints(d.path(), 4, STEPS);
    let nodes: Vec<Child> = (0..2)
        .map(|n| start_node(2, 2, n, p, &restarts, &train))
        .collect();
    wait_for_steps(&d.path().join("metrics.jsonl"), 5, Duration::from_secs(120));
    let pid = rank_pid(p, 3, 0).expect("rank 3 running");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    for (i, n) in nodes.into_iter().enumerate() {
        let out = n.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "node {i}: {err}");
        assert!(err.contains("restart 1 of 1"), "node {i}: {err}");
    }
    assert_eq!(losses(&d.path().join("metrics.jsonl")), reference);
}

#[test]
fn a_job_out_of_restarts_fails_naming_the_rank() {
    let d = tempfile::tempdir().expect("tmp");
    // The fault fires in every attempt (each resumes before step 2).
    let o = launch(
        2,
        &["--max-restarts", "1", "--restart-backoff-s", "0"],
        &dp_args(d.path(), 2, 20),
        &[("SIGMA_FAULT_ABORT", "1:2")],
    );
    assert_clean_failure(
        &o,
        &[
            "rank 1 failed",
            "signal 6",
            "after 1 restart(s)",
            "restart 1 of 1",
        ],
    );
}

fn spawn_train(args: &[String], env: &[(&str, &str)]) -> Child {
    let mut c = sigma_command();
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("spawn")
}

#[test]
fn ctrl_c_saves_and_stops_and_a_second_one_exits_at_once() {
    // Ctrl-C with checkpointing configured: save at the end of the step, exit
    // with --stopped-exit-code; the resumed run equals an uninterrupted one.
    let d = tempfile::tempdir().expect("tmp");
    let mut a = tiny_train_args(d.path(), 30, &["checkpoint.every_steps=100"]);
    a.extend(["--stopped-exit-code".into(), "75".into()]);
    let child = spawn_train(&a, &[]);
    wait_for_steps(&d.path().join("metrics.jsonl"), 3, Duration::from_secs(60));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("SIGINT (Ctrl-C) received"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let stopped = losses(&d.path().join("metrics.jsonl")).len() as u64;
    let ck = d
        .path()
        .join(format!("checkpoints/step-{stopped:07}/COMMITTED"));
    assert!(ck.is_file(), "no checkpoint at step {stopped}: {err}");

    // A second Ctrl-C while the first is being handled (the save is slowed
    // down to make room for it): out at once, 130, nothing committed.
    let d2 = tempfile::tempdir().expect("tmp");
    let a = tiny_train_args(d2.path(), 100000, &["checkpoint.every_steps=100000"]);
    let child = spawn_train(&a, &[("SIGMA_FAULT_SAVE_DELAY_MS", "20000")]);
    wait_for_steps(&d2.path().join("metrics.jsonl"), 1, Duration::from_secs(60));
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGINT).expect("SIGINT");
    std::thread::sleep(Duration::from_millis(1000));
    kill(pid, Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("exiting now"), "{err}");

    // Without checkpointing, Ctrl-C ends the run at once.
    let d3 = tempfile::tempdir().expect("tmp");
    let child = spawn_train(&tiny_train_args(d3.path(), 100000, &[]), &[]);
    wait_for_steps(&d3.path().join("metrics.jsonl"), 1, Duration::from_secs(60));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130));
    assert!(!d3.path().join("checkpoints").exists());
}

/// True once process `pid` catches `sig` (its handlers are installed).
fn catches(pid: u32, sig: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (sig as i32 - 1)) != 0)
}

#[test]
fn a_signal_during_start_up_is_not_lost() {
    // Rank 0 starts alone and waits at the rendezvous for rank 1: a SIGUSR1
    // then (a scheduler's pre-emption notice) must not kill it. Both ranks
    // run their first step, save it and stop.
    let p = port().to_string();
    let d = tempfile::tempdir().expect("tmp");
    let args = dp_args(d.path(), 2, 50);
    let r0 = spawn_rank(&args, 0, &p, "s", &[("SIGMA_DIST_TIMEOUT_S", "60")]);
    let t0 = Instant::now();
    while !catches(r0.id(), Signal::SIGUSR1) {
        assert!(t0.elapsed() < Duration::from_secs(30), "no SIGUSR1 handler");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(r0.id() as i32), Signal::SIGUSR1).expect("SIGUSR1");
    let r1 = spawn_rank(&args, 1, &p, "s", &[("SIGMA_DIST_TIMEOUT_S", "60")]);
    for (i, r) in [r0, r1].into_iter().enumerate() {
        let out = r.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rank {i}: {err}");
    }
    assert!(d
        .path()
        .join("checkpoints/step-0000001/COMMITTED")
        .is_file());
    assert_eq!(losses(&d.path().join("metrics.jsonl")).len(), 1);
}

#[test]
fn losing_the_store_host_stops_the_others_with_one_message() {
    let p = port().to_string();
    let d = tempfile::tempdir().expect("tmp");
    let args = dp_args(d.path(), 2, 10_000);
    let env = [
        ("SIGMA_LIVENESS_TIMEOUT_S", "3"),
        ("SIGMA_HEARTBEAT_S", "0.5"),
    ];
    let mut r0 = spawn_rank(&args, 0, &p, "s", &env);
    let r1 = spawn_rank(&args, 1, &p, "s", &env);
    wait_for_steps(&d.path().join("metrics.jsonl"), 2, Duration::from_secs(60));
    r0.kill().expect("kill rank 0");
    let _ = r0.wait();
    let t0 = Instant::now();
    let out = r1.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("frame #"),
        "{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("rank 1") && errors[0].contains("store"),
        "{err}"
    );
}

#[test]
fn sigusr1_to_the_launcher_stops_every_rank_with_their_stop_status() {
    // The ranks exit 75 after saving; the launcher must take that as a stop
    // (not a failure to restart from) and exit 75 itself.
    let d = tempfile::tempdir().expect("tmp");
    let p = port();
    let mut train = dp_args(d.path(), 2, 10_000);
    train.extend(["--stopped-exit-code".into(), "75".into()]);
    let node = start_node(2, 1, 0, p, &["--max-restarts", "2"], &train);
    wait_for_steps(&d.path().join("metrics.jsonl"), 2, Duration::from_secs(60));
    kill(Pid::from_raw(node.id() as i32), Signal::SIGUSR1).expect("SIGUSR1");
    let out = node.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("every rank saved and stopped (exit status 75)"),
        "{err}"
    );
    assert!(!err.contains("restart 1"), "{err}");
    let stopped = losses(&d.path().join("metrics.jsonl")).len() as u64;
    assert!(d
        .path()
        .join(format!("checkpoints/step-{stopped:07}/COMMITTED"))
        .is_file());
}

/// A launcher killed outright (SIGKILL: no chance to stop its ranks) takes
/// its ranks with it, instead of leaving orphans that keep their memory and
/// the job's port.
#[test]
fn ranks_do_not_outlive_a_killed_launcher() {
    let d = tempfile::tempdir().expect("tmp");
    let p = port();
    // One rank: a world of one joins no job, so it neither talks to the
    // store nor heartbeats; nothing but the launcher's death can stop it soon.
    let mut node = sigma_command()
        .args([
            "launch",
            "--nproc-per-node",
            "1",
            "--master-port",
            &p.to_string(),
        ])
        .args(["--log-dir", &d.path().join("logs").to_string_lossy()])
        .arg("--")
        .arg("train")
        .args(dp_args(d.path(), 1, 100_000))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("launch");
    wait_for_steps(&d.path().join("metrics.jsonl"), 2, Duration::from_secs(120));
    let ranks: Vec<i32> = (0..1)
        .map(|r| rank_pid(p, r, 0).unwrap_or_else(|| panic!("rank {r} running")))
        .collect();
    node.kill().expect("SIGKILL the launcher");
    node.wait().expect("reap the launcher");
    let t0 = Instant::now();
    // A killed rank is a zombie until its new parent reaps it: gone or zombie both count.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    };
    while ranks.iter().any(|&r| alive(r)) {
        if t0.elapsed() > Duration::from_secs(10) {
            let left: Vec<i32> = ranks.iter().copied().filter(|&r| alive(r)).collect();
            for &r in &left {
                let _ = kill(Pid::from_raw(r), Signal::SIGKILL);
            }
            panic!("ranks still running 10 s after their launcher was killed: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
