//! The manifest: one JSON file per prepared directory that says what its shards
//! hold, with counts per row group and checksums. See docs/data-format.md.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::store::Location;

pub const FORMAT: &str = "sigma-shards";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    pub sha256: String,
    pub vocab_size: u32,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// The tokenizer.json copied next to the shards.
    pub file: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RowGroupInfo {
    pub documents: u64,
    pub tokens: u64,
    /// xxh3-64 (hex) over the row group's documents: for each, its length as u32 LE, then its tokens as u32 LE.
    pub xxh3: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    pub file: String,
    pub split: Split,
    pub bytes: u64,
    pub sha256: String,
    pub documents: u64,
    pub tokens: u64,
    pub row_groups: Vec<RowGroupInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub domain: String,
    pub created_by: String,
    pub tokenizer: TokenizerInfo,
    pub inputs: Vec<String>,
    pub text_field: String,
    pub valid_fraction: f64,
    pub row_group_tokens: u64,
    /// Documents that were empty after reading and were left out.
    pub skipped_documents: u64,
    pub shards: Vec<ShardInfo>,
}

/// Largest manifest.json sigma reads.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Letters, digits, '-' and '_' (a domain name is used in file metadata and config keys).
pub fn valid_domain_name(domain: &str) -> bool {
    !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file name inside the prepared directory (no path, not hidden).
fn plain_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.contains('\\') && !s.starts_with('.')
}

/// A field that is wrong, and why.
type FieldError = (&'static str, String);

impl TokenizerInfo {
    fn validate(&self) -> std::result::Result<(), FieldError> {
        if !is_hex(&self.sha256, 64) {
            return Err((
                "sha256",
                format!("{:?} is not a sha256 (64 hex digits)", self.sha256),
            ));
        }
        if self.vocab_size == 0 {
            return Err(("vocab_size", "must be positive".into()));
        }
        for (name, id) in [
            ("eos_id", Some(self.eos_id)),
            ("bos_id", self.bos_id),
            ("pad_id", self.pad_id),
        ] {
            if let Some(id) = id.filter(|&id| id >= self.vocab_size) {
                return Err((
                    name,
                    format!("{id} is not below vocab_size {}", self.vocab_size),
                ));
            }
        }
        if !plain_name(&self.file) {
            return Err((
                "file",
                format!(
                    "{:?} must be a plain file name inside the directory",
                    self.file
                ),
            ));
        }
        Ok(())
    }
}

impl ShardInfo {
    /// The split a shard file name says (`train-00000.parquet` -> train).
    pub fn split_of_name(file: &str) -> Option<Split> {
        let (prefix, rest) = file.split_once('-')?;
        let digits = rest.strip_suffix(".parquet")?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        [Split::Train, Split::Valid]
            .into_iter()
            .find(|s| s.name() == prefix)
    }

    fn validate(&self) -> std::result::Result<(), FieldError> {
        if !plain_name(&self.file) {
            return Err((
                "file",
                "must be a plain file name inside the directory".into(),
            ));
        }
        match ShardInfo::split_of_name(&self.file) {
            None => {
                return Err((
                    "file",
                    "not a shard name (train-NNNNN.parquet or valid-NNNNN.parquet)".into(),
                ))
            }
            Some(named) if named != self.split => {
                return Err((
                    "split",
                    format!(
                        "{:?}, but the file holds {} data (its name says so)",
                        self.split.name(),
                        named.name()
                    ),
                ))
            }
            Some(_) => {}
        }
        if !is_hex(&self.sha256, 64) {
            return Err((
                "sha256",
                format!("{:?} is not a sha256 (64 hex digits)", self.sha256),
            ));
        }
        if self.bytes == 0 {
            return Err(("bytes", "must be positive".into()));
        }
        if self.row_groups.is_empty() {
            return Err((
                "row_groups",
                "none (sigma never writes an empty shard)".into(),
            ));
        }
        let (mut docs, mut toks) = (0u64, 0u64);
        for rg in &self.row_groups {
            if rg.documents == 0 {
                return Err(("row_groups", "an empty row group".into()));
            }
            if rg.tokens > MAX_ROW_GROUP_TOKENS {
                return Err(("row_groups", format!("a row group of {} tokens, more than a row group can hold ({MAX_ROW_GROUP_TOKENS})", rg.tokens)));
            }
            if !is_hex(&rg.xxh3, 16) {
                return Err((
                    "row_groups",
                    format!("xxh3 {:?} is not an xxh3-64 (16 hex digits)", rg.xxh3),
                ));
            }
            docs = docs
                .checked_add(rg.documents)
                .ok_or(("documents", "overflow".to_string()))?;
            toks = toks
                .checked_add(rg.tokens)
                .ok_or(("tokens", "overflow".to_string()))?;
        }
        if docs != self.documents || toks != self.tokens {
            return Err((
                "documents",
                format!(
                "row groups add up to {docs} documents / {toks} tokens but the shard says {} / {}",
                self.documents, self.tokens
            ),
            ));
        }
        Ok(())
    }
}

/// Tokens one row group can hold: its token list has 32-bit offsets.
pub const MAX_ROW_GROUP_TOKENS: u64 = i32::MAX as u64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub shards: u64,
    pub row_groups: u64,
    pub documents: u64,
    pub tokens: u64,
    pub bytes: u64,
}

