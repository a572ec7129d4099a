//! Pipeline schedules as pure functions: (stages `pp`, virtual stages per
//! rank `v`, micro-batches `m`) -> for every rank, the order of its forward
//! and backward passes. Communication follows from the order: before a
//! forward of virtual stage `s` (chunk `c` on rank `r` is virtual stage
//! `c * pp + r`) comes the receive of its input from stage `s - 1`, after it
//! the send to `s + 1`; backward the other way. Sends never wait for their
//! receiver (buffered on CPU, a send stream per channel on GPU), so a
//! schedule runs without deadlock exactly when its waits form no cycle,
//! which `simulate` checks.
//!
//! 1F1B (`v = 1`): rank `r` runs `min(pp - 1 - r, m)` warm-up forwards, then
//! alternates one forward and one backward, then drains the backwards; at most
//! `pp - r` micro-batches are in flight on it. Any `m >= 1` works (with
//! `m < pp` the warm-up is cut short and the bubble is large).
//! Interleaved 1F1B (`v > 1`, Narayanan et al. 2021): each rank holds `v`
//! chunks of layers; micro-batches go through the chunks in groups of `pp`,
//! which needs `m` to be a multiple of `pp`; the bubble shrinks by `v`.

use crate::error::{Result, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Forward { mb: usize, chunk: usize },
    Backward { mb: usize, chunk: usize },
}

