//! The `[data]` section of a run config. Parsed strictly (unknown keys are
//! errors) and validated into a form the mixer can trust.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

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

impl DataConfig {
    /// Parse the `[data]` table of a TOML document (other tables are ignored here).
    pub fn from_toml(file: &str, text: &str) -> Result<DataConfig> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| DataError::config(file, e.to_string()))?;
        let data = doc
            .get("data")
            .ok_or_else(|| DataError::config(format!("{file}: [data]"), "section missing"))?;
        data.clone().try_into().map_err(|e: toml::de::Error| {
            DataError::config(format!("{file}: [data]"), e.message().to_string())
        })
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

    /// Validate and return the stages with weights indexed like `domains()`.
    /// `source_domains` are the domains the sources provide.
    pub fn stages(&self, source_domains: &[String]) -> Result<Vec<Stage>> {
        if self.seq_len == 0 {
            return Err(DataError::config("data.seq_len", "must be positive"));
        }
        if self.shuffle_window == 0 {
            return Err(DataError::config("data.shuffle_window", "must be positive"));
        }
        if self.prefetch_batches == 0 {
            return Err(DataError::config(
                "data.prefetch_batches",
                "must be positive",
            ));
        }
        if self.sources.is_empty() {
            return Err(DataError::config(
                "data.sources",
                "no sources; add [[data.sources]] entries with `manifest = ...`",
            ));
        }
        let raw: Vec<(String, Option<u64>, &BTreeMap<String, f64>)> =
            match (&self.mixture, self.stages.is_empty()) {
                (Some(_), false) => {
                    return Err(DataError::config(
                        "data.mixture",
                        "give either data.mixture or [[data.stages]], not both",
                    ))
                }
                (None, true) => {
                    return Err(DataError::config(
                        "data.mixture",
                        "missing: give data.mixture or [[data.stages]]",
                    ))
                }
                (Some(m), true) => vec![("data.mixture".into(), None, m)],
                (None, false) => self
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
                    .collect(),
            };
        let domains = self.domains();
        let mut out = Vec::new();
        let mut prev_until = 0u64;
        for (i, (field, until, mix)) in raw.iter().enumerate() {
            let mut sum = 0.0;
            for (d, &w) in mix.iter() {
                if !w.is_finite() || w < 0.0 {
                    return Err(DataError::config(
                        format!("{field}.{d}"),
                        format!("ratio must be a non-negative number, got {w}"),
                    ));
                }
                if w > 0.0 && !source_domains.contains(d) {
                    return Err(DataError::config(
                        format!("{field}.{d}"),
                        format!(
                            "domain `{d}` has no source (sources provide: {})",
                            source_domains.join(", ")
                        ),
                    ));
                }
                sum += w;
            }
            if (sum - 1.0).abs() > 1e-6 {
                return Err(DataError::config(
                    field.as_str(),
                    format!("ratios sum to {sum}, they must sum to 1"),
                ));
            }
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
            let weights = domains
                .iter()
                .map(|d| mix.get(d).copied().unwrap_or(0.0))
                .collect();
            out.push(Stage {
                until_tokens: *until,
                weights,
            });
        }
        Ok(out)
    }
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
}
