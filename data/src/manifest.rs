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
            .map_err(|e| DataError::manifest(url, format!("not valid JSON: {e}")))?;
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
        let m: Manifest =
            serde_json::from_value(v).map_err(|e| DataError::manifest(url, e.to_string()))?;
        m.validate(url)?;
        Ok(m)
    }

    fn validate(&self, url: &str) -> Result<()> {
        for s in &self.shards {
            let bad = |m: String| Err(DataError::manifest(url, format!("shard {}: {m}", s.file)));
            if s.file.contains('/') || s.file.starts_with('.') || s.file.is_empty() {
                return bad("file name must be a plain name inside the directory".into());
            }
            let docs: u64 = s.row_groups.iter().map(|r| r.documents).sum();
            let toks: u64 = s.row_groups.iter().map(|r| r.tokens).sum();
            if docs != s.documents || toks != s.tokens {
                return bad(format!(
                    "row groups add up to {docs} documents / {toks} tokens but the shard says {} / {}",
                    s.documents, s.tokens
                ));
            }
            if s.row_groups.iter().any(|r| r.documents == 0) {
                return bad("empty row group".into());
            }
        }
        if self.tokenizer.eos_id >= self.tokenizer.vocab_size {
            return Err(DataError::manifest(
                url,
                "tokenizer.eos_id is not below tokenizer.vocab_size",
            ));
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
                sha256: "ab".into(),
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
                sha256: "00".into(),
                documents: 3,
                tokens: 30,
                row_groups: vec![
                    RowGroupInfo {
                        documents: 2,
                        tokens: 20,
                        xxh3: "1".into(),
                    },
                    RowGroupInfo {
                        documents: 1,
                        tokens: 10,
                        xxh3: "2".into(),
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
}
