//! The process environment: the variables sigma's libraries read besides
//! the job layout (`dist::env`), each with what it does.

/// `SIGMA_TIME_COLLECTIVES=1`: time every tensor-parallel collective (the
/// compute stream is synchronised around each, which costs a little speed);
/// the trainer logs the seconds per step as `tp_comm_s`. Timing runs every
/// collective to completion where it is issued, so it also turns off the
/// overlap of backward collectives with weight gradients
/// (`parallel.tp_comm_overlap`): the time is all exposed.
pub const TIME_COLLECTIVES: &str = "SIGMA_TIME_COLLECTIVES";

/// Whether `SIGMA_TIME_COLLECTIVES=1` is set.
pub fn time_collectives() -> bool {
    std::env::var(TIME_COLLECTIVES).is_ok_and(|v| v == "1")
}
