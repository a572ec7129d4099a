//! Stop requests by signal. SIGTERM and SIGUSR1 (SLURM's `--signal=USR1@secs`)
//! ask the run to save a checkpoint at the end of the current step and exit;
//! so does SIGINT (Ctrl-C) when the run checkpoints at all; otherwise Ctrl-C
//! ends it at once.
//!
//! From the first millisecond: the `sigma` binary blocks these three signals
//! before libtorch's static initialisers run (launch/src/early_signals.rs, an
//! ELF pre-initialiser; `sigma launch` blocks them in its ranks before `exec`),
//! so a signal that arrives while libtorch loads (about 0.4 s) stays pending
//! instead of killing the process. `StopSignals::install` unblocks them once
//! its handlers are in place, and a pending one is then received like any
//! other: the run saves at the end of its first step and stops. Commands
//! that install no handlers unblock them at once (`unblock_stop_signals`).
//!
//! Copies of one request: SLURM signals every process of a job step, and
//! `sigma launch` passes on the signals it gets, so under `srun sigma launch`
//! each rank receives the same SIGUSR1 (or SIGTERM) two or three times within
//! milliseconds. A stop signal that arrives within `DUPLICATE_WINDOW` of the
//! first is taken as a copy of it and changes nothing. One that arrives later
//! (someone insisting) ends the process at once with `EXIT_INTERRUPTED`,
//! without saving.
//!
//! A watcher thread receives the signals, so it can say what will happen (on
//! rank 0), which a signal handler cannot do safely.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::error::{Result, TrainError};

/// Exit status of a second stop signal (128 + SIGINT, as shells report Ctrl-C).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Stop signals within this long of the first are copies of the same request
/// (SLURM's delivery to every process of a step, and `sigma launch` passing
/// it on, arrive within milliseconds of each other).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(3);

/// The signals that ask a run to stop (blocked from the start of the process
/// until their handlers are installed).
pub const STOP_SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGUSR1, Signal::SIGINT];

/// `STOP_SIGNALS` as a signal set.
pub fn stop_sigset() -> SigSet {
    let mut s = SigSet::empty();
    for sig in STOP_SIGNALS {
        s.add(sig);
    }
    s
}

/// Block the stop signals in the calling thread (threads it starts inherit
/// the mask, and so do programs it `exec`s); a signal sent meanwhile stays
/// pending.
pub fn block_stop_signals() {
    // Cannot fail with a valid `how` and set.
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&stop_sigset()), None);
}

/// Unblock the stop signals in the calling thread: a pending one is delivered
/// now (to the handlers installed by then, or with its default action).
pub fn unblock_stop_signals() {
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&stop_sigset()), None);
}

/// The stop signals pending for this process or the calling thread (sent
/// while they were blocked), as a bit mask (bit `n - 1` for signal `n`), from
/// `/proc/thread-self/status` (0 where it cannot be read).
fn pending_stop_signals() -> u64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0)
    };
    let stop = STOP_SIGNALS
        .iter()
        .fold(0u64, |m, &s| m | 1 << (s as i32 - 1));
    (field("ShdPnd:") | field("SigPnd:")) & stop
}

/// True while the calling thread blocks `sig`.
pub fn is_blocked(sig: Signal) -> bool {
    SigSet::thread_get_mask().is_ok_and(|m| m.contains(sig))
}

#[derive(Clone)]
pub struct StopSignals {
    requested: Arc<AtomicBool>,
    which: Arc<AtomicI32>,
    interrupt_saves: Arc<AtomicBool>,
}

fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT (Ctrl-C)",
        SIGTERM => "SIGTERM",
        SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// What the watcher does with a stop signal, given when the first one came.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// The first request: save at the end of the step, then stop.
    Stop,
    /// A copy of the first request (within `DUPLICATE_WINDOW`): nothing new.
    Copy,
    /// Another request later on: exit now.
    ExitNow,
}

fn action(first: Option<Instant>, now: Instant) -> Action {
    match first {
        None => Action::Stop,
        Some(t) if now.saturating_duration_since(t) < DUPLICATE_WINDOW => Action::Copy,
        Some(_) => Action::ExitNow,
    }
}

