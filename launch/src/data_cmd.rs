//! `sigma data ...` subcommands.

use std::time::Instant;

use std::path::Path;

use anyhow::{bail, Result};
use clap::Subcommand;
use sigma_data::loader::LoaderOptions;
use sigma_data::prepare::{prepare, PrepareOptions};
use sigma_data::{DataConfig, DataState, Dataset, Loader};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Train or inspect tokenizers.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Tokenize raw text (text files, JSONL, Parquet; paths, globs or URLs) into shards plus a manifest.
    Prepare {
        /// Input files, directories, globs or URLs (repeatable).
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<String>,
        /// Domain name recorded in the shards (e.g. general, system, synthetic).
        #[arg(long)]
        domain: String,
        /// tokenizer.json (path or URL).
        #[arg(long)]
        tokenizer: String,
        /// Output directory or URL.
        #[arg(long)]
        output: String,
        /// JSON field / Parquet column holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Fraction of documents (chosen by hash) held out for validation.
        #[arg(long, default_value_t = 0.01)]
        valid_fraction: f64,
        /// Tokens per Parquet row group (the unit of random access; 1 to 2^24).
        #[arg(long, default_value_t = 1 << 18)]
        row_group_tokens: u64,
        /// Tokens per shard file (1 to 2^34).
        #[arg(long, default_value_t = 1 << 27)]
        shard_tokens: u64,
        /// Tokenizer threads (default: all cores; at most 1024).
        #[arg(long)]
        threads: Option<usize>,
        /// Write into an output that is not empty: replaces the prepared data
        /// there, and any file named like one prepare writes. Without it the
        /// output must be new or empty.
        #[arg(long)]
        overwrite: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Generate the synthetic domain (system-domain exercises) deterministically from a seed, as JSONL.
    Synth {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Documents to write (1 to 100,000,000; about 1 KB of text each).
        #[arg(long, default_value_t = 2000)]
        num_docs: u64,
        /// Output file: .jsonl, .ndjson or .json, optionally .gz or .zst (any
        /// other name is refused: `data prepare` reads files by extension).
        #[arg(long)]
        output: std::path::PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Summarise a prepared directory and check its shards.
    Inspect {
        /// Prepared directory or URL.
        url: String,
        /// Also read every shard and verify its sha256.
        #[arg(long)]
        verify: bool,
    },
    /// Show configured vs realized mixture ratios per stage and a few decoded samples.
    Preview {
        #[arg(long)]
        config: String,
        /// Samples simulated per stage (1 to 100,000,000).
        #[arg(long, default_value_t = 100_000)]
        samples: u64,
        /// Decoded samples to print (the first ones of the run; at most 1000).
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
    /// Measure loader throughput (tokens/s) for a config.
    Bench {
        #[arg(long)]
        config: String,
        /// Samples per batch (positive; a batch must fit the loader's bound in memory).
        #[arg(long, default_value_t = 64)]
        global_batch: usize,
        /// Batches timed (1 to 1,000,000).
        #[arg(long, default_value_t = 200)]
        batches: u64,
    },
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE with EOS/BOS/PAD special tokens.
    Train {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<String>,
        /// Vocabulary size, 259 (256 bytes + 3 special tokens) to 1048576 (2^20).
        #[arg(long)]
        vocab_size: u32,
        /// Output tokenizer.json (path or URL).
        #[arg(long)]
        output: String,
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Most batches `data bench` times.
const MAX_BENCH_BATCHES: u64 = 1_000_000;

fn load_config(path: &str) -> Result<DataConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "--config {path}: cannot read it: {}",
            sigma_data::error::io_text(&e)
        )
    })?;
    Ok(DataConfig::from_toml(path, &text)?)
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Tokenizer {
            command:
                TokenizerCommand::Train {
                    input,
                    vocab_size,
                    output,
                    text_field,
                    overwrite,
                },
        } => tokenizer_train(&input, vocab_size, &output, &text_field, overwrite),
        DataCommand::Prepare {
            input,
            domain,
            tokenizer,
            output,
            text_field,
            valid_fraction,
            row_group_tokens,
            shard_tokens,
            threads,
            overwrite,
            quiet,
        } => {
            let mut o = PrepareOptions::new(input, &domain, &tokenizer, &output);
            o.text_field = text_field;
            o.valid_fraction = valid_fraction;
            o.row_group_tokens = row_group_tokens;
            o.shard_tokens = shard_tokens;
            if let Some(t) = threads {
                o.threads = t;
            }
            o.overwrite = overwrite;
            o.progress = !quiet;
            prepare_data(&o)
        }
        DataCommand::Synth {
            seed,
            num_docs,
            output,
            overwrite,
        } => synth(seed, num_docs, &output, overwrite),
        DataCommand::Inspect { url, verify } => {
            let r = sigma_data::inspect::inspect(&url, verify)?;
            print!("{r}");
            if !r.healthy() {
                bail!("{url} is not healthy (see above)");
            }
            Ok(())
        }
        DataCommand::Preview {
            config,
            samples,
            show,
        } => {
            let cfg = load_config(&config)?;
            print!("{}", sigma_data::inspect::preview(&cfg, samples, show)?);
            Ok(())
        }
        DataCommand::Bench {
            config,
            global_batch,
            batches,
        } => bench(&config, global_batch, batches),
    }
}

