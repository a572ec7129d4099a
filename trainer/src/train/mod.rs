//! The training loop. `Trainer::build` wires the parts together (device,
//! dataset, model, optimizer, loader) and writes nothing; `Trainer::resume`
//! loads a checkpoint; `Trainer::run` writes the run's files and loops: gather
//! a global batch of micro-batches, forward/backward each through the segment
//! engine with the loss normalised by the global batch's target tokens, one
//! AdamW step, log, validate, save.

pub mod lr;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod profile;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use sigma_data::loader::LoaderOptions;
use sigma_data::{Batch, DataState, Dataset, Loader};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::load::{config_changes, resolve, Checkpoint};
use crate::checkpoint::save::{SaveInfo, Saver};
use crate::checkpoint::Progress;
use crate::config::{DeviceChoice, NanPolicy, Precision, RunConfig};
use crate::dist::buckets::GradBuckets;
use crate::dist::{abort, DistEnv, Job, MeshDims, PipelineGroups};
use crate::engine;
use crate::error::{Result, TrainError};
use crate::kernels::gpu_memory;
use crate::guard;
use metrics::MetricsWriter;
use crate::model::Model;
use crate::train::optim::{AdamW, StepStats};
use crate::engine::pipeline::{StepInput, Trace};
use crate::parallel::schedule::Schedule;
use crate::parallel::pipeline::PipelinePlan;
use crate::train::profile::{Profiler, Window, PROFILED_STEPS};
use crate::train::lr::lr_at;
use crate::signals::StopSignals;
use crate::model::summary::{memory_estimate, summarize, MemoryInputs};
use crate::parallel::tp::TpPlan;

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

/// Processes in the job (1 without one).
fn env_world(job: &Option<Job>) -> usize {
    job.as_ref().map(|j| j.env.world).unwrap_or(1)
}

