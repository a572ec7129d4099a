//! The `sigma` binary: parse arguments, call the libraries, print, pick the exit code.

mod data_cmd;
mod launcher;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sigma",
    version,
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
    /// Start one process per local rank (data-parallel jobs), on one node or several.
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
    /// Inspect model configs.
    Model {
        #[command(subcommand)]
        command: train_cmd::ModelCommand,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data { command } => data_cmd::run(command),
        Command::Train(args) => train_cmd::train(args),
        Command::Launch(args) => launcher::launch(args),
        Command::Dist { command } => train_cmd::dist(command),
        Command::Model { command } => train_cmd::model(command),
        Command::Checkpoint { command } => train_cmd::checkpoint(command),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        let mut src = e.source();
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}
