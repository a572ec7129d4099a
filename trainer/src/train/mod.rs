//! The training loop. `Trainer::build` wires the parts together (device,
//! dataset, model, optimizer, loader) and writes nothing; `Trainer::resume`
//! loads a checkpoint; `Trainer::run` writes the run's files and loops: gather
//! a global batch of micro-batches, forward/backward each through the segment
//! engine with the loss normalised by the global batch's target tokens, one
//! AdamW step, log, validate, save.

mod build;
pub mod lr;
pub mod metrics;
pub mod plot;
pub mod profile;
mod step;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use sigma_data::{DataState, Dataset, Loader};
use tch::Device;

use crate::checkpoint::save::{SaveInfo, Saver};
use crate::checkpoint::Progress;
use crate::config::{NanPolicy, RunConfig};
use crate::dist::buckets::GradBuckets;
use crate::dist::{abort, Job};
use crate::engine::pipeline::Trace;
use crate::engine::ExecOptions;
use crate::error::{Result, TrainError};
use crate::guard;
use crate::kernels::gpu_memory;
use crate::model::{GradSink, Model};
use crate::optim::{AdamW, StepStats};
use crate::parallel::schedule::Schedule;
use crate::parallel::Layout;
use crate::signals::StopSignals;
use metrics::MetricsWriter;
use profile::{Profiler, PROFILED_STEPS};
pub use step::batch_tensor;

pub struct Trainer {
    pub cfg: RunConfig,
    pub device: Device,
    /// This rank's place in the job and share of the model.
    pub layout: Layout,
    /// How passes run (from the config, resolved once).
    pub opts: ExecOptions,
    pub model: Model,
    /// Where matmul weight gradients go in backward (mixed precision with
    /// `train.fused_weight_grad`): the optimizer's gradient buffer.
    sink: Option<GradSink>,
    pub optim: AdamW,
    pub dataset: Arc<Dataset>,
    loader: Loader,
    /// Only rank 0 writes metrics (opened when the run starts, after any resume).
    metrics: Option<MetricsWriter>,
    saver: Saver,
    /// First step to run (0, or the step of the checkpoint resumed from).
    pub start_step: u64,
    skipped_before: u64,
    /// Save a checkpoint and stop after this many steps (`--stop-after`).
    pub stop_after: Option<u64>,
    /// Set when the job has more than one process.
    pub job: Option<Job>,
    /// The context-parallel ring (cp > 1), its group moved out of the job.
    ring: Option<crate::engine::Ring>,
    /// Plain data parallelism: gradient buckets reduced during backward.
    buckets: Option<GradBuckets>,
    pub device_name: String,
    pub peak_flops: Option<f64>,
    pub flops_per_token: f64,
    pub progress: bool,
    /// Stop requests by signal (installed by the caller before `build`).
    pub signals: StopSignals,
    rank: usize,
    dp_rank: usize,
    /// Learning rate of the last step of the checkpoint resumed from.
    resumed_lr: f64,
    /// The pipeline trace being recorded (`metrics.trace`, steps 2 to 4).
    trace: Option<Trace>,
    /// `metrics.profile`: the profiler of the steps in `profile::PROFILED_STEPS`.
    profiler: Option<Profiler>,
}

/// What `run` carries from step to step.
struct RunState {
    bar: ProgressBar,
    report: TrainReport,
    valid_curve: BTreeMap<String, Vec<(u64, f64)>>,
    interval_tokens: u64,
    interval_time: f64,
}

impl RunState {
    /// A warning above the progress bar (or on stderr without one).
    fn warn(&self, msg: &str) {
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }
}

/// What one optimizer step produced.
struct StepOutcome {
    loss: f64,
    lr: f64,
    stats: StepStats,
    target_tokens: usize,
    dt: f64,
    /// Seconds in data, forward/backward (with reductions), optimizer.
    phases: [f64; 3],
    stop_signal: bool,
    save_timed: bool,
    /// Seconds in tensor-parallel collectives (with SIGMA_TIME_COLLECTIVES=1).
    tp_comm_s: Option<f64>,
}

