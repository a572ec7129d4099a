//! Stop requests by signal, installed as the first thing `sigma train` does
//! (a signal during start-up must not kill a rank that a scheduler asked to
//! save). SIGTERM and SIGUSR1 (SLURM's `--signal=USR1@secs`) ask the run to
//! save a checkpoint at the end of the current step and exit; so does SIGINT
//! (Ctrl-C) when the run checkpoints at all; otherwise Ctrl-C ends it at once.
//! A second stop signal while stopping ends the process at once.
//!
//! A watcher thread receives the signals, so it can say what will happen (on
//! rank 0), which a signal handler cannot do safely.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::error::{Result, TrainError};

/// Exit status of a second stop signal (128 + SIGINT, as shells report Ctrl-C).
pub const EXIT_INTERRUPTED: i32 = 130;

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

impl StopSignals {
    /// Start watching SIGTERM, SIGUSR1 and SIGINT. Ctrl-C stops the process at
    /// once until `set_interrupt_saves(true)`. `announce`: print what happens (rank 0).
    pub fn install(announce: bool) -> Result<StopSignals> {
        let s = StopSignals::none();
        let mut signals = Signals::new([SIGTERM, SIGUSR1, SIGINT])
            .map_err(|e| TrainError::Other(format!("cannot install signal handlers: {e}")))?;
        let (requested, which, interrupt_saves) = (
            s.requested.clone(),
            s.which.clone(),
            s.interrupt_saves.clone(),
        );
        std::thread::Builder::new()
            .name("sigma-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGINT && !interrupt_saves.load(Ordering::SeqCst) {
                        eprintln!("\nsigma: interrupted (no checkpointing configured, nothing to save)");
                        signal_hook::low_level::exit(EXIT_INTERRUPTED);
                    }
                    if requested.swap(true, Ordering::SeqCst) {
                        eprintln!("\nsigma: {} again: exiting now without saving", name(sig));
                        signal_hook::low_level::exit(EXIT_INTERRUPTED);
                    }
                    which.store(sig, Ordering::SeqCst);
                    if announce {
                        eprintln!(
                            "\nsigma: {} received: saving a checkpoint at the end of this step, then exiting ({} again exits at once)",
                            name(sig),
                            if sig == SIGINT { "Ctrl-C" } else { "the same signal" }
                        );
                    }
                }
            })
            .map_err(|e| TrainError::Other(format!("cannot start the signal thread: {e}")))?;
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
