//! Data parallelism on CPU with several processes: equivalence with one
//! process, two "nodes" on loopback, a lost rank (crashed, killed, or
//! frozen), a wrong job secret.
//!
//! Tolerance: see `REL_TOL` in lib.rs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use sigma_tests::*;

#[test]
fn dp_2_and_4_follow_the_single_process_trajectory() {
    let one = tempfile::tempdir().expect("tmp");
    let mut a = dp_args(one.path(), 1, 5);
    a.insert(0, "train".into());
    let o = sigma(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let base = losses(&one.path().join("metrics.jsonl"));
    let base_val = val_losses(&one.path().join("metrics.jsonl"));
    for dp in [2, 4] {
        let d = tempfile::tempdir().expect("tmp");
        let o = launch(dp, &[], &dp_args(d.path(), dp, 5), &[]);
        assert!(o.status.success(), "dp {dp}: {}", stderr(&o));
        assert_close(
            &base,
            &losses(&d.path().join("metrics.jsonl")),
            &format!("dp = {dp}"),
        );
        // Validation is split over the ranks (each scores every dp-th batch)
        // and summed: dp 2 scores the windows one process does (same
        // micro-batch), so it gives the same loss per domain.
        if dp == 2 {
            let val = val_losses(&d.path().join("metrics.jsonl"));
            assert_eq!(val.len(), base_val.len(), "{val:?} vs {base_val:?}");
            for (k, v) in &base_val {
                assert!(
                    (val[k] - v).abs() <= REL_TOL * v.abs(),
                    "dp 2 validation loss of {k}: {} vs {v}",
                    val[k]
                );
            }
        }
    }
}

/// The last validation record of a metrics file: loss per domain.
fn val_losses(metrics: &std::path::Path) -> std::collections::BTreeMap<String, f64> {
    let text = std::fs::read_to_string(metrics).expect("metrics.jsonl");
    let last = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v.get("val_loss").is_some())
        .expect("a validation record");
    last["val_loss"]
        .as_object()
        .expect("domains")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().expect("loss")))
        .collect()
}

/// Two `sigma launch` "nodes" of two ranks each; node `i` runs under
/// `prefix[i]` (e.g. `ip netns exec NS`). Returns the job's losses.
fn two_node_losses(prefix: [&[&str]; 2], master_addr: &str) -> Vec<f64> {
    let d = tempfile::tempdir().expect("tmp");
    let p = port().to_string();
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            let logs = tempfile::tempdir().expect("tmp").keep();
            let bin = sigma_bin();
            let mut argv: Vec<String> = prefix[node].iter().map(|s| s.to_string()).collect();
            argv.push(bin.to_string_lossy().into_owned());
            let mut c = Command::new(&argv[0]);
            c.current_dir(repo_root())
                .envs(CPU_PINS)
                .args(&argv[1..])
                .args(["launch", "--nproc-per-node", "2", "--nnodes", "2"])
                .args(["--node-rank", &node.to_string(), "--master-port", &p])
                .args(["--master-addr", master_addr])
                .args(["--log-dir", &logs.to_string_lossy(), "--", "train"])
                .args(dp_args(d.path(), 4, 4))
                .env("SIGMA_JOB_SECRET", "two-node-test")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            c.spawn().expect("launch node")
        })
        .collect();
    for (i, n) in nodes.into_iter().enumerate() {
        let out = n.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "node {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    losses(&d.path().join("metrics.jsonl"))
}

