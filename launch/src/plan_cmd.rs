//! `sigma plan`: the memory and speed of a run's layouts before launching,
//! by simulation on a calibration (sigma_trainer::plan, docs/plan.md);
//! `sigma plan validate` predicts the recorded runs again; `sigma plan
//! calibrate` measures a calibration on a GPU.
//!
//! Its arguments are parsed here, not by the top-level parser, so that a
//! bad flag is refused in one line naming it, with exit code 1, like every
//! other bad input of sigma.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sigma_trainer::config::RunConfig;
use sigma_trainer::model::summary::{h, summarize};
use sigma_trainer::plan::calib::Calibration;
use sigma_trainer::plan::calibrate::{calibrate, Origin};
use sigma_trainer::plan::recorded::{runs, Run};
use sigma_trainer::plan::search::{search, Fixed, Job, Outcome, LAYOUT_KEYS};
use sigma_trainer::plan::step::{Machine, Prediction, RankPlan};
use sigma_trainer::TrainError;

/// The words after `sigma plan`, parsed by [`PlanCli`].
#[derive(Args)]
#[command(disable_help_flag = true)]
pub struct PlanArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

/// Predict the peak memory per GPU, whether it fits, the step time,
/// tokens/s and MFU of a run's layouts (one, or every valid one), ranked,
/// each refused layout with its reason. No GPU needed.
#[derive(Parser)]
#[command(
    name = "sigma plan",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct PlanCli {
    #[command(subcommand)]
    command: Option<PlanCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Measure this machine's GPU (GEMM, attention, optimizer, memory) and write a calibration file.
    Calibrate(CalibrateArgs),
    /// Predict every GPU run recorded in docs/benchmarks.md again and compare.
    Validate(ValidateArgs),
}

/// The kinds of GPU with a shipped calibration.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Gpu {
    H100,
    H200,
}

impl Gpu {
    fn name(self) -> &'static str {
        match self {
            Gpu::H100 => "h100",
            Gpu::H200 => "h200",
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// The run's config (its model, sequence length and defaults).
    #[arg(long, required = true)]
    config: Option<String>,
    /// Config overrides, as for `sigma train`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// GPUs of the job.
    #[arg(long, required = true)]
    gpus: Option<usize>,
    /// GPUs per node (NVLink inside a node, the network between nodes).
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// The kind of GPU: its shipped calibration.
    #[arg(long, value_enum, default_value = "h100")]
    gpu: Gpu,
    /// A calibration file instead of the shipped one (`sigma plan calibrate` writes one;
    /// it names its GPU, so --gpu is refused with it).
    #[arg(long, conflicts_with = "gpu")]
    calibration: Option<String>,
    /// Tokens per optimizer step over the job (default: the config's
    /// micro_batch_size x grad_accum_steps x dp x seq_len).
    #[arg(long)]
    global_batch: Option<usize>,
    /// Fix some keys of the layout: tp, pp, v (chunks per pipeline rank), dp,
    /// zero (0/1), mbs, ckpt (on/off), chunk (head chunk tokens, 0: off);
    /// e.g. tp=2,pp=4. All of them: one layout, in detail.
    #[arg(long)]
    layout: Option<String>,
    /// Feasible layouts to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// List every refused or non-fitting layout (default: the first 12).
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct CalibrateArgs {
    /// The shipped calibration whose values stand where this machine measures nothing.
    #[arg(long, value_enum, default_value = "h100")]
    base: Gpu,
    /// Where to write the calibration (TOML).
    #[arg(long)]
    output: String,
}

#[derive(Args)]
struct ValidateArgs {
    /// The repository root the recorded runs' configs are read under.
    #[arg(long, default_value = ".")]
    root: String,
}

/// `sigma plan ...`: returns the exit status.
pub fn run(a: PlanArgs) -> Result<i32> {
    let argv = std::iter::once("sigma plan".to_string()).chain(a.args);
    let cli = match PlanCli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            print!("{e}");
            return Ok(0);
        }
        Err(e) => bail!("sigma plan: {}", one_line(&e.render().to_string())),
    };
    match cli.command {
        Some(PlanCommand::Calibrate(c)) => calibrate_cmd(c).map(|_| 0),
        Some(PlanCommand::Validate(v)) => validate_cmd(&v).map(|_| 0),
        None => plan_cmd(&cli.run).map(|_| 0),
    }
}

