//! The single-device training loop. `Trainer::build` wires the parts together
//! (device, dataset, model, optimizer, loader, metrics); `Trainer::run` is the
//! loop: gather a global batch of micro-batches, forward/backward each through
//! the segment engine with the loss normalised by the global batch's target
//! tokens, one AdamW step, log, validate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use sigma_data::loader::LoaderOptions;
use sigma_data::store::block_on;
use sigma_data::{Batch, DataState, Dataset, Loader};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::load::{config_changes, resolve, Checkpoint};
use crate::checkpoint::save::{SaveInfo, Saver};
use crate::checkpoint::Progress;
use crate::config::{DeviceChoice, NanPolicy, Precision, RunConfig};
use crate::dist::buckets::GradBuckets;
use crate::dist::{DistEnv, Job};
use crate::engine;
use crate::error::{Result, TrainError};
use crate::metrics::{self, MetricsWriter};
use crate::model::Model;
use crate::optim::AdamW;
use crate::schedule::lr_at;
use crate::summary::summarize;

pub struct Trainer {
    pub cfg: RunConfig,
    pub device: Device,
    pub model: Model,
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
    /// Plain data parallelism: gradient buckets reduced during backward.
    buckets: Option<GradBuckets>,
    pub device_name: String,
    pub peak_flops: Option<f64>,
    pub flops_per_token: f64,
    pub progress: bool,
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
}

fn pick_device(c: DeviceChoice) -> Result<Device> {
    match c {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(TrainError::config(
            "train.device",
            "\"cuda\" requested but no CUDA device is usable (is the CUDA build of libtorch linked, and a GPU visible?)",
        )),
    }
}

/// Token ids of a batch as an int64 tensor [rows, seq_len + 1] on `device`.
pub fn batch_tensor(b: &Batch, device: Device) -> Tensor {
    let ids: Vec<i64> = b.tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_slice(&ids)
        .view([b.rows as i64, (b.seq_len + 1) as i64])
        .to_device(device)
}

impl Trainer {
    pub fn build(cfg: &RunConfig, progress: bool) -> Result<Trainer> {
        if let Some(n) = cfg.train.cpu_threads {
            tch::set_num_threads(n as i32);
        }
        let env = DistEnv::from_env()?;
        let dp = cfg.parallel.dp;
        if env.world != dp {
            return Err(TrainError::config(
                "parallel.dp",
                format!(
                    "is {dp} but the job has {} process(es) (WORLD_SIZE); start {dp} processes, e.g. `sigma launch --nproc-per-node {dp} -- train --config ...`, or set parallel.dp = {}",
                    env.world, env.world
                ),
            ));
        }
        let device = match pick_device(cfg.train.device)? {
            Device::Cuda(_) => Device::Cuda(env.local_rank),
            d => d,
        };
        let rank = env.rank;
        let cuda_index = match device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        let job = if env.world > 1 {
            Some(Job::join(env, cuda_index)?)
        } else {
            None
        };
        let mixed = match cfg.train.precision {
            Precision::Auto => device.is_cuda(),
            Precision::Bf16 => true,
            Precision::Fp32 => false,
        };
        let dataset = Dataset::open_blocking(&cfg.data)?;
        if (cfg.model.vocab_size as u32) < dataset.tokenizer.vocab_size {
            return Err(TrainError::config(
                "model.vocab_size",
                format!(
                    "{} is smaller than the tokenizer's vocabulary ({}) that prepared {}",
                    cfg.model.vocab_size,
                    dataset.tokenizer.vocab_size,
                    cfg.data.sources[0].manifest
                ),
            ));
        }
        let out = PathBuf::from(&cfg.metrics.output_dir);
        let tokenizer = if rank == 0 {
            sigma_data::store::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
            let src = &dataset.sources[0];
            Some(block_on(src.dir.join(&dataset.tokenizer.file).get())?.to_vec())
        } else {
            None
        };
        let mut saver = Saver::new(cfg, job.as_ref().map(|j| j.env.clone()), tokenizer);
        let model = Model::new(
            &cfg.model,
            cfg.train.seed,
            cfg.optim.decay_norms,
            cfg.optim.decay_embeddings,
            device,
            mixed,
        );
        if cfg.checkpoint.every_steps > 0 || cfg.checkpoint.every_minutes > 0.0 {
            saver.allocate_host(&model.params);
        }
        let zero = (cfg.parallel.zero == 1 && dp > 1).then_some((rank, dp));
        let optim = AdamW::new(&cfg.optim, &model.params, zero);
        let buckets = (job.is_some() && zero.is_none())
            .then(|| GradBuckets::new(&model, (cfg.parallel.bucket_mb * 1e6 / 4.0) as i64));
        let loader = Loader::new(
            dataset.clone(),
            LoaderOptions {
                global_batch: cfg.train.micro_batch_size * dp,
                dp_rank: rank,
                dp_size: dp,
                start: DataState::default(),
            },
        )?;
        let device_name = match device {
            Device::Cuda(i) => metrics::gpu_name(i).unwrap_or_else(|| format!("cuda:{i}")),
            _ => "cpu".into(),
        };
        let peak_flops = cfg
            .metrics
            .peak_flops
            .or_else(|| metrics::peak_flops_for(&device_name));
        Ok(Trainer {
            flops_per_token: summarize(&cfg.model, cfg.data.seq_len).flops_per_token,
            cfg: cfg.clone(),
            device,
            model,
            optim,
            dataset,
            loader,
            metrics: None,
            saver,
            start_step: 0,
            skipped_before: 0,
            stop_after: None,
            job,
            buckets,
            device_name,
            peak_flops,
            progress: progress && rank == 0,
        })
    }

