//! `sigma data inspect` and `sigma data preview`: reports as values that
//! print themselves; the binary decides the exit code from `healthy()`.

use std::fmt;

use crate::config::DataConfig;
use crate::error::{DataError, Result};
use crate::loader::Dataset;
use crate::manifest::{Manifest, ShardInfo, Split};
use crate::shard::ShardReader;
use crate::store::{block_on, Location};
use crate::tokenizer::Tokenizer;

pub struct ShardHealth {
    pub file: String,
    pub problem: Option<String>,
}

pub struct InspectReport {
    pub url: String,
    pub manifest: Manifest,
    pub shards: Vec<ShardHealth>,
    pub tokenizer_problem: Option<String>,
    pub verified_checksums: bool,
}

impl InspectReport {
    pub fn healthy(&self) -> bool {
        self.tokenizer_problem.is_none() && self.shards.iter().all(|s| s.problem.is_none())
    }
}

/// Read a manifest and check every shard: present, right size, readable footer,
/// row-group count, domain and tokenizer recorded in the file. With `verify`,
/// every number the manifest records is checked against the data: the sha256
/// of the whole file, and every row group decoded (documents, tokens, xxh3,
/// token ids below the vocabulary) and summed into the shard's totals; the
/// tokenizer's vocabulary and special ids against the tokenizer file.
pub fn inspect(url: &str, verify: bool) -> Result<InspectReport> {
    block_on(async {
        let (manifest, dir) = Manifest::load(url).await?;
        let mut shards = Vec::new();
        for s in &manifest.shards {
            let problem = check_shard(&manifest, s, dir.join(&s.file), verify)
                .await
                .err();
            shards.push(ShardHealth {
                file: s.file.clone(),
                problem,
            });
        }
        let tok_url = dir.join(&manifest.tokenizer.file).url;
        let tokenizer_problem =
            match Tokenizer::load_verified(&tok_url, &manifest.tokenizer.sha256, "the manifest")
                .await
            {
                Ok(t) => check_tokenizer(&manifest, &t).err(),
                Err(e) => Some(e.to_string()),
            };
        Ok(InspectReport {
            url: dir.url.clone(),
            manifest,
            shards,
            tokenizer_problem,
            verified_checksums: verify,
        })
    })
}

/// The tokenizer file must have the vocabulary and special ids the manifest records.
fn check_tokenizer(m: &Manifest, t: &Tokenizer) -> std::result::Result<(), String> {
    let r = &m.tokenizer;
    let mut bad = Vec::new();
    if t.vocab_size != r.vocab_size {
        bad.push(format!(
            "vocab_size {} (manifest {})",
            t.vocab_size, r.vocab_size
        ));
    }
    if t.eos_id != r.eos_id {
        bad.push(format!("eos_id {} (manifest {})", t.eos_id, r.eos_id));
    }
    if t.bos_id != r.bos_id {
        bad.push(format!("bos_id {:?} (manifest {:?})", t.bos_id, r.bos_id));
    }
    if t.pad_id != r.pad_id {
        bad.push(format!("pad_id {:?} (manifest {:?})", t.pad_id, r.pad_id));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", t.url, bad.join(", ")))
    }
}

async fn check_shard(
    m: &Manifest,
    s: &ShardInfo,
    loc: Location,
    verify: bool,
) -> std::result::Result<(), String> {
    // Present, readable footer, and everything the footer can confirm.
    let r = ShardReader::open_checked(loc.clone(), m, s)
        .await
        .map_err(|e| e.to_string())?;
    if !verify {
        return Ok(());
    }
    let (_, h) = loc.sha256().await.map_err(|e| e.to_string())?;
    if h != s.sha256 {
        return Err(format!("sha256 mismatch: file {h}, manifest {}", s.sha256));
    }
    for (i, g) in s.row_groups.iter().enumerate() {
        let rg = r.read_row_group(i, g).await.map_err(|e| e.to_string())?;
        if let Some(&t) = rg.tokens.iter().find(|&&t| t >= m.tokenizer.vocab_size) {
            return Err(format!(
                "row group {i} holds token id {t}, not below the vocabulary size {} the manifest records",
                m.tokenizer.vocab_size
            ));
        }
    }
    Ok(())
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(f, "{}", self.url)?;
        writeln!(f, "  domain      {}", m.domain)?;
        writeln!(
            f,
            "  format      {} v{} ({})",
            m.format, m.format_version, m.created_by
        )?;
        writeln!(
            f,
            "  tokenizer   vocab {}, eos {}, sha256 {}",
            m.tokenizer.vocab_size,
            m.tokenizer.eos_id,
            &m.tokenizer.sha256[..16.min(m.tokenizer.sha256.len())]
        )?;
        writeln!(f, "  inputs      {}", m.inputs.join(", "))?;
        for split in [Split::Train, Split::Valid] {
            let t = m.totals(split);
            let avg = t.tokens.checked_div(t.documents).unwrap_or(0);
            writeln!(
                f,
                "  {:<11} {} docs, {} tokens (avg {avg}/doc), {} shards, {} row groups, {} bytes",
                split.name(),
                human(t.documents),
                human(t.tokens),
                t.shards,
                t.row_groups,
                human(t.bytes)
            )?;
        }
        let bad: Vec<_> = self.shards.iter().filter(|s| s.problem.is_some()).collect();
        let what = if self.verified_checksums {
            "present, readable, sha256 verified, every recorded count checked against the data"
        } else {
            "present and readable (checksums not verified: --verify)"
        };
        if bad.is_empty() {
            writeln!(f, "  health      ok: {} shards {what}", self.shards.len())?;
        } else {
            writeln!(
                f,
                "  health      {} of {} shards have problems:",
                bad.len(),
                self.shards.len()
            )?;
            for s in bad {
                writeln!(f, "    {}: {}", s.file, s.problem.as_deref().unwrap_or(""))?;
            }
        }
        if let Some(p) = &self.tokenizer_problem {
            writeln!(f, "  tokenizer problem: {p}")?;
        }
        Ok(())
    }
}