/// clap's message on one line, without its usage and help hints.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .map(|l| l.trim_start_matches("error: "))
        .collect::<Vec<_>>()
        .join("; ")
        .replace(":; ", ": ")
}

const GIB: f64 = 1073741824.0;

fn gib(b: f64) -> String {
    format!("{:.1}", b / GIB)
}

fn plan_cmd(a: &RunArgs) -> Result<()> {
    let path = a.config.as_deref().expect("clap: required");
    let gpus = a.gpus.expect("clap: required");
    if gpus == 0 {
        return Err(TrainError::input("--gpus", "must be at least 1, got 0").into());
    }
    if a.gpus_per_node == 0 {
        return Err(TrainError::input("--gpus-per-node", "must be at least 1, got 0").into());
    }
    if a.global_batch == Some(0) {
        return Err(TrainError::input("--global-batch", "must be at least 1 token, got 0").into());
    }
    let fixed = Fixed::parse(a.layout.as_deref().unwrap_or(""))?;
    let cal = match &a.calibration {
        Some(p) => Calibration::load(p).map_err(|e| anyhow!("--calibration: {e}"))?,
        None => Calibration::built_in(a.gpu.name())?,
    };
    let base = RunConfig::load(path, &a.overrides)?;
    sigma_trainer::plan::check_supported(&base)?;
    let t = &base.train;
    let global = match a.global_batch {
        Some(g) => g,
        None => t
            .micro_batch_size
            .checked_mul(t.grad_accum_steps)
            .and_then(|n| n.checked_mul(base.parallel.dp))
            .and_then(|n| n.checked_mul(base.data.seq_len))
            .ok_or_else(|| {
                anyhow!("{path}: train.micro_batch_size x train.grad_accum_steps x parallel.dp x data.seq_len is past any global batch sigma can plan")
            })?,
    };
    let machine = Machine {
        cal: &cal,
        gpus_per_node: a.gpus_per_node,
    };
    header(&base, path, gpus, global, &cal, a);
    let job = Job {
        gpus,
        global_tokens: global,
    };
    let outcomes = search(&base, &job, &fixed, machine);
    let mut fit: Vec<&Prediction> = Vec::new();
    let mut refused: Vec<(String, String)> = Vec::new();
    for o in &outcomes {
        match o {
            Outcome::Planned(p) if p.fits => fit.push(p),
            Outcome::Planned(p) => refused.push((p.cand.describe(), does_not_fit(p))),
            Outcome::Refused { layout, reason } => refused.push((layout.clone(), reason.clone())),
        }
    }
    fit.sort_by(|x, y| y.tokens_per_s.total_cmp(&x.tokens_per_s));
    println!(
        "{} layout(s) considered: {} fit, {} refused or do not fit",
        outcomes.len(),
        fit.len(),
        refused.len()
    );
    if outcomes.len() == 1 {
        if let Outcome::Planned(p) = &outcomes[0] {
            detail(p);
        }
    }
    ranked(&fit, a.top);
    list_refused(&refused, a.all);
    Ok(())
}

fn header(
    base: &RunConfig,
    path: &str,
    gpus: usize,
    global: usize,
    cal: &Calibration,
    a: &RunArgs,
) {
    let s = summarize(&base.model, base.data.seq_len);
    let from = match &a.calibration {
        Some(p) => format!("calibration {p}"),
        None => format!("shipped calibration {}", a.gpu.name()),
    };
    println!(
        "sigma plan: {path} on {gpus} x {} ({} per node; {from}), global batch {global} tokens of {}",
        cal.gpu, a.gpus_per_node, base.data.seq_len
    );
    println!(
        "model: {} parameters, {}FLOP per token; layouts over tp, pp, v (interleaved chunks), dp, ZeRO-1, micro-batch, activation checkpointing, head chunks ({LAYOUT_KEYS}); context parallelism (parallel.cp) is not modelled: every layout has cp = 1",
        h(s.params as f64),
        h(s.flops_per_token)
    );
}

