//! `sigma launch`: one process per local rank, with the torchrun-style
//! environment, a job secret, and the rendezvous store hosted here on node 0.
//! Rank 0's output is streamed; other ranks write `<log-dir>/rank-N.log`.
//! SIGINT/SIGTERM are forwarded as SIGTERM (ranks save a checkpoint and stop), SIGUSR1 as is. If any rank fails, the others are stopped and
//! the launcher exits non-zero naming the rank and showing its last log lines.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sigma_trainer::dist::env as vars;
use sigma_trainer::dist::StoreServer;

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Processes (ranks) on this node.
    #[arg(long)]
    pub nproc_per_node: usize,
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, where the rendezvous store runs.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Where ranks other than 0 write their output.
    #[arg(long, default_value = "runs/launch-logs")]
    pub log_dir: PathBuf,
    /// Seconds to wait for the other ranks to stop after one failed, before killing them.
    #[arg(long, default_value_t = 10)]
    pub grace_s: u64,
    /// Seconds ranks get to save a checkpoint and exit after SIGTERM/SIGINT reaches the launcher.
    #[arg(long, default_value_t = 600)]
    pub signal_grace_s: u64,
    /// The sigma command each rank runs, after `--` (e.g. `-- train --config c.toml`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn random_secret() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom for the job secret")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn last_lines(path: &PathBuf, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn signal_all(children: &mut [(usize, Child)], sig: Signal) {
    for (_, c) in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
        }
    }
}

/// Stop every child still running: SIGTERM, then SIGKILL after `grace`.
fn stop_all(children: &mut [(usize, Child)], grace: Duration) {
    signal_all(children, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

pub fn launch(a: LaunchArgs) -> Result<()> {
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        bail!("--nproc-per-node and --nnodes must be positive and --node-rank below --nnodes (got {}, {}, {})", a.nproc_per_node, a.nnodes, a.node_rank);
    }
    let world = a.nproc_per_node * a.nnodes;
    let secret = match std::env::var(vars::JOB_SECRET) {
        Ok(s) if !s.is_empty() => s,
        _ if a.nnodes > 1 => bail!(
            "{} must be set (to the same value on every node) for a job of several nodes",
            vars::JOB_SECRET
        ),
        _ => random_secret()?,
    };
    // Node 0 hosts the store for the whole job.
    let _server = if a.node_rank == 0 {
        Some(
            StoreServer::start(&format!("0.0.0.0:{}", a.master_port), &secret)
                .with_context(|| format!("port {}", a.master_port))?,
        )
    } else {
        None
    };
    std::fs::create_dir_all(&a.log_dir)
        .with_context(|| format!("cannot create log dir {}", a.log_dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the sigma binary")?;
    // NCCL and the CUDA runtime must be libtorch's own: expose them as libnccl.so and
    // libcudart.so first on the ranks' library path (cudarc loads them by those names).
    let ld_path = match sigma_trainer::dist::nccl::nccl_library_dir(&a.log_dir) {
        Some(d) => format!(
            "{}:{}",
            d.display(),
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        ),
        None => std::env::var("LD_LIBRARY_PATH").unwrap_or_default(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    // SIGUSR1 (SLURM's `--signal=USR1@secs`): passed on; ranks save and stop.
    let usr1 = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone())
        .context("cannot install signal handlers")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = a.node_rank * a.nproc_per_node + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&a.command)
            .env(vars::RANK, rank.to_string())
            .env(vars::LOCAL_RANK, local.to_string())
            .env(vars::WORLD_SIZE, world.to_string())
            .env(vars::LOCAL_WORLD_SIZE, a.nproc_per_node.to_string())
            .env(vars::MASTER_ADDR, &a.master_addr)
            .env(vars::MASTER_PORT, a.master_port.to_string())
            .env(vars::JOB_SECRET, &secret)
            .env(vars::STORE_HOSTED, "1")
            .env("LD_LIBRARY_PATH", &ld_path)
            .stdin(Stdio::null());
        if rank != 0 {
            let log = a.log_dir.join(format!("rank-{rank}.log"));
            let f = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push((rank, child));
    }
    loop {
        if usr1.swap(false, Ordering::Relaxed) {
            eprintln!("sigma launch: SIGUSR1 passed on to the ranks (save and stop)");
            signal_all(&mut children, Signal::SIGUSR1);
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!(
                "sigma launch: signal received; asking {} rank(s) to save and stop (up to {} s)",
                children.len(),
                a.signal_grace_s
            );
            stop_all(&mut children, Duration::from_secs(a.signal_grace_s));
            let failed: Vec<String> = children
                .iter_mut()
                .filter_map(|(r, c)| match c.wait() {
                    Ok(st) if st.success() => None,
                    Ok(st) => Some(format!("rank {r} ({})", describe(st))),
                    Err(e) => Some(format!("rank {r} ({e})")),
                })
                .collect();
            if failed.is_empty() {
                eprintln!("sigma launch: every rank saved and stopped");
                return Ok(());
            }
            bail!("interrupted; not cleanly stopped: {}", failed.join(", "));
        }
        let mut running = 0;
        for i in 0..children.len() {
            let rank = children[i].0;
            match children[i].1.try_wait() {
                Ok(Some(st)) if !st.success() => {
                    let log = a.log_dir.join(format!("rank-{rank}.log"));
                    let tail = if rank == 0 {
                        "(its output is above)".to_string()
                    } else {
                        last_lines(&log, 20)
                    };
                    stop_all(&mut children, Duration::from_secs(a.grace_s));
                    bail!("rank {rank} failed ({}); stopped the other ranks. Last lines of rank {rank}:\n{tail}", describe(st));
                }
                Ok(Some(_)) => {}
                Ok(None) => running += 1,
                Err(e) => bail!("cannot watch rank {rank}: {e}"),
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
