//! `sigma ablate`: train every variant of an ablation file on the identical
//! data stream, evaluate each final checkpoint, and write a report.
//!
//! Layout of the output directory:
//!   plan.json                   the ablation (base config, grid, overrides)
//!   runs/<variant>/             one run directory per variant: config.toml,
//!                               metrics.jsonl, checkpoints/, train.log,
//!                               eval.json (`sigma eval --json`), done.json
//!   report.md, report.json, loss-curves.png, val-vs-kv.png

mod plan;
mod report;
mod runner;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sigma_trainer::model::summary::h;

use plan::Plan;
use runner::{Slot, State};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AblateArgs {
    #[command(subcommand)]
    pub command: Option<AblateCommand>,
    /// The base run config (TOML) every variant starts from.
    #[arg(long)]
    pub base: Option<String>,
    /// The ablation file: named variants, each a set of overrides (see configs/ablations/).
    #[arg(long)]
    pub grid: Option<String>,
    /// The ablation's directory (created; rerun with the same one to resume).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Override for every variant, e.g. a shorter run (section.key=value, repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Rerun only this variant, from scratch (repeatable).
    #[arg(long, value_name = "NAME")]
    pub only: Vec<String>,
    /// GPUs per variant on this host (each variant runs as a job of this many
    /// processes; variants run side by side on the remaining GPUs). Without a GPU,
    /// variants run one after another on the CPU.
    #[arg(long, default_value_t = 1)]
    pub gpus_per_run: usize,
    /// Print the plan (with the time estimate) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the few-step probe that measures a step for the time estimate.
    #[arg(long)]
    pub no_estimate: bool,
}

#[derive(Subcommand)]
pub enum AblateCommand {
    /// Regenerate report.md, report.json and the plots of an ablation directory.
    Report { dir: PathBuf },
}

pub fn ablate(a: AblateArgs) -> Result<i32> {
    if let Some(AblateCommand::Report { dir }) = a.command {
        sigma_trainer::signals::unblock_stop_signals();
        return report_only(&dir);
    }
    // The stop signals are blocked since the process started
    // (early_signals.rs): from here on they set the flag, through the probe
    // run too, and none is lost or kills the runner with its children.
    let stop = stop_on_signals()?;
    sigma_trainer::signals::unblock_stop_signals();
    let (Some(base), Some(grid), Some(out)) =
        (a.base.as_deref(), a.grid.as_deref(), a.output.as_ref())
    else {
        bail!("sigma ablate needs --base CONFIG, --grid ABLATION.toml and --output DIR (or: sigma ablate report DIR)");
    };
    let plan = plan::build(base, grid, out, &a.sets)?;
    let (states, todo) = select(&plan, &a.only, grid)?;
    let slots = runner::slots(a.gpus_per_run, &plan)?;
    // A dry run writes nothing under --output (its probe runs in a temporary directory).
    let probe_dir = if a.dry_run {
        std::env::temp_dir().join(format!("sigma-ablate-probe-{}", std::process::id()))
    } else {
        out.join(".probe")
    };
    let step_s = if a.no_estimate || todo.is_empty() {
        None
    } else {
        measure_step(&plan, &slots[0], &probe_dir, &stop)?
    };
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!(
            "sigma ablate: stopped before any variant started; rerun the same command to start"
        );
        return Ok(sigma_trainer::signals::EXIT_INTERRUPTED);
    }
    print_plan(&plan, &states, &todo, &slots, step_s);
    if a.dry_run {
        return Ok(0);
    }
    start_output(&plan, out, &a.only)?;
    let outcome = runner::run(&plan, todo, &slots, stop, |_| {
        // A partial report after every variant; errors wait for the final one.
        let _ = report::write(out);
    })?;
    finish(out, &outcome)
}

/// `sigma ablate report DIR`.
fn report_only(dir: &std::path::Path) -> Result<i32> {
    let r = report::write(dir)?;
    let finished = r.variants.iter().filter(|v| v.finished).count();
    println!(
        "report of {} ({} of {} variants finished): {}",
        r.name,
        finished,
        r.variants.len(),
        dir.join("report.md").display()
    );
    Ok(0)
}

