//! Building a trainer, in phases: resolve where this process sits and what it
//! holds ([`Placement`]), join the job, open the data, build the model and
//! its optimizer ([`Parts`]), then wire the trainer. Nothing here writes to
//! disk: a run's files appear only when `Trainer::run` starts, so a refused
//! start or resume leaves everything as it was. And `resume`, which loads a
//! checkpoint into a built trainer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sigma_data::loader::LoaderOptions;
use sigma_data::{DataState, Dataset, Loader};
use tch::Device;

use crate::checkpoint::load::{config_changes, resolve, Checkpoint};
use crate::checkpoint::save::Saver;
use crate::config::{DeviceChoice, Precision, RunConfig};
use crate::dist::buckets::GradBuckets;
use crate::dist::{DistEnv, Job, PipelineGroups};
use crate::engine::{ExecOptions, Program, Ring};
use crate::error::{Result, TrainError};
use crate::guard;
use crate::model::fp8::{self, Fp8Plan};
use crate::model::summary::{check_host_memory, memory_estimate, summarize, MemoryInputs};
use crate::model::{GradSink, Model, ModelInit};
use crate::optim::AdamW;
use crate::parallel::Layout;
use crate::signals::StopSignals;
use crate::train::metrics;
use crate::train::Trainer;

/// Where this process sits and what it computes with: the job's
/// environment, its layout, device and precision.
struct Placement {
    env: DistEnv,
    layout: Layout,
    device: Device,
    /// bf16 matmuls.
    mixed: bool,
    /// `train.precision = "fp8"`: which matmuls run in FP8, and how.
    fp8: Option<Fp8Plan>,
}

