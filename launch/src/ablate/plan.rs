//! The ablation plan: the grid file, each variant's resolved config, the
//! fairness checks (every variant sees the same data stream), and the
//! plan.json the runner and the report share.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sigma_trainer::config::read_config;
use sigma_trainer::model::summary::{summarize, Summary};
use sigma_trainer::parallel::Layout;
use sigma_trainer::RunConfig;

/// An ablation file (TOML).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    #[serde(default)]
    ablation: Header,
    #[serde(default)]
    variant: Vec<VariantSpec>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: Option<String>,
    /// The variant the others are compared to (default: the first).
    base: Option<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantSpec {
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// Overrides, `"section.key" = value`.
    #[serde(default)]
    set: toml::Table,
}

/// What plan.json records: enough to rerun and to report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlanFile {
    pub name: String,
    pub description: Option<String>,
    pub base_config: String,
    pub grid: String,
    /// The `--set` overrides given to `sigma ablate` (every variant).
    pub sets: Vec<String>,
    pub base_variant: String,
    pub variants: Vec<PlanVariant>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlanVariant {
    pub name: String,
    pub description: Option<String>,
    /// The variant's own overrides, `section.key=value`.
    pub set: Vec<String>,
}

pub struct Variant {
    pub name: String,
    /// Everything the child `sigma train` gets after `--config`: the
    /// ablation's `--set`s, the variant's, and the runner's own (run directory).
    pub overrides: Vec<String>,
    pub cfg: RunConfig,
    pub summary: Summary,
}

impl Variant {
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(&self.cfg.metrics.output_dir)
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.dir().join("checkpoints")
    }
}

pub struct Plan {
    pub file: PlanFile,
    pub variants: Vec<Variant>,
    pub base: usize,
    pub out: PathBuf,
}

/// The directory of variant `name` under an ablation's output.
pub fn run_dir(out: &Path, name: &str) -> PathBuf {
    out.join("runs").join(name)
}

fn key_of(spec: &str) -> &str {
    spec.split_once('=')
        .map(|(k, _)| k.trim())
        .unwrap_or(spec.trim())
}

/// Keys the runner sets itself for every variant.
const RUNNER_KEYS: [&str; 2] = ["metrics.output_dir", "checkpoint.dir"];

pub fn build(base_config: &str, grid: &str, out: &Path, sets: &[String]) -> Result<Plan> {
    let text = read_config(grid)?;
    let g: GridFile = toml::from_str(&text).with_context(|| format!("ablation file `{grid}`"))?;
    if g.variant.is_empty() {
        bail!("ablation file `{grid}`: no [[variant]] entries");
    }
    for s in sets {
        if RUNNER_KEYS.contains(&key_of(s)) {
            bail!("--set {s}: sigma ablate gives every variant its own directory under --output; leave {} out", key_of(s));
        }
    }
    let mut pv: Vec<PlanVariant> = Vec::new();
    for v in &g.variant {
        if v.name.is_empty()
            || !v
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || v.name.starts_with('.')
        {
            bail!("ablation file `{grid}`: variant name {:?}: use letters, digits, '-', '_' and '.' (it names a directory)", v.name);
        }
        if pv.iter().any(|p| p.name == v.name) {
            bail!(
                "ablation file `{grid}`: two variants are named {:?}",
                v.name
            );
        }
        let mut set = Vec::new();
        for (k, val) in &v.set {
            if RUNNER_KEYS.contains(&k.as_str()) {
                bail!("ablation file `{grid}`, variant {}: {k} is set by the runner (each variant runs in <output>/runs/<name>)", v.name);
            }
            if let Some(s) = sets.iter().find(|s| key_of(s) == k) {
                bail!(
                    "variant {} of `{grid}` sets {k}, and so does --set {s}: say it in one place",
                    v.name
                );
            }
            set.push(format!("{k}={val}"));
        }
        pv.push(PlanVariant {
            name: v.name.clone(),
            description: v.description.clone(),
            set,
        });
    }
    let base_variant = match &g.ablation.base {
        Some(b) if pv.iter().any(|v| &v.name == b) => b.clone(),
        Some(b) => bail!("ablation file `{grid}`: [ablation] base = {b:?} names no variant"),
        None => pv[0].name.clone(),
    };
    let name = g.ablation.name.clone().unwrap_or_else(|| {
        Path::new(grid)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ablation".into())
    });
    let file = PlanFile {
        name,
        description: g.ablation.description.clone(),
        base_config: base_config.to_string(),
        grid: grid.to_string(),
        sets: sets.to_vec(),
        base_variant,
        variants: pv,
    };
    resolve(file, out)
}

