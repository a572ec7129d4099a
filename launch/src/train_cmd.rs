//! `sigma train` and `sigma model ...`.

use anyhow::Result;
use clap::Subcommand;
use sigma_trainer::checkpoint::tools;
use sigma_trainer::model::summary::summarize;
use sigma_trainer::train::{TrainReport, Trainer};
use sigma_trainer::RunConfig;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run config (TOML).
    #[arg(long)]
    pub config: String,
    /// Override a config value: section.key=value (repeatable; value parsed as TOML, else a string).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Resume from a checkpoint: `auto` (the newest committed one under the
    /// run's checkpoint directory; start fresh if there is none) or a path to a `step-NNNNNNN` directory.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
    /// Save a checkpoint and stop after this step (the schedule still spans train.steps).
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<u64>,
    /// Exit status when the run stopped early on a signal (SIGTERM, SIGUSR1,
    /// Ctrl-C) after saving a checkpoint; a finished run exits 0. Batch scripts
    /// use it to requeue themselves (see launch/slurm/).
    #[arg(long, value_name = "CODE", default_value_t = 0)]
    pub stopped_exit_code: u8,
}

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Step, tokens, layout, tensors, sizes, and health (checksums, non-finite values).
    Inspect { path: std::path::PathBuf },
    /// One consolidated safetensors file, config.json and the tokenizer, for use outside sigma.
    Export {
        /// The checkpoint (`step-NNNNNNN/`) to export.
        #[arg(required_unless_present = "init", conflicts_with = "init")]
        path: Option<std::path::PathBuf>,
        /// Export a freshly initialised model of this run config instead of a
        /// checkpoint (no training): the weights a one-device run of it with
        /// train.seed = --seed starts from.
        #[arg(long, value_name = "CONFIG.toml")]
        init: Option<std::path::PathBuf>,
        /// --init: the seed of the initial draws [default: 0].
        #[arg(long, requires = "init")]
        seed: Option<u64>,
        /// --init: the tokenizer.json the model is for (default: the config's data.tokenizer).
        #[arg(long, value_name = "PATH", requires = "init")]
        tokenizer: Option<String>,
        /// --init: override a config value, section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "init")]
        overrides: Vec<String>,
        #[arg(long)]
        output: std::path::PathBuf,
        /// Weight dtype of the export.
        #[arg(long, value_enum, default_value_t = ExportDtypeArg::F32)]
        dtype: ExportDtypeArg,
        /// What to write.
        #[arg(long, value_enum, default_value_t = ExportFormatArg::Sigma)]
        format: ExportFormatArg,
    },
}

/// `--dtype` of `sigma checkpoint export` (tools::ExportDtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtypeArg {
    /// float32 weights, as trained.
    #[value(alias = "float32")]
    F32,
    /// bfloat16 weights (half the size).
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<ExportDtypeArg> for tools::ExportDtype {
    fn from(d: ExportDtypeArg) -> Self {
        match d {
            ExportDtypeArg::F32 => tools::ExportDtype::F32,
            ExportDtypeArg::Bf16 => tools::ExportDtype::Bf16,
        }
    }
}

/// `--format` of `sigma checkpoint export` (tools::ExportFormat).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormatArg {
    /// model.safetensors, config.json and tokenizer.json.
    Sigma,
    /// a directory that Hugging Face transformers loads with trust_remote_code=True.
    #[value(alias = "huggingface")]
    Hf,
}

impl From<ExportFormatArg> for tools::ExportFormat {
    fn from(f: ExportFormatArg) -> Self {
        match f {
            ExportFormatArg::Sigma => tools::ExportFormat::Sigma,
            ExportFormatArg::Hf => tools::ExportFormat::HuggingFace,
        }
    }
}

