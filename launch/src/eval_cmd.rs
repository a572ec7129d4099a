//! `sigma eval`: loss, perplexity and bits per byte per domain of a
//! checkpoint (any parallel layout) or an exported model.

use anyhow::{bail, Result};
use sigma_trainer::config::{parse_doc, read_config, typed};
use sigma_trainer::infer::eval::{evaluate, load, DomainScore, Files, Loaded, Validation};
use sigma_trainer::RunConfig;

use crate::device::DeviceArg;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A checkpoint directory (step-NNNNNNN) or the output of `sigma checkpoint export`.
    #[arg(long)]
    pub checkpoint: std::path::PathBuf,
    /// Run config whose [data] (validation split) and [train] (batch, windows) are used;
    /// default: the checkpoint's own.
    #[arg(long)]
    pub config: Option<String>,
    /// Take only the [data] section from this config (other sources or mixture).
    #[arg(long, conflicts_with = "input")]
    pub data: Option<String>,
    /// Score raw text / JSONL / Parquet files instead (tokenized with the checkpoint's tokenizer).
    #[arg(long, num_args = 1..)]
    pub input: Vec<String>,
    /// JSONL/Parquet field holding the text (with --input) [default: text].
    #[arg(long, requires = "input")]
    pub text_field: Option<String>,
    /// Tokens to score per domain (default: what training validates on,
    /// train.eval_steps x train.micro_batch_size windows).
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Windows per forward pass (default: train.micro_batch_size).
    #[arg(long)]
    pub batch: Option<u64>,
    /// Where to run (auto: a GPU when one is usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    check_counts(&a)?;
    let device = a.device.resolve()?;
    let loaded = load(&a.checkpoint, device)?;
    let run = run_config(&a, &loaded)?;
    let scores = score(&a, &loaded, run.as_ref(), device)?;
    if a.json {
        print_json(&scores)
    } else {
        print_table(&scores);
        Ok(())
    }
}

/// The counts and options a user gives must mean what they say: none is
/// replaced or ignored.
fn check_counts(a: &EvalArgs) -> Result<()> {
    // clap lets --text-field through with --data (which conflicts with
    // --input, so --input's requirement counts as met).
    if a.text_field.is_some() && a.input.is_empty() {
        bail!("--text-field applies to --input only");
    }
    if a.max_tokens == Some(0) {
        bail!("--max-tokens 0: nothing would be scored; give at least 1 (or leave it out for train.eval_steps x train.micro_batch_size windows)");
    }
    match a.batch {
        Some(0) => bail!("--batch 0: give at least 1 window per forward pass"),
        Some(b) if b > MAX_EVAL_BATCH => {
            bail!("--batch {b}: at most {MAX_EVAL_BATCH} windows per forward pass")
        }
        _ => Ok(()),
    }
}

/// The most windows `sigma eval` scores in one forward pass.
const MAX_EVAL_BATCH: u64 = 65_536;

/// The run's config: given (--config), or the checkpoint's (none for an
/// export); its model must be the checkpoint's, and its CPU thread count applies.
fn run_config(a: &EvalArgs, loaded: &Loaded) -> Result<Option<RunConfig>> {
    let run: Option<RunConfig> = match &a.config {
        Some(c) => Some(RunConfig::load(c, &[])?),
        None => loaded.run.clone(),
    };
    if let Some(r) = &run {
        if r.model != loaded.model.cfg {
            bail!(
                "the [model] of {} differs from the checkpoint's model",
                a.config.as_deref().unwrap_or("the config")
            );
        }
        if let Some(n) = r.train.cpu_threads {
            tch::set_num_threads(n as i32);
        }
    }
    Ok(run)
}

/// Score every domain: of the --input files, or of the validation split.
fn score(
    a: &EvalArgs,
    loaded: &Loaded,
    run: Option<&RunConfig>,
    device: tch::Device,
) -> Result<Vec<DomainScore>> {
    let (seq_len, rows, windows_default) = match run {
        Some(r) => (
            r.data.seq_len,
            r.train.micro_batch_size as u64,
            r.train.eval_steps * r.train.micro_batch_size as u64,
        ),
        None => (0, 4, 16),
    };
    let rows = a.batch.unwrap_or(rows);
    let mut loss = |t: &tch::Tensor| -> sigma_trainer::Result<f64> {
        Ok(loaded.loss_sum(t)?.double_value(&[]))
    };
    let per_domain = |seq: usize| match a.max_tokens {
        Some(t) => t.div_ceil(seq as u64).max(1),
        None => windows_default,
    };
    let tokenizer = Some(&loaded.tokenizer);
    if !a.input.is_empty() {
        let seq = match (run, &a.data) {
            (Some(r), None) => r.data.seq_len,
            _ => bail!("--input needs the sequence length: give --config (or evaluate a checkpoint, which has it)"),
        };
        let files = Files::read(
            &a.input,
            &loaded.tokenizer,
            seq,
            a.text_field.as_deref().unwrap_or("text"),
        )?;
        let windows = per_domain(seq);
        return Ok(evaluate(
            &files, rows, windows, device, &mut loss, tokenizer,
        )?);
    }
    let data = validation_data(a, run)?;
    let seq = if seq_len > 0 { seq_len } else { data.seq_len };
    let dataset = sigma_data::Dataset::open_blocking(&data)?;
    let windows = per_domain(seq);
    Ok(evaluate(
        &Validation(&dataset),
        rows,
        windows,
        device,
        &mut loss,
        tokenizer,
    )?)
}

/// The [data] whose validation split is scored: --data's, else the run's.
fn validation_data(a: &EvalArgs, run: Option<&RunConfig>) -> Result<sigma_data::DataConfig> {
    Ok(match (&a.data, run) {
        (Some(path), _) => {
            let doc = parse_doc(path, &read_config(path)?, &[])?;
            let section = doc
                .get("data")
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("config `{path}`: no [data] section"))?;
            typed::<sigma_data::DataConfig>(section, "data", path, &[])?
        }
        (None, Some(r)) => r.data.clone(),
        (None, None) => bail!(
            "{} is an export (no run config): give --config or --data for the validation data, or --input files",
            a.checkpoint.display()
        ),
    })
}

fn print_json(scores: &[DomainScore]) -> Result<()> {
    let rows: Vec<serde_json::Value> = scores
        .iter()
        .map(|s| {
            serde_json::json!({
                "domain": s.domain, "windows": s.windows, "tokens": s.tokens,
                "loss": s.loss(), "perplexity": s.perplexity(),
                "bits_per_byte": s.bits_per_byte(), "bytes": s.bytes,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(())
}

fn print_table(scores: &[DomainScore]) {
    println!(
        "{:<40} {:>8} {:>10} {:>10} {:>11} {:>10}",
        "domain", "windows", "tokens", "loss", "perplexity", "bits/byte"
    );
    for s in scores {
        println!(
            "{:<40} {:>8} {:>10} {:>10.4} {:>11.3} {:>10}",
            s.domain,
            s.windows,
            s.tokens,
            s.loss(),
            s.perplexity(),
            s.bits_per_byte()
                .map(|b| format!("{b:.4}"))
                .unwrap_or_else(|| "-".into())
        );
    }
}