fn tokenizer_train(
    input: &[String],
    vocab_size: u32,
    output: &str,
    text_field: &str,
    overwrite: bool,
) -> Result<()> {
    let t0 = Instant::now();
    let tok =
        sigma_data::tokenizer::train_from_inputs(input, text_field, vocab_size, output, overwrite)?;
    println!(
        "wrote {output}: vocab {}, eos {}, sha256 {} ({:.1}s)",
        tok.vocab_size,
        tok.eos_id,
        &tok.sha256[..16],
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn prepare_data(o: &PrepareOptions) -> Result<()> {
    let r = prepare(o)?;
    let s = r.seconds.max(1e-9);
    println!(
        "prepared {} ({}): {} documents, {} tokens in {} shards; {:.2} MB/s of text, {:.0} tokens/s, {} threads, {:.1}s",
        o.output,
        o.domain,
        r.documents(),
        r.tokens(),
        r.manifest.shards.len(),
        r.text_bytes as f64 / s / 1e6,
        r.tokens() as f64 / s,
        o.threads,
        s
    );
    Ok(())
}

fn synth(seed: u64, num_docs: u64, output: &Path, overwrite: bool) -> Result<()> {
    sigma_data::synth::check_options(output, num_docs)?;
    sigma_data::fsutil::check_new_output(output, overwrite)?;
    let bytes = sigma_data::synth::write(output, seed, num_docs)?;
    println!(
        "wrote {} ({num_docs} documents, seed {seed}, {bytes} bytes)",
        output.display()
    );
    Ok(())
}

fn bench(config: &str, global_batch: usize, batches: u64) -> Result<()> {
    if global_batch == 0 {
        bail!("--global-batch: must be positive, got 0");
    }
    if batches == 0 || batches > MAX_BENCH_BATCHES {
        bail!("--batches: must be from 1 to {MAX_BENCH_BATCHES}, got {batches}");
    }
    let cfg = load_config(config)?;
    let ds = Dataset::open_blocking(&cfg)?;
    let opts = LoaderOptions {
        global_batch,
        dp_rank: 0,
        dp_size: 1,
        start: DataState::default(),
    };
    let mut loader = Loader::new(ds.clone(), opts)
        .map_err(|e| anyhow::anyhow!("--global-batch {global_batch}: {e}"))?;
    loader.next_batch()?; // warm-up: first windows decoded
    let t0 = Instant::now();
    let mut tokens = 0u64;
    for _ in 0..batches {
        let b = loader.next_batch()?;
        tokens += (b.rows * b.seq_len) as u64;
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "loader: {batches} batches of {global_batch} x {} tokens in {s:.3}s = {:.1}M tokens/s",
        cfg.seq_len,
        tokens as f64 / s / 1e6
    );
    Ok(())
}