/// What a finished run reports.
#[derive(Debug, Default)]
pub struct TrainReport {
    pub losses: Vec<f64>,
    pub valid: BTreeMap<String, f64>,
    pub tokens_per_s: f64,
    pub mfu: Option<f64>,
    pub skipped_steps: u64,
    pub output_dir: PathBuf,
    pub data_state: DataState,
    /// (step, training stall in seconds) of each checkpoint saved.
    pub checkpoints: Vec<(u64, f64)>,
    /// Set when the run stopped early on a signal or `--stop-after`.
    pub stopped_at: Option<u64>,
    /// The early stop was asked for by a signal (not `--stop-after`).
    pub stopped_by_signal: bool,
}

impl Trainer {
    /// A message from rank 0 only.
    fn say(&self, msg: String) {
        if self.rank == 0 {
            eprintln!("{msg}");
        }
    }

    fn save(&mut self, step: u64, lr: f64, skipped: u64) -> Result<Option<f64>> {
        let data = self.loader.state();
        let info = SaveInfo {
            progress: Progress {
                step,
                consumed_samples: data.consumed_samples,
                consumed_tokens: data.consumed_samples * self.cfg.data.seq_len as u64,
                skipped_steps: skipped,
            },
            data,
            adam_steps: self.optim.steps,
            last_lr: lr,
        };
        let store = self.job.as_mut().map(|j| &mut j.store);
        self.saver
            .save(&self.model.params, &self.optim, info, store)
    }

    fn cuda_index(&self) -> Option<usize> {
        match self.device {
            Device::Cuda(i) => Some(i),
            _ => None,
        }
    }

    fn device_name(&self) -> String {
        match self.device {
            Device::Cuda(i) => metrics::gpu_name(i).unwrap_or_else(|| format!("cuda:{i}")),
            _ => "cpu".into(),
        }
    }

    /// Write this rank's profile (`profile-rank<r>.json` and `.txt` in the run
    /// directory); rank 0 prints its table.
    fn write_profile(&mut self) -> Result<()> {
        let Some(mut p) = self.profiler.take() else {
            return Ok(());
        };
        let prof = p.finish();
        let dir = PathBuf::from(&self.cfg.metrics.output_dir);
        let base = dir.join(format!("profile-rank{}", self.rank));
        let json = serde_json::to_string_pretty(prof).map_err(|e| {
            TrainError::internal_state(format!("the profile does not serialise: {e}"))
        })?;
        sigma_data::fsutil::write_atomic(&base.with_extension("json"), json.as_bytes())?;
        let table = prof.table();
        sigma_data::fsutil::write_atomic(&base.with_extension("txt"), table.as_bytes())?;
        self.say(format!("{table}profile written to {}.json", base.display()));
        Ok(())
    }

    /// Write this rank's trace (`trace-rank<r>.json` in the run directory) and
    /// log the measured bubble next to the theoretical one (rank 0).
    fn write_trace(&mut self, step: u64) -> Result<()> {
        let Some(tr) = self.trace.take() else {
            return Ok(());
        };
        let dir = PathBuf::from(&self.cfg.metrics.output_dir);
        let path = dir.join(format!("trace-rank{}.json", self.rank));
        sigma_data::fsutil::write_atomic(&path, tr.to_json(self.rank).to_string().as_bytes())?;
        let m = self.cfg.accum_steps_at(step.saturating_sub(1));
        let theory = Schedule::new(self.cfg.parallel.pp, self.layout.pipe.v, m)?.bubble();
        if let Some(b) = tr.bubble() {
            self.say(format!(
                "pipeline trace: {} (rank 0 idle {:.1} % of the forward/backward stretch; (p - 1) / (v m + p - 1) = {:.1} %)",
                path.display(),
                100.0 * b,
                100.0 * theory
            ));
            if let Some(mw) = &mut self.metrics {
                mw.log(
                    step,
                    &json!({"step": step, "pipeline_bubble": b, "pipeline_bubble_theory": theory}),
                )?;
            }
        }
        Ok(())
    }