    /// `--resume auto|PATH`: load weights, optimizer and data state from a
    /// checkpoint (any data-parallel layout). Returns the step resumed at, or
    /// None when `auto` found no checkpoint.
    pub fn resume(&mut self, spec: &str) -> Result<Option<u64>> {
        let Some(dir) = resolve(spec, &self.saver.root)? else {
            self.say(format!(
                "resume: no committed checkpoint under {}; starting from step 0",
                self.saver.root.display()
            ));
            return Ok(None);
        };
        let t0 = Instant::now();
        let mut ck = Checkpoint::open(&dir)?;
        ck.restore(&self.model.params, &mut self.optim)?;
        self.sync();
        let load_s = t0.elapsed().as_secs_f64();
        let m = ck.meta.clone();
        let now = serde_json::to_value(&self.cfg).expect("config serializes");
        for change in config_changes(&m.config, &now) {
            self.say(format!(
                "resume: config differs from the checkpoint's: {change}"
            ));
        }
        let dp = self.cfg.parallel.dp;
        let rank = self.job.as_ref().map(|j| j.env.rank).unwrap_or(0);
        self.loader = Loader::new(
            self.dataset.clone(),
            LoaderOptions {
                global_batch: self.cfg.train.micro_batch_size * dp,
                dp_rank: rank,
                dp_size: dp,
                start: m.data,
            },
        )?;
        if self.loader.state().stage != m.data.stage {
            self.say(format!(
                "resume: the data mixture changed: sample {} is in stage {} now, was {}",
                m.data.consumed_samples,
                self.loader.state().stage,
                m.data.stage
            ));
        }
        self.start_step = m.progress.step;
        self.skipped_before = m.progress.skipped_steps;
        let bytes: u64 = m.files.values().map(|f| f.bytes).sum();
        self.say(format!(
            "resume: {} (step {}, {} tokens; saved with dp {} zero {}, now dp {} zero {}); loaded and verified in {load_s:.2} s ({:.2} GB checkpoint)",
            dir.display(),
            m.progress.step,
            m.progress.consumed_tokens,
            m.layout.dp,
            m.layout.zero,
            dp,
            self.cfg.parallel.zero,
            bytes as f64 / 1e9
        ));
        Ok(Some(m.progress.step))
    }

