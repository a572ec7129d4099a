//! `sigma launch`: one process per local rank, with the torchrun-style
//! environment, a job secret, and the rendezvous store hosted here on node 0.
//! Rank 0's output is streamed; other ranks write `<log-dir>/rank-N.log`.
//!
//! Signals: SIGINT/SIGTERM are forwarded as SIGTERM (ranks save a checkpoint
//! and stop), SIGUSR1 as is. Ranks run in process groups of their own, so a
//! Ctrl-C at the terminal reaches them once, through the launcher. Ranks start
//! with the stop signals blocked (trainer/src/signals.rs): one that arrives
//! while a rank loads libtorch stays pending until its handlers are in place.
//! Under `srun sigma launch`, SLURM signals the ranks as well as the launcher;
//! a rank takes the copy the launcher passes on as the same request. Once a
//! stop signal has reached the launcher, nothing is restarted: it waits for
//! every rank and reports how each one ended (saved and stopped, or not).
//!
//! The rendezvous port: `--master-port`, else `MASTER_PORT`, else under SLURM
//! one derived from `SLURM_JOB_ID` (`dist::env::port_for_job`, as `sigma
//! train` started by `srun` takes it), else 29500.
//!
//! Failures and restarts (`--max-restarts N`, torchrun's convention): when a
//! rank fails, every rank of the job is stopped; with restarts left, the job
//! starts again after `--restart-backoff-s` with `--resume auto` (it continues
//! from its newest committed checkpoint), else the launcher exits non-zero
//! naming the rank and showing its last log lines. Across nodes, the launchers
//! agree through the store: a failure on any node is recorded under the
//! attempt's number and every launcher stops and restarts its ranks. Each
//! attempt's ranks use a namespace of their own in the store
//! (`SIGMA_RESTART_COUNT`), so nothing of a failed attempt leaks into the next.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sigma_trainer::dist::env as vars;
use sigma_trainer::dist::{StoreClient, StoreServer};
use sigma_trainer::signals::{block_stop_signals, unblock_stop_signals, EXIT_INTERRUPTED};

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
    /// Port of the rendezvous store [default: MASTER_PORT, else under SLURM
    /// one from SLURM_JOB_ID, else 29500].
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Where ranks other than 0 write their output.
    #[arg(long, default_value = "runs/launch-logs")]
    pub log_dir: PathBuf,
    /// Seconds to wait for the other ranks to stop after one failed, before killing them.
    #[arg(long, default_value_t = 10)]
    pub grace_s: u64,
    /// Seconds ranks get to save a checkpoint and exit after SIGTERM/SIGINT reaches the launcher.
    #[arg(long, default_value_t = 600)]
    pub signal_grace_s: u64,
    /// Restart the whole job this many times when a rank fails (each restart
    /// continues from the newest checkpoint with `--resume auto`); every node
    /// of a job must be given the same value.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: usize,
    /// Seconds to wait before a restart.
    #[arg(long, default_value_t = 5)]
    pub restart_backoff_s: u64,
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

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// The ranks of this node in one attempt.
struct Ranks {
    children: Vec<(usize, Child)>,
}

impl Ranks {
    fn signal(&mut self, sig: Signal) {
        for (_, c) in self.children.iter_mut() {
            if let Ok(None) = c.try_wait() {
                let _ = kill(Pid::from_raw(c.id() as i32), sig);
            }
        }
    }

