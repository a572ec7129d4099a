//! The `[data]` section of a run config. Parsed strictly (unknown keys are
//! errors) and validated into a form the mixer can trust.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::manifest::valid_domain_name;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A prepared directory (or its manifest.json): path or URL.
    pub manifest: String,
    /// Domain this source feeds; defaults to the domain recorded in the manifest.
    #[serde(default)]
    pub domain: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The stage ends once this many tokens have been consumed in total (all
    /// stages counted). Leave it out on the last stage to run on indefinitely.
    #[serde(default)]
    pub until_tokens: Option<u64>,
    pub mixture: BTreeMap<String, f64>,
}

fn default_seed() -> u64 {
    1234
}
fn default_shuffle_window() -> usize {
    64
}
fn default_prefetch() -> usize {
    4
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub sources: Vec<SourceConfig>,
    /// Ratios per domain (used when there are no stages).
    #[serde(default)]
    pub mixture: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageConfig>,
    /// Tokens per training sample; each sample is read as `seq_len + 1` tokens.
    pub seq_len: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Optional tokenizer.json the run expects; it must match the manifests'.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Row groups shuffled together per window (see docs/data-format.md).
    #[serde(default = "default_shuffle_window")]
    pub shuffle_window: usize,
    /// Batches prepared ahead of the trainer.
    #[serde(default = "default_prefetch")]
    pub prefetch_batches: usize,
}

/// One validated stage: ratios by domain index, and where it ends in samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub until_tokens: Option<u64>,
    pub weights: Vec<f64>,
}

/// Largest `data.seq_len`: a sample is read into memory whole and the
/// offsets of documents inside it are 32-bit.
pub const MAX_SEQ_LEN: usize = 1 << 24;
/// Largest `data.prefetch_batches` (each holds a whole batch in memory).
pub const MAX_PREFETCH_BATCHES: usize = 1024;
/// Most domains a mixture may name: batches carry each row's domain as a u16.
pub const MAX_DOMAINS: usize = u16::MAX as usize;

/// One mixture as written: the field it came from, where it ends, the ratios.
type RawStage<'a> = (String, Option<u64>, &'a BTreeMap<String, f64>);