impl Manifest {
    pub fn totals(&self, split: Split) -> Totals {
        let mut t = Totals::default();
        for s in self.shards.iter().filter(|s| s.split == split) {
            t.shards += 1;
            t.row_groups += s.row_groups.len() as u64;
            t.documents += s.documents;
            t.tokens += s.tokens;
            t.bytes += s.bytes;
        }
        t
    }

    /// The directory location and manifest location for a directory or manifest URL.
    pub fn locate(dir_or_manifest: &str) -> Result<(Location, Location)> {
        let trimmed = dir_or_manifest.trim_end_matches('/');
        if let Some(dir) = trimmed.strip_suffix(&format!("/{MANIFEST_FILE}")) {
            return Ok((Location::parse(dir)?, Location::parse(trimmed)?));
        }
        let dir = Location::parse(trimmed)?;
        let m = dir.join(MANIFEST_FILE);
        Ok((dir, m))
    }

    /// Read and validate the manifest of a prepared directory (or a manifest.json URL).
    pub async fn load(dir_or_manifest: &str) -> Result<(Manifest, Location)> {
        let (dir, mloc) = Manifest::locate(dir_or_manifest)?;
        let bytes = match mloc.size().await? {
            Some(n) if n > MAX_MANIFEST_BYTES => {
                return Err(DataError::manifest(
                    &mloc.url,
                    format!("{n} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have (one of 100,000 shards is about 50 MB): this is not a manifest sigma wrote"),
                ))
            }
            Some(_) => mloc.get().await?,
            None => {
                return Err(DataError::manifest(
                    &mloc.url,
                    "not found: this is not a prepared directory (run `sigma data prepare`), or its preparation did not finish",
                ))
            }
        };
        let m = Manifest::parse(&mloc.url, &bytes)?;
        Ok((m, dir))
    }