fn does_not_fit(p: &Prediction) -> String {
    let w = p.worst();
    format!(
        "does not fit: pipeline rank {} needs {} GiB of {} GiB ({} GiB allocated at the peak: state {}, activations {} in {} micro-batch(es), head {}, sends {}, working {})",
        w.pp_rank,
        gib(w.total),
        gib(p.capacity),
        gib(w.allocated),
        gib(w.state.total()),
        gib(w.peak.activations),
        w.peak.in_flight,
        gib(w.peak.head),
        gib(w.peak.sends),
        gib(w.peak.working)
    )
}

fn ranked(fit: &[&Prediction], top: usize) {
    if fit.is_empty() {
        println!("no layout fits");
        return;
    }
    println!(
        "\n{:>3}  {:<50} {:>4} {:>10} {:>8} {:>10} {:>8} {:>6} {:>7}",
        "#", "layout", "m", "peak GiB", "step s", "tokens/s", "per GPU", "MFU", "bubble"
    );
    for (i, p) in fit.iter().take(top).enumerate() {
        let w = p.worst();
        println!(
            "{:>3}  {:<50} {:>4} {:>10} {:>8.3} {:>10.0} {:>8.0} {:>5.1}% {:>6.1}%",
            i + 1,
            p.cand.describe(),
            p.cand.accum,
            format!("{} (pp{})", gib(w.total), w.pp_rank),
            p.step,
            p.tokens_per_s,
            p.tokens_per_s / p.cand.gpus() as f64,
            100.0 * p.mfu,
            100.0 * p.ranks[0].bubble
        );
    }
    if fit.len() > top {
        println!(
            "  ... and {} more that fit (--top N lists more)",
            fit.len() - top
        );
    }
}

fn list_refused(refused: &[(String, String)], all: bool) {
    if refused.is_empty() {
        return;
    }
    println!("\nrefused or not fitting:");
    let n = if all {
        refused.len()
    } else {
        refused.len().min(12)
    };
    for (l, why) in &refused[..n] {
        println!("  {l}: {why}");
    }
    if n < refused.len() {
        println!(
            "  ... and {} more (--all lists every one)",
            refused.len() - n
        );
    }
}

/// One layout in detail: each pipeline rank's memory by part and its time.
fn detail(p: &Prediction) {
    println!(
        "\nlayout {} ({} micro-batches per step per data-parallel rank)",
        p.cand.describe(),
        p.cand.accum
    );
    for r in &p.ranks {
        rank_detail(r, p);
    }
    let w = p.worst();
    println!(
        "step: {:.3} s = passes {:.3} s (rank 0 idle {:.1} %, theory {:.1} %) + reductions {:.3} s + optimizer {:.3} s + host; {:.0} tokens/s, {:.0} per GPU, MFU {:.1} %; {}",
        p.step,
        p.passes,
        100.0 * p.ranks[0].bubble,
        100.0 * p.bubble_theory,
        p.ranks.iter().map(|r| r.reduce).fold(0.0, f64::max),
        p.ranks.iter().map(|r| r.optimizer).fold(0.0, f64::max),
        p.tokens_per_s,
        p.tokens_per_s / p.cand.gpus() as f64,
        100.0 * p.mfu,
        if p.fits { "fits".to_string() } else { format!("does NOT fit (pipeline rank {})", w.pp_rank) }
    );
}

