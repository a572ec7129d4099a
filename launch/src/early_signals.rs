//! The stop signals (SIGTERM, SIGUSR1, SIGINT) blocked from the first
//! instructions of every `sigma` process, before libtorch initialises.
//!
//! `sigma` links libtorch, whose static initialisers run before `main` (about
//! 0.4 s on an idle machine, longer under load). A pre-emption signal in that
//! time used to kill the process with its default action (SLURM then saw
//! `FAILED 138`: no checkpoint, no requeue). The dynamic loader calls the
//! functions of the executable's `.preinit_array` after it has mapped and
//! relocated every library (a few milliseconds, `LD_DEBUG=statistics`) and
//! before any library's initialisers (glibc's `_dl_init`); the one here
//! blocks the stop signals, so one that arrives later stays pending until
//! `sigma train` (or `sigma launch`) has its handlers and unblocks them
//! (trainer/src/signals.rs); every other command unblocks them at the start
//! of `main`, where their default action applies as before. Ranks started by
//! `sigma launch` are blocked before `exec` and have no window at all; a
//! process started otherwise (srun) has the few milliseconds of loading.
//!
//! The only unsafe code is the attribute that places a function pointer in
//! the `.preinit_array` section (the `unsafe_code` lint covers
//! `#[link_section]`); the function itself is safe code calling
//! `pthread_sigmask`, which needs nothing initialised.
#![allow(unsafe_code)] // `#[link_section = ".preinit_array"]`: see above.

use std::ffi::{c_char, c_int};

/// Called by the dynamic loader before any library initialiser.
extern "C" fn block_stop_signals_at_start(
    _argc: c_int,
    _argv: *const *const c_char,
    _envp: *const *const c_char,
) {
    sigma_trainer::signals::block_stop_signals();
}

#[used]
#[link_section = ".preinit_array"]
static PREINIT: extern "C" fn(c_int, *const *const c_char, *const *const c_char) =
    block_stop_signals_at_start;
