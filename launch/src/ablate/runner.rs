//! Running the variants: each as a child `sigma train --resume auto` (or
//! `sigma launch ... -- train` for a multi-GPU variant), then `sigma eval` on
//! its final checkpoint. Slots are groups of GPUs (`--gpus-per-run`), or the
//! one CPU; a worker thread per slot takes the next variant. The main thread
//! draws the progress view from the runs' metrics.jsonl and passes a stop
//! signal on to the children, which save and exit.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::plan::{Plan, Variant};

/// Exit status the child `sigma train` uses when a signal stopped it after saving.
const STOPPED: i32 = 75;

/// Where variants run: the GPUs of one run (CUDA_VISIBLE_DEVICES), or the CPU.
#[derive(Clone, Debug)]
pub struct Slot {
    pub gpus: Option<Vec<String>>,
}

impl Slot {
    pub fn describe(&self) -> String {
        match &self.gpus {
            None => "CPU".into(),
            Some(g) => format!("GPU {}", g.join(",")),
        }
    }
    fn nproc(&self) -> usize {
        self.gpus.as_ref().map(|g| g.len()).unwrap_or(1)
    }
}

/// The slots of this host: the visible GPUs in groups of `per_run`, or the CPU.
pub fn slots(per_run: usize, plan: &Plan) -> Result<Vec<Slot>> {
    let n = tch::Cuda::device_count() as usize;
    let world = |v: &Variant| sigma_trainer::dist::MeshDims::of(&v.cfg.parallel).world();
    if n == 0 {
        if let Some(v) = plan.variants.iter().find(|v| world(v) > 1) {
            bail!("variant {} needs {} processes (parallel.dp x cp x tp x pp) and runs one per GPU; no GPU is usable here", v.name, world(v));
        }
        return Ok(vec![Slot { gpus: None }]);
    }
    if per_run == 0 || per_run > n {
        bail!("--gpus-per-run {per_run}: this host has {n} usable GPU(s)");
    }
    if let Some(v) = plan.variants.iter().find(|v| world(v) != per_run) {
        bail!(
            "variant {} runs {} process(es) (parallel.dp x cp x tp x pp = {} x {} x {} x {}) but --gpus-per-run is {per_run}: make them equal",
            v.name,
            world(v),
            v.cfg.parallel.dp,
            v.cfg.parallel.cp,
            v.cfg.parallel.tp,
            v.cfg.parallel.pp
        );
    }
    let visible: Vec<String> = match sigma_data::env::var("CUDA_VISIBLE_DEVICES") {
        Some(s) if !s.trim().is_empty() => s.split(',').map(|x| x.trim().to_string()).collect(),
        _ => (0..n).map(|i| i.to_string()).collect(),
    };
    Ok(visible
        .chunks_exact(per_run)
        .map(|c| Slot {
            gpus: Some(c.to_vec()),
        })
        .collect())
}

/// A finished variant: written after its evaluation, checked on a rerun.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
pub struct Done {
    pub base_config: String,
    pub sets: Vec<String>,
    pub checkpoint: String,
    pub seconds: f64,
}

pub fn done_path(v: &Variant) -> PathBuf {
    v.dir().join("done.json")
}

/// The variant's own overrides as recorded (the ablation's, then the variant's).
fn recorded(plan: &Plan, i: usize) -> Vec<String> {
    let mut s = plan.file.sets.clone();
    s.extend(plan.file.variants[i].set.iter().cloned());
    s
}

/// How far a variant got: finished (and still the same variant), or the step
/// of its newest checkpoint (0: fresh).
pub enum State {
    Done,
    At(u64),
}

pub fn state(plan: &Plan, i: usize) -> Result<State> {
    let v = &plan.variants[i];
    if let Ok(text) = std::fs::read(done_path(v)) {
        let d: Done =
            serde_json::from_slice(&text).with_context(|| format!("{}", done_path(v).display()))?;
        if d.sets != recorded(plan, i) || d.base_config != plan.file.base_config {
            bail!(
                "variant {} in {} finished with other settings (base {}, overrides {:?}; now base {}, {:?}): rerun it with --only {} or use another --output",
                v.name,
                plan.out.display(),
                d.base_config,
                d.sets,
                plan.file.base_config,
                recorded(plan, i),
                v.name
            );
        }
        return Ok(State::Done);
    }
    Ok(State::At(
        sigma_trainer::checkpoint::latest(&v.checkpoints())
            .map(|(s, _)| s)
            .unwrap_or(0),
    ))
}

