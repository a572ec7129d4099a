//! `sigma generate`: sample from a checkpoint (any layout) or an export,
//! through the DiffQKV KV cache (trainer/src/generate.rs).

use std::io::Write;

use anyhow::{bail, Context, Result};
use sigma_trainer::infer::decoder::StepMode;
use sigma_trainer::infer::eval::{load_with, Loaded};
use sigma_trainer::infer::generate::{
    check_prompts, generate_timed, KeyCache, Request, Sampling, Timing,
};
use sigma_trainer::infer::prebuild::Prebuild;

use crate::device::DeviceArg;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A checkpoint directory (step-NNNNNNN) or the output of `sigma checkpoint export`.
    #[arg(long)]
    pub checkpoint: std::path::PathBuf,
    /// One prompt; its completion streams to stdout.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A file of prompts, one per line (plain text, or JSON with a "prompt"
    /// field); one JSON line per prompt on stdout.
    #[arg(long)]
    pub prompts: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0: greedy (deterministic).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampling seed: the same seed, prompts and checkpoint give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts decoded together (--prompts).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Prompt + new tokens limit (default: the training sequence length).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Where to run (auto: a GPU when one is usable).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Models with `k_compression = "projected"`: cache the keys expanded
    /// (up-projected and rotated once; each step reads the cache once) or
    /// compressed (the smallest cache; expanded again at every step).
    #[arg(long, value_enum, default_value_t = KeyCacheArg::Expanded)]
    pub key_cache: KeyCacheArg,
    /// On a GPU, record each decoding step as a CUDA graph (one per 256
    /// positions) and replay it per token; off: launch every kernel from
    /// the host; static: the recorded step's arithmetic without recording
    /// (for checks: it gives the graphs' tokens to the bit). Prefill is
    /// never recorded.
    #[arg(long, value_enum, default_value_t = GraphArg::On)]
    pub cuda_graph: GraphArg,
    /// Generate exactly --max-new-tokens tokens, not stopping at the
    /// end-of-text token (for timing).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print the prefill and decoding times of each batch on stderr (one
    /// JSON line per batch).
    #[arg(long)]
    pub timing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphArg {
    On,
    Off,
    Static,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KeyCacheArg {
    Expanded,
    Compressed,
}

/// The training sequence length: from the run config, or an export's config.json.
fn trained_context(
    path: &std::path::Path,
    run: Option<&sigma_trainer::RunConfig>,
) -> Result<usize> {
    if let Some(r) = run {
        return Ok(r.data.seq_len);
    }
    let p = path.join("config.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("{}", p.display()))?)
            .with_context(|| format!("{}: not JSON", p.display()))?;
    v["max_position_embeddings"]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no max_position_embeddings; give --max-context",
                p.display()
            )
        })
}

fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
            match v["prompt"].as_str() {
                Some(p) => out.push(p.to_string()),
                None => bail!(
                    "{}:{}: a JSON line needs a string field \"prompt\"",
                    path.display(),
                    n + 1
                ),
            }
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Sampling settings and sizes that are out of range.
fn check_args(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature {}: must be 0 (greedy) or positive",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {}: must be in (0, 1]", a.top_p);
    }
    if a.batch == 0 || a.max_new_tokens == 0 {
        bail!("--batch and --max-new-tokens must be positive");
    }
    let most = sigma_data::config::MAX_SEQ_LEN;
    if let Some(n) = a.max_context.filter(|n| !(1..=most).contains(n)) {
        bail!("--max-context {n}: must be 1 to {most} tokens");
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    check_args(&a)?;
    let device = a.device.resolve()?;
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => read_prompts(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE"),
    };
    // sigma's kernels compile (or load from the kernel cache) while the
    // weights load, and are all built before the first batch runs.
    let batch = if a.prompt.is_some() {
        1
    } else {
        a.batch.min(prompts.len())
    };
    // The batches' sizes: `batch`, and a smaller last one.
    let sizes: Vec<i64> = [batch, prompts.len().checked_rem(batch).unwrap_or(0)]
        .into_iter()
        .filter(|&b| b > 0)
        .map(|b| b as i64)
        .collect();
    let mut prebuild = None;
    let loaded = load_with(&a.checkpoint, device, &mut |cfg| {
        prebuild = Some(Prebuild::start(cfg, device, &sizes));
    })?;
    if let Some(n) = loaded.run.as_ref().and_then(|r| r.train.cpu_threads) {
        tch::set_num_threads(n as i32);
    }
    let max_context = match a.max_context {
        Some(n) => n,
        None => trained_context(&a.checkpoint, loaded.run.as_ref())?,
    };
    let tok = &loaded.tokenizer;
    let request = Request {
        max_new_tokens: a.max_new_tokens,
        sampling: Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
        },
        seed: a.seed,
        eos: (!a.ignore_eos).then_some(tok.eos_id),
        max_context,
        key_cache: match a.key_cache {
            KeyCacheArg::Expanded => KeyCache::Expanded,
            KeyCacheArg::Compressed => KeyCache::Compressed,
        },
        steps: match a.cuda_graph {
            GraphArg::On => StepMode::Graph,
            GraphArg::Off => StepMode::Eager,
            GraphArg::Static => StepMode::Static,
        },
    };
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_, _>>()?;
    // Every prompt before the first batch runs: a bad one anywhere in the
    // file fails the command with nothing written.
    check_prompts(&encoded, &request)?;
    if let Some(p) = prebuild {
        p.wait();
    }
    if a.prompt.is_some() {
        stream(&loaded, &prompts[0], &encoded, &request, a.timing)
    } else {
        json_lines(&loaded, &prompts, &encoded, &request, a.batch, a.timing)
    }
}