    /// A message from rank 0 only.
    fn say(&self, msg: String) {
        if self.job.as_ref().map(|j| j.env.rank).unwrap_or(0) == 0 {
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

    /// Mean validation loss per domain (nats per token) over up to
    /// `eval_steps * micro_batch_size` validation samples of each domain.
    pub fn validate(&self) -> Result<BTreeMap<String, f64>> {
        let mbs = self.cfg.train.micro_batch_size as u64;
        let mut out = BTreeMap::new();
        for (d, name) in self.dataset.domains.iter().enumerate() {
            let n = (self.cfg.train.eval_steps * mbs).min(self.dataset.num_valid_samples(d));
            if n == 0 {
                continue;
            }
            let (mut sum, mut tokens) = (0.0, 0u64);
            let mut j = 0;
            while j < n {
                let rows = mbs.min(n - j);
                let mut ids: Vec<i64> = Vec::new();
                for k in j..j + rows {
                    let s = block_on(self.dataset.valid_sample(d, k))?;
                    ids.extend(s.tokens.iter().map(|&t| t as i64));
                }
                let t = Tensor::from_slice(&ids)
                    .view([rows as i64, -1])
                    .to_device(self.device);
                sum += engine::loss_sum(&self.model, &t).double_value(&[]);
                tokens += rows * self.cfg.data.seq_len as u64;
                j += rows;
            }
            out.insert(name.clone(), sum / tokens as f64);
        }
        Ok(out)
    }

    /// Wait for the device (phase timings are wall-clock, so the GPU must be idle).
    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    fn memory_record(&self) -> serde_json::Value {
        match self.device {
            Device::Cuda(i) => json!({"gpu_mib": metrics::gpu_memory_mib(i)}),
            _ => json!({"peak_rss_bytes": metrics::peak_rss_bytes()}),
        }
    }

    pub fn run(&mut self) -> Result<TrainReport> {
        let c = self.cfg.clone();
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
        let mut report = TrainReport {
            output_dir: PathBuf::from(&c.metrics.output_dir),
            skipped_steps: self.skipped_before,
            ..Default::default()
        };
        let rank0 = self.job.as_ref().map(|j| j.env.rank).unwrap_or(0) == 0;
        if rank0 {
            self.metrics = Some(MetricsWriter::create(
                &report.output_dir,
                c.metrics.tensorboard,
                self.start_step,
            )?);
        }
        // SIGTERM / SIGUSR1: save at the end of the current step and stop. A
        // second SIGTERM while stopping ends the process at once.
        let signalled = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
            signal_hook::flag::register_conditional_shutdown(sig, 1, signalled.clone())
                .and_then(|_| signal_hook::flag::register(sig, signalled.clone()))
                .map_err(|e| TrainError::Other(format!("cannot install signal handlers: {e}")))?;
        }
        let ckpt_enabled = c.checkpoint.every_steps > 0 || c.checkpoint.every_minutes > 0.0;
        bar.set_position(self.start_step);
        if self.start_step >= total {
            self.say(format!(
                "nothing to do: the run is at step {} of {total}",
                self.start_step
            ));
        }
        let dp = c.parallel.dp;
        let mut valid_curve: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
        let (mut interval_tokens, mut interval_time) = (0u64, 0.0f64);
        let mut gpu_peak_mib = 0u64;
        let rank = self.job.as_ref().map(|j| j.env.rank).unwrap_or(0);
        for step in self.start_step..total {
            crate::dist::env::maybe_inject_fault(rank, step);
            let t0 = Instant::now();
            let accum = c.accum_steps_at(step);
            let batches: Vec<Batch> = (0..accum)
                .map(|_| self.loader.next_batch())
                .collect::<std::result::Result<_, _>>()?;
            let t_data = t0.elapsed().as_secs_f64();
            // Every rank holds the same number of rows: the global batch is dp times this rank's.
            let target_tokens: usize =
                batches.iter().map(|b| b.rows * b.seq_len).sum::<usize>() * dp;
            let scale = 1.0 / target_tokens as f64;
            let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
            for (i, b) in batches.iter().enumerate() {
                let t = batch_tensor(b, self.device);
                let last_micro = i + 1 == batches.len() && c.parallel.overlap_grad_reduce;
                let (buckets, job) = (&mut self.buckets, &mut self.job);
                // On the last micro-batch, reduce each bucket as soon as it is final.
                let mut hook =
                    |pos: usize, g: &Tensor| match (last_micro, buckets.as_mut(), job.as_mut()) {
                        (true, Some(bk), Some(j)) => bk.segment_done(pos, g, j.dp.as_mut()),
                        _ => Ok(()),
                    };
                let l = engine::forward_backward(
                    &self.model,
                    &t,
                    scale,
                    c.train.activation_checkpointing,
                    &mut self.optim.grad,
                    &mut hook,
                )?;
                loss_sum += l.to_kind(Kind::Double);
            }
            if let (Some(bk), Some(j)) = (&mut self.buckets, &mut self.job) {
                bk.finish(&self.optim.grad, j.dp.as_mut())?;
            }
            // Loss and the stop / timed-save requests travel together, so every
            // rank agrees on them: [loss sum, signal received, save time reached (rank 0's clock)].
            let timed = rank0
                && c.checkpoint.every_minutes > 0.0
                && self.saver.last_save.elapsed().as_secs_f64()
                    >= c.checkpoint.every_minutes * 60.0;
            let mut flags = [
                loss_sum.double_value(&[]),
                f64::from(u8::from(signalled.load(Ordering::Relaxed))),
                f64::from(u8::from(timed)),
            ];
            if let Some(job) = &mut self.job {
                let mut l = Tensor::from_slice(&flags).to_device(self.device);
                job.dp.all_reduce_sum(&mut l)?;
                flags.copy_from_slice(&Vec::<f64>::try_from(l.to_device(Device::Cpu))?);
            }
            let loss_sum = flags[0];
            let (stop_signal, save_timed) = (flags[1] > 0.0, flags[2] > 0.0);
            self.sync();
            let t_fwd_bwd = t0.elapsed().as_secs_f64() - t_data;
            let lr = lr_at(&c.optim, step, total);
            // Plain DP reduced the gradient in buckets already; ZeRO-1 reduce-scatters in the step.
            let comm = match self.buckets {
                Some(_) => None,
                None => self.job.as_mut().map(|j| j.dp.as_mut()),
            };
            let stats = self.optim.step(&self.model.params, lr, comm)?;
            self.sync();
            let t_optim = t0.elapsed().as_secs_f64() - t_data - t_fwd_bwd;
            let loss = loss_sum / target_tokens as f64;
            let dt = t0.elapsed().as_secs_f64();
            interval_tokens += target_tokens as u64;
            interval_time += dt;
            report.losses.push(loss);
            if !stats.applied || !loss.is_finite() {
                report.skipped_steps += 1;
                let msg = format!(
                    "step {step}: non-finite loss {loss} / grad norm {} ",
                    stats.grad_norm
                );
                if c.train.nan_policy == NanPolicy::Abort {
                    return Err(TrainError::Other(format!(
                        "{msg}; aborting (train.nan_policy = \"abort\")"
                    )));
                }
                let warning =
                    format!("warning: {msg}; update skipped (train.nan_policy = \"skip\")");
                if bar.is_hidden() {
                    eprintln!("{warning}");
                } else {
                    bar.println(warning);
                }
            }
            let last = step + 1 == total;
            if (step + 1) % c.train.log_every.max(1) == 0 || last {
                let tps = interval_tokens as f64 / interval_time.max(1e-9);
                // Global tokens/s over the peak of all dp devices.
                let mfu = self
                    .peak_flops
                    .map(|p| tps * self.flops_per_token / (p * dp as f64));
                if let Device::Cuda(i) = self.device {
                    gpu_peak_mib = gpu_peak_mib.max(metrics::gpu_memory_mib(i).unwrap_or(0));
                }
                let rec = json!({
                    "step": step + 1,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": stats.grad_norm,
                    "tokens_per_s": tps,
                    "mfu": mfu,
                    "global_batch_tokens": target_tokens,
                    "step_time_s": dt,
                    "phase_s": {"data": t_data, "forward_backward": t_fwd_bwd, "optimizer": t_optim},
                    "skipped": !stats.applied,
                    "optimizer_state_bytes": self.optim.state_bytes(),
                    "memory": if self.device.is_cuda() { json!({"gpu_mib_peak": gpu_peak_mib}) } else { self.memory_record() },
                });
                if let Some(m) = &mut self.metrics {
                    m.log(step + 1, &rec)?;
                }
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {:.0} tok/s{}",
                    tps,
                    mfu.map(|m| format!(" MFU {:.1}%", 100.0 * m))
                        .unwrap_or_default()
                ));
                report.tokens_per_s = tps;
                report.mfu = mfu;
                interval_tokens = 0;
                interval_time = 0.0;
            }
            bar.inc(1);
            if (c.train.eval_every > 0 && (step + 1) % c.train.eval_every == 0) || last {
                let v = self.validate()?;
                for (k, l) in &v {
                    valid_curve
                        .entry(k.clone())
                        .or_default()
                        .push((step + 1, *l));
                }
                if let Some(m) = &mut self.metrics {
                    m.log(step + 1, &json!({"step": step + 1, "val_loss": v}))?;
                }
                report.valid = v;
            }
            let done = step + 1;
            let stop = stop_signal || self.stop_after == Some(done);
            let every = c.checkpoint.every_steps > 0 && done % c.checkpoint.every_steps == 0;
            if stop || every || save_timed || (last && ckpt_enabled) {
                if let Some(stall) = self.save(done, lr, report.skipped_steps)? {
                    report.checkpoints.push((done, stall));
                    if let Some(m) = &mut self.metrics {
                        m.log(
                            done,
                            &json!({"step": done, "checkpoint": {"stall_s": stall}}),
                        )?;
                    }
                }
            }
            if stop {
                self.saver.wait()?;
                let why = if stop_signal {
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
                bar.println(&msg);
                if bar.is_hidden() {
                    self.say(msg);
                }
                report.stopped_at = Some(done);
                break;
            }
        }
        self.saver.wait()?;
        bar.finish_and_clear();
        report.data_state = self.loader.state();
        if let Some(job) = &mut self.job {
            job.finish()?;
        }
        if let (true, Some(m)) = (c.metrics.plot, &self.metrics) {
            let train: Vec<(u64, f64)> = report
                .losses
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u64 + 1, l))
                .collect();
            let valid: Vec<(String, Vec<(u64, f64)>)> = valid_curve.into_iter().collect();
            crate::plot::loss_png(&m.dir.join("loss.png"), &train, &valid)?;
        }
        Ok(report)
    }
}