/// The child `sigma` for a variant's training on `slot` (`extra`: more overrides, for the probe).
pub fn train_command(
    v: &Variant,
    base_config: &str,
    slot: &Slot,
    extra: &[String],
    resume: bool,
) -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find the sigma executable")?;
    let mut c = Command::new(exe);
    if slot.nproc() > 1 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        c.args([
            "launch",
            "--nproc-per-node",
            &slot.nproc().to_string(),
            "--master-port",
            &port.to_string(),
        ]);
        c.arg("--log-dir").arg(v.dir().join("launch-logs"));
        c.arg("--");
    }
    c.args([
        "train",
        "--config",
        base_config,
        "--quiet",
        "--stopped-exit-code",
        &STOPPED.to_string(),
    ]);
    if resume {
        c.args(["--resume", "auto"]);
    }
    for o in v.overrides.iter().chain(extra) {
        c.arg("--set").arg(o);
    }
    if let Some(g) = &slot.gpus {
        c.env("CUDA_VISIBLE_DEVICES", g.join(","));
    }
    // Its own process group: a Ctrl-C reaches the runner, which passes on one SIGTERM.
    c.process_group(0).stdin(Stdio::null());
    Ok(c)
}

/// Shared between the workers and the progress view.
struct Shared {
    queue: Mutex<VecDeque<usize>>,
    /// Per variant: what it is doing ("", "train", "eval", "finished": the result is in).
    phase: Mutex<Vec<String>>,
    children: Mutex<Vec<u32>>,
    stop: AtomicBool,
    /// Worker threads still running.
    alive: AtomicUsize,
}

/// Per variant: None while it runs, then Ok or the error ("stopped" after a stop request).
type Results = Arc<Mutex<Vec<Option<Result<(), String>>>>>;

/// A running variant's bar: the bar, the metrics.jsonl offset read, the last step and loss.
type Bar = (ProgressBar, u64, u64, Option<f64>);

pub struct Outcome {
    pub failed: Vec<(String, String)>,
    pub interrupted: bool,
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// Run a child to completion, its output appended to `log`; registered so a stop reaches it.
fn run_child(
    shared: &Shared,
    mut c: Command,
    log: &Path,
    stdout: Option<&mut Vec<u8>>,
) -> Result<std::process::ExitStatus> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("{}", log.display()))?;
    c.stderr(f.try_clone()?);
    if stdout.is_some() {
        c.stdout(Stdio::piped());
    } else {
        c.stdout(f);
    }
    let mut child = c.spawn().context("cannot start sigma")?;
    let pid = child.id();
    shared.children.lock().expect("lock").push(pid);
    if shared.stop.load(Ordering::SeqCst) {
        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGTERM);
    }
    if let Some(buf) = stdout {
        child.stdout.take().expect("piped").read_to_end(buf)?;
    }
    let status = child.wait()?;
    shared.children.lock().expect("lock").retain(|&p| p != pid);
    Ok(status)
}

