//! Parquet shards of tokenized documents. Columns: `tokens` (list<uint32>),
//! `source` (utf8), `doc_hash` (uint64). One row group holds about
//! `row_group_tokens` tokens, so the loader can fetch any part of a shard with
//! one ranged read. Domain, format version and tokenizer hash are in the
//! file's key-value metadata as well as in the manifest.

// parquet 60 deprecates ParquetObjectReader in favour of hand-written
// AsyncFileReader impls; it still works and is the ranged-read path we want.
#![allow(deprecated)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, ListArray, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema};
use futures::TryStreamExt;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use xxhash_rust::xxh3::Xxh3;

use crate::error::{DataError, Result};
use crate::manifest::{
    Manifest, RowGroupInfo, ShardInfo, Split, FORMAT_VERSION, MAX_ROW_GROUP_TOKENS,
};
use crate::store::Location;

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(
            "tokens",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
            false,
        ),
        Field::new("source", DataType::Utf8, false),
        Field::new("doc_hash", DataType::UInt64, false),
    ]))
}

/// Checksum of one row group's documents (see `RowGroupInfo::xxh3`).
#[derive(Default)]
pub struct RowGroupHasher(Xxh3);

impl RowGroupHasher {
    pub fn add(&mut self, doc: &[u32]) {
        self.0.update(&(doc.len() as u32).to_le_bytes());
        // Tokens are hashed as little-endian bytes; chunked to avoid a copy per document.
        let mut buf = [0u8; 4096];
        for chunk in doc.chunks(1024) {
            for (i, t) in chunk.iter().enumerate() {
                buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
            }
            self.0.update(&buf[..chunk.len() * 4]);
        }
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0.digest())
    }
}

/// Writes one shard file; row groups are cut at `row_group_tokens`.
pub struct ShardWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
    row_group_tokens: u64,
    values: Vec<u32>,
    offsets: Vec<i32>,
    sources: Vec<String>,
    hashes: Vec<u64>,
    hasher: RowGroupHasher,
    row_groups: Vec<RowGroupInfo>,
}

impl ShardWriter {
    pub fn create(
        path: &Path,
        domain: &str,
        split: Split,
        tokenizer_sha256: &str,
        row_group_tokens: u64,
    ) -> Result<ShardWriter> {
        let file = File::create(path).map_err(|e| DataError::io("create", path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(1).expect("valid zstd level"),
            ))
            .set_key_value_metadata(Some(vec![
                KeyValue::new("sigma.format_version".into(), FORMAT_VERSION.to_string()),
                KeyValue::new("sigma.domain".into(), domain.to_string()),
                KeyValue::new("sigma.split".into(), split.name().to_string()),
                KeyValue::new(
                    "sigma.tokenizer_sha256".into(),
                    tokenizer_sha256.to_string(),
                ),
            ]))
            .build();
        let writer = ArrowWriter::try_new(file, schema(), Some(props))
            .map_err(|e| DataError::shard(path.display().to_string(), e))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            writer,
            row_group_tokens,
            values: Vec::new(),
            offsets: vec![0],
            sources: Vec::new(),
            hashes: Vec::new(),
            hasher: RowGroupHasher::default(),
            row_groups: Vec::new(),
        })
    }

    pub fn add(&mut self, tokens: &[u32], source: &str, doc_hash: u64) -> Result<()> {
        self.hasher.add(tokens);
        self.values.extend_from_slice(tokens);
        self.offsets.push(self.values.len() as i32);
        self.sources.push(source.to_string());
        self.hashes.push(doc_hash);
        if self.values.len() as u64 >= self.row_group_tokens
            || self.values.len() > (i32::MAX as usize) / 2
        {
            self.flush_row_group()?;
        }
        Ok(())
    }

    /// Bytes written so far (approximate: excludes the open row group).
    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes_written() as u64
    }

    fn flush_row_group(&mut self) -> Result<()> {
        if self.sources.is_empty() {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| DataError::shard(self.path.display().to_string(), e);
        let values = UInt32Array::from(std::mem::take(&mut self.values));
        let offsets = OffsetBuffer::new(ScalarBuffer::from(std::mem::replace(
            &mut self.offsets,
            vec![0],
        )));
        let list = ListArray::new(
            Arc::new(Field::new("item", DataType::UInt32, false)),
            offsets,
            Arc::new(values),
            None,
        );
        let docs = list.len() as u64;
        let tokens = list.values().len() as u64;
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(list),
                Arc::new(StringArray::from(std::mem::take(&mut self.sources))),
                Arc::new(UInt64Array::from(std::mem::take(&mut self.hashes))),
            ],
        )
        .map_err(|e| err(&e))?;
        self.writer.write(&batch).map_err(|e| err(&e))?;
        self.writer.flush().map_err(|e| err(&e))?;
        let h = std::mem::take(&mut self.hasher);
        self.row_groups.push(RowGroupInfo {
            documents: docs,
            tokens,
            xxh3: h.hex(),
        });
        Ok(())
    }

    /// Finish the file and fsync it; returns its row groups.
    pub fn finish(mut self) -> Result<Vec<RowGroupInfo>> {
        self.flush_row_group()?;
        let path = self.path.clone();
        let file = self
            .writer
            .into_inner()
            .map_err(|e| DataError::shard(path.display().to_string(), e))?;
        file.sync_all()
            .map_err(|e| DataError::io("sync", &path, e))?;
        Ok(self.row_groups)
    }
}

