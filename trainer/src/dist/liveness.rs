//! Liveness: every rank heartbeats to the rendezvous store from a thread of
//! its own and asks it which ranks are lost. A rank whose process dies (kill
//! -9, a crash) closes its connection to the store, which its kernel does at
//! once, and the others learn it at their next heartbeat (within
//! `SIGMA_HEARTBEAT_S`); a rank that falls silent without closing it (a lost
//! node, a cut network) is noticed within `SIGMA_LIVENESS_TIMEOUT_S`. Either
//! way every other rank stops naming it, instead of waiting for a collective
//! timeout. A rank that finishes says so first (and one that fails, that it
//! failed), so a clean exit is not a loss; losing the store itself (its host
//! died) is fatal too. The thread does not
//! end the process itself: it records the reason (`abort`), the main thread
//! reports it and exits 1; only if the main thread is stuck past
//! `ABORT_GRACE` does the thread end the process (without destructors).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::env::{secs_var, DistEnv};
use super::store::{LostRank, StoreClient};
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

/// The first rank that stopped on an error, if any did.
fn failed_rank(client: &mut StoreClient) -> Result<Option<String>> {
    if client.add(FAILED_COUNT, 0)? == 0 {
        return Ok(None);
    }
    Ok(Some(
        client
            .get(&failed_key(1))
            .ok()
            .and_then(|b| b.try_into().ok())
            .map(|b| u32::from_le_bytes(b).to_string())
            .unwrap_or_else(|| "another rank".into()),
    ))
}

/// Why the job must stop, if it must: a rank failed (it said so), or ranks
/// are lost (their liveness connection closed without a clean finish, or
/// they fell silent for `timeout`).
fn check_peers(client: &mut StoreClient, timeout: Duration) -> Result<Option<String>> {
    client.heartbeat()?;
    if let Some(who) = failed_rank(client)? {
        return Ok(Some(format!("rank {who} failed (its own output says why)")));
    }
    let lost: Vec<LostRank> = client
        .lost_ranks(timeout)?
        .into_iter()
        .filter(|l| client.get(&done_key(l.rank)).is_err())
        .collect();
    if lost.is_empty() {
        return Ok(None);
    }
    // A failing rank records its failure before its connection closes: look again.
    if let Some(who) = failed_rank(client)? {
        return Ok(Some(format!("rank {who} failed (its own output says why)")));
    }
    let list = |gone: bool| {
        let r: Vec<String> = lost
            .iter()
            .filter(|l| l.disconnected == gone)
            .map(|l| l.rank.to_string())
            .collect();
        r.join(", ")
    };
    let mut why = Vec::new();
    let (gone, silent) = (list(true), list(false));
    if !gone.is_empty() {
        why.push(format!(
            "rank(s) {gone} lost: its connection to the store closed without a clean finish (its process ended: killed or crashed)"
        ));
    }
    if !silent.is_empty() {
        why.push(format!(
            "rank(s) {silent} lost: no heartbeat for {timeout:.0?}"
        ));
    }
    Ok(Some(why.join("; ")))
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
                    match check_peers(&mut client, timeout) {
                        Err(e) => fatal(format!(
                            "lost the rendezvous store at {addr} (its host, rank 0 or the launcher, is gone?): {e}"
                        )),
                        Ok(Some(why)) => fatal(why),
                        Ok(None) => {}
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