impl StopSignals {
    /// Start watching SIGTERM, SIGUSR1 and SIGINT, then unblock them in the
    /// calling thread (a signal held pending since start-up arrives now).
    /// Ctrl-C stops the process at once until `set_interrupt_saves(true)`.
    /// `announce`: print what happens (rank 0).
    pub fn install(announce: bool) -> Result<StopSignals> {
        let s = StopSignals::none();
        let mut signals =
            Signals::new([SIGTERM, SIGUSR1, SIGINT]).map_err(|e| TrainError::Setup {
                what: "install signal handlers".into(),
                message: e.to_string(),
            })?;
        let (requested, which, interrupt_saves) = (
            s.requested.clone(),
            s.which.clone(),
            s.interrupt_saves.clone(),
        );
        // Signals that came while they were blocked (start-up), set before they are unblocked.
        let held = Arc::new(AtomicU64::new(0));
        let held_w = held.clone();
        std::thread::Builder::new()
            .name("sigma-signals".into())
            .spawn(move || {
                let mut first: Option<Instant> = None;
                for sig in signals.forever() {
                    if sig == SIGINT && !interrupt_saves.load(Ordering::SeqCst) {
                        eprintln!("\nsigma: interrupted (no checkpointing configured, nothing to save)");
                        signal_hook::low_level::exit(EXIT_INTERRUPTED);
                    }
                    let now = Instant::now();
                    match action(first, now) {
                        Action::ExitNow => {
                            eprintln!("\nsigma: {} again: exiting now without saving", name(sig));
                            signal_hook::low_level::exit(EXIT_INTERRUPTED);
                        }
                        Action::Copy => {
                            if announce {
                                eprintln!(
                                    "sigma: {} again within {} s: a copy of the same stop request (still saving at the end of this step)",
                                    name(sig),
                                    DUPLICATE_WINDOW.as_secs()
                                );
                            }
                        }
                        Action::Stop => {
                            first = Some(now);
                            which.store(sig, Ordering::SeqCst);
                            requested.store(true, Ordering::SeqCst);
                            let was_held = held_w.load(Ordering::SeqCst) & 1 << (sig - 1) != 0;
                            if announce {
                                eprintln!(
                                    "\nsigma: {} received{}: saving a checkpoint at the end of this step, then exiting (a stop signal more than {} s later exits at once)",
                                    name(sig),
                                    if was_held {
                                        " (sent during start-up, held until the handlers were ready)"
                                    } else {
                                        ""
                                    },
                                    DUPLICATE_WINDOW.as_secs()
                                );
                            }
                        }
                    }
                }
            })
            .map_err(|e| TrainError::Setup {
                what: "start the signal thread".into(),
                message: e.to_string(),
            })?;
        held.store(pending_stop_signals(), Ordering::SeqCst);
        unblock_stop_signals();
        Ok(s)
    }

    /// A handle that never fires (library use, tests).
    pub fn none() -> StopSignals {
        StopSignals {
            requested: Arc::new(AtomicBool::new(false)),
            which: Arc::new(AtomicI32::new(0)),
            interrupt_saves: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Ctrl-C saves a checkpoint like SIGTERM (set once the run is known to checkpoint).
    pub fn set_interrupt_saves(&self, on: bool) {
        self.interrupt_saves.store(on, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The signal that asked to stop, by name.
    pub fn name(&self) -> &'static str {
        name(self.which.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_within_the_window_change_nothing_and_a_later_signal_exits() {
        let t0 = Instant::now();
        assert_eq!(action(None, t0), Action::Stop);
        assert_eq!(action(Some(t0), t0), Action::Copy);
        assert_eq!(
            action(Some(t0), t0 + DUPLICATE_WINDOW - Duration::from_millis(1)),
            Action::Copy
        );
        assert_eq!(action(Some(t0), t0 + DUPLICATE_WINDOW), Action::ExitNow);
    }

    #[test]
    fn a_blocked_stop_signal_is_held_and_delivered_on_unblocking() {
        // A thread of its own: the test harness's threads keep their masks.
        std::thread::spawn(|| {
            let got = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(SIGUSR1, got.clone()).expect("handler");
            assert!(!is_blocked(Signal::SIGUSR1));
            block_stop_signals();
            assert!(STOP_SIGNALS.iter().all(|&s| is_blocked(s)));
            assert!(!is_blocked(Signal::SIGHUP));
            assert_eq!(pending_stop_signals(), 0);
            // Sent to this thread while blocked: pending, not delivered.
            nix::sys::signal::raise(Signal::SIGUSR1).expect("raise");
            assert!(!got.load(Ordering::SeqCst));
            assert_eq!(pending_stop_signals(), 1 << (SIGUSR1 - 1));
            // Delivered as the mask is lifted.
            unblock_stop_signals();
            assert!(got.load(Ordering::SeqCst));
            assert!(STOP_SIGNALS.iter().all(|&s| !is_blocked(s)));
            assert_eq!(pending_stop_signals(), 0);
        })
        .join()
        .expect("thread");
    }
}
