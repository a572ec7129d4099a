//! `sigma data ...` subcommands.

use std::time::Instant;

use anyhow::{bail, Context, Result};
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
        /// Tokens per Parquet row group (the unit of random access).
        #[arg(long, default_value_t = 1 << 18)]
        row_group_tokens: u64,
        /// Tokens per shard file.
        #[arg(long, default_value_t = 1 << 27)]
        shard_tokens: u64,
        /// Tokenizer threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Replace prepared data already in the output.
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
        #[arg(long, default_value_t = 2000)]
        num_docs: u64,
        /// Output file (.jsonl, .jsonl.zst or .jsonl.gz).
        #[arg(long)]
        output: std::path::PathBuf,
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
        /// Samples simulated per stage.
        #[arg(long, default_value_t = 100_000)]
        samples: u64,
        /// Decoded samples to print.
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
    /// Measure loader throughput (tokens/s) for a config.
    Bench {
        #[arg(long)]
        config: String,
        #[arg(long, default_value_t = 64)]
        global_batch: usize,
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
        #[arg(long)]
        vocab_size: u32,
        #[arg(long)]
        output: String,
        #[arg(long, default_value = "text")]
        text_field: String,
    },
}

fn load_config(path: &str) -> Result<DataConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read config {path}"))?;
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
                },
        } => {
            let t0 = Instant::now();
            let tok =
                sigma_data::tokenizer::train_from_inputs(&input, &text_field, vocab_size, &output)?;
            println!(
                "wrote {output}: vocab {}, eos {}, sha256 {} ({:.1}s)",
                tok.vocab_size,
                tok.eos_id,
                &tok.sha256[..16],
                t0.elapsed().as_secs_f64()
            );
        }
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
            let r = prepare(&o)?;
            let s = r.seconds.max(1e-9);
            println!(
                "prepared {output} ({domain}): {} documents, {} tokens in {} shards; {:.2} MB/s of text, {:.0} tokens/s, {} threads, {:.1}s",
                r.documents(),
                r.tokens(),
                r.manifest.shards.len(),
                r.text_bytes as f64 / s / 1e6,
                r.tokens() as f64 / s,
                o.threads,
                s
            );
        }
        DataCommand::Synth {
            seed,
            num_docs,
            output,
        } => {
            let bytes = sigma_data::synth::write(&output, seed, num_docs)?;
            println!(
                "wrote {} ({num_docs} documents, seed {seed}, {bytes} bytes)",
                output.display()
            );
        }
        DataCommand::Inspect { url, verify } => {
            let r = sigma_data::inspect::inspect(&url, verify)?;
            print!("{r}");
            if !r.healthy() {
                bail!("{url} is not healthy (see above)");
            }
        }
        DataCommand::Preview {
            config,
            samples,
            show,
        } => {
            let cfg = load_config(&config)?;
            print!("{}", sigma_data::inspect::preview(&cfg, samples, show)?);
        }
        DataCommand::Bench {
            config,
            global_batch,
            batches,
        } => {
            let cfg = load_config(&config)?;
            let ds = Dataset::open_blocking(&cfg)?;
            let opts = LoaderOptions {
                global_batch,
                dp_rank: 0,
                dp_size: 1,
                start: DataState::default(),
            };
            let mut loader = Loader::new(ds.clone(), opts)?;
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
        }
    }
    Ok(())
}