fn rank_detail(r: &RankPlan, p: &Prediction) {
    let s = &r.state;
    let per_mb = r.passes.iter().map(|m| m.kept).fold(0.0, f64::max);
    println!(
        "pipeline rank {} ({} layers): weights {} GiB, gradients {} GiB, optimizer moments {} GiB, bf16 copy {} GiB; activations {} GiB ({} micro-batch(es) in flight, up to {} GiB each), head and loss {} GiB, pipeline sends held {} GiB, backward working {} GiB; optimizer-step temporaries {} GiB; allocator peak {} GiB; NCCL {} GiB, fragmentation {} GiB, CUDA context {} GiB: {} GiB of {} GiB",
        r.pp_rank,
        r.layers,
        gib(s.weights),
        gib(s.grads),
        gib(s.moments),
        gib(s.work_copy),
        gib(r.peak.activations),
        r.peak.in_flight,
        gib(per_mb),
        gib(r.peak.head),
        gib(r.peak.sends),
        gib(r.peak.working),
        gib(r.optimizer_extra),
        gib(r.allocated),
        gib(r.nccl),
        gib(r.fragmentation),
        gib(r.context),
        gib(r.total),
        gib(p.capacity)
    );
    for (i, c) in r.chunks.iter().enumerate() {
        println!(
            "  chunk {i}: forward {:.1} ms, backward {:.1} ms per micro-batch (GEMM {:.1}, attention {:.1}, elementwise {:.1}, TP collectives exposed {:.1} ms)",
            1e3 * c.fwd,
            1e3 * c.bwd,
            1e3 * c.gemm,
            1e3 * c.attention,
            1e3 * c.elementwise,
            1e3 * c.tp_comm,
        );
    }
    println!(
        "  computes {:.3} s of the step's passes, idle {:.1} % of its stretch",
        r.busy,
        100.0 * r.bubble
    );
}

fn validate_cmd(v: &ValidateArgs) -> Result<()> {
    let root = PathBuf::from(&v.root);
    println!(
        "{:<52} {:<11} {:>9} {:>8} {:>10} {:>9} {:>8} {:>8} {:>7} {:>7}",
        "run (commit)", "use", "tok/s", "pred", "err", "MiB", "pred", "err", "bubble", "pred"
    );
    for r in runs()? {
        let p = r.predict(&root).map_err(|e| anyhow!("{}: {e}", r.name))?;
        validate_row(&r, &p);
    }
    Ok(())
}

fn validate_row(r: &Run, p: &Prediction) {
    let err = |m: f64, x: f64| format!("{:+.1}%", 100.0 * (x - m) / m);
    let mib = p.ranks[0].allocated / 1048576.0;
    let (t, te) = match r.tokens_per_s {
        Some(m) => (format!("{m:.0}"), err(m, p.tokens_per_s)),
        None => ("-".into(), "-".into()),
    };
    let (mm, me) = match r.memory_mib {
        Some(m) => (format!("{m:.0}"), err(m, mib)),
        None => ("-".into(), "-".into()),
    };
    let b = r
        .bubble
        .map_or("-".into(), |b| format!("{:.1}%", 100.0 * b));
    let pb = if p.cand.pp > 1 {
        format!("{:.1}%", 100.0 * p.ranks[0].bubble)
    } else {
        "-".into()
    };
    println!(
        "{:<52} {:<11} {:>9} {:>8.0} {:>10} {:>9} {:>8.0} {:>8} {:>7} {:>7}",
        format!("{} ({})", r.name, r.commit),
        r.role,
        t,
        p.tokens_per_s,
        te,
        mm,
        mib,
        me,
        b,
        pb
    );
}

fn calibrate_cmd(c: CalibrateArgs) -> Result<()> {
    let base = Calibration::built_in(c.base.name())?;
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map_or("unknown date".into(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    let cal = calibrate(&base, &Origin { commit, date })?;
    std::fs::write(&c.output, cal.to_toml()).map_err(|e| TrainError::io(&c.output, e))?;
    println!(
        "wrote {} (check it with `sigma plan --calibration {} ...`)",
        c.output, c.output
    );
    Ok(())
}
