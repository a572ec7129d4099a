//! Liveness: every rank heartbeats to the rendezvous store from a thread of
//! its own and asks it which ranks have fallen silent. A rank that dies (kill
//! -9, a lost node) is noticed within `SIGMA_LIVENESS_TIMEOUT_S` by every
//! other rank, which then stops naming it, instead of waiting for a collective
//! timeout. A rank that finishes says so first, so a clean exit is not a loss;
//! losing the store itself (its host died) is fatal too. The thread does not
//! end the process itself: it records the reason (`abort`), the main thread
//! reports it and exits 1; only if the main thread is stuck past
//! `ABORT_GRACE` does the thread end the process (without destructors).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::env::{secs_var, DistEnv};
use crate::error::Result;

/// Seconds between heartbeats (default 1).
pub const HEARTBEAT_S: &str = "SIGMA_HEARTBEAT_S";
/// Seconds of silence after which a rank counts as lost (default 30).
pub const LIVENESS_TIMEOUT_S: &str = "SIGMA_LIVENESS_TIMEOUT_S";

/// How long the main thread has to stop on its own after a loss was recorded.
const ABORT_GRACE: Duration = Duration::from_secs(15);

pub struct Liveness {
    /// 0 running, 1 finished cleanly, 2 failed (stopping on an error).
    stop: Arc<AtomicU8>,
    thread: Option<JoinHandle<()>>,
}

const RUNNING: u8 = 0;
const CLEAN: u8 = 1;
const FAILED: u8 = 2;

fn done_key(rank: u32) -> String {
    format!("liveness/done/{rank}")
}

/// Count of ranks that stopped on an error (one key every rank reads per heartbeat).
const FAILED_COUNT: &str = "liveness/failed";

fn failed_key(n: i64) -> String {
    format!("liveness/failed/{n}")
}

impl Liveness {
    pub fn start(env: &DistEnv) -> Result<Liveness> {
        let interval = Duration::from_secs_f64(secs_var(HEARTBEAT_S, 1.0)?);
        let timeout = Duration::from_secs_f64(secs_var(LIVENESS_TIMEOUT_S, 30.0)?);
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let rank = env.rank as u32;
        let mut client = super::connect(env)?;
        client.heartbeat()?;
        let stop = Arc::new(AtomicU8::new(RUNNING));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sigma-liveness".into())
            .spawn(move || {
                let fatal = |msg: String| -> ! {
                    super::abort::request(format!("rank {rank}: {msg}; exiting"));
                    super::abort::exit_after(ABORT_GRACE)
                };
                let mut next = Instant::now() + interval;
                loop {
                    std::thread::sleep(Duration::from_millis(20));
                    match s.load(Ordering::Relaxed) {
                        CLEAN => {
                            if let Err(e) = client.set(&done_key(rank), b"1") {
                                eprintln!(
                                    "warning: rank {rank}: could not record a clean finish: {e}"
                                );
                            }
                            return;
                        }
                        FAILED => {
                            // Tell the others at once (best effort: the store may be what failed).
                            if let Ok(n) = client.add(FAILED_COUNT, 1) {
                                let _ = client.set(&failed_key(n), &rank.to_le_bytes());
                            }
                            return;
                        }
                        _ => {}
                    }
                    if Instant::now() < next {
                        continue;
                    }
                    next = Instant::now() + interval;
                    let failed = client.heartbeat().and_then(|_| client.add(FAILED_COUNT, 0));
                    if let Ok(n) = failed {
                        if n > 0 {
                            let who = client
                                .get(&failed_key(1))
                                .ok()
                                .and_then(|b| b.try_into().ok())
                                .map(|b| u32::from_le_bytes(b).to_string())
                                .unwrap_or_else(|| "another rank".into());
                            fatal(format!("rank {who} failed (its own output says why)"));
                        }
                    }
                    let lost = failed.and_then(|_| {
                        let silent = client.dead_ranks(timeout)?;
                        Ok(silent
                            .into_iter()
                            .filter(|&r| client.get(&done_key(r)).is_err())
                            .collect::<Vec<u32>>())
                    });
                    match lost {
                        Err(e) => fatal(format!(
                            "lost the rendezvous store at {addr} (its host, rank 0 or the launcher, is gone?): {e}"
                        )),
                        Ok(l) if !l.is_empty() => fatal(format!(
                            "rank(s) {} lost: no heartbeat for {:.0?}",
                            l.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
                            timeout
                        )),
                        Ok(_) => {}
                    }
                }
            })
            .expect("liveness thread");
        Ok(Liveness {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop heartbeating and record a clean finish.
    pub fn stop(&mut self) {
        self.end(CLEAN);
    }

    fn end(&mut self, how: u8) {
        let _ = self
            .stop
            .compare_exchange(RUNNING, how, Ordering::SeqCst, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // A thread that recorded a loss waits in `exit_after` for the main
            // thread to exit: leave it (joining would hold the exit up).
            if super::abort::reason().is_none() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Liveness {
    /// Dropped without `stop`: this rank is leaving on an error; the others are told.
    fn drop(&mut self) {
        self.end(FAILED);
    }
}