impl DataConfig {
    /// Parse the `[data]` table of a TOML document (other tables are ignored
    /// here) and validate it (`validate`).
    pub fn from_toml(file: &str, text: &str) -> Result<DataConfig> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e
                .span()
                .map(|r| {
                    let before = text.get(..r.start).unwrap_or(text);
                    format!(" line {}", before.matches('\n').count() + 1)
                })
                .unwrap_or_default();
            DataError::config(format!("{file}{at}"), e.message().trim().to_string())
        })?;
        let data = doc
            .get("data")
            .ok_or_else(|| DataError::config(format!("{file}: [data]"), "section missing"))?;
        let cfg: DataConfig = data.clone().try_into().map_err(|e: toml::de::Error| {
            DataError::config(format!("{file}: [data]"), e.message().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Domains in index order (sorted by name), from all mixtures.
    pub fn domains(&self) -> Vec<String> {
        let mut d: Vec<String> = self.mixtures().flat_map(|m| m.keys().cloned()).collect();
        d.sort();
        d.dedup();
        d
    }

    fn mixtures(&self) -> Box<dyn Iterator<Item = &BTreeMap<String, f64>> + '_> {
        match &self.mixture {
            Some(m) if self.stages.is_empty() => Box::new(std::iter::once(m)),
            _ => Box::new(self.stages.iter().map(|s| &s.mixture)),
        }
    }

    /// Check everything the config says on its own, before any manifest is
    /// read: every consumer (the loader, the trainer, eval, preview) gets the
    /// same refusal naming the field. The checks against the sources'
    /// domains are in `stages`.
    pub fn validate(&self) -> Result<()> {
        self.validate_sizes()?;
        self.validate_sources()?;
        let raw = self.raw_stages()?;
        let mut prev_until = 0u64;
        for (i, (field, until, mix)) in raw.iter().enumerate() {
            validate_mixture(field, mix)?;
            if let Some(u) = until {
                if *u <= prev_until {
                    return Err(DataError::config(
                        format!("data.stages[{i}].until_tokens"),
                        format!("must be larger than the previous stage's ({prev_until}), got {u}"),
                    ));
                }
                prev_until = *u;
            } else if i + 1 != raw.len() {
                return Err(DataError::config(
                    format!("data.stages[{i}].until_tokens"),
                    "missing: only the last stage may leave it out",
                ));
            }
        }
        let n = self.domains().len();
        if n > MAX_DOMAINS {
            return Err(DataError::config(
                "data.mixture",
                format!("{n} domains, more than the {MAX_DOMAINS} a batch can label"),
            ));
        }
        Ok(())
    }

    fn validate_sizes(&self) -> Result<()> {
        if self.seq_len == 0 || self.seq_len > MAX_SEQ_LEN {
            return Err(DataError::config(
                "data.seq_len",
                format!(
                    "must be from 1 to {MAX_SEQ_LEN} (a sample is held in memory whole), got {}",
                    self.seq_len
                ),
            ));
        }
        if self.shuffle_window == 0 {
            return Err(DataError::config(
                "data.shuffle_window",
                "must be positive (row groups shuffled together)",
            ));
        }
        if self.prefetch_batches == 0 || self.prefetch_batches > MAX_PREFETCH_BATCHES {
            return Err(DataError::config(
                "data.prefetch_batches",
                format!("must be from 1 to {MAX_PREFETCH_BATCHES} (each is a batch held in memory), got {}", self.prefetch_batches),
            ));
        }
        if self
            .tokenizer
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(DataError::config(
                "data.tokenizer",
                "empty: give a tokenizer.json path or URL, or leave the key out",
            ));
        }
        Ok(())
    }

    fn validate_sources(&self) -> Result<()> {
        if self.sources.is_empty() {
            return Err(DataError::config(
                "data.sources",
                "no sources; add [[data.sources]] entries with `manifest = ...`",
            ));
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, src) in self.sources.iter().enumerate() {
            let field = format!("data.sources[{i}]");
            let dir = src.manifest.trim().trim_end_matches('/');
            let dir = dir.strip_suffix("/manifest.json").unwrap_or(dir);
            if dir.is_empty() {
                return Err(DataError::config(
                    format!("{field}.manifest"),
                    "empty: give a prepared directory (or its manifest.json)",
                ));
            }
            if let Some(j) = seen.insert(dir.to_string(), i) {
                return Err(DataError::config(
                    format!("{field}.manifest"),
                    format!("{dir} is already data.sources[{j}]; a source listed twice would be read twice as often"),
                ));
            }
            if let Some(d) = src.domain.as_deref().filter(|d| !valid_domain_name(d)) {
                return Err(DataError::config(
                    format!("{field}.domain"),
                    format!("{d:?} is not a domain name (letters, digits, '-' and '_')"),
                ));
            }
        }
        Ok(())
    }

    /// The mixtures as written, each with the field it came from.
    fn raw_stages(&self) -> Result<Vec<RawStage<'_>>> {
        match (&self.mixture, self.stages.is_empty()) {
            (Some(_), false) => Err(DataError::config(
                "data.mixture",
                "give either data.mixture or [[data.stages]], not both",
            )),
            (None, true) => Err(DataError::config(
                "data.mixture",
                "missing: give data.mixture or [[data.stages]]",
            )),
            (Some(m), true) => Ok(vec![("data.mixture".into(), None, m)]),
            (None, false) => Ok(self
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        format!("data.stages[{i}].mixture"),
                        s.until_tokens,
                        &s.mixture,
                    )
                })
                .collect()),
        }
    }

    /// Validate and return the stages with weights indexed like `domains()`.
    /// `source_domains` are the domains the sources provide.
    pub fn stages(&self, source_domains: &[String]) -> Result<Vec<Stage>> {
        self.validate()?;
        let domains = self.domains();
        let mut out = Vec::new();
        for (field, until, mix) in self.raw_stages()? {
            for (d, &w) in mix.iter() {
                if w > 0.0 && !source_domains.contains(d) {
                    return Err(DataError::config(
                        format!("{field}.{d}"),
                        format!(
                            "domain `{d}` has no source (sources provide: {})",
                            source_domains.join(", ")
                        ),
                    ));
                }
            }
            let weights = domains
                .iter()
                .map(|d| mix.get(d).copied().unwrap_or(0.0))
                .collect();
            out.push(Stage {
                until_tokens: until,
                weights,
            });
        }
        Ok(out)
    }
}

