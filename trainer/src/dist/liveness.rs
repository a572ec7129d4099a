//! Liveness: every rank heartbeats to the rendezvous store from a thread of
//! its own and asks it which ranks have fallen silent. A rank that dies (kill
//! -9, a lost node) is noticed within `SIGMA_LIVENESS_TIMEOUT_S` by every
//! other rank, which then exits naming it, instead of waiting for a collective
//! timeout. A rank that finishes says so first, so a clean exit is not a loss;
//! losing the store itself (its host died) is fatal too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::env::{secs_var, DistEnv};
use crate::error::Result;

/// Seconds between heartbeats (default 1).
pub const HEARTBEAT_S: &str = "SIGMA_HEARTBEAT_S";
/// Seconds of silence after which a rank counts as lost (default 30).
pub const LIVENESS_TIMEOUT_S: &str = "SIGMA_LIVENESS_TIMEOUT_S";

pub struct Liveness {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn done_key(rank: u32) -> String {
    format!("liveness/done/{rank}")
}

impl Liveness {
    pub fn start(env: &DistEnv) -> Result<Liveness> {
        let interval = Duration::from_secs_f64(secs_var(HEARTBEAT_S, 1.0)?);
        let timeout = Duration::from_secs_f64(secs_var(LIVENESS_TIMEOUT_S, 30.0)?);
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let rank = env.rank as u32;
        let mut client = super::connect(env)?;
        client.heartbeat()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sigma-liveness".into())
            .spawn(move || {
                let fatal = |msg: String| -> ! {
                    eprintln!("error: rank {rank}: {msg}; exiting");
                    std::process::exit(1);
                };
                let mut next = Instant::now() + interval;
                loop {
                    std::thread::sleep(Duration::from_millis(20));
                    if s.load(Ordering::Relaxed) {
                        if let Err(e) = client.set(&done_key(rank), b"1") {
                            eprintln!("warning: rank {rank}: could not record a clean finish: {e}");
                        }
                        return;
                    }
                    if Instant::now() < next {
                        continue;
                    }
                    next = Instant::now() + interval;
                    let lost = client.heartbeat().and_then(|_| {
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
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop();
    }
}