/// Train (or resume) and evaluate one variant on `slot`.
fn run_variant(plan: &Plan, i: usize, slot: &Slot, shared: &Shared) -> Result<()> {
    let v = &plan.variants[i];
    sigma_data::fsutil::create_dir_all(&v.dir())?;
    let log = v.dir().join("train.log");
    let t0 = Instant::now();
    train_variant(plan, i, slot, shared, &log)?;
    let ck = final_checkpoint(v)?;
    shared.phase.lock().expect("lock")[i] = "eval".into();
    let out = eval_variant(&ck, slot, shared, &log)?;
    sigma_data::fsutil::write_atomic(&v.dir().join("eval.json"), &out)?;
    let done = Done {
        base_config: plan.file.base_config.clone(),
        sets: recorded(plan, i),
        checkpoint: ck.to_string_lossy().into_owned(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    sigma_data::fsutil::write_atomic(
        &done_path(v),
        serde_json::to_string_pretty(&done)?.as_bytes(),
    )?;
    Ok(())
}

/// Train variant `i` to its last step, resuming from its newest checkpoint
/// (nothing to do when that is the last step already).
fn train_variant(plan: &Plan, i: usize, slot: &Slot, shared: &Shared, log: &Path) -> Result<()> {
    let v = &plan.variants[i];
    let at = sigma_trainer::checkpoint::latest(&v.checkpoints())
        .map(|(s, _)| s)
        .unwrap_or(0);
    if at >= v.cfg.train.steps {
        return Ok(());
    }
    shared.phase.lock().expect("lock")[i] = "train".into();
    let status = run_child(
        shared,
        train_command(v, &plan.file.base_config, slot, &[], true)?,
        log,
        None,
    )?;
    if status.code() == Some(STOPPED) || shared.stop.load(Ordering::SeqCst) {
        bail!("stopped");
    }
    if !status.success() {
        bail!(
            "training failed ({}); see {}",
            describe_exit(status),
            log.display()
        );
    }
    Ok(())
}

/// The checkpoint of the variant's last step.
fn final_checkpoint(v: &Variant) -> Result<PathBuf> {
    let (step, ck) = sigma_trainer::checkpoint::latest(&v.checkpoints()).ok_or_else(|| {
        anyhow::anyhow!(
            "no checkpoint under {} after training",
            v.checkpoints().display()
        )
    })?;
    if step != v.cfg.train.steps {
        bail!(
            "the newest checkpoint under {} is step {step}, not the last step {}",
            v.checkpoints().display(),
            v.cfg.train.steps
        );
    }
    Ok(ck)
}

/// `sigma eval --json` of checkpoint `ck` on the slot's first GPU (or the
/// CPU); returns the JSON it printed.
fn eval_variant(ck: &Path, slot: &Slot, shared: &Shared, log: &Path) -> Result<Vec<u8>> {
    let exe = std::env::current_exe()?;
    let mut c = Command::new(exe);
    c.args(["eval", "--json", "--checkpoint"]).arg(ck);
    match &slot.gpus {
        Some(g) => {
            c.env("CUDA_VISIBLE_DEVICES", &g[0])
                .args(["--device", "cuda"]);
        }
        None => {
            c.args(["--device", "cpu"]);
        }
    }
    c.process_group(0).stdin(Stdio::null());
    let mut out = Vec::new();
    let status = run_child(shared, c, log, Some(&mut out))?;
    if shared.stop.load(Ordering::SeqCst) {
        bail!("stopped");
    }
    if !status.success() {
        bail!(
            "sigma eval failed ({}); see {}",
            describe_exit(status),
            log.display()
        );
    }
    serde_json::from_slice::<serde_json::Value>(&out)
        .context("sigma eval --json printed no JSON")?;
    Ok(out)
}

/// The newest training step in a metrics.jsonl, reading from `offset` on.
fn last_step(path: &Path, offset: &mut u64, step: &mut u64, loss: &mut Option<f64>) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut r = std::io::BufReader::new(f);
    let mut line = String::new();
    while let Ok(n) = r.read_line(&mut line) {
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        *offset += n as u64;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if let (Some(s), Some(l)) = (v["step"].as_u64(), v["loss"].as_f64()) {
                *step = s;
                *loss = Some(l);
            }
        }
        line.clear();
    }
}

/// Run `todo` (variant indices) on `slots`, with a progress view; `stop` is
/// set by the signal handlers.
pub fn run(
    plan: &Plan,
    todo: Vec<usize>,
    slots: &[Slot],
    stop: Arc<AtomicBool>,
    mut on_done: impl FnMut(usize),
) -> Result<Outcome> {
    let n = plan.variants.len();
    let shared = Arc::new(Shared {
        queue: Mutex::new(todo.iter().copied().collect()),
        phase: Mutex::new(vec![String::new(); n]),
        children: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        alive: AtomicUsize::new(slots.len()),
    });
    let results: Results = Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    let mut view = Progress::new(plan, todo.len());
    std::thread::scope(|scope| -> Result<Outcome> {
        for slot in slots {
            let (shared, results) = (shared.clone(), results.clone());
            scope.spawn(move || worker(plan, slot, &shared, &results));
        }
        let mut forwarded = false;
        loop {
            let alive = shared.alive.load(Ordering::SeqCst);
            if stop.load(Ordering::SeqCst) && !forwarded {
                forwarded = true;
                forward_stop(&shared, &view);
            }
            let phases = shared.phase.lock().expect("lock").clone();
            for (i, phase) in phases.iter().enumerate() {
                match phase.as_str() {
                    "train" | "eval" => view.show_running(plan, i, phase == "eval"),
                    "finished" => view.report_finished(plan, i, &results, &mut on_done),
                    _ => {}
                }
            }
            // Every worker had exited before this pass: all is reported.
            if alive == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        view.total.finish_and_clear();
        Ok(outcome(plan, &results, &shared))
    })
}

/// A worker thread: take the next variant from the queue and run it, until
/// the queue is empty or a stop is requested.
fn worker(plan: &Plan, slot: &Slot, shared: &Shared, results: &Results) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Some(i) = shared.queue.lock().expect("lock").pop_front() else {
            break;
        };
        let r = run_variant(plan, i, slot, shared).map_err(|e| format!("{e:#}"));
        results.lock().expect("lock")[i] = Some(r);
        shared.phase.lock().expect("lock")[i] = "finished".into();
    }
    shared.alive.fetch_sub(1, Ordering::SeqCst);
}

