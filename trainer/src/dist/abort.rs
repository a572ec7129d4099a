//! Orderly shutdown when the job is lost: a helper thread (liveness, the NCCL
//! watchdog) that finds a peer or the store gone records the reason here
//! instead of ending the process under the main thread's feet (exiting from
//! another thread runs libtorch's static destructors while the main thread
//! may still be inside libtorch). The main thread looks at the reason
//! wherever it waits on peers (every slice of a store wait) and at every
//! step, and returns an error that the binary prints once before exiting 1.
//!
//! Where the main thread cannot notice (blocked in a device sync behind a
//! collective that will never finish), `exit_after` ends the process after a
//! grace period with `_exit`, which skips those destructors: one message, no
//! panic, no hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Result, TrainError};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static REASON: Mutex<Option<String>> = Mutex::new(None);
static PRINTED: AtomicBool = AtomicBool::new(false);

/// Ask the main thread to stop with `reason` (the first reason wins).
pub fn request(reason: String) {
    let mut r = REASON.lock().unwrap_or_else(|e| e.into_inner());
    if r.is_none() {
        *r = Some(reason);
        REQUESTED.store(true, Ordering::SeqCst);
    }
}

/// The recorded reason, if the job is being stopped.
pub fn reason() -> Option<String> {
    if !REQUESTED.load(Ordering::SeqCst) {
        return None;
    }
    REASON.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `Err` with the recorded reason when the job is being stopped.
pub fn check() -> Result<()> {
    match reason() {
        Some(r) => Err(TrainError::Aborted(r)),
        None => Ok(()),
    }
}

/// Print `error: <message>` unless a message about the stop was printed already.
pub fn print_once(message: &str) {
    if !PRINTED.swap(true, Ordering::SeqCst) {
        eprintln!("error: {message}");
    }
}

/// End the process now, without running exit handlers or destructors.
pub fn exit_now(message: &str) -> ! {
    print_once(message);
    signal_hook::low_level::exit(1)
}

/// After `grace`, end the process if it is still running (the main thread did
/// not get to report the recorded reason itself).
pub fn exit_after(grace: Duration) -> ! {
    std::thread::sleep(grace);
    let r = reason().unwrap_or_else(|| "the job was stopped".into());
    exit_now(&format!(
        "{r} (the main thread did not stop within {grace:?})"
    ))
}
