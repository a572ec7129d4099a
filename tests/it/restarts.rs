//! Restarts and signals: `sigma launch --max-restarts` brings a job back after
//! a rank is killed (on one node and across two), and the finished job's
//! losses equal an uninterrupted run's bit for bit; Ctrl-C saves and stops
//! (a copy of it changes nothing, a second one later exits at once); a signal
//! during start-up is not lost, even while libtorch initialises or before a
//! launched rank has run at all; copies of one signal to the ranks and the
//! launcher save once, and the launcher reports each rank truthfully; losing
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

    // While the first is being handled (the save is slowed down to make room):
    // a copy soon after it changes nothing (SLURM and `sigma launch` both
    // deliver one request); a second Ctrl-C after the copy window exits at
    // once, 130, nothing committed.
    let d2 = tempfile::tempdir().expect("tmp");
    let a = tiny_train_args(d2.path(), 100000, &["checkpoint.every_steps=100000"]);
    let child = spawn_train(&a, &[("SIGMA_FAULT_SAVE_DELAY_MS", "20000")]);
    wait_for_steps(&d2.path().join("metrics.jsonl"), 1, Duration::from_secs(60));
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGINT).expect("SIGINT");
    std::thread::sleep(Duration::from_millis(300));
    kill(pid, Signal::SIGINT).expect("SIGINT");
    std::thread::sleep(sigma_trainer::signals::DUPLICATE_WINDOW + Duration::from_millis(500));
    kill(pid, Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("a copy of the same stop request"), "{err}");
    assert!(err.contains("exiting now"), "{err}");
    assert!(
        !d2.path()
            .join("checkpoints/step-0000001/COMMITTED")
            .exists(),
        "{err}"
    );

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

/// The `SigBlk` (blocked) and `SigCgt` (caught) masks of process `pid`, if it is running.
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

fn bit(sig: Signal) -> u64 {
    1 << (sig as i32 - 1)
}

/// The path process `pid` runs (its `exec`ed program).
fn exe_of(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[test]
fn a_stop_signal_while_libtorch_initialises_is_held_and_acted_on() {
    // `sigma train` started directly (as srun starts it): the stop signals are
    // blocked before libtorch's static initialisers run (~0.4 s before
    // `main`), so a SIGUSR1 then stays pending until the handlers are in
    // place: the run saves at the end of its first step and exits with its
    // stop status. The timeline is printed (exec, signals blocked, handlers).
    let d = tempfile::tempdir().expect("tmp");
    let mut a = tiny_train_args(d.path(), 1000, &["checkpoint.every_steps=100000"]);
    a.extend(["--stopped-exit-code".into(), "75".into()]);
    let bin = std::fs::canonicalize(sigma_bin()).expect("sigma");
    let t0 = Instant::now();
    let child = spawn_train(&a, &[]);
    let pid = child.id();
    let (mut exec_at, mut blocked_at, mut sent_at, mut caught_at) = (None, None, None, None);
    while caught_at.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no SIGUSR1 handler");
        let Some((blk, cgt)) = signal_masks(pid) else {
            break; // exited
        };
        let now = t0.elapsed();
        if exec_at.is_none() && exe_of(pid).as_deref() == Some(bin.as_path()) {
            exec_at = Some(now);
        }
        if exec_at.is_some() && blocked_at.is_none() && blk & bit(Signal::SIGUSR1) != 0 {
            blocked_at = Some(now);
        }
        if cgt & bit(Signal::SIGUSR1) != 0 {
            caught_at = Some(now);
        } else if blocked_at.is_some() && sent_at.is_none() {
            kill(Pid::from_raw(pid as i32), Signal::SIGUSR1).expect("SIGUSR1");
            sent_at = Some(now);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    eprintln!(
        "start-up timeline from spawn: exec seen {exec_at:?}, stop signals blocked {blocked_at:?}, SIGUSR1 sent {sent_at:?}, handlers installed {caught_at:?}"
    );
    if blocked_at.is_none() || sent_at.is_none() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        panic!("the stop signals were never seen blocked before the handlers were installed");
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("SIGUSR1 received (sent during start-up, held until the handlers were ready)"),
        "{err}"
    );
    assert_eq!(losses(&d.path().join("metrics.jsonl")).len(), 1, "{err}");
    assert!(d
        .path()
        .join("checkpoints/step-0000001/COMMITTED")
        .is_file());
}

#[test]
fn ranks_of_sigma_launch_start_with_the_stop_signals_blocked() {
    // A signal to a rank before it has installed its handlers (here: as soon
    // as it has `exec`ed) is held, not fatal: every rank saves at the end of
    // its first step and stops, and the launcher says so.
    let d = tempfile::tempdir().expect("tmp");
    let p = port();
    let mut train = dp_args(d.path(), 2, 10_000);
    train.extend(["--stopped-exit-code".into(), "75".into()]);
    let mut node = start_node(2, 1, 0, p, &[], &train);
    let t0 = Instant::now();
    let mut pending: Vec<usize> = vec![0, 1];
    let mut rank0_had_handlers = false;
    let mut unblocked = None;
    while !pending.is_empty() && unblocked.is_none() && t0.elapsed() < Duration::from_secs(60) {
        pending.retain(|&r| {
            let Some(pid) = rank_pid(p, r, 0) else {
                return true;
            };
            let (blk, cgt) = signal_masks(pid as u32).expect("rank running");
            if blk & bit(Signal::SIGUSR1) == 0 {
                unblocked = Some(r);
                return false;
            }
            if cgt & bit(Signal::SIGUSR1) != 0 {
                eprintln!("note: rank {r} had its handlers before it was seen");
                rank0_had_handlers |= r == 0;
            }
            kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("SIGUSR1");
            false
        });
        std::thread::sleep(Duration::from_millis(1));
    }
    if unblocked.is_some() || !pending.is_empty() {
        // Its ranks die with it (parent-death signal).
        let _ = node.kill();
        let _ = node.wait();
        panic!(
            "rank {unblocked:?} started with SIGUSR1 unblocked, or ranks {pending:?} did not start"
        );
    }
    let out = node.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("every rank saved and stopped (exit status 75)"),
        "{err}"
    );
    // Rank 0 prints how it got the signal (rank 1 writes to its log).
    assert!(
        rank0_had_handlers || err.contains("held until the handlers were ready"),
        "{err}"
    );
    assert_eq!(losses(&d.path().join("metrics.jsonl")).len(), 1, "{err}");
    assert!(d
        .path()
        .join("checkpoints/step-0000001/COMMITTED")
        .is_file());
}