    pub fn parse(url: &str, bytes: &[u8]) -> Result<Manifest> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| DataError::manifest(url, format!("not valid JSON ({e}); a manifest sigma wrote was edited or damaged: prepare the data again")))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(DataError::manifest(
                url,
                format!("field `format` is {format:?}, expected {FORMAT:?}"),
            ));
        }
        let version = v
            .get("format_version")
            .and_then(|f| f.as_u64())
            .unwrap_or(0);
        if version != FORMAT_VERSION as u64 {
            return Err(DataError::manifest(
                url,
                format!("format_version {version} is not supported by this sigma (it reads version {FORMAT_VERSION}); re-run `sigma data prepare` or use a matching sigma"),
            ));
        }
        let m: Manifest = serde_path_to_error::deserialize(v).map_err(|e| {
            DataError::manifest(url, format!("field `{}`: {}", e.path(), e.inner()))
        })?;
        m.validate(url)?;
        Ok(m)
    }

    /// Everything the manifest says about itself must agree: names, splits,
    /// checksums and counts. Each refusal names the field.
    fn validate(&self, url: &str) -> Result<()> {
        let bad = |field: &str, m: String| {
            Err(DataError::manifest(
                url,
                format!("field `{field}`: {m}; the manifest was edited or damaged, prepare the data again"),
            ))
        };
        if !valid_domain_name(&self.domain) {
            return bad(
                "domain",
                format!(
                    "{:?} is not a domain name (letters, digits, '-' and '_')",
                    self.domain
                ),
            );
        }
        if !(0.0..1.0).contains(&self.valid_fraction) {
            return bad(
                "valid_fraction",
                format!("{} is not in [0, 1)", self.valid_fraction),
            );
        }
        if self.row_group_tokens == 0 {
            return bad("row_group_tokens", "must be positive".into());
        }
        self.tokenizer
            .validate()
            .or_else(|(f, m)| bad(&format!("tokenizer.{f}"), m))?;
        self.validate_shards().or_else(|(f, m)| bad(&f, m))
    }

    fn validate_shards(&self) -> std::result::Result<(), (String, String)> {
        let mut files = std::collections::HashMap::new();
        let mut hashes = std::collections::HashMap::new();
        let mut total = 0u64;
        for (i, s) in self.shards.iter().enumerate() {
            let f = |name: &str| format!("shards[{i}].{name}");
            s.validate()
                .map_err(|(name, m)| (f(name), format!("{}: {m}", s.file)))?;
            if let Some(j) = files.insert(s.file.as_str(), i) {
                return Err((f("file"), format!("{} is listed twice (also as shards[{j}]), which would count its documents twice", s.file)));
            }
            if let Some(j) = hashes.insert(s.sha256.as_str(), i) {
                return Err((f("sha256"), format!("{} has the same content as shards[{j}] ({}): one shard listed under two names", s.file, self.shards[j].file)));
            }
            total = total.checked_add(s.tokens).ok_or_else(|| {
                (
                    f("tokens"),
                    "the shards' token counts overflow a 64-bit total".to_string(),
                )
            })?;
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            domain: "general".into(),
            created_by: "test".into(),
            tokenizer: TokenizerInfo {
                sha256: "ab".repeat(32),
                vocab_size: 300,
                eos_id: 0,
                bos_id: Some(1),
                pad_id: Some(2),
                file: TOKENIZER_FILE.into(),
            },
            inputs: vec!["x".into()],
            text_field: "text".into(),
            valid_fraction: 0.01,
            row_group_tokens: 100,
            skipped_documents: 0,
            shards: vec![ShardInfo {
                file: "train-00000.parquet".into(),
                split: Split::Train,
                bytes: 10,
                sha256: "00".repeat(32),
                documents: 3,
                tokens: 30,
                row_groups: vec![
                    RowGroupInfo {
                        documents: 2,
                        tokens: 20,
                        xxh3: "1".repeat(16),
                    },
                    RowGroupInfo {
                        documents: 1,
                        tokens: 10,
                        xxh3: "2".repeat(16),
                    },
                ],
            }],
        }
    }

    #[test]
    fn round_trips_and_validates_counts() {
        let m = sample();
        let back = Manifest::parse("m.json", &m.to_json()).unwrap();
        assert_eq!(back, m);
        let mut bad = m.clone();
        bad.shards[0].tokens = 31;
        let e = Manifest::parse("m.json", &bad.to_json())
            .unwrap_err()
            .to_string();
        assert!(e.contains("train-00000.parquet") && e.contains("31"), "{e}");
    }

    #[test]
    fn rejects_other_versions_with_a_hint() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["format_version"] = 7.into();
        let e = Manifest::parse("m.json", &serde_json::to_vec(&v).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("format_version 7") && e.contains("m.json"),
            "{e}"
        );
        v["format_version"] = 1.into();
        v["surprise"] = 1.into();
        let e = Manifest::parse("m.json", &serde_json::to_vec(&v).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("surprise"), "{e}");
    }

    fn refusal(edit: impl FnOnce(&mut Manifest)) -> String {
        let mut m = sample();
        edit(&mut m);
        Manifest::parse("m.json", &m.to_json())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn cross_checks_name_the_field() {
        let e = refusal(|m| m.shards[0].split = Split::Valid);
        assert!(e.contains("m.json") && e.contains("shards[0].split"), "{e}");
        let e = refusal(|m| {
            let again = m.shards[0].clone();
            m.shards.push(again);
        });
        assert!(
            e.contains("shards[1].file") && e.contains("listed twice"),
            "{e}"
        );
        let e = refusal(|m| {
            let mut copy = m.shards[0].clone();
            copy.file = "train-00001.parquet".into();
            m.shards.push(copy);
        });
        assert!(
            e.contains("shards[1].sha256") && e.contains("same content"),
            "{e}"
        );
        let e = refusal(|m| m.shards[0].file = "notes.parquet".into());
        assert!(e.contains("shards[0].file"), "{e}");
        let e = refusal(|m| m.shards[0].sha256 = "zz".into());
        assert!(e.contains("shards[0].sha256"), "{e}");
        let e = refusal(|m| m.tokenizer.pad_id = Some(300));
        assert!(e.contains("tokenizer.pad_id"), "{e}");
        let e = refusal(|m| m.shards[0].row_groups.clear());
        assert!(e.contains("shards[0].row_groups"), "{e}");
        let e = refusal(|m| m.valid_fraction = 1.5);
        assert!(e.contains("valid_fraction"), "{e}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["shards"][0]["bytes"] = "ten".into();
        let e = Manifest::parse("m.json", &serde_json::to_vec(&v).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("shards[0].bytes"), "{e}");
    }
}