/// One mixture's ratios: domain names, finite and non-negative, summing to 1.
fn validate_mixture(field: &str, mix: &BTreeMap<String, f64>) -> Result<()> {
    let mut sum = 0.0;
    for (d, &w) in mix.iter() {
        if !valid_domain_name(d) {
            return Err(DataError::config(
                format!("{field}.{d}"),
                format!("{d:?} is not a domain name (letters, digits, '-' and '_')"),
            ));
        }
        if !w.is_finite() || w < 0.0 {
            return Err(DataError::config(
                format!("{field}.{d}"),
                format!("ratio must be a non-negative number, got {w}"),
            ));
        }
        sum += w;
    }
    if (sum - 1.0).abs() > 1e-6 {
        return Err(DataError::config(
            field,
            format!("ratios sum to {sum}, they must sum to 1"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> std::result::Result<Vec<Stage>, String> {
        let text = format!("[data]\nseq_len = 8\n[[data.sources]]\nmanifest = \"x\"\n{extra}");
        let c = DataConfig::from_toml("t.toml", &text).map_err(|e| e.to_string())?;
        c.stages(&["a".into(), "b".into()])
            .map_err(|e| e.to_string())
    }

    #[test]
    fn explains_bad_mixtures() {
        assert!(cfg("[data.mixture]\na = 0.5\nb = 0.5\n").is_ok());
        let e = cfg("[data.mixture]\na = -0.5\nb = 1.5\n").unwrap_err();
        assert!(
            e.contains("data.mixture.a") && e.contains("non-negative"),
            "{e}"
        );
        let e = cfg("[data.mixture]\na = 0.5\nb = 0.4\n").unwrap_err();
        assert!(e.contains("sum to 0.9"), "{e}");
        let e = cfg("[data.mixture]\na = 0.5\nc = 0.5\n").unwrap_err();
        assert!(e.contains("`c` has no source"), "{e}");
        let e =
            cfg("[data.mixture]\na = 1.0\n[[data.stages]]\nmixture = { a = 1.0 }\n").unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = cfg("bogus = 1\n[data.mixture]\na = 1.0\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn stages_must_increase() {
        let ok = "[[data.stages]]\nuntil_tokens = 100\nmixture = { a = 1.0 }\n[[data.stages]]\nmixture = { b = 1.0 }\n";
        let st = cfg(ok).unwrap();
        assert_eq!(st[0].weights, vec![1.0, 0.0]);
        assert_eq!(st[1].until_tokens, None);
        let bad = "[[data.stages]]\nuntil_tokens = 100\nmixture = { a = 1.0 }\n[[data.stages]]\nuntil_tokens = 50\nmixture = { b = 1.0 }\n";
        assert!(cfg(bad)
            .unwrap_err()
            .contains("data.stages[1].until_tokens"));
        let bad =
            "[[data.stages]]\nmixture = { a = 1.0 }\n[[data.stages]]\nmixture = { b = 1.0 }\n";
        assert!(cfg(bad).unwrap_err().contains("only the last stage"));
    }

    #[test]
    fn validate_names_the_field_before_any_manifest_is_read() {
        let base = "[data]\nseq_len = 8\n";
        let mix = "[data.mixture]\na = 1.0\n";
        let cases = [
            (format!("{base}sources = []\n{mix}"), "data.sources"),
            (
                format!("{base}[[data.sources]]\nmanifest = \"x\"\n[[data.sources]]\nmanifest = \"x/manifest.json\"\n{mix}"),
                "data.sources[1].manifest",
            ),
            (
                format!("{base}prefetch_batches = 100000\n[[data.sources]]\nmanifest = \"x\"\n{mix}"),
                "data.prefetch_batches",
            ),
            (
                format!("[data]\nseq_len = 100000000\n[[data.sources]]\nmanifest = \"x\"\n{mix}"),
                "data.seq_len",
            ),
            (
                format!("{base}[[data.sources]]\nmanifest = \"x\"\n[data.mixture]\n\"a.b\" = 1.0\n"),
                "data.mixture.a.b",
            ),
        ];
        for (text, field) in cases {
            let e = DataConfig::from_toml("t.toml", &text)
                .expect_err(field)
                .to_string();
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        }
    }
}