pub struct StagePreview {
    pub first_sample: u64,
    pub samples: u64,
    pub until_tokens: Option<u64>,
    pub configured: Vec<f64>,
    pub realized: Vec<u64>,
}

pub struct PreviewReport {
    pub domains: Vec<String>,
    pub epoch_tokens: Vec<u64>,
    pub valid_samples: Vec<u64>,
    pub stages: Vec<StagePreview>,
    /// (global index, domain, decoded text)
    pub examples: Vec<(u64, String, String)>,
}

/// Bounds of `data preview`'s flags: the simulation costs a few
/// nanoseconds per sample and domain, each shown sample one read and decode.
pub const MAX_PREVIEW_SAMPLES: u64 = 100_000_000;
pub const MAX_PREVIEW_SHOW: usize = 1000;

/// Simulate up to `samples` samples of each stage and decode the first `show`
/// samples; the cost is linear in both.
pub fn preview(cfg: &DataConfig, samples: u64, show: usize) -> Result<PreviewReport> {
    if samples == 0 || samples > MAX_PREVIEW_SAMPLES {
        return Err(DataError::flag(
            "--samples",
            format!(
                "must be from 1 to {MAX_PREVIEW_SAMPLES} (samples simulated per stage), got {samples}"
            ),
        ));
    }
    if show > MAX_PREVIEW_SHOW {
        return Err(DataError::flag(
            "--show",
            format!("must be at most {MAX_PREVIEW_SHOW} (decoded samples printed), got {show}"),
        ));
    }
    let ds = Dataset::open_blocking(cfg)?;
    let m = &ds.mixer;
    let mut stages = Vec::new();
    for (s, st) in m.stages.iter().enumerate() {
        let first = if s == 0 { 0 } else { m.stage_ends[s - 1] };
        let len = m.stage_ends[s].saturating_sub(first).min(samples);
        stages.push(StagePreview {
            first_sample: first,
            samples: len,
            until_tokens: st.until_tokens,
            configured: st.weights.clone(),
            realized: m.stage_counts(s, len),
        });
    }
    let tok = ds.load_tokenizer()?;
    let mut examples = Vec::new();
    let mut c = m.start();
    for _ in 0..show {
        let s = block_on(ds.next_sample(&mut c))?;
        let text = tok.decode(&s.tokens, false)?;
        examples.push((s.index, ds.domains[s.domain as usize].clone(), text));
    }
    Ok(PreviewReport {
        epoch_tokens: (0..ds.domains.len()).map(|d| ds.epoch_tokens(d)).collect(),
        valid_samples: (0..ds.domains.len())
            .map(|d| ds.num_valid_samples(d))
            .collect(),
        domains: ds.domains.clone(),
        stages,
        examples,
    })
}

impl fmt::Display for PreviewReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "domains:")?;
        for (i, d) in self.domains.iter().enumerate() {
            writeln!(
                f,
                "  {d:<12} {} training tokens per epoch, {} validation samples",
                human(self.epoch_tokens[i]),
                self.valid_samples[i]
            )?;
        }
        for (s, st) in self.stages.iter().enumerate() {
            let until = st
                .until_tokens
                .map(|t| format!("until {} tokens", human(t)))
                .unwrap_or_else(|| "open-ended".into());
            writeln!(
                f,
                "stage {s} ({until}), samples {}..{} simulated:",
                st.first_sample,
                st.first_sample + st.samples
            )?;
            writeln!(
                f,
                "  {:<12} {:>10} {:>10} {:>10}",
                "domain", "configured", "realized", "samples"
            )?;
            for (i, d) in self.domains.iter().enumerate() {
                let r = if st.samples > 0 {
                    st.realized[i] as f64 / st.samples as f64
                } else {
                    0.0
                };
                writeln!(
                    f,
                    "  {d:<12} {:>10.4} {:>10.4} {:>10}",
                    st.configured[i], r, st.realized[i]
                )?;
            }
        }
        for (i, d, text) in &self.examples {
            let shown: String = text.chars().take(400).collect();
            writeln!(
                f,
                "--- sample {i} ({d}) ---\n{shown}{}",
                if text.chars().count() > 400 {
                    " [...]"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}