/// The model and what trains it.
struct Parts {
    model: Model,
    optim: AdamW,
    sink: Option<GradSink>,
    buckets: Option<GradBuckets>,
    saver: Saver,
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

/// Phase 1: the environment, the layout (checked against the job's size),
/// the device and precision; the out-of-memory hint by formula.
fn place(cfg: &RunConfig) -> Result<Placement> {
    if let Some(n) = cfg.train.cpu_threads {
        tch::set_num_threads(n as i32);
    }
    let env = DistEnv::from_env()?;
    let p = &cfg.parallel;
    if p.tp == 1 && p.pp == 1 && p.cp == 1 && env.world != p.dp {
        return Err(TrainError::config(
            "parallel.dp",
            format!(
                "is {} but the job has {} process(es) (WORLD_SIZE); start {} processes, e.g. `sigma launch --nproc-per-node {} -- train --config ...`, or set parallel.dp = {}",
                p.dp, env.world, p.dp, p.dp, env.world
            ),
        ));
    }
    Layout::check(cfg)?;
    check_outputs(cfg)?;
    let layout = Layout::new(cfg, env.rank);
    layout.mesh.check(env.world)?;
    let device = match pick_device(cfg.train.device)? {
        Device::Cuda(_) => Device::Cuda(env.local_rank),
        d => d,
    };
    let rank = env.rank;
    guard::set_device(match device {
        Device::Cuda(i) => format!("cuda:{i} (rank {rank})"),
        _ if env.world > 1 => format!("cpu (rank {rank})"),
        _ => "cpu".into(),
    });
    let mixed = match cfg.train.precision {
        Precision::Auto => device.is_cuda(),
        Precision::Bf16 | Precision::Fp8 => true,
        Precision::Fp32 => false,
    };
    let fp8 = match cfg.fp8() {
        Some(f) => Some(Fp8Plan::new(
            &f,
            cfg.model.num_layers,
            fp8::gemm_for(device, f.emulate)?,
        )),
        None => None,
    };
    if cfg.fp8.is_some() && fp8.is_none() && rank == 0 {
        eprintln!(
            "note: [fp8] has no effect: train.precision is {}, not \"fp8\"",
            serde_json::to_string(&cfg.train.precision).expect("serializes")
        );
    }
    guard::set_memory_hint(memory_hint(cfg, &layout, mixed, fp8.as_ref()));
    Ok(Placement {
        env,
        layout,
        device,
        mixed,
        fp8,
    })
}

/// What an out-of-memory error tells the user: the run's needs by formula.
fn memory_hint(cfg: &RunConfig, layout: &Layout, mixed: bool, fp8: Option<&Fp8Plan>) -> String {
    let p = &cfg.parallel;
    let share = layout.share(&cfg.model);
    memory_estimate(
        &cfg.model,
        &MemoryInputs {
            seq_len: cfg.data.seq_len,
            micro_batch_size: cfg.train.micro_batch_size,
            activation_checkpointing: cfg.train.activation_checkpointing,
            mixed,
            optimizer_shards: if p.zero == 1 { p.dp } else { 1 },
            params: share.held_numel(),
            tp: p.tp,
            layers: layout.num_layers(),
            in_flight: layout.in_flight(cfg.train.grad_accum_steps),
            head: layout.pipe.last(),
            loss_chunk_tokens: cfg.train.loss_chunk_tokens,
            fp8_params: fp8.map_or(0, |f| f.params_in_fp8(&share)),
        },
    )
    .advice()
}

/// The directories the run writes (the metrics' and the checkpoints'), checked
/// before anything is written: each is a directory or does not exist yet
/// under one (a file in the way is refused, naming the key).
fn check_outputs(cfg: &RunConfig) -> Result<()> {
    let dirs = [
        ("metrics.output_dir", PathBuf::from(&cfg.metrics.output_dir)),
        ("checkpoint.dir", crate::checkpoint::save::root_dir(cfg)),
    ];
    for (key, dir) in dirs {
        if let Some(f) = sigma_data::fsutil::file_in_the_way(&dir) {
            let what = if f == dir { "is" } else { "is inside" };
            return Err(TrainError::config(
                key,
                format!(
                    "{} {what} {}, which is not a directory",
                    dir.display(),
                    f.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Phase 2: join the job (more than one process), and describe the layout.
fn join(cfg: &RunConfig, pl: &Placement) -> Result<Option<Job>> {
    guard::at("joining the job", None);
    if pl.env.world == 1 {
        return Ok(None);
    }
    let (c, l) = (&cfg.model, &pl.layout);
    let shared = [l.tp.k_share(c), l.tp.v_share(c)];
    let groups = PipelineGroups {
        v: l.pipe.v,
        tied: c.tie_embeddings,
    };
    let cuda = match pl.device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let job = Job::join(pl.env.clone(), cuda, l.mesh, &shared, groups)?;
    if pl.env.rank == 0 {
        eprintln!("{}", l.mesh.describe());
        if l.mesh.pp > 1 {
            let kind = if l.pipe.v > 1 {
                "interleaved 1F1B"
            } else {
                "1F1B"
            };
            eprintln!("pipeline: {kind} schedule, {}", l.pipe.describe());
        }
    }
    Ok(Some(job))
}

/// Phase 3: open the data (manifests checked) and, on rank 0, read the
/// tokenizer that checkpoints will carry (the one the manifest records).
fn open_data(cfg: &RunConfig, rank: usize) -> Result<(Arc<Dataset>, Option<Vec<u8>>)> {
    guard::at("opening the data", None);
    let dataset = Dataset::open_blocking(&cfg.data)?;
    if (cfg.model.vocab_size as u32) < dataset.tokenizer.vocab_size {
        return Err(TrainError::config(
            "model.vocab_size",
            format!(
                "{} is smaller than the tokenizer's vocabulary ({}) that prepared {}",
                cfg.model.vocab_size, dataset.tokenizer.vocab_size, cfg.data.sources[0].manifest
            ),
        ));
    }
    let tokenizer = if rank == 0 {
        Some(dataset.load_tokenizer()?.json.to_vec())
    } else {
        None
    };
    Ok((dataset, tokenizer))
}

/// Phase 4: this rank's share of the model (bf16 working weights cast once
/// per optimizer step), AdamW, the gradient sink, the data-parallel buckets
/// and the checkpoint saver.
fn build_parts(
    cfg: &RunConfig,
    pl: &Placement,
    job: Option<&Job>,
    tokenizer: Option<Vec<u8>>,
    opts: &ExecOptions,
) -> Result<Parts> {
    guard::at("model initialisation", None);
    let (p, l) = (&cfg.parallel, &pl.layout);
    let init = ModelInit {
        seed: cfg.train.seed,
        decay_norms: cfg.optim.decay_norms,
        decay_embeddings: cfg.optim.decay_embeddings,
        device: pl.device,
        mixed: pl.mixed,
    };
    let share = l.share(&cfg.model);
    check_host_memory(host_bytes(cfg, &share, pl), "initialising the model")?;
    let mut model = Model::from_share(&cfg.model, share, &init);
    // Matmuls read bf16 weights cast once per optimizer step.
    model.params.enable_work_copy(model.compute);
    if let Some(plan) = &pl.fp8 {
        // And FP8 weights quantised once per optimizer step.
        // The tokens of a micro-batch this rank computes (seq_len / cp of each row).
        let tokens = (cfg.train.micro_batch_size * l.local_seq_len(cfg.data.seq_len)) as i64;
        model.enable_fp8(plan.clone(), tokens)?;
        if pl.env.rank == 0 {
            eprintln!("{}", plan.describe());
        }
    }
    let mut saver = Saver::new(cfg, job.map(|j| j.env.clone()), tokenizer);
    if cfg.checkpointing() {
        saver.allocate_host(&model.params);
    }
    // The dp x cp ranks hold the same parameters: ZeRO-1 shards over all of them.
    let replicas = l.mesh.replicas();
    let zero = (p.zero == 1 && replicas > 1).then_some((l.mesh.replica_index(l.coords), replicas));
    let optim = AdamW::new(&cfg.optim, &model.params, zero, p.tp);
    // Matmul weight gradients straight into the fp32 buffer (mixed precision).
    let sink = cfg
        .train
        .fused_weight_grad
        .then(|| GradSink::new(&model, &optim.grad))
        .flatten();
    if pl.env.rank == 0 && p.tp > 1 && p.tp_comm_overlap && pl.device.is_cuda() {
        note_idle_overlap(sink.is_some(), opts);
    }
    let buckets = (replicas > 1 && zero.is_none()).then(|| {
        let n = model.params.specs.len();
        let ready = if p.pp == 1 {
            Program::with_ring(&model, &l.tp, p.cp > 1).final_positions(&model)
        } else {
            vec![usize::MAX; n]
        };
        GradBuckets::new(
            &model.params.layout(),
            &ready,
            (p.bucket_mb * 1e6 / 4.0) as i64,
        )
    });
    Ok(Parts {
        model,
        optim,
        sink,
        buckets,
        saver,
    })
}

/// Host memory to initialise this rank's share (the flat fp32 buffer and the
/// largest whole tensor drawn at a time) and, on the CPU, to train it
/// (gradient and AdamW moments).
fn host_bytes(cfg: &RunConfig, share: &crate::model::Share, pl: &Placement) -> f64 {
    let held = share.held_numel() as f64;
    let largest = share
        .specs
        .iter()
        .map(|s| s.global_numel())
        .max()
        .unwrap_or(0) as f64;
    let init = 4.0 * (held + largest);
    if pl.device.is_cuda() {
        return init;
    }
    let shards = if cfg.parallel.zero == 1 {
        cfg.parallel.dp * cfg.parallel.cp
    } else {
        1
    };
    init + held * (4.0 + 8.0 / shards as f64)
}

/// Say why `parallel.tp_comm_overlap` will not act, where it cannot.
fn note_idle_overlap(sink: bool, opts: &ExecOptions) {
    if !sink {
        eprintln!(
            "note: parallel.tp_comm_overlap has no effect here: it puts off the weight \
             gradients that mixed precision adds into the gradient buffer \
             (train.precision bf16 with train.fused_weight_grad = true)"
        );
    } else if opts.time_collectives {
        eprintln!(
            "note: {}=1 runs every tensor-parallel collective to completion: \
             parallel.tp_comm_overlap is off for this run",
            sigma_data::env::TIME_COLLECTIVES
        );
    }
}

impl Trainer {
    /// Wire the parts together. Writes nothing to disk: the run's files appear
    /// only when `run` starts, so a refused resume leaves everything as it was.
    pub fn build(cfg: &RunConfig, progress: bool, signals: StopSignals) -> Result<Trainer> {
        let pl = place(cfg)?;
        let mut job = join(cfg, &pl)?;
        let ring = job.as_mut().and_then(|j| j.cp.take()).map(Ring::new);
        let (rank, dp_rank) = (pl.env.rank, pl.layout.coords.dp);
        let (dataset, tokenizer) = open_data(cfg, rank)?;
        let opts = ExecOptions::training(cfg);
        let parts = build_parts(cfg, &pl, job.as_ref(), tokenizer, &opts)?;
        // Every rank of a tensor-parallel group reads the same samples.
        let loader = Loader::new(
            dataset.clone(),
            LoaderOptions {
                global_batch: cfg.train.micro_batch_size * cfg.parallel.dp,
                dp_rank,
                dp_size: cfg.parallel.dp,
                start: DataState::default(),
            },
        )?;
        let device_name = match pl.device {
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
            device: pl.device,
            layout: pl.layout,
            opts,
            model: parts.model,
            sink: parts.sink,
            optim: parts.optim,
            dataset,
            loader,
            metrics: None,
            saver: parts.saver,
            start_step: 0,
            skipped_before: 0,
            stop_after: None,
            job,
            ring,
            buckets: parts.buckets,
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
    /// checkpoint (any layout). Returns the step resumed at, or None when
    /// `auto` found no checkpoint.
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
        let (p, l) = (&self.cfg.parallel, &m.layout);
        let cp = |n: usize| {
            if n > 1 {
                format!(" cp {n}")
            } else {
                String::new()
            }
        };
        self.say(format!(
            "resume: {} (step {}, {} tokens; saved with dp {}{} tp {} pp {} zero {}, now dp {}{} tp {} pp {} zero {}); loaded and verified in {load_s:.2} s ({:.2} GB checkpoint)",
            dir.display(),
            m.progress.step,
            m.progress.consumed_tokens,
            l.dp, cp(l.cp), l.tp, l.pp, l.zero,
            p.dp, cp(p.cp), p.tp, p.pp, p.zero,
            bytes as f64 / 1e9
        ));
        Ok(Some(m.progress.step))
    }
}
