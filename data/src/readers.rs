//! Readers for raw text: plain files (one document per file), JSONL (a string
//! field, `text` by default; `.gz` and `.zst` too) and Parquet (a string column,
//! `text` by default, as in FineWeb/DCLM dumps). Format is chosen by extension.

use std::io::Read;

use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{DataError, Result};
use crate::store::Location;

/// One raw document and where it came from (`file:line`, `file:row` or `file`).
#[derive(Clone, Debug)]
pub struct Document {
    pub text: String,
    pub source: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
    Parquet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Decide format and compression from a file name.
pub fn detect(name: &str) -> (Format, Compression) {
    let (stem, comp) = if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".zst") {
        (s, Compression::Zstd)
    } else {
        (name, Compression::None)
    };
    let format = if stem.ends_with(".parquet") {
        Format::Parquet
    } else if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") || stem.ends_with(".json") {
        Format::Jsonl
    } else {
        Format::Text
    };
    (format, comp)
}

/// MiB one input file may hold once decompressed, unless `SIGMA_MAX_INPUT_MIB` says otherwise.
pub const DEFAULT_MAX_INPUT_MIB: u64 = 16 << 10;

/// The most bytes one input file may hold once decompressed.
fn max_input_bytes() -> Result<u64> {
    let mib = crate::env::number(
        crate::env::MAX_INPUT_MIB,
        DEFAULT_MAX_INPUT_MIB,
        (1, 1 << 30),
    )?;
    Ok(mib << 20)
}

/// The file's bytes, decompressed, at most `limit` of them: a file that
/// holds more (a decompression bomb, or a file to split) is an error naming
/// it and the limit, found after reading `limit + 1` bytes, never more.
fn decompress(url: &str, raw: Bytes, comp: Compression, limit: u64) -> Result<Vec<u8>> {
    let too_big = |what: &str| {
        DataError::input(
            url,
            format!(
                "{what} more than {} MiB, the most one input file may hold (SIGMA_MAX_INPUT_MIB): split the file, or raise the limit",
                limit >> 20
            ),
        )
    };
    let mut out = Vec::new();
    let r = match comp {
        Compression::None => {
            if raw.len() as u64 > limit {
                return Err(too_big("holds"));
            }
            return Ok(raw.to_vec());
        }
        Compression::Gzip => flate2::read::MultiGzDecoder::new(&raw[..])
            .take(limit + 1)
            .read_to_end(&mut out),
        Compression::Zstd => zstd::stream::read::Decoder::new(&raw[..])
            .and_then(|d| d.take(limit + 1).read_to_end(&mut out)),
    };
    r.map_err(|e| DataError::input(url, format!("cannot decompress ({comp:?}): {e}")))?;
    if out.len() as u64 > limit {
        return Err(too_big(&format!("decompresses ({comp:?}) to")));
    }
    Ok(out)
}

/// Read every document of one input file, calling `emit` for each non-empty one.
/// Returns the number of documents emitted.
pub async fn read_file(
    file: &Location,
    text_field: &str,
    emit: &mut (dyn FnMut(Document) -> Result<()> + Send),
) -> Result<u64> {
    let (format, comp) = detect(&file.file_name());
    let limit = max_input_bytes()?;
    let raw = file.get().await?;
    let url = file.url.as_str();
    match format {
        Format::Parquet => {
            if comp != Compression::None {
                return Err(DataError::input(url, "compressed Parquet files are not supported; Parquet compresses its pages itself"));
            }
            if raw.len() as u64 > limit {
                return Err(DataError::input(url, format!("holds more than {} MiB, the most one input file may hold (SIGMA_MAX_INPUT_MIB): split the file, or raise the limit", limit >> 20)));
            }
            read_parquet(url, raw, text_field, emit)
        }
        Format::Jsonl => read_jsonl(url, &decompress(url, raw, comp, limit)?, text_field, emit),
        Format::Text => {
            let bytes = decompress(url, raw, comp, limit)?;
            let text = String::from_utf8(bytes).map_err(|e| {
                DataError::input(
                    url,
                    format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
                )
            })?;
            if text.trim().is_empty() {
                return Ok(0);
            }
            emit(Document {
                text,
                source: url.to_string(),
            })?;
            Ok(1)
        }
    }
}