/// Tokens of one decoded row group: document `i` is `tokens[offsets[i]..offsets[i+1]]`.
#[derive(Debug, Default)]
pub struct RowGroupTokens {
    pub tokens: Vec<u32>,
    pub offsets: Vec<u32>,
}

impl RowGroupTokens {
    pub fn num_docs(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
    pub fn doc(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// An opened shard: its footer is read once, row groups on demand with ranged reads.
pub struct ShardReader {
    pub loc: Location,
    meta: ArrowReaderMetadata,
    size: u64,
}

impl ShardReader {
    pub async fn open(loc: Location) -> Result<ShardReader> {
        let size = loc.size().await?.ok_or_else(|| {
            DataError::shard(
                &loc.url,
                "missing: the manifest lists it but the file does not exist",
            )
        })?;
        let mut reader =
            ParquetObjectReader::new(loc.store(), loc.object_path().clone()).with_file_size(size);
        let meta = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
            .await
            .map_err(|e| {
                DataError::shard(&loc.url, format!("not a readable Parquet shard: {e}"))
            })?;
        let fields = meta.schema().fields();
        if fields.is_empty() || fields[0].name() != "tokens" {
            return Err(DataError::shard(
                &loc.url,
                "no `tokens` column: not a sigma shard",
            ));
        }
        Ok(ShardReader { loc, meta, size })
    }

    pub fn num_row_groups(&self) -> usize {
        self.meta.metadata().num_row_groups()
    }

    pub fn file_size(&self) -> u64 {
        self.size
    }

    /// Key-value metadata of the file.
    pub fn key_value(&self, key: &str) -> Option<String> {
        let kv = self.meta.metadata().file_metadata().key_value_metadata()?;
        kv.iter()
            .find(|k| k.key == key)
            .and_then(|k| k.value.clone())
    }

    /// Open a shard the manifest `m` lists as `s` and check, from the footer
    /// only (no data pages are read), that it is the file the manifest
    /// describes: its size, row groups and rows per row group, and the
    /// format version, domain, split and tokenizer recorded in the file.
    pub async fn open_checked(loc: Location, m: &Manifest, s: &ShardInfo) -> Result<ShardReader> {
        let r = ShardReader::open(loc).await?;
        r.check_against(m, s)?;
        Ok(r)
    }

    fn check_against(&self, m: &Manifest, s: &ShardInfo) -> Result<()> {
        let bad = |what: String| {
            Err(DataError::shard(
                &self.loc.url,
                format!("{what}; the shard or the manifest was changed after `sigma data prepare` wrote them (prepare the data again)"),
            ))
        };
        if self.size != s.bytes {
            return bad(format!(
                "{} bytes, the manifest records {}",
                self.size, s.bytes
            ));
        }
        if self.num_row_groups() != s.row_groups.len() {
            return bad(format!(
                "{} row groups, the manifest records {}",
                self.num_row_groups(),
                s.row_groups.len()
            ));
        }
        for (i, g) in s.row_groups.iter().enumerate() {
            let rows = self.meta.metadata().row_group(i).num_rows();
            if u64::try_from(rows).ok() != Some(g.documents) {
                return bad(format!(
                    "row group {i} holds {rows} documents, the manifest records {}",
                    g.documents
                ));
            }
        }
        let expect = [
            (
                "sigma.format_version",
                FORMAT_VERSION.to_string(),
                "format version",
            ),
            ("sigma.domain", m.domain.clone(), "domain"),
            ("sigma.split", s.split.name().to_string(), "split"),
            (
                "sigma.tokenizer_sha256",
                m.tokenizer.sha256.clone(),
                "tokenizer sha256",
            ),
        ];
        for (key, want, what) in expect {
            match self.key_value(key) {
                Some(v) if v != want => {
                    return bad(format!(
                        "{what} {v:?} recorded in the file, the manifest says {want:?}"
                    ))
                }
                // Shards written before sigma recorded the split do not have it.
                None if key != "sigma.split" => {
                    return bad(format!(
                        "no {what} recorded in the file (`{key}`): not a sigma shard"
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Decode row group `rg` and check it against the manifest's counts and checksum.
    pub async fn read_row_group(&self, rg: usize, expect: &RowGroupInfo) -> Result<RowGroupTokens> {
        let batches = self.decode_row_group(rg).await?;
        let out = self.collect_tokens(&batches)?;
        self.check_row_group(rg, &out, expect)?;
        Ok(out)
    }

    /// The record batches of row group `rg`, `tokens` column only.
    async fn decode_row_group(&self, rg: usize) -> Result<Vec<RecordBatch>> {
        let url = &self.loc.url;
        if rg >= self.num_row_groups() {
            return Err(DataError::shard(
                url,
                format!(
                    "has {} row groups, the manifest expects at least {}",
                    self.num_row_groups(),
                    rg + 1
                ),
            ));
        }
        let rows = self.meta.metadata().row_group(rg).num_rows() as usize;
        let reader = ParquetObjectReader::new(self.loc.store(), self.loc.object_path().clone())
            .with_file_size(self.size);
        let mask = ProjectionMask::roots(self.meta.parquet_schema(), [0]);
        let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, self.meta.clone())
            .with_row_groups(vec![rg])
            .with_projection(mask)
            .with_batch_size(rows.max(1))
            .build()
            .map_err(|e| DataError::shard(url, format!("row group {rg} cannot be read: {e}")))?;
        stream
            .try_collect()
            .await
            .map_err(|e| DataError::shard(url, format!("row group {rg} is unreadable: {e}")))
    }

    /// The documents of decoded batches as one token buffer with offsets.
    fn collect_tokens(&self, batches: &[RecordBatch]) -> Result<RowGroupTokens> {
        let url = &self.loc.url;
        // Sized by the decoded data, not by the manifest's count (checked after).
        let mut out = RowGroupTokens {
            tokens: Vec::new(),
            offsets: vec![0],
        };
        for b in batches {
            let list = b
                .column(0)
                .as_any()
                .downcast_ref::<ListArray>()
                .ok_or_else(|| {
                    DataError::shard(url, "column `tokens` is not a list: not a sigma shard")
                })?;
            let values = list
                .values()
                .as_any()
                .downcast_ref::<UInt32Array>()
                .ok_or_else(|| {
                    DataError::shard(
                        url,
                        "column `tokens` does not hold uint32: not a sigma shard",
                    )
                })?;
            let offs = list.value_offsets();
            let (first, last) = (offs[0] as usize, offs[offs.len() - 1] as usize);
            let base = out.tokens.len();
            if base + (last - first) > MAX_ROW_GROUP_TOKENS as usize {
                return Err(DataError::shard(url, format!("a row group holds more than {MAX_ROW_GROUP_TOKENS} tokens: not a sigma shard")));
            }
            out.tokens.reserve_exact(last - first);
            out.tokens.extend_from_slice(&values.values()[first..last]);
            out.offsets.extend(
                offs[1..]
                    .iter()
                    .map(|&o| (base + (o as usize - first)) as u32),
            );
        }
        Ok(out)
    }

    /// Counts and xxh3 of a decoded row group against the manifest's record.
    fn check_row_group(
        &self,
        rg: usize,
        out: &RowGroupTokens,
        expect: &RowGroupInfo,
    ) -> Result<()> {
        let url = &self.loc.url;
        let mut h = RowGroupHasher::default();
        for i in 0..out.num_docs() {
            h.add(out.doc(i));
        }
        let counts_differ =
            out.num_docs() as u64 != expect.documents || out.tokens.len() as u64 != expect.tokens;
        if counts_differ && h.hex() == expect.xxh3 {
            // The data still hashes to the recorded checksum: the counts are what changed.
            return Err(DataError::manifest(
                url,
                format!(
                    "row group {rg}: the manifest records {} documents and {} tokens, but the shard holds {} and {} (its checksum matches the manifest, so the manifest's counts were edited); prepare the data again",
                    expect.documents,
                    expect.tokens,
                    out.num_docs(),
                    out.tokens.len()
                ),
            ));
        }
        if counts_differ || h.hex() != expect.xxh3 {
            return Err(DataError::Checksum {
                url: url.clone(),
                what: format!("row group {rg}"),
                expected: format!(
                    "{} documents, {} tokens, xxh3 {}",
                    expect.documents, expect.tokens, expect.xxh3
                ),
                found: format!(
                    "{} documents, {} tokens, xxh3 {}",
                    out.num_docs(),
                    out.tokens.len(),
                    h.hex()
                ),
            });
        }
        Ok(())
    }
}