fn one_node_of_four_losses() -> Vec<f64> {
    let one = tempfile::tempdir().expect("tmp");
    let o = launch(4, &[], &dp_args(one.path(), 4, 4), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    losses(&one.path().join("metrics.jsonl"))
}

#[test]
fn two_nodes_of_two_ranks_on_loopback_match_one_node_of_four() {
    // Same ranks, same data, same reduction order: identical to the bit.
    assert_eq!(
        one_node_of_four_losses(),
        two_node_losses([&[], &[]], "127.0.0.1")
    );
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct NetNs {
    names: [String; 2],
}

impl NetNs {
    /// None when this machine does not allow it (not root, no `ip`, no netns support).
    fn create() -> Option<NetNs> {
        let id = std::process::id() % 100_000;
        let names = [format!("sigA{id}"), format!("sigB{id}")];
        let ns = NetNs { names };
        let (a, b) = (&ns.names[0], &ns.names[1]);
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", a],
            vec!["netns", "add", b],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", a],
            vec!["link", "set", &vb, "netns", b],
            vec!["-n", a, "addr", "add", "10.231.0.1/24", "dev", &va],
            vec!["-n", b, "addr", "add", "10.231.0.2/24", "dev", &vb],
            vec!["-n", a, "link", "set", &va, "up"],
            vec!["-n", b, "link", "set", &vb, "up"],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", b, "link", "set", "lo", "up"],
        ];
        for s in steps {
            let ok = Command::new("ip")
                .args(&s)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|st| st.success());
            if !ok {
                eprintln!(
                    "network namespaces unavailable here (`ip {}` failed)",
                    s.join(" ")
                );
                return None;
            }
        }
        Some(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", n]).status();
        }
    }
}

#[test]
fn two_nodes_in_separate_network_namespaces_match_one_node_of_four() {
    let Some(ns) = NetNs::create() else {
        // Covered on loopback by the test above; this machine forbids namespaces.
        skip_unless_ci("needs root and iproute2 to create network namespaces");
        return;
    };
    let (a, b) = (ns.names[0].as_str(), ns.names[1].as_str());
    // Node 0 (and the store) in namespace A at 10.231.0.1; node 1 reaches it over the veth pair.
    let two = two_node_losses(
        [&["ip", "netns", "exec", a], &["ip", "netns", "exec", b]],
        "10.231.0.1",
    );
    assert_eq!(one_node_of_four_losses(), two);
}

#[test]
fn a_lost_rank_stops_the_job_and_is_named() {
    // With the launcher: rank 1 crashes at step 2.
    let d = tempfile::tempdir().expect("tmp");
    let t0 = Instant::now();
    let o = launch(
        2,
        &[],
        &dp_args(d.path(), 2, 50),
        &[("SIGMA_FAULT_ABORT", "1:2")],
    );
    assert_clean_failure(&o, &["rank 1 failed", "signal 6", "SIGMA_FAULT_ABORT"]);
    assert!(t0.elapsed() < Duration::from_secs(60));
    // Without a launcher (srun-style: each process started on its own), rank 1
    // killed outright (kill -9) after 2 steps: rank 0, which hosts the store,
    // sees rank 1's connection close and stops within a heartbeat or two,
    // naming it, long before the liveness timeout (30 s by default) and the
    // collective timeout (120 s here).
    let (out0, took) = lose_rank_1(Signal::SIGKILL, &[]);
    eprintln!("rank 0 stopped {took:?} after rank 1 was killed");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_clean_failure(
        &out0,
        &["rank 0", "rank(s) 1 lost", "connection to the store closed"],
    );
    // A rank that falls silent with its connection open (a frozen process; a
    // lost node looks the same): the heartbeat timeout names it.
    let env = [
        ("SIGMA_LIVENESS_TIMEOUT_S", "3"),
        ("SIGMA_HEARTBEAT_S", "0.5"),
    ];
    let (out0, took) = lose_rank_1(Signal::SIGSTOP, &env);
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_clean_failure(&out0, &["rank 0", "rank(s) 1 lost", "no heartbeat"]);
    // Frozen with a short collective timeout instead: the collective names the missing rank.
    let (out0, _) = lose_rank_1(Signal::SIGSTOP, &[("SIGMA_DIST_TIMEOUT_S", "5")]);
    assert_clean_failure(&out0, &["rank(s) 1 did not arrive", "all_reduce", "`dp`"]);
}

/// Steps in a metrics.jsonl so far (0 while it does not exist).
fn steps_logged(metrics: &std::path::Path) -> usize {
    std::fs::read_to_string(metrics)
        .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
        .unwrap_or(0)
}