/// Pass a stop request on: no new variants, and one SIGTERM to each running
/// child's process group (they save a checkpoint and stop).
fn forward_stop(shared: &Shared, view: &Progress) {
    shared.stop.store(true, Ordering::SeqCst);
    view.say("sigma ablate: stop requested; the running variants save a checkpoint and stop (rerun the same command to resume)".into());
    for &pid in shared.children.lock().expect("lock").iter() {
        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGTERM);
    }
}

/// The variants that failed (a stop is not a failure), and whether a stop was requested.
fn outcome(plan: &Plan, results: &Results, shared: &Shared) -> Outcome {
    let r = results.lock().expect("lock");
    let failed = (0..plan.variants.len())
        .filter_map(|i| match &r[i] {
            Some(Err(e)) if e != "stopped" => Some((plan.variants[i].name.clone(), e.clone())),
            _ => None,
        })
        .collect();
    Outcome {
        failed,
        interrupted: shared.stop.load(Ordering::SeqCst),
    }
}

/// The progress view on stderr: a bar per running variant under one for the
/// whole ablation, and a line per finished variant (plain lines when stderr
/// is not a terminal).
struct Progress {
    mp: MultiProgress,
    total: ProgressBar,
    quiet: bool,
    bars: Vec<Option<Bar>>,
    reported: Vec<bool>,
}

impl Progress {
    fn new(plan: &Plan, todo: usize) -> Self {
        let n = plan.variants.len();
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let quiet = mp.is_hidden();
        let total = mp.add(ProgressBar::new(todo as u64));
        total.set_style(
            ProgressStyle::with_template(
                "ablation {msg} [{bar:30}] {pos}/{len} variants, {elapsed_precise}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        total.set_message(plan.file.name.clone());
        Progress {
            mp,
            total,
            quiet,
            bars: (0..n).map(|_| None).collect(),
            reported: vec![false; n],
        }
    }

    fn say(&self, m: String) {
        if self.quiet {
            eprintln!("{m}");
        } else {
            self.mp.println(m).ok();
        }
    }

    /// Variant `i` trains or is evaluated: its bar, fed by its metrics.jsonl.
    fn show_running(&mut self, plan: &Plan, i: usize, evaluating: bool) {
        let v = &plan.variants[i];
        let (mp, total) = (&self.mp, &self.total);
        let b = self.bars[i].get_or_insert_with(|| {
            let b = mp.insert_before(total, ProgressBar::new(v.cfg.train.steps));
            b.set_style(
                ProgressStyle::with_template(
                    "  {prefix:<16} [{bar:30}] step {pos}/{len} {msg} eta {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b.set_prefix(v.name.clone());
            (b, 0, 0, None)
        });
        let (bar, off, step, loss) = b;
        last_step(&v.dir().join("metrics.jsonl"), off, step, loss);
        bar.set_position(*step);
        let l = loss.map(|l| format!("loss {l:.4}")).unwrap_or_default();
        bar.set_message(if evaluating {
            format!("{l}, evaluating")
        } else {
            l
        });
    }

    /// Variant `i` finished: clear its bar and say how it ended, once.
    fn report_finished(
        &mut self,
        plan: &Plan,
        i: usize,
        results: &Results,
        on_done: &mut impl FnMut(usize),
    ) {
        if self.reported[i] {
            return;
        }
        self.reported[i] = true;
        let v = &plan.variants[i];
        if let Some((b, ..)) = self.bars[i].take() {
            b.finish_and_clear();
        }
        let r = results.lock().expect("lock")[i].clone();
        match r {
            Some(Ok(())) => {
                self.total.inc(1);
                self.say(format!("variant {}: done", v.name));
                on_done(i);
            }
            Some(Err(e)) if e == "stopped" => self.say(format!(
                "variant {}: stopped; it resumes from its last checkpoint",
                v.name
            )),
            Some(Err(e)) => self.say(format!("variant {}: FAILED: {e}", v.name)),
            None => {}
        }
    }
}