/// Resolve every variant's config from a plan file (also used on rerun).
pub fn resolve(file: PlanFile, out: &Path) -> Result<Plan> {
    let base_text = read_config(&file.base_config)?;
    let mut variants = Vec::new();
    for v in &file.variants {
        let dir = run_dir(out, &v.name);
        let quoted = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
        let mut overrides: Vec<String> = file.sets.clone();
        overrides.extend(v.set.iter().cloned());
        overrides.push(format!("metrics.output_dir={}", quoted(dir.clone())));
        overrides.push(format!(
            "checkpoint.dir={}",
            quoted(dir.join("checkpoints"))
        ));
        let cfg = RunConfig::parse(&file.base_config, &base_text, &overrides)
            .and_then(|c| Layout::check(&c).map(|()| c))
            .with_context(|| format!("variant {}", v.name))?;
        let mut cfg = cfg;
        if !cfg.checkpointing() {
            // Resumable, and the final checkpoint is what `sigma eval` scores.
            overrides.push("checkpoint.every_minutes=30.0".into());
            cfg = RunConfig::parse(&file.base_config, &base_text, &overrides)?;
        }
        let summary = summarize(&cfg.model, cfg.data.seq_len);
        variants.push(Variant {
            name: v.name.clone(),
            overrides,
            cfg,
            summary,
        });
    }
    let base = variants
        .iter()
        .position(|v| v.name == file.base_variant)
        .expect("base variant exists");
    check_fair(&variants, base)?;
    Ok(Plan {
        file,
        variants,
        base,
        out: out.to_path_buf(),
    })
}

/// Every variant must see the same data stream: same data section, seed,
/// samples per step (and ramp) and steps. Only how the model (or the
/// optimizer) is built may differ.
fn check_fair(vs: &[Variant], base: usize) -> Result<()> {
    let b = &vs[base].cfg;
    let samples = |c: &RunConfig, step: u64| {
        c.accum_steps_at(step) * c.train.micro_batch_size * c.parallel.dp
    };
    for v in vs {
        let c = &v.cfg;
        let differs = if c.data != b.data {
            Some("the [data] section")
        } else if c.train.seed != b.train.seed {
            Some("train.seed")
        } else if c.train.steps != b.train.steps {
            Some("train.steps (the token budget)")
        } else if c.train.batch_ramp_steps != b.train.batch_ramp_steps
            || (0..=c.train.batch_ramp_steps.min(c.train.steps))
                .any(|s| samples(c, s) != samples(b, s))
        {
            Some("the global batch (train.micro_batch_size x train.grad_accum_steps x parallel.dp, or its ramp)")
        } else {
            None
        };
        if let Some(what) = differs {
            bail!(
                "variant {} changes {what} relative to the base variant {}: every variant must train on the identical data stream (same seed, mixture and token budget)",
                v.name,
                vs[base].name
            );
        }
    }
    Ok(())
}

impl Plan {
    pub fn tokens_per_variant(&self) -> u64 {
        let c = &self.variants[self.base].cfg;
        (0..c.train.steps)
            .map(|s| {
                (c.accum_steps_at(s) * c.train.micro_batch_size * c.parallel.dp * c.data.seq_len)
                    as u64
            })
            .sum()
    }

    pub fn plan_json(&self) -> PathBuf {
        self.out.join("plan.json")
    }
}

pub fn read_plan(out: &Path) -> Result<PlanFile> {
    let p = out.join("plan.json");
    let text = std::fs::read(&p).with_context(|| {
        format!(
            "{}: not an ablation directory (sigma ablate writes plan.json)",
            p.display()
        )
    })?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a plan written by sigma ablate", p.display()))
}