/// What `run` carries from step to step.
struct RunState {
    bar: ProgressBar,
    report: TrainReport,
    valid_curve: BTreeMap<String, Vec<(u64, f64)>>,
    interval_tokens: u64,
    interval_time: f64,
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
    /// Wire the parts together. Writes nothing to disk: the run's files appear
    /// only when `run` starts, so a refused resume leaves everything as it was.
    pub fn build(cfg: &RunConfig, progress: bool, signals: StopSignals) -> Result<Trainer> {
        if let Some(n) = cfg.train.cpu_threads {
            tch::set_num_threads(n as i32);
        }
        let env = DistEnv::from_env()?;
        let (dp, tp, pp) = (cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp);
        let dims = MeshDims { dp, tp, pp };
        if tp == 1 && pp == 1 && env.world != dp {
            return Err(TrainError::config(
                "parallel.dp",
                format!(
                    "is {dp} but the job has {} process(es) (WORLD_SIZE); start {dp} processes, e.g. `sigma launch --nproc-per-node {dp} -- train --config ...`, or set parallel.dp = {}",
                    env.world, env.world
                ),
            ));
        }
        dims.check(env.world)?;
        let coords = dims.coords(env.rank);
        let dp_rank = coords.dp;
        let plan = TpPlan::new(&cfg.model, tp, coords.tp, cfg.parallel.sequence_parallel());
        let pipe = PipelinePlan::new(
            &cfg.model,
            pp,
            cfg.parallel.virtual_stages(),
            cfg.parallel.pp_layers.as_deref(),
            coords.pp,
        );
        let device = match pick_device(cfg.train.device)? {
            Device::Cuda(_) => Device::Cuda(env.local_rank),
            d => d,
        };
        let rank = env.rank;
        let cuda_index = match device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        guard::set_device(match device {
            Device::Cuda(i) => format!("cuda:{i} (rank {rank})"),
            _ if env.world > 1 => format!("cpu (rank {rank})"),
            _ => "cpu".into(),
        });
        let mixed = match cfg.train.precision {
            Precision::Auto => device.is_cuda(),
            Precision::Bf16 => true,
            Precision::Fp32 => false,
        };
        guard::set_memory_hint(
            memory_estimate(
                &cfg.model,
                &MemoryInputs {
                    seq_len: cfg.data.seq_len,
                    micro_batch_size: cfg.train.micro_batch_size,
                    activation_checkpointing: cfg.train.activation_checkpointing,
                    mixed,
                    optimizer_shards: if cfg.parallel.zero == 1 { dp } else { 1 },
                    params: crate::model::held_specs(&cfg.model, &plan, &pipe)
                        .iter()
                        .map(|s| s.numel())
                        .sum(),
                    tp,
                    layers: pipe.chunks().iter().map(|(_, _, l)| l.len()).sum(),
                    in_flight: if pp > 1 {
                        ((pp - coords.pp) * pipe.v).min(cfg.train.grad_accum_steps * pipe.v)
                    } else {
                        1
                    },
                    head: pipe.last(),
                    loss_chunk_tokens: cfg.train.loss_chunk_tokens,
                },
            )
            .advice(),
        );
        guard::at("joining the job", None);
        let job = if env.world > 1 {
            let shared = [plan.k_share(&cfg.model), plan.v_share(&cfg.model)];
            let groups = PipelineGroups {
                v: pipe.v,
                tied: cfg.model.tie_embeddings,
            };
            Some(Job::join(env, cuda_index, dims, &shared, groups)?)
        } else {
            None
        };
        if rank == 0 && env_world(&job) > 1 {
            eprintln!("{}", dims.describe());
            if pp > 1 {
                eprintln!(
                    "pipeline: {} schedule, {}",
                    if pipe.v > 1 {
                        "interleaved 1F1B"
                    } else {
                        "1F1B"
                    },
                    pipe.describe()
                );
            }
        }
        guard::at("opening the data", None);
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
        // Rank 0 copies the tokenizer into checkpoints: it must be the one the manifest records.
        let tokenizer = if rank == 0 {
            Some(dataset.load_tokenizer()?.json.to_vec())
        } else {
            None
        };
        let mut saver = Saver::new(cfg, job.as_ref().map(|j| j.env.clone()), tokenizer);
        guard::at("model initialisation", None);
        let mut model = Model::with_plan(
            &cfg.model,
            plan,
            pipe,
            cfg.train.seed,
            cfg.optim.decay_norms,
            cfg.optim.decay_embeddings,
            device,
            mixed,
        );
        model.loss_chunk_tokens = cfg.train.loss_chunk_tokens;
        model.tp_comm_overlap = cfg.parallel.tp_comm_overlap;
        // Matmuls read bf16 weights cast once per optimizer step.
        model.params.enable_work_copy(model.compute);
        if cfg.checkpointing() {
            saver.allocate_host(&model.params);
        }
        let zero = (cfg.parallel.zero == 1 && dp > 1).then_some((dp_rank, dp));
        let optim = AdamW::new(&cfg.optim, &model.params, zero, tp);
        // Matmul weight gradients straight into the fp32 buffer (mixed precision).
        if cfg.train.fused_weight_grad {
            model.set_grad_sink(Some(optim.grad.shallow_clone()));
        }
        if rank == 0 && tp > 1 && cfg.parallel.tp_comm_overlap && device.is_cuda() {
            if !model.fused_weight_grad() {
                eprintln!(
                    "note: parallel.tp_comm_overlap has no effect here: it puts off the weight \
                     gradients that mixed precision adds into the gradient buffer \
                     (train.precision bf16 with train.fused_weight_grad = true)"
                );
            } else if std::env::var(engine::TIME_COLLECTIVES).is_ok_and(|v| v == "1") {
                eprintln!(
                    "note: {}=1 runs every tensor-parallel collective to completion: \
                     parallel.tp_comm_overlap is off for this run",
                    engine::TIME_COLLECTIVES
                );
            }
        }
        let buckets = (dp > 1 && zero.is_none())
            .then(|| GradBuckets::new(&model, (cfg.parallel.bucket_mb * 1e6 / 4.0) as i64));
        // Every rank of a tensor-parallel group reads the same samples.
        let loader = Loader::new(
            dataset.clone(),
            LoaderOptions {
                global_batch: cfg.train.micro_batch_size * dp,
                dp_rank,
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
            signals,
            rank,
            dp_rank,
            resumed_lr: 0.0,
            trace: None,
            profiler: None,
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
        guard::at("checkpoint load", None);
        let mut ck = Checkpoint::open(&dir)?;
        ck.restore(&self.cfg.model, &self.model.params, &mut self.optim)?;
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
        self.loader = Loader::new(
            self.dataset.clone(),
            LoaderOptions {
                global_batch: self.cfg.train.micro_batch_size * dp,
                dp_rank: self.dp_rank,
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
        self.resumed_lr = m.scheduler.last_lr;
        let bytes: u64 = m.files.values().map(|f| f.bytes).sum();
        self.say(format!(
            "resume: {} (step {}, {} tokens; saved with dp {} tp {} pp {} zero {}, now dp {} tp {} pp {} zero {}); loaded and verified in {load_s:.2} s ({:.2} GB checkpoint)",
            dir.display(),
            m.progress.step,
            m.progress.consumed_tokens,
            m.layout.dp,
            m.layout.tp,
            m.layout.pp,
            m.layout.zero,
            dp,
            self.cfg.parallel.tp,
            self.cfg.parallel.pp,
            self.cfg.parallel.zero,
            bytes as f64 / 1e9
        ));
        Ok(Some(m.progress.step))
    }

    /// Make every gradient whole before the optimizer: first the data-parallel
    /// sum (the buckets started during backward must be done before anything
    /// else touches those ranges), then the sums of copies held by several
    /// ranks: tensor-parallel replicas, and the tied embedding of the first
    /// and last pipeline stage.
    fn reduce_gradients(&mut self) -> Result<()> {
        guard::at("gradient reduction", None);
        let Some(j) = &mut self.job else {
            return Ok(());
        };
        if let Some(bk) = &mut self.buckets {
            bk.finish(&self.optim.grad, j.dp.as_mut())?;
        }
        if let Some(tp) = j.tp.as_mut() {
            crate::parallel::tp::sync_shared_grads(
                &self.model.params,
                &self.optim.grad,
                tp.as_mut(),
                &mut j.replicas,
            )?;
        }
        if let Some(tied) = j.tied.as_mut() {
            crate::parallel::tp::sync_tied_grads(&self.model.params, &self.optim.grad, tied.as_mut())?;
        }
        Ok(())
    }

    /// Forward and backward of the micro-batches one after another (no
    /// pipeline): returns the sum of their token losses.
    fn micro_batches(&mut self, batches: &[Batch], scale: f64) -> Result<Tensor> {
        let c = &self.cfg;
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
        for (i, b) in batches.iter().enumerate() {
            let t = batch_tensor(b, self.device);
            let last_micro = i + 1 == batches.len() && c.parallel.overlap_grad_reduce;
            let buckets = &mut self.buckets;
            let (mut dp, tp) = match self.job.as_mut() {
                Some(j) => {
                    let (d, t) = j.groups();
                    (Some(d), t)
                }
                None => (None, None),
            };
            // On the last micro-batch, reduce each bucket as soon as it is final.
            let mut hook =
                |pos: usize, g: &Tensor| match (last_micro, buckets.as_mut(), dp.as_deref_mut()) {
                    (true, Some(bk), Some(d)) => bk.segment_done(pos, g, d),
                    _ => Ok(()),
                };
            let l = engine::forward_backward_in(
                &self.model,
                tp,
                &t,
                scale,
                c.train.activation_checkpointing,
                &mut self.optim.grad,
                &mut hook,
            )?;
            loss_sum += l.to_kind(Kind::Double);
        }
        Ok(loss_sum)
    }

    /// The programs of this rank's pipeline chunks and the shape of the
    /// activations crossing stages (`rows` samples).
    fn chunks(&self, rows: usize) -> (Vec<engine::Program>, Vec<i64>) {
        let pipe = &self.model.pipe;
        let n = pipe.num_stages();
        let progs = pipe
            .chunks()
            .into_iter()
            .map(|(_, s, layers)| engine::Program::chunk(&self.model, layers, s == 0, s + 1 == n))
            .collect();
        let plan = self.model.plan;
        let t = if plan.sequence_parallel {
            self.cfg.data.seq_len / plan.tp
        } else {
            self.cfg.data.seq_len
        };
        (
            progs,
            vec![rows as i64, t as i64, self.cfg.model.d_model as i64],
        )
    }

    /// The micro-batches through the pipeline schedule: returns the sum of
    /// their token losses on the last stage (zero on the others).
    fn pipeline_pass(&mut self, batches: &[Batch], scale: f64, step: u64) -> Result<Tensor> {
        let schedule = Schedule::new(self.cfg.parallel.pp, self.model.pipe.v, batches.len())?;
        let (progs, act_shape) = self.chunks(self.cfg.train.micro_batch_size);
        let tokens: Vec<Tensor> = batches
            .iter()
            .map(|b| batch_tensor(b, self.device))
            .collect();
        let input = StepInput {
            model: &self.model,
            schedule: &schedule,
            progs: &progs,
            batches: &tokens,
            loss_scale: scale,
            checkpoint: self.cfg.train.activation_checkpointing,
            act_shape,
        };
        let job = self
            .job
            .as_mut()
            .expect("pipeline parallelism runs as a job");
        let (rank, tp, links) = job.pipeline_parts();
        if let Some(tr) = self.trace.as_mut() {
            tr.step = step + 1;
        }
        crate::engine::pipeline::run_step(
            &input,
            rank,
            tp,
            links,
            &mut self.optim.grad,
            self.trace.as_mut(),
        )
    }

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

    /// Mean validation loss per domain (nats per token) over up to
    /// `eval_steps * micro_batch_size` validation samples of each domain.
    pub fn validate(&mut self) -> Result<BTreeMap<String, f64>> {
        let mbs = self.cfg.train.micro_batch_size as u64;
        let dataset = self.dataset.clone();
        let device = self.device;
        // Each data-parallel rank scores every dp-th batch; the sums are added up.
        let dp = self.cfg.parallel.dp as u64;
        let part = match &self.job {
            Some(j) if dp > 1 => (j.coords.dp as u64, dp),
            _ => (0, 1),
        };
        let mut scores = crate::infer::eval::evaluate_part(
            &crate::infer::eval::Validation(&dataset),
            mbs,
            self.cfg.train.eval_steps * mbs,
            device,
            &mut |t| self.eval_loss(t),
            None,
            part,
        )?;
        if let (Some(job), true) = (self.job.as_mut(), part.1 > 1) {
            let mut v: Vec<f64> = scores.iter().map(|s| s.loss_sum).collect();
            v.extend(scores.iter().map(|s| s.tokens as f64));
            let mut t = Tensor::from_slice(&v).to_device(device);
            job.dp.all_reduce_sum(&mut t)?;
            let v = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
            let n = scores.len();
            for (i, s) in scores.iter_mut().enumerate() {
                s.loss_sum = v[i];
                s.tokens = v[n + i].round() as u64;
            }
        }
        Ok(scores
            .into_iter()
            .map(|s| (s.domain.clone(), s.loss()))
            .collect())
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
        let json =
            serde_json::to_string_pretty(prof).map_err(|e| TrainError::Other(e.to_string()))?;
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
        let theory = Schedule::new(self.cfg.parallel.pp, self.model.pipe.v, m)?.bubble();
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

    /// Sum of token losses of one validation batch, on every rank.
    fn eval_loss(&mut self, t: &Tensor) -> Result<f64> {
        if self.cfg.parallel.pp == 1 {
            let tp = self.job.as_mut().and_then(|j| j.groups().1);
            return Ok(engine::loss_sum_in(&self.model, tp, t)?.double_value(&[]));
        }
        let schedule = Schedule::stages_only(self.cfg.parallel.pp, self.model.pipe.v);
        let (progs, act_shape) = self.chunks(t.size()[0] as usize);
        let input = StepInput {
            model: &self.model,
            schedule: &schedule,
            progs: &progs,
            batches: &[],
            loss_scale: 1.0,
            checkpoint: false,
            act_shape,
        };
        let job = self
            .job
            .as_mut()
            .expect("pipeline parallelism runs as a job");
        let (rank, tp, links) = job.pipeline_parts();
        let mut l = crate::engine::pipeline::eval_step(&input, rank, tp, links, t)?;
        // Only the last stage computed the loss.
        if let Some(pp) = job.pp.as_mut() {
            pp.all_reduce_sum(&mut l)?;
        }
        Ok(l.double_value(&[]))
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
        let mut run = self.begin()?;
        if self.start_step > 0 && self.stop_after == Some(self.start_step) {
            // Stop at the step resumed from: write the loaded state in this
            // run's layout (a checkpoint moved to another dp/tp), then stop.
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
            self.metrics = Some(MetricsWriter::create(
                &out,
                c.metrics.tensorboard,
                self.start_step,
            )?);
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

    /// One optimizer step: gather the micro-batches, forward/backward each,
    /// agree with every rank on the loss and on stop/save requests, update.
    fn train_step(&mut self, step: u64) -> Result<StepOutcome> {
        let c = self.cfg.clone();
        let t0 = Instant::now();
        guard::at("data loading", None);
        let accum = c.accum_steps_at(step);
        let batches: Vec<Batch> = (0..accum)
            .map(|_| self.loader.next_batch())
            .collect::<std::result::Result<_, _>>()?;
        let t_data = t0.elapsed().as_secs_f64();
        // Every rank holds the same number of rows: the global batch is dp times this rank's.
        let target_tokens: usize =
            batches.iter().map(|b| b.rows * b.seq_len).sum::<usize>() * c.parallel.dp;
        let scale = 1.0 / target_tokens as f64;
        if let Some(p) = self.profiler.as_mut() {
            p.begin(Window::ForwardBackward);
        }
        let loss_sum = if c.parallel.pp > 1 {
            self.pipeline_pass(&batches, scale, step)?
        } else {
            self.micro_batches(&batches, scale)?
        };
        self.reduce_gradients()?;
        // Loss and the stop / timed-save requests travel together, so every
        // rank agrees on them: [loss sum, signal received, save time reached (rank 0's clock)].
        let timed = self.rank == 0
            && c.checkpoint.every_minutes > 0.0
            && self.saver.last_save.elapsed().as_secs_f64() >= c.checkpoint.every_minutes * 60.0;
        let mut flags = [
            loss_sum.double_value(&[]),
            f64::from(u8::from(self.signals.requested())),
            f64::from(u8::from(timed)),
        ];
        if let Some(job) = &mut self.job {
            let mut l = Tensor::from_slice(&flags).to_device(self.device);
            job.dp.all_reduce_sum(&mut l)?;
            // Only the last pipeline stage has the loss; every stage has its requests.
            if let Some(pp) = job.pp.as_mut() {
                pp.all_reduce_sum(&mut l)?;
            }
            flags.copy_from_slice(&Vec::<f64>::try_from(l.to_device(Device::Cpu))?);
            // The tensor-parallel ranks hold the same loss; the requests must reach them all.
            if let Some(tp) = job.tp.as_mut() {
                let mut r = Tensor::from_slice(&flags[1..]).to_device(self.device);
                tp.all_reduce_sum(&mut r)?;
                flags[1..].copy_from_slice(&Vec::<f64>::try_from(r.to_device(Device::Cpu))?);
            }
        }
        self.sync();
        if let Some(p) = self.profiler.as_mut() {
            p.end();
        }
        let t_fwd_bwd = t0.elapsed().as_secs_f64() - t_data;
        let loss = flags[0] / target_tokens as f64;
        let lr = lr_at(&c.optim, step, c.train.steps);
        // Plain DP reduced the gradient in buckets already; ZeRO-1 reduce-scatters in the step.
        let zero = self.optim.shard.is_some();
        let (comm, spread) = match self.job.as_mut() {
            Some(j) => {
                let mut spread: Vec<&mut dyn crate::dist::Collectives> = Vec::new();
                if let Some(t) = j.tp.as_mut() {
                    spread.push(t.as_mut());
                }
                if let Some(p) = j.pp.as_mut() {
                    spread.push(p.as_mut());
                }
                (zero.then_some(j.dp.as_mut()), spread)
            }
            None => (None, Vec::new()),
        };
        guard::at("optimizer step", None);
        if let Some(p) = self.profiler.as_mut() {
            p.begin(Window::Optimizer);
        }
        // A non-finite loss (every rank sees the same one) skips the update like a
        // non-finite gradient does.
        let (optim, params) = (&mut self.optim, &self.model.params);
        let update = || optim.step(params, lr, comm, spread, !loss.is_finite());
        let stats = match self.trace.as_mut() {
            Some(tr) => tr.span("optimizer".into(), "optimizer", update)?,
            None => update()?,
        };
        self.sync();
        if let Some(p) = self.profiler.as_mut() {
            p.end();
            p.add_step(t_data);
        }
        let dt = t0.elapsed().as_secs_f64();
        Ok(StepOutcome {
            loss,
            lr,
            stats,
            target_tokens,
            dt,
            phases: [t_data, t_fwd_bwd, dt - t_data - t_fwd_bwd],
            stop_signal: flags[1] > 0.0,
            save_timed: flags[2] > 0.0,
            tp_comm_s: std::env::var(engine::TIME_COLLECTIVES)
                .is_ok()
                .then(engine::take_comm_seconds),
        })
    }

    /// Skip accounting (and `nan_policy = "abort"`), the step's record, the bar.
    fn record(&mut self, step: u64, o: &StepOutcome, run: &mut RunState) -> Result<()> {
        let c = &self.cfg;
        run.interval_tokens += o.target_tokens as u64;
        run.interval_time += o.dt;
        run.report.losses.push(o.loss);
        if !o.stats.applied {
            run.report.skipped_steps += 1;
            let msg = format!(
                "step {step}: non-finite loss {} / grad norm {}",
                o.loss, o.stats.grad_norm
            );
            if c.train.nan_policy == NanPolicy::Abort {
                return Err(TrainError::Other(format!(
                    "{msg}; aborting (train.nan_policy = \"abort\")"
                )));
            }
            let warning = format!("warning: {msg}; update skipped (train.nan_policy = \"skip\")");
            if run.bar.is_hidden() {
                eprintln!("{warning}");
            } else {
                run.bar.println(warning);
            }
        }
        if step == 0
            && self.model.fused_weight_grad()
            && self.model.params.flat.device().is_cuda()
            && !crate::kernels::fused::linear_accum_fused_gemm()
        {
            let warning =
                "warning: libtorch refused the GEMM with an fp32 output that adds matmul \
                           weight gradients into the gradient buffer; they are computed in bf16 \
                           and added instead (slower; train.fused_weight_grad)";
            if run.bar.is_hidden() {
                eprintln!("{warning}");
            } else {
                run.bar.println(warning);
            }
        }
        let last = step + 1 == c.train.steps;
        if (step + 1).is_multiple_of(c.train.log_every.max(1)) || last {
            let devices = (c.parallel.dp * c.parallel.tp * c.parallel.pp) as f64;
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
        }
        run.bar.inc(1);
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