/// `sigma launch` of 2 ranks on `port` with restarts allowed, the ranks
/// stopping with status 75, checkpoints slowed down by `save_delay_ms`.
fn start_slow_saving_node(out: &Path, port: u16, save_delay_ms: &str) -> Child {
    let mut train = dp_args(out, 2, 10_000);
    train.extend(["--stopped-exit-code".into(), "75".into()]);
    train.extend(["--set".into(), "checkpoint.every_steps=100000".into()]);
    sigma_command()
        .args(["launch", "--nproc-per-node", "2", "--max-restarts", "2"])
        .args(["--master-port", &port.to_string(), "--grace-s", "2"])
        .args(["--log-dir", &out.join("logs").to_string_lossy()])
        .arg("--")
        .arg("train")
        .args(&train)
        .env("SIGMA_FAULT_SAVE_DELAY_MS", save_delay_ms)
        .env("SIGMA_LIVENESS_TIMEOUT_S", "3")
        .env("SIGMA_HEARTBEAT_S", "0.5")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch")
}

#[test]
fn copies_of_one_stop_signal_save_once_and_the_launcher_reports_each_rank() {
    // `srun sigma launch` at the time limit: SLURM sends SIGTERM to every
    // process of the step, the ranks and the launcher, which passes it on.
    // Each rank gets it twice (the save is slowed down, so the copy comes
    // while it saves), saves once and exits with the stop status.
    let d = tempfile::tempdir().expect("tmp");
    let p = port();
    let node = start_slow_saving_node(d.path(), p, "2000");
    let metrics = d.path().join("metrics.jsonl");
    wait_for_steps(&metrics, 2, Duration::from_secs(60));
    for r in 0..2 {
        let pid = rank_pid(p, r, 0).expect("rank running");
        kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
    }
    // The launcher's copy comes later than the direct one, as a separate delivery.
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(node.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let out = node.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("every rank saved and stopped (exit status 75)"),
        "{err}"
    );
    assert!(err.contains("a copy of the same stop request"), "{err}");
    assert!(!err.contains("exiting now"), "{err}");
    let stopped = losses(&metrics).len() as u64;
    assert!(d
        .path()
        .join(format!("checkpoints/step-{stopped:07}/COMMITTED"))
        .is_file());

    // A rank that really exits without saving (a second SIGTERM well after
    // the first, while the save is slowed down): the launcher names each
    // rank's status, fails, and does not restart.
    let d = tempfile::tempdir().expect("tmp");
    let p = port();
    let node = start_slow_saving_node(d.path(), p, "15000");
    wait_for_steps(&d.path().join("metrics.jsonl"), 1, Duration::from_secs(60));
    let rank1 = rank_pid(p, 1, 0).expect("rank 1 running");
    kill(Pid::from_raw(node.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    std::thread::sleep(sigma_trainer::signals::DUPLICATE_WINDOW + Duration::from_secs(1));
    kill(Pid::from_raw(rank1), Signal::SIGTERM).expect("SIGTERM");
    let out = node.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("every rank saved and stopped"), "{err}");
    assert!(!err.contains("restart 1"), "{err}");
    assert!(
        err.contains("not every rank saved a checkpoint and stopped")
            && err.contains("rank 1: exit code 130: exited without saving"),
        "{err}"
    );
}