fn read_jsonl(
    url: &str,
    data: &[u8],
    field: &str,
    emit: &mut (dyn FnMut(Document) -> Result<()> + Send),
) -> Result<u64> {
    let mut n = 0;
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let lineno = i + 1;
        let line = std::str::from_utf8(line).map_err(|e| {
            DataError::input(
                format!("{url}:{lineno}"),
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            DataError::input(format!("{url}:{lineno}"), format!("not valid JSON: {e}"))
        })?;
        let text = match v.get(field) {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(DataError::input(
                    format!("{url}:{lineno}"),
                    format!(
                        "field `{field}` is {} , expected a string",
                        json_kind(other)
                    ),
                ))
            }
            None => {
                return Err(DataError::input(
                    format!("{url}:{lineno}"),
                    format!(
                        "no field `{field}` in this JSON object (choose another with --text-field)"
                    ),
                ))
            }
        };
        if text.is_empty() {
            continue;
        }
        emit(Document {
            text: text.clone(),
            source: format!("{url}:{lineno}"),
        })?;
        n += 1;
    }
    Ok(n)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_parquet(
    url: &str,
    raw: Bytes,
    column: &str,
    emit: &mut (dyn FnMut(Document) -> Result<()> + Send),
) -> Result<u64> {
    let corrupt = |e: &dyn std::fmt::Display| {
        DataError::input(url, format!("not a readable Parquet file: {e}"))
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(raw).map_err(|e| corrupt(&e))?;
    let schema = builder.parquet_schema();
    let idx = (0..schema.num_columns())
        .find(|&i| schema.column(i).path().string() == column)
        .ok_or_else(|| {
            let names: Vec<String> = (0..schema.num_columns())
                .map(|i| schema.column(i).path().string())
                .collect();
            DataError::input(
                url,
                format!(
                    "no column `{column}` (columns: {}); choose one with --text-field",
                    names.join(", ")
                ),
            )
        })?;
    let mask = ProjectionMask::leaves(schema, [idx]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(|e| corrupt(&e))?;
    let mut row = 0u64;
    let mut n = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(&e))?;
        let col = batch.column(0);
        let mut each = |i: usize, s: Option<&str>| -> Result<()> {
            if let Some(s) = s.filter(|s| !s.is_empty()) {
                emit(Document {
                    text: s.to_string(),
                    source: format!("{url}:{}", row + i as u64),
                })?;
                n += 1;
            }
            Ok(())
        };
        if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
            for i in 0..a.len() {
                each(i, a.is_valid(i).then(|| a.value(i)))?;
            }
        } else if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
            for i in 0..a.len() {
                each(i, a.is_valid(i).then(|| a.value(i)))?;
            }
        } else if let Some(a) = col.as_any().downcast_ref::<StringViewArray>() {
            for i in 0..a.len() {
                each(i, a.is_valid(i).then(|| a.value(i)))?;
            }
        } else {
            return Err(DataError::input(
                url,
                format!(
                    "column `{column}` has type {}, expected a string column",
                    col.data_type()
                ),
            ));
        }
        row += batch.num_rows() as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        assert_eq!(detect("a.jsonl.zst"), (Format::Jsonl, Compression::Zstd));
        assert_eq!(detect("a.json.gz"), (Format::Jsonl, Compression::Gzip));
        assert_eq!(detect("x.parquet"), (Format::Parquet, Compression::None));
        assert_eq!(detect("README"), (Format::Text, Compression::None));
        assert_eq!(detect("a.txt.gz"), (Format::Text, Compression::Gzip));
    }

    #[test]
    fn jsonl_errors_name_file_line_and_field() {
        let mut sink = |_d: Document| Ok(());
        let e = read_jsonl(
            "f.jsonl",
            b"{\"text\":\"a\"}\n{\"body\":\"b\"}\n",
            "text",
            &mut sink,
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("f.jsonl:2") && m.contains("`text`"), "{m}");
        let e = read_jsonl("f.jsonl", b"{\"text\":\"\xff\"}\n", "text", &mut sink).unwrap_err();
        assert!(e.to_string().contains("invalid UTF-8"), "{e}");
    }
}