/// One prompt: print the prompt, then the decoded text as it grows (a token
/// may complete a character only later).
fn stream(
    loaded: &Loaded,
    prompt: &str,
    encoded: &[Vec<u32>],
    request: &Request,
    timing: bool,
) -> Result<()> {
    let tok = &loaded.tokenizer;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut ids: Vec<u32> = Vec::new();
    let mut shown = 0;
    let mut failed: Option<std::io::Error> = None;
    let mut started = false;
    let mut start = |out: &mut std::io::StdoutLock| -> std::io::Result<()> {
        if !started {
            started = true;
            write!(out, "{prompt}")?;
        }
        Ok(())
    };
    let (_, times) = generate_timed(&loaded.fwd(), encoded, request, 0, &mut |_, t| {
        if let Err(e) = start(&mut out) {
            failed.get_or_insert(e);
        }
        if Some(t) == request.eos {
            return;
        }
        ids.push(t);
        if let Ok(text) = tok.decode(&ids, true) {
            if text.len() > shown && text.is_char_boundary(shown) {
                if let Err(e) = write!(out, "{}", &text[shown..]).and_then(|_| out.flush()) {
                    failed.get_or_insert(e);
                }
                shown = text.len();
            }
        }
    })?;
    start(&mut out)?;
    writeln!(out)?;
    if timing {
        report(encoded, &times);
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(())
}

/// A file of prompts: `batch` at a time, one JSON line per prompt.
fn json_lines(
    loaded: &Loaded,
    prompts: &[String],
    encoded: &[Vec<u32>],
    request: &Request,
    batch: usize,
    timing: bool,
) -> Result<()> {
    let tok = &loaded.tokenizer;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (c, chunk) in encoded.chunks(batch).enumerate() {
        let first = c * batch;
        let (new, times) =
            generate_timed(&loaded.fwd(), chunk, request, first as u64, &mut |_, _| {})?;
        if timing {
            report(chunk, &times);
        }
        for (j, ids) in new.iter().enumerate() {
            let stopped = request.eos.is_some() && ids.last() == request.eos.as_ref();
            let text_ids = if stopped {
                &ids[..ids.len() - 1]
            } else {
                &ids[..]
            };
            let row = serde_json::json!({
                "index": first + j,
                "prompt": prompts[first + j],
                "completion": tok.decode(text_ids, true)?,
                "prompt_tokens": chunk[j].len(),
                "new_tokens": ids.len(),
                "stop": if stopped { "eos" } else { "length" },
            });
            writeln!(out, "{row}")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// One JSON line on stderr: a batch's prefill and decoding times.
fn report(batch: &[Vec<u32>], t: &Timing) {
    let per = if t.steps > 0 {
        t.decode_s / t.steps as f64
    } else {
        0.0
    };
    // Steps that replayed or ran eagerly, without the ones that recorded.
    let steady = if t.steps > t.graphs {
        (t.decode_s - t.recording_s) / (t.steps - t.graphs) as f64
    } else {
        0.0
    };
    let row = serde_json::json!({
        "batch": batch.len(),
        "prompt_tokens": batch.iter().map(|p| p.len()).max().unwrap_or(0),
        "prefill_ms": t.prefill_s * 1e3,
        "decode_steps": t.steps,
        "decode_ms_per_step": per * 1e3,
        "tokens_per_s": if per > 0.0 { batch.len() as f64 / per } else { 0.0 },
        "steady_ms_per_step": steady * 1e3,
        "steps": format!("{:?}", t.mode).to_lowercase(),
        "cuda_graphs": t.graphs,
        "recording_ms": t.recording_s * 1e3,
        "matvec_launches": sigma_trainer::kernels::gemv::launches(),
        "folded_appends": sigma_trainer::kernels::decode::folded_appends(),
    });
    eprintln!("{row}");
}