    /// Wait for the device (phase timings are wall-clock, so the GPU must be idle).
    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Memory for the metrics: on GPU the caching allocator's peaks since
    /// the start of the run, on CPU the process's peak resident set.
    fn memory_record(&self) -> serde_json::Value {
        match self.device {
            Device::Cuda(i) => gpu_memory_record(i),
            _ => json!({"peak_rss_bytes": metrics::peak_rss_bytes()}),
        }
    }

    /// The training loop, as named phases: `begin` (files, progress bar),
    /// then per step `train_step` (data, forward/backward, agreement across
    /// ranks, optimizer), `record` (skips, logging), `maybe_validate` and
    /// `maybe_save` (which also decides to stop), and `end`.
    pub fn run(&mut self) -> Result<TrainReport> {
        self.check_stop_after()?;
        let mut run = self.begin()?;
        if self.stop_after == Some(self.start_step) {
            // Stop at the step started or resumed from: write the initial or
            // loaded state in this run's layout (a checkpoint moved to
            // another dp/tp), then stop.
            guard::at("checkpoint save", None);
            if let Some(stall) = self.save(self.start_step, self.resumed_lr, self.skipped_before)? {
                run.report.checkpoints.push((self.start_step, stall));
            }
            self.saver.wait()?;
            self.say(format!(
                "--stop-after {0}: saved the checkpoint of step {0} in this layout (dp {1}, tp {2}, pp {3}) and stopped",
                self.start_step, self.cfg.parallel.dp, self.cfg.parallel.tp, self.cfg.parallel.pp
            ));
            run.report.stopped_at = Some(self.start_step);
            return self.end(run);
        }
        // The pipeline trace covers the 2nd to 4th step of this process.
        let traced = self.cfg.metrics.trace && self.cfg.parallel.pp > 1;
        let profiled = self.cfg.metrics.profile;
        let total = self.cfg.train.steps;
        for step in self.start_step..total {
            abort::check()?;
            crate::dist::env::maybe_inject_fault(self.rank, step);
            if traced && step == self.start_step + 1 {
                self.trace = Some(Trace::new(self.device));
            }
            if profiled && step == self.start_step + PROFILED_STEPS.start {
                self.profiler = Some(Profiler::new(self.cuda_index(), self.device_name()));
            }
            let out = self.train_step(step)?;
            if traced && self.trace.is_some() && (step == self.start_step + 3 || step + 1 == total)
            {
                self.write_trace(step + 1)?;
            }
            if self.profiler.is_some()
                && (step + 1 == self.start_step + PROFILED_STEPS.end || step + 1 == total)
            {
                self.write_profile()?;
            }
            self.record(step, &out, &mut run)?;
            self.maybe_validate(step, &mut run)?;
            if self.maybe_save(step, &out, &mut run)? {
                break;
            }
        }
        self.end(run)
    }

    /// `--stop-after N` must name a step this run reaches: from the step it
    /// starts at (saving that state) to `train.steps`.
    fn check_stop_after(&self) -> Result<()> {
        let (Some(n), total) = (self.stop_after, self.cfg.train.steps) else {
            return Ok(());
        };
        if n > total {
            return Err(TrainError::input(
                "--stop-after",
                format!(
                    "{n} is past the run's last step (train.steps = {total}): the run ends at step {total} anyway; give a step from {} to {total}",
                    self.start_step
                ),
            ));
        }
        if n < self.start_step {
            return Err(TrainError::input(
                "--stop-after",
                format!(
                    "{n} is before step {}, where the checkpoint resumed from stands; give a step from {} to {total}",
                    self.start_step, self.start_step
                ),
            ));
        }
        Ok(())
    }