/// Each variant's state and the variants to run (`--only`'s, else every
/// unfinished one). Finished variants must still be what the plan says
/// (checked before anything is written).
fn select(plan: &Plan, only: &[String], grid: &str) -> Result<(Vec<State>, Vec<usize>)> {
    for o in only {
        if !plan.variants.iter().any(|v| &v.name == o) {
            let names: Vec<&str> = plan.variants.iter().map(|v| v.name.as_str()).collect();
            bail!(
                "--only {o}: no such variant in {grid} (variants: {})",
                names.join(", ")
            );
        }
    }
    let mut states: Vec<State> = Vec::new();
    for (i, v) in plan.variants.iter().enumerate() {
        states.push(if only.contains(&v.name) {
            State::At(0)
        } else {
            runner::state(plan, i)?
        });
    }
    let todo: Vec<usize> = (0..plan.variants.len())
        .filter(|&i| only.is_empty() || only.contains(&plan.variants[i].name))
        .filter(|&i| !matches!(states[i], State::Done))
        .collect();
    Ok((states, todo))
}

/// Create the output directory with plan.json; `--only` variants start over.
fn start_output(plan: &Plan, out: &std::path::Path, only: &[String]) -> Result<()> {
    sigma_data::fsutil::create_dir_all(out)?;
    sigma_data::fsutil::write_atomic(
        &plan.plan_json(),
        serde_json::to_string_pretty(&plan.file)?.as_bytes(),
    )?;
    for o in only {
        let v = plan
            .variants
            .iter()
            .find(|v| &v.name == o)
            .expect("checked");
        if v.dir().exists() {
            std::fs::remove_dir_all(v.dir())
                .with_context(|| format!("cannot remove {}", v.dir().display()))?;
        }
    }
    Ok(())
}

/// A flag set by SIGINT, SIGTERM and SIGUSR1 (the runner passes the stop on).
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    Ok(stop)
}

/// The final report, and the exit status: interrupted, failed variants, or 0.
fn finish(out: &std::path::Path, outcome: &runner::Outcome) -> Result<i32> {
    let r = report::write(out)?;
    println!("report: {}", out.join("report.md").display());
    let finished = r.variants.iter().filter(|v| v.finished).count();
    if outcome.interrupted {
        eprintln!(
            "sigma ablate: stopped with {finished} of {} variants finished; rerun the same command to resume",
            r.variants.len()
        );
        return Ok(sigma_trainer::signals::EXIT_INTERRUPTED);
    }
    if !outcome.failed.is_empty() {
        let list: Vec<String> = outcome
            .failed
            .iter()
            .map(|(n, e)| format!("  {n}: {e}"))
            .collect();
        bail!(
            "{} of {} variants failed (the others are in the report):\n{}",
            outcome.failed.len(),
            r.variants.len(),
            list.join("\n")
        );
    }
    Ok(0)
}

/// Median step time in seconds of the base variant: from a run of this
/// ablation that already logged steps, else from a 4-step probe run.
fn measure_step(
    plan: &Plan,
    slot: &Slot,
    dir: &std::path::Path,
    stop: &AtomicBool,
) -> Result<Option<f64>> {
    let median_step = |path: &std::path::Path| -> Option<f64> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut t: Vec<f64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|r| r["step_time_s"].as_f64())
            .collect();
        if t.len() > 1 {
            t.remove(0);
        }
        t.sort_by(|a, b| a.total_cmp(b));
        t.get(t.len() / 2).copied()
    };
    for v in &plan.variants {
        if let Some(s) = median_step(&v.dir().join("metrics.jsonl")) {
            // Scale to the base variant by FLOPs per token.
            return Ok(Some(
                s * plan.variants[plan.base].summary.flops_per_token / v.summary.flops_per_token,
            ));
        }
    }
    let dir = dir.to_path_buf();
    let _ = std::fs::remove_dir_all(&dir);
    let quoted = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
    let extra: Vec<String> = vec![
        format!("metrics.output_dir={}", quoted(dir.clone())),
        format!("checkpoint.dir={}", quoted(dir.join("checkpoints"))),
        "checkpoint.every_steps=0".into(),
        "checkpoint.every_minutes=0.0".into(),
        "train.steps=4".into(),
        "train.batch_ramp_steps=0".into(),
        "train.log_every=1".into(),
        "train.eval_steps=1".into(),
        "metrics.plot=false".into(),
        "metrics.tensorboard=false".into(),
    ];
    let v = &plan.variants[plan.base];
    eprintln!(
        "sigma ablate: timing 4 steps of {} on {} for the estimate (--no-estimate skips this)",
        v.name,
        slot.describe()
    );
    let mut c = runner::train_command(v, &plan.file.base_config, slot, &extra, false)?;
    let o = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()?;
    let s = median_step(&dir.join("metrics.jsonl"));
    let _ = std::fs::remove_dir_all(&dir);
    if !o.status.success() {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None); // stopped too: the caller reports the stop
        }
        let err = String::from_utf8_lossy(&o.stderr);
        bail!(
            "the probe run of variant {} failed:\n{}",
            v.name,
            err.trim_end()
        );
    }
    Ok(s)
}