impl Action {
    pub fn mb(self) -> usize {
        match self {
            Action::Forward { mb, .. } | Action::Backward { mb, .. } => mb,
        }
    }
    pub fn chunk(self) -> usize {
        match self {
            Action::Forward { chunk, .. } | Action::Backward { chunk, .. } => chunk,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Schedule {
    pub pp: usize,
    pub v: usize,
    pub m: usize,
    /// Per rank, its passes in order.
    pub ranks: Vec<Vec<Action>>,
}

/// Can `m` micro-batches run on `pp` stages with `v` chunks per rank?
pub fn check(pp: usize, v: usize, m: usize) -> Result<()> {
    if pp == 0 || v == 0 || m == 0 {
        return Err(TrainError::config(
            "parallel.pp",
            "stages, virtual stages and micro-batches must be positive",
        ));
    }
    if v > 1 && !m.is_multiple_of(pp) {
        return Err(TrainError::config(
            "train.grad_accum_steps",
            format!(
                "{m} micro-batches per step do not fill the interleaved schedule: it sends micro-batches through the chunks in groups of parallel.pp ({pp}), so grad_accum_steps must be a multiple of {pp} (or use pp_schedule = \"1f1b\")"
            ),
        ));
    }
    Ok(())
}

impl Schedule {
    pub fn new(pp: usize, v: usize, m: usize) -> Result<Schedule> {
        check(pp, v, m)?;
        let ranks = (0..pp)
            .map(|r| {
                if v == 1 {
                    one_f_one_b(pp, r, m)
                } else {
                    interleaved(pp, v, r, m)
                }
            })
            .collect();
        Ok(Schedule { pp, v, m, ranks })
    }

    /// The stages without passes (forward-only use: validation).
    pub fn stages_only(pp: usize, v: usize) -> Schedule {
        Schedule {
            pp,
            v,
            m: 0,
            ranks: vec![Vec::new(); pp],
        }
    }

    /// Virtual stage of chunk `chunk` on rank `rank`.
    pub fn stage(&self, rank: usize, chunk: usize) -> usize {
        crate::dist::mesh::stage_of(rank, chunk, self.pp)
    }

    /// Rank and chunk of virtual stage `s`.
    pub fn place(&self, s: usize) -> (usize, usize) {
        crate::dist::mesh::stage_place(s, self.pp)
    }

    pub fn num_stages(&self) -> usize {
        self.pp * self.v
    }

    /// Theoretical idle fraction of a step: (pp - 1) / (v * m + pp - 1).
    pub fn bubble(&self) -> f64 {
        (self.pp - 1) as f64 / (self.v * self.m + self.pp - 1) as f64
    }
}

fn one_f_one_b(pp: usize, r: usize, m: usize) -> Vec<Action> {
    let warm = (pp - 1 - r).min(m);
    let mut out: Vec<Action> = (0..warm)
        .map(|mb| Action::Forward { mb, chunk: 0 })
        .collect();
    for i in 0..m - warm {
        out.push(Action::Forward {
            mb: warm + i,
            chunk: 0,
        });
        out.push(Action::Backward { mb: i, chunk: 0 });
    }
    out.extend((m - warm..m).map(|mb| Action::Backward { mb, chunk: 0 }));
    out
}

fn interleaved(pp: usize, v: usize, r: usize, m: usize) -> Vec<Action> {
    let total = m * v;
    // The k-th forward (and backward) of this rank: micro-batches in groups of
    // pp through every chunk (backward: chunks in reverse).
    let fwd = |k: usize| Action::Forward {
        mb: (k / (pp * v)) * pp + k % pp,
        chunk: (k / pp) % v,
    };
    let bwd = |k: usize| Action::Backward {
        mb: (k / (pp * v)) * pp + k % pp,
        chunk: v - 1 - (k / pp) % v,
    };
    let warm = ((pp - 1 - r) * 2 + (v - 1) * pp).min(total);
    let mut out: Vec<Action> = (0..warm).map(fwd).collect();
    for i in 0..total - warm {
        out.push(fwd(warm + i));
        out.push(bwd(i));
    }
    out.extend((total - warm..total).map(bwd));
    out
}

/// What running a schedule showed.
#[derive(Debug)]
pub struct Simulation {
    /// Per rank, the most forward passes whose backward had not run yet.
    pub peak_in_flight: Vec<usize>,
    /// Time steps of the simulation (each pass takes one).
    pub time: usize,
}

/// Run `s` with sends that never wait and receives that wait for their
/// message: `Err` names a deadlock or an ordering error.
pub fn simulate(s: &Schedule) -> std::result::Result<Simulation, String> {
    use std::collections::HashSet;
    let n = s.num_stages();
    // Messages available: (kind, mb, to stage); kind 0 activation, 1 gradient.
    let mut sent: HashSet<(u8, usize, usize)> = HashSet::new();
    let mut pc = vec![0usize; s.pp];
    let mut done_fwd: HashSet<(usize, usize)> = HashSet::new();
    let mut in_flight = vec![0usize; s.pp];
    let mut peak = vec![0usize; s.pp];
    let mut time = 0;
    loop {
        if (0..s.pp).all(|r| pc[r] == s.ranks[r].len()) {
            break;
        }
        // Every rank that can run its next pass runs it in this time step.
        let mut ran = Vec::new();
        for (r, (ops, &at)) in s.ranks.iter().zip(&pc).enumerate() {
            let Some(&a) = ops.get(at) else {
                continue;
            };
            let st = s.stage(r, a.chunk());
            let ready = match a {
                Action::Forward { mb, .. } => st == 0 || sent.contains(&(0, mb, st)),
                Action::Backward { mb, .. } => {
                    if !done_fwd.contains(&(mb, st)) {
                        return Err(format!("rank {r}: backward of micro-batch {mb} on stage {st} before its forward"));
                    }
                    st == n - 1 || sent.contains(&(1, mb, st))
                }
            };
            if ready {
                ran.push((r, a, st));
            }
        }
        if ran.is_empty() {
            return Err(format!(
                "deadlock at time {time}: every rank waits ({pc:?})"
            ));
        }
        for (r, a, st) in ran {
            match a {
                Action::Forward { mb, .. } => {
                    done_fwd.insert((mb, st));
                    in_flight[r] += 1;
                    peak[r] = peak[r].max(in_flight[r]);
                    if st + 1 < n {
                        sent.insert((0, mb, st + 1));
                    }
                }
                Action::Backward { mb, .. } => {
                    in_flight[r] -= 1;
                    if st > 0 {
                        sent.insert((1, mb, st - 1));
                    }
                }
            }
            pc[r] += 1;
        }
        time += 1;
    }
    Ok(Simulation {
        peak_in_flight: peak,
        time,
    })
}

/// A schedule run with durations: when each pass of each rank started and
/// ended, its rank's passes in order. Time 0 is the start of the step, when
/// every rank begins (the step before ended with collectives over all of them).
#[derive(Clone, Debug)]
pub struct Timeline {
    pub passes: Vec<Vec<(f64, f64)>>,
}

impl Timeline {
    /// When the last pass of any rank ends.
    pub fn end(&self) -> f64 {
        (0..self.passes.len())
            .map(|r| self.rank_end(r))
            .fold(0.0, f64::max)
    }

    /// When rank `r`'s last pass ends.
    pub fn rank_end(&self, r: usize) -> f64 {
        self.passes[r].last().map_or(0.0, |p| p.1)
    }

    /// Time rank `r` computes.
    pub fn busy(&self, r: usize) -> f64 {
        self.passes[r].iter().map(|(a, b)| b - a).sum()
    }

    /// The fraction of rank `r`'s stretch, from the start of the step to the
    /// end of its last pass, in which it computed nothing: what a trace logs
    /// as `pipeline_bubble` (`engine::pipeline::Trace::bubble`).
    pub fn bubble(&self, r: usize) -> f64 {
        let end = self.rank_end(r);
        if end > 0.0 {
            1.0 - self.busy(r) / end
        } else {
            0.0
        }
    }
}

/// Run `s` as the trainer does, with durations: each rank runs its passes
/// in its order, a pass starting when its rank is free and its input has
/// arrived. `dur(rank, action)`: how long a pass takes; `link(from, to)`:
/// how long a message from virtual stage `from` takes to reach `to` (sends
/// never hold their sender). `Err` names a deadlock.
pub fn simulate_timed(
    s: &Schedule,
    dur: &dyn Fn(usize, Action) -> f64,
    link: &dyn Fn(usize, usize) -> f64,
) -> std::result::Result<Timeline, String> {
    use std::collections::HashMap;
    let n = s.num_stages();
    // End of each pass: (is backward, micro-batch, virtual stage).
    let mut ended: HashMap<(bool, usize, usize), f64> = HashMap::new();
    let mut pc = vec![0usize; s.pp];
    let mut free = vec![0.0f64; s.pp];
    let mut passes: Vec<Vec<(f64, f64)>> = vec![Vec::new(); s.pp];
    loop {
        let mut progress = false;
        for (r, acts) in s.ranks.iter().enumerate() {
            while let Some(&a) = acts.get(pc[r]) {
                let st = s.stage(r, a.chunk());
                let (bwd, from) = match a {
                    Action::Forward { .. } => (false, (st > 0).then(|| st - 1)),
                    Action::Backward { .. } => (true, (st + 1 < n).then_some(st + 1)),
                };
                let ready = match from {
                    None => Some(0.0),
                    Some(f) => ended.get(&(bwd, a.mb(), f)).map(|&e| e + link(f, st)),
                };
                let Some(ready) = ready else { break };
                if bwd && !ended.contains_key(&(false, a.mb(), st)) {
                    return Err(format!(
                        "rank {r}: backward of micro-batch {} on stage {st} before its forward",
                        a.mb()
                    ));
                }
                let start = free[r].max(ready);
                let end = start + dur(r, a);
                ended.insert((bwd, a.mb(), st), end);
                passes[r].push((start, end));
                free[r] = end;
                pc[r] += 1;
                progress = true;
            }
        }
        if (0..s.pp).all(|r| pc[r] == s.ranks[r].len()) {
            return Ok(Timeline { passes });
        }
        if !progress {
            return Err(format!("deadlock: every rank waits ({pc:?})"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schedule_runs_every_pass_once_in_order_without_deadlock() {
        for pp in 1..=6 {
            for v in 1..=3 {
                for m in 1..=12 {
                    let Ok(s) = Schedule::new(pp, v, m) else {
                        assert!(v > 1 && m % pp != 0, "refused pp {pp} v {v} m {m}");
                        continue;
                    };
                    for (r, acts) in s.ranks.iter().enumerate() {
                        assert_eq!(acts.len(), 2 * m * v, "pp {pp} v {v} m {m} rank {r}");
                        let set: std::collections::HashSet<_> = acts.iter().collect();
                        assert_eq!(
                            set.len(),
                            acts.len(),
                            "a pass twice: pp {pp} v {v} m {m} rank {r}"
                        );
                    }
                    let sim = simulate(&s).unwrap_or_else(|e| panic!("pp {pp} v {v} m {m}: {e}"));
                    if v == 1 {
                        // 1F1B keeps at most pp - r micro-batches in flight on rank r.
                        for (r, &p) in sim.peak_in_flight.iter().enumerate() {
                            assert_eq!(p, (pp - r).min(m), "pp {pp} m {m} rank {r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_first_stage_of_1f1b_holds_as_many_micro_batches_as_there_are_stages() {
        let s = Schedule::new(4, 1, 8).expect("schedule");
        assert_eq!(simulate(&s).expect("runs").peak_in_flight[0], 4);
        assert!((s.bubble() - 3.0 / 11.0).abs() < 1e-12);
        // Interleaving shrinks the theoretical bubble by the number of chunks.
        assert!((Schedule::new(4, 2, 8).expect("schedule").bubble() - 3.0 / 19.0).abs() < 1e-12);
    }

    #[test]
    fn too_few_micro_batches_for_interleaving_are_refused() {
        let e = Schedule::new(4, 2, 6).unwrap_err().to_string();
        assert!(
            e.contains("train.grad_accum_steps") && e.contains("multiple of 4"),
            "{e}"
        );
        // 1F1B takes any count, even fewer than the stages.
        assert!(Schedule::new(4, 1, 2).is_ok());
    }
}