    /// Everything the run writes before its first step: the resolved config
    /// (only now, after a resume's checks passed), the metrics files, the bar.
    fn begin(&mut self) -> Result<RunState> {
        let c = &self.cfg;
        let total = c.train.steps;
        let bar = if self.progress {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg} ETA {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        let out = PathBuf::from(&c.metrics.output_dir);
        if self.rank == 0 {
            sigma_data::fsutil::write_atomic(&out.join("config.toml"), c.to_toml().as_bytes())?;
            let mut m = MetricsWriter::create(&out, c.metrics.tensorboard, self.start_step)?;
            if let Some(f) = self.model.fp8() {
                let rec = json!({"step": self.start_step, "fp8": f.record(&self.model.params)});
                m.log(self.start_step, &rec)?;
            }
            self.metrics = Some(m);
        }
        bar.set_position(self.start_step);
        if self.start_step >= total {
            self.say(format!(
                "nothing to do: the run is at step {} of {total}",
                self.start_step
            ));
        }
        Ok(RunState {
            bar,
            report: TrainReport {
                output_dir: out,
                skipped_steps: self.skipped_before,
                ..Default::default()
            },
            valid_curve: BTreeMap::new(),
            interval_tokens: 0,
            interval_time: 0.0,
        })
    }

    /// Skip accounting (and `nan_policy = "abort"`), the step's record, the bar.
    fn record(&mut self, step: u64, o: &StepOutcome, run: &mut RunState) -> Result<()> {
        run.interval_tokens += o.target_tokens as u64;
        run.interval_time += o.dt;
        run.report.losses.push(o.loss);
        if !o.stats.applied {
            run.report.skipped_steps += 1;
            if self.cfg.train.nan_policy == NanPolicy::Abort {
                return Err(TrainError::NonFinite {
                    step,
                    loss: o.loss,
                    grad_norm: o.stats.grad_norm,
                });
            }
            run.warn(&format!(
                "warning: step {step}: non-finite loss {} / grad norm {}; update skipped (train.nan_policy = \"skip\")",
                o.loss, o.stats.grad_norm
            ));
        }
        if step == 0
            && self.sink.is_some()
            && self.model.params.flat.device().is_cuda()
            && !crate::kernels::fused::linear_accum_fused_gemm()
        {
            run.warn(
                "warning: libtorch refused the GEMM with an fp32 output that adds matmul \
                 weight gradients into the gradient buffer; they are computed in bf16 \
                 and added instead (slower; train.fused_weight_grad)",
            );
        }
        let last = step + 1 == self.cfg.train.steps;
        if (step + 1).is_multiple_of(self.cfg.train.log_every.max(1)) || last {
            self.log_step(step, o, run)?;
        }
        run.bar.inc(1);
        Ok(())
    }

    /// The step's line in metrics.jsonl (speed and MFU over the steps since
    /// the last line) and the progress bar's message.
    fn log_step(&mut self, step: u64, o: &StepOutcome, run: &mut RunState) -> Result<()> {
        let c = &self.cfg;
        let devices = (c.parallel.dp * c.parallel.cp * c.parallel.tp * c.parallel.pp) as f64;
        let tps = run.interval_tokens as f64 / run.interval_time.max(1e-9);
        // Global tokens/s over the peak of all devices of the job.
        let mfu = self
            .peak_flops
            .map(|p| tps * self.flops_per_token / (p * devices));
        let [t_data, t_fwd_bwd, t_optim] = o.phases;
        let rec = json!({
            "step": step + 1,
            "loss": o.loss,
            "lr": o.lr,
            "grad_norm": o.stats.grad_norm,
            "tokens_per_s": tps,
            "mfu": mfu,
            "global_batch_tokens": o.target_tokens,
            "step_time_s": o.dt,
            "phase_s": {"data": t_data, "forward_backward": t_fwd_bwd, "optimizer": t_optim},
            "tp_comm_s": o.tp_comm_s,
            "skipped": !o.stats.applied,
            "optimizer_state_bytes": self.optim.state_bytes(),
            "memory": self.memory_record(),
        });
        if let Some(m) = &mut self.metrics {
            m.log(step + 1, &rec)?;
        }
        run.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s{}",
            o.loss,
            o.lr,
            tps,
            mfu.map(|m| format!(" MFU {:.1}%", 100.0 * m))
                .unwrap_or_default()
        ));
        run.report.tokens_per_s = tps;
        run.report.mfu = mfu;
        run.interval_tokens = 0;
        run.interval_time = 0.0;
        Ok(())
    }

    /// Validation every `train.eval_every` steps and after the last.
    fn maybe_validate(&mut self, step: u64, run: &mut RunState) -> Result<()> {
        let c = &self.cfg.train;
        let last = step + 1 == c.steps;
        if !((c.eval_every > 0 && (step + 1).is_multiple_of(c.eval_every)) || last) {
            return Ok(());
        }
        guard::at("validation", None);
        let v = self.validate()?;
        for (k, l) in &v {
            run.valid_curve
                .entry(k.clone())
                .or_default()
                .push((step + 1, *l));
        }
        if let Some(m) = &mut self.metrics {
            m.log(step + 1, &json!({"step": step + 1, "val_loss": v}))?;
        }
        run.report.valid = v;
        Ok(())
    }

    /// Save when due (every N steps or minutes, a stop request, the last step).
    /// Returns true when the run stops here.
    fn maybe_save(&mut self, step: u64, o: &StepOutcome, run: &mut RunState) -> Result<bool> {
        let c = self.cfg.checkpoint.clone();
        let done = step + 1;
        let last = done == self.cfg.train.steps;
        let stop = o.stop_signal || self.stop_after == Some(done);
        let every = c.every_steps > 0 && done.is_multiple_of(c.every_steps);
        if stop || every || o.save_timed || (last && self.cfg.checkpointing()) {
            guard::at("checkpoint save", None);
            if let Some(stall) = self.save(done, o.lr, run.report.skipped_steps)? {
                run.report.checkpoints.push((done, stall));
                if let Some(m) = &mut self.metrics {
                    m.log(
                        done,
                        &json!({"step": done, "checkpoint": {"stall_s": stall}}),
                    )?;
                }
            }
        }
        if !stop {
            return Ok(false);
        }
        self.saver.wait()?;
        let why = if o.stop_signal {
            "signal received"
        } else {
            "--stop-after"
        };
        let msg = format!(
            "{why}: saved {} and stopped after step {done}",
            self.saver
                .root
                .join(crate::checkpoint::step_dir_name(done))
                .display()
        );
        run.bar.println(&msg);
        if run.bar.is_hidden() {
            self.say(msg);
        }
        run.report.stopped_at = Some(done);
        run.report.stopped_by_signal = o.stop_signal;
        Ok(true)
    }

    /// Wait for the last save, leave the job cleanly, draw the loss curve.
    fn end(&mut self, run: RunState) -> Result<TrainReport> {
        let RunState {
            bar,
            mut report,
            valid_curve,
            ..
        } = run;
        // A run that stopped inside the profiled steps writes what it profiled.
        if self.profiler.is_some() {
            self.write_profile()?;
        }
        self.saver.wait()?;
        bar.finish_and_clear();
        report.data_state = self.loader.state();
        if let Some(job) = &mut self.job {
            job.finish()?;
        }
        if let (true, Some(m)) = (self.cfg.metrics.plot, &self.metrics) {
            let train: Vec<(u64, f64)> = report
                .losses
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u64 + self.start_step + 1, l))
                .collect();
            let valid: Vec<(String, Vec<(u64, f64)>)> = valid_curve.into_iter().collect();
            crate::train::plot::loss_png(&m.dir.join("loss.png"), &train, &valid)?;
        }
        Ok(report)
    }
}

/// The caching allocator's figures for the metrics (MiB): peak allocated
/// (what tensors needed) and peak reserved (what the allocator held).
fn gpu_memory_record(index: usize) -> serde_json::Value {
    match gpu_memory::gpu_memory(index) {
        Some(m) => json!({
            "allocated_mib_peak": gpu_memory::mib(m.peak_allocated),
            "reserved_mib_peak": gpu_memory::mib(m.peak_reserved),
            "allocated_mib": gpu_memory::mib(m.allocated),
        }),
        None => json!({}),
    }
}