    /// Stop every rank still running: SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && self
                .children
                .iter_mut()
                .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        for (_, c) in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How an attempt ended.
enum Outcome {
    /// Every rank exited 0.
    Finished,
    /// A signal asked the job to stop; every rank exited with this code.
    Stopped(i32),
    /// A rank failed (here or, `remote`, on another node).
    Failed { what: String, tail: String },
}

struct Launcher {
    a: LaunchArgs,
    secret: String,
    /// The rendezvous port (see the module docs).
    port: u16,
    exe: PathBuf,
    stop: Arc<AtomicBool>,
    usr1: Arc<AtomicBool>,
    /// A stop signal was passed on to the ranks: no rank exit restarts the job.
    stopping: bool,
    /// Connection to the store, for agreeing on failures across nodes.
    control: Option<StoreClient>,
}

/// The status the ranks exit with when a signal stopped them after a
/// checkpoint (`train --stopped-exit-code`, 0 when not given).
fn stopped_code(command: &[String]) -> i32 {
    let mut it = command.iter();
    while let Some(a) = it.next() {
        if a == "--stopped-exit-code" {
            return it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
        if let Some(v) = a.strip_prefix("--stopped-exit-code=") {
            return v.parse().unwrap_or(0);
        }
    }
    0
}

fn failure_key(attempt: usize) -> String {
    format!("failed/{attempt}")
}

impl Launcher {
    fn rank_log(&self, rank: usize) -> PathBuf {
        self.a.log_dir.join(format!("rank-{rank}.log"))
    }

    /// The ranks' command for `attempt`: a restart resumes from the newest checkpoint.
    fn command(&self, attempt: usize) -> Vec<String> {
        let mut cmd = self.a.command.clone();
        if attempt > 0 && cmd.first().map(String::as_str) == Some("train") {
            match cmd.iter().position(|x| x == "--resume") {
                Some(i) if i + 1 < cmd.len() => cmd[i + 1] = "auto".into(),
                _ => {
                    cmd.retain(|x| !x.starts_with("--resume="));
                    cmd.extend(["--resume".to_string(), "auto".to_string()]);
                }
            }
        }
        cmd
    }

    /// Start this node's ranks. The stop signals are blocked here meanwhile,
    /// so no rank ever runs with them unblocked before `sigma train` installs
    /// its handlers; one sent to the launcher meanwhile is passed on after.
    fn spawn(&self, attempt: usize) -> Result<Ranks> {
        block_stop_signals();
        let ranks = self.spawn_ranks(attempt);
        unblock_stop_signals();
        ranks
    }

    fn spawn_ranks(&self, attempt: usize) -> Result<Ranks> {
        let a = &self.a;
        let world = a.nproc_per_node * a.nnodes;
        let cmd = self.command(attempt);
        let mut children = Vec::new();
        for local in 0..a.nproc_per_node {
            let rank = a.node_rank * a.nproc_per_node + local;
            let mut c = Command::new(&self.exe);
            c.args(&cmd)
                .env(vars::RANK, rank.to_string())
                .env(vars::LOCAL_RANK, local.to_string())
                .env(vars::WORLD_SIZE, world.to_string())
                .env(vars::LOCAL_WORLD_SIZE, a.nproc_per_node.to_string())
                .env(vars::MASTER_ADDR, &a.master_addr)
                .env(vars::MASTER_PORT, self.port.to_string())
                .env(vars::JOB_SECRET, &self.secret)
                .env(vars::STORE_HOSTED, "1")
                .env(vars::RESTART_COUNT, attempt.to_string())
                .stdin(Stdio::null())
                // A group of its own: a terminal's Ctrl-C reaches the ranks once, through us.
                .process_group(0);
            prepare_rank(&mut c);
            if rank != 0 {
                let log = self.rank_log(rank);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(attempt > 0)
                    .truncate(attempt == 0)
                    .open(&log)
                    .with_context(|| format!("cannot create {}", log.display()))?;
                if attempt > 0 {
                    writeln!(f, "=== sigma launch: restart {attempt} ===")?;
                }
                c.stdout(f.try_clone()?).stderr(f);
            }
            let child = c
                .spawn()
                .with_context(|| format!("cannot start rank {rank}"))?;
            children.push((rank, child));
        }
        Ok(Ranks { children })
    }

    /// A failure another node recorded for this attempt.
    fn remote_failure(&mut self, attempt: usize) -> Option<String> {
        let c = self.control.as_mut()?;
        c.get(&failure_key(attempt))
            .ok()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    fn record_failure(&mut self, attempt: usize, what: &str) {
        if let Some(c) = self.control.as_mut() {
            if let Err(e) = c.set(&failure_key(attempt), what.as_bytes()) {
                eprintln!("sigma launch: could not tell the other nodes about the failure: {e}");
            }
        }
    }

    /// Watch one attempt's ranks until it ends.
    fn supervise(&mut self, ranks: &mut Ranks, attempt: usize) -> Result<Outcome> {
        let stop_code = stopped_code(&self.a.command);
        let mut next_poll = Instant::now();
        loop {
            if self.usr1.swap(false, Ordering::Relaxed) {
                eprintln!("sigma launch: SIGUSR1 passed on to the ranks (save and stop)");
                ranks.signal(Signal::SIGUSR1);
                self.stopping = true;
            }
            if self.stop.load(Ordering::Relaxed) {
                return self.stop_on_signal(ranks, stop_code);
            }
            if self.a.nnodes > 1 && Instant::now() >= next_poll {
                next_poll = Instant::now() + Duration::from_millis(500);
                if let Some(what) = self.remote_failure(attempt) {
                    ranks.stop(Duration::from_secs(self.a.grace_s));
                    return Ok(Outcome::Failed {
                        what: format!("{what} (on another node)"),
                        tail: String::new(),
                    });
                }
            }
            let mut running = 0;
            for i in 0..ranks.children.len() {
                let rank = ranks.children[i].0;
                match ranks.children[i].1.try_wait() {
                    // A rank stopped by a signal after saving (SIGUSR1 passed on,
                    // or a signal that reached it another way): every rank stops
                    // at the same step, so wait for the others; not a failure.
                    // After a stop signal, no exit is a failure to restart from.
                    Ok(Some(st))
                        if (stop_code != 0 && st.code() == Some(stop_code))
                            || (self.stopping && !st.success()) =>
                    {
                        return self.wait_stopped(ranks, stop_code);
                    }
                    Ok(Some(st)) if !st.success() => {
                        let what = format!("rank {rank} failed ({})", describe(st));
                        self.record_failure(attempt, &what);
                        let tail = if rank == 0 {
                            "(its output is above)".to_string()
                        } else {
                            last_lines(&self.rank_log(rank), 20)
                        };
                        ranks.stop(Duration::from_secs(self.a.grace_s));
                        return Ok(Outcome::Failed { what, tail });
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => running += 1,
                    Err(e) => bail!("cannot watch rank {rank}: {e}"),
                }
            }
            if running == 0 {
                return Ok(Outcome::Finished);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The job is stopping on a signal: wait (without signalling anyone,
    /// which would be another stop signal) up to `--signal-grace-s` for
    /// every rank, and report the truth. Only if every rank exited with the
    /// stop status `code` did every rank save and stop; otherwise each
    /// rank's status is named and the launcher fails (no restart).
    fn wait_stopped(&mut self, ranks: &mut Ranks, code: i32) -> Result<Outcome> {
        let grace = self.a.signal_grace_s;
        let deadline = Instant::now() + Duration::from_secs(grace);
        let mut statuses = Vec::new();
        for (r, c) in ranks.children.iter_mut() {
            let st = loop {
                match c.try_wait() {
                    Ok(Some(st)) => break Some(st),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => break None,
                }
            };
            statuses.push((*r, st));
        }
        if statuses
            .iter()
            .all(|(_, st)| st.and_then(|s| s.code()) == Some(code))
        {
            eprintln!("sigma launch: every rank saved and stopped (exit status {code})");
            return Ok(Outcome::Stopped(code));
        }
        let each: Vec<String> = statuses
            .iter()
            .map(|(r, st)| format!("rank {r}: {}", stop_status(*st, code, grace)))
            .collect();
        ranks.stop(Duration::from_secs(self.a.grace_s));
        bail!(
            "a stop signal reached the job, but not every rank saved a checkpoint and stopped: {}",
            each.join("; ")
        )
    }

    /// SIGINT/SIGTERM reached the launcher: ask every rank to save and stop.
    fn stop_on_signal(&mut self, ranks: &mut Ranks, code: i32) -> Result<Outcome> {
        eprintln!(
            "sigma launch: signal received; asking {} rank(s) to save and stop (up to {} s)",
            ranks.children.len(),
            self.a.signal_grace_s
        );
        ranks.signal(Signal::SIGTERM);
        self.wait_stopped(ranks, code)
    }
}

/// How a rank ended after a stop signal, for the launcher's report.
fn stop_status(st: Option<ExitStatus>, code: i32, grace_s: u64) -> String {
    match st {
        Some(s) if s.code() == Some(code) => {
            format!("saved and stopped (exit code {code})")
        }
        Some(s) if s.code() == Some(EXIT_INTERRUPTED) => format!(
            "exit code {EXIT_INTERRUPTED}: exited without saving (a second stop signal, more than {} s after the first)",
            sigma_trainer::signals::DUPLICATE_WINDOW.as_secs()
        ),
        Some(s) if s.success() => "exit code 0: finished the run".into(),
        Some(s) => format!("{}: did not save", describe(s)),
        None => format!("still running after {grace_s} s: killed"),
    }
}

/// Returns the exit status for the launcher: 0 when the job finished, the
/// ranks' common exit status when a signal stopped them.
pub fn launch(a: LaunchArgs) -> Result<i32> {
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        bail!("--nproc-per-node and --nnodes must be positive and --node-rank below --nnodes (got {}, {}, {})", a.nproc_per_node, a.nnodes, a.node_rank);
    }
    let secret = match sigma_data::env::var(vars::JOB_SECRET) {
        Some(s) if !s.is_empty() => s,
        _ if a.nnodes > 1 => bail!(
            "{} must be set (to the same value on every node) for a job of several nodes",
            vars::JOB_SECRET
        ),
        _ => random_secret()?,
    };
    let (port, from) = match a.master_port {
        Some(p) => (p, "--master-port".to_string()),
        None => port_from_env()?,
    };
    // Node 0 hosts the store for the whole job, across restarts.
    let _server = if a.node_rank == 0 {
        Some(
            StoreServer::start(&format!("0.0.0.0:{port}"), &secret).with_context(|| {
                format!("port {port} ({from}): choose a free one with --master-port or MASTER_PORT")
            })?,
        )
    } else {
        None
    };
    let control = control_connection(&a, port, &secret)?;
    sigma_data::fsutil::create_dir_all(&a.log_dir).context("--log-dir")?;
    let exe = std::env::current_exe().context("cannot find the sigma binary")?;
    let (stop, usr1) = install_signals()?;
    let mut l = Launcher {
        a,
        secret,
        port,
        exe,
        stop,
        usr1,
        stopping: false,
        control,
    };
    l.run_attempts()
}

/// The port when `--master-port` is not given, and where it came from.
fn port_from_env() -> Result<(u16, String)> {
    let get = sigma_data::env::var;
    let port = vars::master_port(&get)?;
    let from = match (get(vars::MASTER_PORT), get(vars::SLURM_JOB_ID)) {
        (Some(_), _) => "MASTER_PORT".to_string(),
        (None, Some(id)) => format!("derived from SLURM_JOB_ID {id}"),
        (None, None) => "the default".to_string(),
    };
    Ok((port, from))
}

/// Launchers agree on failures through the store (needed with several nodes).
fn control_connection(a: &LaunchArgs, port: u16, secret: &str) -> Result<Option<StoreClient>> {
    if a.nnodes == 1 {
        return Ok(None);
    }
    let timeout = Duration::from_secs_f64(vars::secs_var(vars::TIMEOUT_S, 300.0)?);
    Ok(Some(StoreClient::connect_in(
        &format!("{}:{port}", a.master_addr),
        secret,
        u32::MAX - a.node_rank as u32,
        timeout,
        "launch/",
    )?))
}

/// SIGINT/SIGTERM set the stop flag, SIGUSR1 (SLURM's `--signal=USR1@secs`)
/// the one passed on as is; then the stop signals, blocked since the process
/// started (launch/src/early_signals.rs), are unblocked: one that came
/// meanwhile is seen now.
fn install_signals() -> Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let usr1 = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone())
        .context("cannot install signal handlers")?;
    unblock_stop_signals();
    Ok((stop, usr1))
}

impl Launcher {
    /// Every attempt, until one finishes, stops on a signal, or fails with no
    /// restart left.
    fn run_attempts(&mut self) -> Result<i32> {
        let max = self.a.max_restarts;
        for attempt in 0..=max {
            let mut ranks = self.spawn(attempt)?;
            let (what, tail) = match self.supervise(&mut ranks, attempt)? {
                Outcome::Finished => return Ok(0),
                Outcome::Stopped(code) => return Ok(code),
                Outcome::Failed { what, tail } => (what, tail),
            };
            let tail = if tail.is_empty() {
                String::new()
            } else {
                format!(" Last lines of its output:\n{tail}")
            };
            if attempt == max {
                let restarts = if max > 0 {
                    format!(" (after {max} restart(s), --max-restarts {max})")
                } else {
                    String::new()
                };
                bail!("{what}{restarts}; stopped the other ranks.{tail}");
            }
            eprintln!(
                "sigma launch: {what}; stopped the other ranks.{tail}\nsigma launch: restart {} of {max} in {} s, resuming from the newest checkpoint",
                attempt + 1,
                self.a.restart_backoff_s
            );
            let until = Instant::now() + Duration::from_secs(self.a.restart_backoff_s);
            while Instant::now() < until {
                if self.stop.load(Ordering::Relaxed) || self.usr1.load(Ordering::Relaxed) {
                    bail!("interrupted while waiting to restart ({what})");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}

/// A rank outlives nothing it needs: if the launcher dies without stopping
/// its ranks (SIGKILL, the out-of-memory killer), the kernel kills them too
/// (Linux's parent-death signal), instead of leaving orphans that hold GPU
/// memory and the store's port. The launcher spawns from its main thread,
/// which lives as long as it does. And a rank starts with the stop signals
/// blocked (blocked signals stay pending across `exec`), so one that comes
/// before `sigma train` has its handlers is acted on, not fatal.
#[allow(unsafe_code)] // pre_exec: runs between fork and exec.
fn prepare_rank(c: &mut Command) {
    let parent = nix::unistd::getpid();
    let stop = sigma_trainer::signals::stop_sigset();
    // SAFETY: prctl, sigprocmask and getppid are async-signal-safe, and
    // nothing here allocates (the forked child of a multithreaded process
    // must not).
    unsafe {
        c.pre_exec(move || {
            stop.thread_block()?;
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The launcher may have died before the signal was armed.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}