/// Two ranks started by hand (srun-style, rank 0 hosting the store); once 2
/// steps are logged, rank 1 gets `sig`. Rank 0's output, and how long it ran
/// after the signal. Rank 1 is killed at the end whatever `sig` was.
fn lose_rank_1(sig: Signal, env: &[(&str, &str)]) -> (std::process::Output, Duration) {
    let p = port().to_string();
    let d = tempfile::tempdir().expect("tmp");
    let args = dp_args(d.path(), 2, 10_000);
    let mut env = env.to_vec();
    env.insert(0, ("SIGMA_DIST_TIMEOUT_S", "120"));
    let r0 = spawn_rank(&args, 0, &p, "s", &env);
    let mut r1 = spawn_rank(&args, 1, &p, "s", &env);
    let metrics = d.path().join("metrics.jsonl");
    let t0 = Instant::now();
    while steps_logged(&metrics) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no 2 steps logged");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(Pid::from_raw(r1.id() as i32), sig).expect("signal rank 1");
    let t0 = Instant::now();
    let out0 = r0.wait_with_output().expect("wait");
    let took = t0.elapsed();
    let _ = r1.kill();
    let _ = r1.wait();
    (out0, took)
}

#[test]
fn sigma_launch_takes_its_port_from_master_port_or_the_slurm_job_id() {
    // A port of the per-job range, free here and then held: the launcher
    // started for that job id (no --master-port, no MASTER_PORT) must try
    // exactly it, fail to listen, and say where the port came from.
    let (held, p) = (20000..29500u16)
        .find_map(|p| {
            std::net::TcpListener::bind(("0.0.0.0", p))
                .ok()
                .map(|l| (l, p))
        })
        .expect("a free port in 20000-29499");
    let id = (p - 20000).to_string();
    let run = |env: &[(&str, &str)]| {
        let mut c = sigma_command();
        c.args(["launch", "--nproc-per-node", "1", "--", "train"])
            .args(["--config", "configs/tiny.toml"])
            .env_remove("MASTER_PORT")
            .env_remove("SLURM_JOB_ID");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run sigma launch")
    };
    let o = run(&[("SLURM_JOB_ID", &id)]);
    assert_clean_failure(
        &o,
        &[
            &format!("port {p} (derived from SLURM_JOB_ID {id})"),
            "--master-port or MASTER_PORT",
        ],
    );
    // MASTER_PORT comes first (here: the held port, under another job id).
    let o = run(&[("SLURM_JOB_ID", "7"), ("MASTER_PORT", &p.to_string())]);
    assert_clean_failure(&o, &[&format!("port {p} (MASTER_PORT)")]);
    let o = run(&[("MASTER_PORT", "http")]);
    assert_clean_failure(&o, &["environment MASTER_PORT", "not a port"]);
    drop(held);
}

#[test]
fn a_process_with_the_wrong_job_secret_is_refused() {
    let p = port().to_string();
    let d = tempfile::tempdir().expect("tmp");
    let args = dp_args(d.path(), 2, 3);
    let r0 = spawn_rank(&args, 0, &p, "right", &[]);
    std::thread::sleep(Duration::from_millis(500));
    let r1 = spawn_rank(&args, 1, &p, "wrong", &[])
        .wait_with_output()
        .expect("wait");
    assert_clean_failure(&r1, &["wrong job secret"]);
    let r0 = r0.wait_with_output().expect("wait");
    assert_clean_failure(&r0, &["join"]);
}

#[test]
fn zero1_follows_plain_data_parallelism_and_shards_the_optimizer_state() {
    let mut runs = Vec::new();
    for zero in [0, 1] {
        let d = tempfile::tempdir().expect("tmp");
        let mut a = dp_args(d.path(), 2, 5);
        a.push("--set".into());
        a.push(format!("parallel.zero={zero}"));
        let o = launch(2, &[], &a, &[]);
        assert!(o.status.success(), "zero {zero}: {}", stderr(&o));
        let state: Vec<u64> = std::fs::read_to_string(d.path().join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()?
                    .get("optimizer_state_bytes")?
                    .as_u64()
            })
            .collect();
        runs.push((losses(&d.path().join("metrics.jsonl")), state[0]));
    }
    assert_close(&runs[0].0, &runs[1].0, "ZeRO-1 vs plain DP");
    // Moments are sharded: 3 full buffers without ZeRO, 1 full + 2 halves with it (dp = 2).
    let ratio = runs[1].1 as f64 / runs[0].1 as f64;
    assert!(
        (ratio - 2.0 / 3.0).abs() < 0.01,
        "optimizer state ratio {ratio}"
    );
}