fn duration(s: f64) -> String {
    match s {
        s if s >= 3600.0 => format!("{:.1} h", s / 3600.0),
        s if s >= 60.0 => format!("{:.1} min", s / 60.0),
        s => format!("{s:.0} s"),
    }
}

/// The plan: what is compared on which data, a row per variant (size, cost,
/// estimated time, status), and where and how long it runs.
fn print_plan(plan: &Plan, states: &[State], todo: &[usize], slots: &[Slot], step_s: Option<f64>) {
    print_plan_header(plan);
    println!(
        "{:<18} {:>10} {:>12} {:>9} {:>11}  {:<14} overrides",
        "variant", "params", "FLOPs/token", "KV B/tok", "est. time", "status"
    );
    let mut total = 0.0;
    for (i, state) in states.iter().enumerate() {
        let est = print_variant_row(plan, i, state, todo.contains(&i), step_s);
        if todo.contains(&i) {
            total += est.unwrap_or(0.0);
        }
    }
    let where_ = if slots[0].gpus.is_none() {
        "one after another on the CPU".to_string()
    } else {
        format!(
            "{} at a time on {}",
            slots.len(),
            slots
                .iter()
                .map(|s| s.describe())
                .collect::<Vec<_>>()
                .join(" | ")
        )
    };
    match step_s {
        Some(s) => println!(
            "measured step of {}: {:.3} s (others scaled by FLOPs per token); about {} of training in all, {where_} (evaluation and start-up not included)",
            plan.variants[plan.base].name,
            s,
            duration(total / slots.len() as f64)
        ),
        None => println!("runs {where_}"),
    }
}

/// What the ablation compares, from which files, on which data stream.
fn print_plan_header(plan: &Plan) {
    let b = &plan.variants[plan.base];
    let c = &b.cfg;
    let mix = c
        .data
        .mixture
        .as_ref()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(" / ")
        })
        .unwrap_or_else(|| "sources in proportion to their tokens".into());
    println!(
        "ablation {}: {} variants of {} from {}, base variant {}",
        plan.file.name,
        plan.variants.len(),
        plan.file.base_config,
        plan.file.grid,
        b.name
    );
    if !plan.file.sets.is_empty() {
        println!("every variant: --set {}", plan.file.sets.join(" --set "));
    }
    println!(
        "identical data stream: data seed {}, train seed {}, mixture {mix}, {} steps = {} tokens per variant",
        c.data.seed,
        c.train.seed,
        c.train.steps,
        h(plan.tokens_per_variant() as f64)
    );
}

/// Variant `i`'s row; returns its estimated training time in seconds
/// (the base variant's measured step scaled by FLOPs per token).
fn print_variant_row(
    plan: &Plan,
    i: usize,
    state: &State,
    selected: bool,
    step_s: Option<f64>,
) -> Option<f64> {
    let (v, b) = (&plan.variants[i], &plan.variants[plan.base]);
    let steps_left = match state {
        State::Done => 0,
        State::At(s) => v.cfg.train.steps.saturating_sub(*s),
    };
    let status = match (state, selected) {
        (State::Done, _) => "done, skipped".to_string(),
        (_, false) => "not selected".to_string(),
        (State::At(0), true) => "to run".to_string(),
        (State::At(s), true) => format!("resume at {s}"),
    };
    let est = step_s
        .map(|s| s * v.summary.flops_per_token / b.summary.flops_per_token * steps_left as f64);
    let set = &plan.file.variants[i].set;
    println!(
        "{:<18} {:>10} {:>12} {:>9} {:>11}  {:<14} {}",
        v.name,
        h(v.summary.params as f64),
        h(v.summary.flops_per_token),
        v.summary.kv_cache_bytes_per_token,
        est.map(duration).unwrap_or_else(|| "-".into()),
        status,
        if set.is_empty() {
            "(base config)".to_string()
        } else {
            set.join(" ")
        }
    );
    est
}
