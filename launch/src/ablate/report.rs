//! The ablation report (`report.md`, `report.json`, `loss-curves.png`,
//! `val-vs-kv.png`), built only from the files the runs left: each variant's
//! `config.toml` (what it trained), `metrics.jsonl` (loss curve, speed) and
//! `eval.json` (`sigma eval` on its final checkpoint). Regenerated at any
//! time with `sigma ablate report DIR`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use sigma_trainer::model::summary::{h, summarize};
use sigma_trainer::RunConfig;

use super::plan::{read_plan, run_dir, PlanFile};

#[derive(Clone, Debug, Serialize)]
pub struct DomainResult {
    pub loss: f64,
    pub bits_per_byte: Option<f64>,
    pub tokens: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Delta {
    pub train_loss: Option<f64>,
    pub val_mean_loss: Option<f64>,
    pub val_mean_bits_per_byte: Option<f64>,
    pub val: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VariantReport {
    pub name: String,
    pub description: Option<String>,
    pub set: Vec<String>,
    /// Trained and evaluated (eval.json present).
    pub finished: bool,
    pub params: Option<i64>,
    pub flops_per_token: Option<f64>,
    pub kv_cache_bytes_per_token: Option<i64>,
    pub seq_len: Option<usize>,
    /// KV cache of one full-length sequence (bf16, all layers).
    pub kv_cache_bytes_per_sequence: Option<i64>,
    pub steps: Option<u64>,
    /// Median tokens/s of the logged steps (the first left out: warm-up).
    pub tokens_per_s: Option<f64>,
    pub final_step: Option<u64>,
    pub final_train_loss: Option<f64>,
    pub val: BTreeMap<String, DomainResult>,
    pub val_mean_loss: Option<f64>,
    pub val_mean_bits_per_byte: Option<f64>,
    /// This variant minus the base variant.
    pub delta: Option<Delta>,
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub name: String,
    pub description: Option<String>,
    pub base_config: String,
    pub grid: String,
    pub sets: Vec<String>,
    pub base_variant: String,
    pub sigma_version: String,
    pub variants: Vec<VariantReport>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    })
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Loss curve, final loss and speed from a metrics.jsonl (rank 0's step
/// records; a resumed run has truncated it to the resumed step).
fn read_metrics(path: &Path, v: &mut VariantReport) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let mut speeds = Vec::new();
    // A running variant may be writing its last line: only whole lines count.
    let whole = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
    for (n, line) in whole.enumerate() {
        let r: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        let (Some(step), Some(loss)) = (r["step"].as_u64(), r["loss"].as_f64()) else {
            continue;
        };
        if let Some(t) = r["tokens_per_s"].as_f64() {
            speeds.push(t);
        }
        v.curve.push((step as f64, loss));
        v.final_step = Some(step);
        v.final_train_loss = Some(loss);
    }
    // The first logged step includes warm-up (allocation, kernel selection).
    if speeds.len() > 1 {
        speeds.remove(0);
    }
    v.tokens_per_s = median(speeds);
    Ok(())
}

fn variant(out: &Path, plan: &PlanFile, i: usize) -> Result<VariantReport> {
    let pv = &plan.variants[i];
    let dir = run_dir(out, &pv.name);
    let mut v = VariantReport {
        name: pv.name.clone(),
        description: pv.description.clone(),
        set: pv.set.clone(),
        finished: false,
        params: None,
        flops_per_token: None,
        kv_cache_bytes_per_token: None,
        seq_len: None,
        kv_cache_bytes_per_sequence: None,
        steps: None,
        tokens_per_s: None,
        final_step: None,
        final_train_loss: None,
        val: BTreeMap::new(),
        val_mean_loss: None,
        val_mean_bits_per_byte: None,
        delta: None,
        curve: Vec::new(),
    };
    let cfg_path = dir.join("config.toml");
    if !cfg_path.is_file() {
        return Ok(v);
    }
    let cfg = RunConfig::load(&cfg_path.to_string_lossy(), &[])?;
    let s = summarize(&cfg.model, cfg.data.seq_len);
    v.params = Some(s.params);
    v.flops_per_token = Some(s.flops_per_token);
    v.kv_cache_bytes_per_token = Some(s.kv_cache_bytes_per_token);
    v.seq_len = Some(cfg.data.seq_len);
    v.kv_cache_bytes_per_sequence = Some(s.kv_cache_bytes_per_token * cfg.data.seq_len as i64);
    v.steps = Some(cfg.train.steps);
    read_metrics(&dir.join("metrics.jsonl"), &mut v)?;
    let eval = dir.join("eval.json");
    if let Ok(text) = std::fs::read(&eval) {
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&text).with_context(|| format!("{}", eval.display()))?;
        for r in rows {
            let (Some(d), Some(loss)) = (r["domain"].as_str(), r["loss"].as_f64()) else {
                continue;
            };
            v.val.insert(
                d.to_string(),
                DomainResult {
                    loss,
                    bits_per_byte: r["bits_per_byte"].as_f64(),
                    tokens: r["tokens"].as_u64().unwrap_or(0),
                },
            );
        }
        v.finished = dir.join("done.json").is_file();
        v.val_mean_loss = mean(v.val.values().map(|d| d.loss));
        v.val_mean_bits_per_byte = if v.val.values().all(|d| d.bits_per_byte.is_some()) {
            mean(v.val.values().filter_map(|d| d.bits_per_byte))
        } else {
            None
        };
    }
    Ok(v)
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

pub fn build(out: &Path) -> Result<Report> {
    let plan = read_plan(out)?;
    let mut variants: Vec<VariantReport> = (0..plan.variants.len())
        .map(|i| variant(out, &plan, i))
        .collect::<Result<_>>()?;
    if let Some(b) = variants
        .iter()
        .find(|v| v.name == plan.base_variant)
        .cloned()
    {
        for v in &mut variants {
            if v.final_train_loss.is_none() && v.val.is_empty() {
                continue;
            }
            v.delta = Some(Delta {
                train_loss: diff(v.final_train_loss, b.final_train_loss),
                val_mean_loss: diff(v.val_mean_loss, b.val_mean_loss),
                val_mean_bits_per_byte: diff(v.val_mean_bits_per_byte, b.val_mean_bits_per_byte),
                val: v
                    .val
                    .iter()
                    .filter_map(|(d, r)| Some((d.clone(), r.loss - b.val.get(d)?.loss)))
                    .collect(),
            });
        }
    }
    Ok(Report {
        name: plan.name.clone(),
        description: plan.description.clone(),
        base_config: plan.base_config.clone(),
        grid: plan.grid.clone(),
        sets: plan.sets.clone(),
        base_variant: plan.base_variant.clone(),
        sigma_version: env!("CARGO_PKG_VERSION").into(),
        variants,
    })
}

fn f(x: Option<f64>, digits: usize) -> String {
    x.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn signed(x: Option<f64>) -> String {
    x.map(|x| format!("{x:+.4}")).unwrap_or_else(|| "-".into())
}

fn markdown(r: &Report) -> String {
    let mut m = String::new();
    intro(&mut m, r);
    results_table(&mut m, r);
    domains_table(&mut m, r);
    let _ = writeln!(m, "\n## Plots\n\n![training loss of every variant](loss-curves.png)\n\n![mean validation loss against KV-cache bytes per token](val-vs-kv.png)\n");
    let _ = writeln!(
        m,
        "## Columns\n\n\
         - params: every trainable parameter (AugQ and the K up-projection included; a tied output head once).\n\
         - FLOPs/token: training FLOPs per token at the config's sequence length (6 x matmul parameters + causal attention; `sigma model summary`).\n\
         - KV bytes/token: the decode-time cache, bf16, all layers: layers x (n_k x cached K dim + n_v x d_v) x 2. KV/sequence: the same at data.seq_len tokens.\n\
         - tokens/s: median over the logged training steps, the first (warm-up) left out.\n\
         - final train loss: the loss of the last logged step (one step's batch: noisy; compare validation).\n\
         - val loss, bits/byte: `sigma eval` on the final checkpoint, the validation windows training validates on; the mean is over domains, unweighted.\n"
    );
    m
}

/// The title, the description, what was compared and how the report was made.
fn intro(m: &mut String, r: &Report) {
    let _ = writeln!(m, "# Ablation: {}\n", r.name);
    if let Some(d) = &r.description {
        let _ = writeln!(m, "{d}\n");
    }
    let b = r.variants.iter().find(|v| v.name == r.base_variant);
    let _ = writeln!(
        m,
        "Base config `{}`, ablation file `{}`{}. Differences are against the base variant `{}`. Every variant trains {} steps on the same data stream from its own initialisation.\n",
        r.base_config,
        r.grid,
        if r.sets.is_empty() { String::new() } else { format!(", for every variant `{}`", r.sets.join("`, `")) },
        r.base_variant,
        b.and_then(|b| b.steps).map(|s| s.to_string()).unwrap_or_else(|| "the same".into())
    );
    let _ = writeln!(m, "Generated by sigma {} from the runs' files (`runs/<variant>/config.toml`, `metrics.jsonl`, `eval.json`); regenerate with `sigma ablate report <dir>`.\n", r.sigma_version);
}

/// One row per variant: size, cost, speed, losses and their differences.
fn results_table(m: &mut String, r: &Report) {
    let _ = writeln!(m, "## Results\n");
    let _ = writeln!(m, "| variant | overrides | params | FLOPs/token | KV bytes/token | KV/sequence | tokens/s | final train loss | Δ train | val loss (mean) | Δ val | bits/byte (mean) | Δ bits/byte |");
    let _ = writeln!(m, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for v in &r.variants {
        let d = v.delta.as_ref();
        let _ = writeln!(
            m,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            if v.finished { "" } else { " (not finished)" },
            if v.set.is_empty() {
                "-".into()
            } else {
                format!("`{}`", v.set.join("`, `"))
            },
            v.params.map(|p| h(p as f64)).unwrap_or_else(|| "-".into()),
            v.flops_per_token
                .map(|x| format!("{}FLOP", h(x)))
                .unwrap_or_else(|| "-".into()),
            v.kv_cache_bytes_per_token
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into()),
            v.kv_cache_bytes_per_sequence
                .map(|x| format!("{:.2} MiB", x as f64 / (1u64 << 20) as f64))
                .unwrap_or_else(|| "-".into()),
            f(v.tokens_per_s, 0),
            f(v.final_train_loss, 4),
            signed(d.and_then(|d| d.train_loss)),
            f(v.val_mean_loss, 4),
            signed(d.and_then(|d| d.val_mean_loss)),
            f(v.val_mean_bits_per_byte, 4),
            signed(d.and_then(|d| d.val_mean_bits_per_byte)),
        );
    }
}

/// Validation loss per domain and variant (nothing when no variant was evaluated).
fn domains_table(m: &mut String, r: &Report) {
    let domains: Vec<String> = {
        let mut d: Vec<String> = r
            .variants
            .iter()
            .flat_map(|v| v.val.keys().cloned())
            .collect();
        d.sort();
        d.dedup();
        d
    };
    if domains.is_empty() {
        return;
    }
    let _ = writeln!(m, "\n## Validation per domain\n\nLoss in nats per token (bits per byte in brackets), difference to `{}` after the slash.\n", r.base_variant);
    let _ = writeln!(m, "| variant | {} |", domains.join(" | "));
    let _ = writeln!(m, "|---|{}", "--:|".repeat(domains.len()));
    for v in &r.variants {
        let cells: Vec<String> = domains
            .iter()
            .map(|d| match v.val.get(d) {
                None => "-".into(),
                Some(x) => format!(
                    "{:.4} ({}) / {}",
                    x.loss,
                    f(x.bits_per_byte, 4),
                    signed(v.delta.as_ref().and_then(|dl| dl.val.get(d).copied()))
                ),
            })
            .collect();
        let _ = writeln!(m, "| {} | {} |", v.name, cells.join(" | "));
    }
}

/// Build the report from `out`'s runs and write report.md, report.json and the plots.
pub fn write(out: &Path) -> Result<Report> {
    let r = build(out)?;
    sigma_data::fsutil::write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&r)?.as_bytes(),
    )?;
    sigma_data::fsutil::write_atomic(&out.join("report.md"), markdown(&r).as_bytes())?;
    let curves: Vec<(String, Vec<(f64, f64)>)> = r
        .variants
        .iter()
        .filter(|v| !v.curve.is_empty())
        .map(|v| (v.name.clone(), v.curve.clone()))
        .collect();
    if !curves.is_empty() {
        sigma_trainer::train::plot::curves_png(
            &out.join("loss-curves.png"),
            &format!("{}: training loss", r.name),
            "step",
            "loss (nats/token)",
            &curves,
        )?;
    }
    let points: Vec<(String, f64, f64)> = r
        .variants
        .iter()
        .filter_map(|v| {
            Some((
                v.name.clone(),
                v.kv_cache_bytes_per_token? as f64,
                v.val_mean_loss?,
            ))
        })
        .collect();
    if !points.is_empty() {
        sigma_trainer::train::plot::scatter_png(
            &out.join("val-vs-kv.png"),
            &format!("{}: validation loss against KV cache", r.name),
            "KV-cache bytes per token (bf16, all layers)",
            "mean validation loss (nats/token)",
            &points,
        )?;
    }
    Ok(r)
}
