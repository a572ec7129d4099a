//! The `sigma` binary: parse arguments, call the libraries, print, pick the exit code.

mod ablate;
mod bench;
mod cuda_libs;
mod data_cmd;
mod device;
mod early_signals;
mod eval_cmd;
mod generate_cmd;
mod launcher;
mod plan_cmd;
mod train_cmd;
mod usage;

use clap::{Parser, Subcommand};

/// `sigma --version`: the package's version and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SIGMA_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "sigma",
    version = VERSION,
    about = "sigma: data pipeline and pre-training for SIGMA (DiffQKV) language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare, mix and inspect token data.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
    /// Train a model (one process; see `launch` for several).
    Train(train_cmd::TrainArgs),
    /// Start one process per local rank, on one node or several, with restarts.
    Launch(launcher::LaunchArgs),
    /// Distributed-runtime tools (benchmarks).
    Dist {
        #[command(subcommand)]
        command: train_cmd::DistCommand,
    },
    /// Inspect and export checkpoints.
    Checkpoint {
        #[command(subcommand)]
        command: train_cmd::CheckpointCommand,
    },
    /// Loss, perplexity and bits per byte of a checkpoint or an exported model.
    Eval(eval_cmd::EvalArgs),
    /// Micro-benchmarks (decode attention, fused training operations).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Sample text from a checkpoint or an export (DiffQKV KV cache).
    Generate(generate_cmd::GenerateArgs),
    /// Train the variants of an ablation file on one data stream, evaluate them, and report.
    Ablate(ablate::AblateArgs),
    /// Pipeline traces (`metrics.trace = true`).
    Trace {
        #[command(subcommand)]
        command: train_cmd::TraceCommand,
    },
    /// Inspect model configs.
    Model {
        #[command(subcommand)]
        command: train_cmd::ModelCommand,
    },
    /// Memory and speed of layouts before launching, simulated (no GPU); `plan calibrate` on a GPU.
    Plan(plan_cmd::PlanArgs),
}

fn run(command: Command) -> anyhow::Result<i32> {
    let ok = |r: anyhow::Result<()>| r.map(|_| 0);
    match command {
        Command::Data { command } => ok(data_cmd::run(command)),
        Command::Train(args) => train_cmd::train(args),
        Command::Launch(args) => launcher::launch(args),
        Command::Dist { command } => ok(train_cmd::dist(command)),
        Command::Model { command } => ok(train_cmd::model(command)),
        Command::Checkpoint { command } => ok(train_cmd::checkpoint(command)),
        Command::Trace { command } => ok(train_cmd::trace(command)),
        Command::Eval(args) => ok(eval_cmd::eval(args)),
        Command::Ablate(args) => ablate::ablate(args),
        Command::Generate(args) => ok(generate_cmd::run(args)),
        Command::Bench { command } => ok(bench::run(command)),
        Command::Plan(args) => plan_cmd::run(args),
    }
}

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| usage::exit(e));
    // The stop signals are blocked since before libtorch loaded
    // (early_signals.rs): `train`, `launch` and `ablate` unblock them once
    // their handlers are installed; every other command takes them as usual.
    if !matches!(
        cli.command,
        Command::Train(_) | Command::Launch(_) | Command::Ablate(_)
    ) {
        sigma_trainer::signals::unblock_stop_signals();
    }
    // sigma's own environment variables, checked before anything runs.
    // (SIGMA_DECODE_TUNING's fields are the decode kernel's to check.)
    let env_ok = sigma_data::env::check_sigma_vars()
        .and_then(|()| sigma_trainer::kernels::decode::env_tuning().map(|_| ()));
    if let Err(e) = env_ok {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    // GPU machines: make cudarc find libtorch's own NCCL (may restart the process once).
    cuda_libs::ensure();
    // libtorch failures (and bugs) come back as errors, not panics.
    sigma_trainer::guard::install();
    let result = sigma_trainer::guard::catch(|| run(cli.command));
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Several processes of a job write to one log under srun: say which one failed.
            let who = train_cmd::job_rank()
                .map(|r| format!("rank {r}: "))
                .unwrap_or_default();
            // A lost peer or store: report the cause that stopped the job, once.
            if let Some(reason) = sigma_trainer::dist::abort::reason() {
                sigma_trainer::dist::abort::print_once(&reason);
                std::process::exit(1);
            }
            let mut text = format!("{who}{e}");
            let mut src = e.source();
            while let Some(s) = src {
                // A cause the message already quotes is not repeated.
                let cause = s.to_string();
                if !text.contains(&cause) {
                    text.push_str(&format!("\n  caused by: {cause}"));
                }
                src = s.source();
            }
            sigma_trainer::dist::abort::print_once(&text);
            std::process::exit(1);
        }
    }
}