pub fn checkpoint(cmd: CheckpointCommand) -> Result<()> {
    match cmd {
        CheckpointCommand::Inspect { path } => print!("{}", tools::inspect(&path)?),
        CheckpointCommand::Export {
            path,
            init,
            seed,
            tokenizer,
            overrides,
            output,
            dtype,
            format,
        } => {
            let f = tools::ExportFormat::from(format);
            // clap does not enforce `requires` on an argument whose target
            // conflicts with a given one (here --init with the path).
            if path.is_some() {
                let given = [
                    ("--seed", seed.is_some()),
                    ("--tokenizer", tokenizer.is_some()),
                    ("--set", !overrides.is_empty()),
                ];
                if let Some((flag, _)) = given.iter().find(|g| g.1) {
                    anyhow::bail!(
                        "{flag} applies to --init only: a checkpoint is exported with its own config, seed and tokenizer"
                    );
                }
            }
            let seed = seed.unwrap_or(0);
            let source = match (&path, &init) {
                (Some(p), _) => {
                    tools::export(p, &output, dtype.into(), f)?;
                    p.display().to_string()
                }
                (None, Some(c)) => {
                    let req = tools::InitExport {
                        config: c,
                        overrides: &overrides,
                        seed,
                        tokenizer: tokenizer.as_deref(),
                    };
                    tools::export_init(&req, &output, dtype.into(), f)?;
                    format!("a model of {} initialised with seed {seed}", c.display())
                }
                (None, None) => anyhow::bail!("give a checkpoint path or --init CONFIG.toml"),
            };
            println!(
                "exported {source} to {} ({})",
                output.display(),
                match f {
                    tools::ExportFormat::Sigma => "model.safetensors, config.json, tokenizer.json",
                    tools::ExportFormat::HuggingFace =>
                        "Hugging Face: model.safetensors, config.json, modeling_sigma.py, configuration_sigma.py, tokenizer files",
                }
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum DistCommand {
    /// All-reduce bus bandwidth by message size (bf16), through sigma and plain NCCL; run under `sigma launch`.
    BenchAllreduce {
        /// Smallest message, bytes (doubling up to --max-bytes).
        #[arg(long, default_value_t = 1 << 20)]
        min_bytes: usize,
        #[arg(long, default_value_t = 1 << 30)]
        max_bytes: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
}

pub fn dist(cmd: DistCommand) -> Result<()> {
    match cmd {
        DistCommand::BenchAllreduce {
            min_bytes,
            max_bytes,
            iters,
        } => {
            let mut sizes = Vec::new();
            let mut s = min_bytes.max(2);
            while s <= max_bytes {
                sizes.push(s);
                s *= 2;
            }
            let rows = sigma_trainer::dist::bench::bench_allreduce(&sizes, iters)?;
            if !rows.is_empty() {
                println!(
                    "{:>12} {:>16} {:>16} {:>8}",
                    "bytes", "sigma GB/s", "plain NCCL GB/s", "ratio"
                );
                for r in rows {
                    println!(
                        "{:>12} {:>16.1} {:>16.1} {:>7.1}%",
                        r.bytes,
                        r.sigma_busbw / 1e9,
                        r.plain_busbw / 1e9,
                        100.0 * r.sigma_busbw / r.plain_busbw
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TraceCommand {
    /// Draw the traces of a run (DIR/trace-rank*.json) as one timeline, DIR/trace.png.
    Plot {
        dir: std::path::PathBuf,
        /// The traced step to draw (default: the last one).
        #[arg(long)]
        step: Option<u64>,
        /// Where to write the PNG (default: DIR/trace.png).
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
}

pub fn trace(cmd: TraceCommand) -> Result<()> {
    let TraceCommand::Plot { dir, step, output } = cmd;
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("trace-rank") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!(
            "no trace-rank*.json in {} (train with --set metrics.trace=true and parallel.pp > 1)",
            dir.display()
        );
    }
    let mut events = Vec::new();
    for f in &files {
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?,
        )
        .map_err(|e| anyhow::anyhow!("{}: not a trace: {e}", f.display()))?;
        let rank = v["otherData"]["rank"].as_u64().unwrap_or(0) as usize;
        if let Some(b) = v["otherData"]["bubble"].as_f64() {
            println!(
                "rank {rank}: idle {:.1} % of the forward/backward stretch",
                100.0 * b
            );
        }
        for e in v["traceEvents"].as_array().into_iter().flatten() {
            events.push((
                e["args"]["step"].as_u64().unwrap_or(0),
                rank,
                e["name"].as_str().unwrap_or("").to_string(),
                e["cat"].as_str().unwrap_or("").to_string(),
                e["ts"].as_f64().unwrap_or(0.0),
                e["dur"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    let last = events.iter().map(|e| e.0).max().unwrap_or(0);
    let want = step.unwrap_or(last);
    let picked: Vec<_> = events
        .into_iter()
        .filter(|e| e.0 == want)
        .map(|(_, r, n, c, t, d)| (r, n, c, t, d))
        .collect();
    if picked.is_empty() {
        anyhow::bail!(
            "no events of step {want} in the traces of {}",
            dir.display()
        );
    }
    let out = output.unwrap_or_else(|| dir.join("trace.png"));
    sigma_trainer::train::plot::trace_png(&out, &picked, &format!("pipeline, step {want}"))?;
    println!("wrote {}", out.display());
    Ok(())
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Parameters by component, FLOPs per token and KV-cache bytes per token.
    Summary {
        #[arg(long)]
        config: String,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
    },
}

/// This process's rank when it is part of a job of several (from the environment).
pub fn job_rank() -> Option<usize> {
    let get = |k: &str| sigma_data::env::var(k).and_then(|v| v.trim().parse::<usize>().ok());
    let (rank, world) = match get("RANK") {
        Some(r) => (r, get("WORLD_SIZE")),
        None => (get("SLURM_PROCID")?, get("SLURM_NTASKS")),
    };
    (world.unwrap_or(1) > 1).then_some(rank)
}

/// Returns the process exit status: 0, or `--stopped-exit-code` after an early stop by signal.
pub fn train(a: TrainArgs) -> Result<i32> {
    let rank0 = job_rank().unwrap_or(0) == 0;
    // Before anything slow: a scheduler's signal during start-up must not kill
    // the process. Ctrl-C saves only when the run checkpoints; decided once the
    // config is read (until then it ends the process, with nothing to lose).
    let signals = sigma_trainer::signals::StopSignals::install(rank0)?;
    let cfg = RunConfig::load(&a.config, &a.overrides)?;
    sigma_trainer::parallel::Layout::check(&cfg)?;
    signals.set_interrupt_saves(cfg.checkpointing());
    if rank0 {
        println!(
            "# resolved config ({}), saved as {}/config.toml",
            a.config, cfg.metrics.output_dir
        );
        print!("{}", cfg.to_toml());
    }
    let mut t = Trainer::build(&cfg, !a.quiet, signals)?;
    t.stop_after = a.stop_after;
    if let Some(spec) = &a.resume {
        t.resume(spec)?;
    }
    if rank0 {
        print_setup(&t, &cfg);
    }
    let r = t.run()?;
    if rank0 {
        print_outcome(&r, &cfg);
    }
    Ok(if r.stopped_by_signal {
        a.stopped_exit_code as i32
    } else {
        0
    })
}

/// Rank 0, before the first step: device, parameters, FLOPs, optimizer state.
fn print_setup(t: &Trainer, cfg: &RunConfig) {
    let total = summarize(&cfg.model, cfg.data.seq_len).params;
    let local = t.model.params.numel();
    println!(
        "device {} ({}), {} parameters{}, {:.3} GFLOP/token, peak {}",
        t.device_name,
        if t.model.compute == tch::Kind::BFloat16 {
            "bf16 matmuls, fp32 master weights"
        } else {
            "fp32"
        },
        total,
        if local != total {
            format!(" ({local} on this rank)")
        } else {
            String::new()
        },
        t.flops_per_token / 1e9,
        t.peak_flops
            .map(|p| format!("{:.0} TFLOP/s", p / 1e12))
            .unwrap_or_else(|| "unknown (no MFU)".into())
    );
    println!(
        "optimizer state on this rank: {:.1} MB{}",
        t.optim.state_bytes() as f64 / 1e6,
        t.optim
            .shard
            .map(|s| format!(" (ZeRO-1: shard {} of {})", s.rank, s.world))
            .unwrap_or_default()
    );
}

/// Rank 0, at the end: how the run stopped, its checkpoints, speed,
/// validation and where the metrics are.
fn print_outcome(r: &TrainReport, cfg: &RunConfig) {
    let last = r.losses.last().copied().unwrap_or(f64::NAN);
    if let Some(s) = r.stopped_at {
        println!("stopped after step {s} with a checkpoint; continue with --resume auto");
    }
    for (step, stall) in &r.checkpoints {
        println!("checkpoint at step {step}: training stalled {stall:.3} s");
    }
    println!(
        "done: {} steps, final loss {last:.4}, {}{}{}",
        r.losses.len(),
        if r.tokens_per_s > 0.0 {
            format!("{:.0} tokens/s", r.tokens_per_s)
        } else {
            "no step logged (speed unknown)".into()
        },
        r.mfu
            .map(|m| format!(", MFU {:.1}%", m * 100.0))
            .unwrap_or_default(),
        if r.skipped_steps > 0 {
            format!(", {} steps skipped (non-finite)", r.skipped_steps)
        } else {
            String::new()
        }
    );
    if !r.valid.is_empty() {
        println!("validation loss per domain (nats/token):");
    }
    for (d, l) in &r.valid {
        println!("  {d:<12} {l:.4}");
    }
    println!(
        "metrics: {}/metrics.jsonl{}",
        r.output_dir.display(),
        if cfg.metrics.plot {
            ", loss curve: loss.png"
        } else {
            ""
        }
    );
}

pub fn model(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Summary { config, overrides } => {
            use sigma_trainer::config::{parse_doc, read_config, typed, ModelConfig};
            let doc = parse_doc(&config, &read_config(&config)?, &overrides)?;
            let section = doc
                .get("model")
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("config `{config}`: no [model] section"))?;
            let model: ModelConfig = typed(section, "model", &config, &overrides)?;
            model.validate()?;
            // data.seq_len where the config has one (a model-only config: 4096).
            let max = sigma_data::config::MAX_SEQ_LEN;
            let seq_len = match doc.get("data").and_then(|d| d.get("seq_len")) {
                None => 4096,
                Some(v) => v
                    .as_integer()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "config `{config}`: data.seq_len {v}: must be an integer from 1 to {max}"
                        )
                    })?,
            };
            print!("{}", summarize(&model, seq_len));
        }
    }
    Ok(())
}
