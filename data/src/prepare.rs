//! `sigma data prepare`: raw text -> tokenized Parquet shards + manifest.
//!
//! Pipeline: a reader thread streams documents in batches; a rayon pool of
//! `threads` workers tokenizes each batch (order preserved, so the output does
//! not depend on the thread count); the main thread splits train/valid by
//! document hash and writes shards into a private staging directory. Commit
//! order: old manifest removed (if overwriting), shards moved/uploaded into
//! place, tokenizer.json copied, manifest written last. A run that fails or is
//! killed therefore never leaves a manifest pointing at missing or partial shards.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{DataError, Result};
use crate::manifest::{
    Manifest, ShardInfo, Split, TokenizerInfo, FORMAT, FORMAT_VERSION, MANIFEST_FILE,
    TOKENIZER_FILE,
};
use crate::readers::{read_file, Document};
use crate::shard::ShardWriter;
use crate::store::{block_on, expand_inputs, Location};
use crate::tokenizer::{sha256_hex, Tokenizer};

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub inputs: Vec<String>,
    pub domain: String,
    pub tokenizer: String,
    pub output: String,
    pub text_field: String,
    /// Fraction of documents (by hash) that go to the validation split.
    pub valid_fraction: f64,
    pub row_group_tokens: u64,
    /// A shard is closed once it holds this many tokens.
    pub shard_tokens: u64,
    pub threads: usize,
    pub overwrite: bool,
    pub progress: bool,
}

impl PrepareOptions {
    pub fn new(inputs: Vec<String>, domain: &str, tokenizer: &str, output: &str) -> Self {
        PrepareOptions {
            inputs,
            domain: domain.into(),
            tokenizer: tokenizer.into(),
            output: output.into(),
            text_field: "text".into(),
            valid_fraction: 0.01,
            row_group_tokens: 1 << 18,
            shard_tokens: 1 << 27,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            overwrite: false,
            progress: false,
        }
    }
}

#[derive(Debug)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub input_bytes: u64,
    pub text_bytes: u64,
    pub seconds: f64,
}

impl PrepareReport {
    pub fn tokens(&self) -> u64 {
        self.manifest.shards.iter().map(|s| s.tokens).sum()
    }
    pub fn documents(&self) -> u64 {
        self.manifest.shards.iter().map(|s| s.documents).sum()
    }
}

pub fn check_domain_name(domain: &str) -> Result<()> {
    if domain.is_empty()
        || !domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(DataError::config(
            "--domain",
            format!("{domain:?} is not a valid domain name (use letters, digits, '-' and '_')"),
        ));
    }
    Ok(())
}

/// Which split a document goes to: a pure function of its text.
pub fn split_of(doc_hash: u64, valid_fraction: f64) -> Split {
    let cut = (valid_fraction * 1_000_000.0).round() as u64;
    if doc_hash % 1_000_000 < cut {
        Split::Valid
    } else {
        Split::Train
    }
}

/// Removes the staging directory unless the run committed.
struct Staging(PathBuf);
impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct SplitWriter {
    split: Split,
    next_index: usize,
    current: Option<(String, ShardWriter, u64, u64)>, // file, writer, docs, tokens
    done: Vec<(String, u64, u64, Vec<crate::manifest::RowGroupInfo>)>,
}

impl SplitWriter {
    fn new(split: Split) -> Self {
        SplitWriter {
            split,
            next_index: 0,
            current: None,
            done: Vec::new(),
        }
    }

    fn add(
        &mut self,
        dir: &Path,
        opts: &PrepareOptions,
        tok_sha: &str,
        tokens: &[u32],
        source: &str,
        hash: u64,
    ) -> Result<()> {
        if self.current.is_none() {
            let file = format!("{}-{:05}.parquet", self.split.name(), self.next_index);
            self.next_index += 1;
            let w = ShardWriter::create(
                &dir.join(&file),
                &opts.domain,
                tok_sha,
                opts.row_group_tokens,
            )?;
            self.current = Some((file, w, 0, 0));
        }
        let full = {
            let (_, w, docs, toks) = self.current.as_mut().expect("set above");
            w.add(tokens, source, hash)?;
            *docs += 1;
            *toks += tokens.len() as u64;
            *toks >= opts.shard_tokens
        };
        if full {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some((file, w, docs, toks)) = self.current.take() {
            let rgs = w.finish()?;
            self.done.push((file, docs, toks, rgs));
        }
        Ok(())
    }
}

pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    check_domain_name(&opts.domain)?;
    if !(0.0..1.0).contains(&opts.valid_fraction) {
        return Err(DataError::config(
            "--valid-fraction",
            format!("must be in [0, 1), got {}", opts.valid_fraction),
        ));
    }
    if opts.row_group_tokens == 0 || opts.shard_tokens == 0 || opts.threads == 0 {
        return Err(DataError::config(
            "prepare",
            "row-group tokens, shard tokens and threads must be positive",
        ));
    }
    let start = Instant::now();
    let tok = Tokenizer::load(&opts.tokenizer)?;
    let files = block_on(expand_inputs(&opts.inputs))?;
    let input_bytes: u64 = files.iter().map(|f| f.1).sum();
    let out = Location::parse(&opts.output)?;
    let manifest_loc = out.join(MANIFEST_FILE);
    let old = if block_on(manifest_loc.size())?.is_some() {
        if !opts.overwrite {
            return Err(DataError::store(
                &out.url,
                "already holds prepared data (manifest.json); pass --overwrite to replace it",
            ));
        }
        Some(block_on(Manifest::load(&out.url))?.0)
    } else {
        None
    };

    // Staging: inside the output directory when it is local (same file system, so
    // the final move is a rename), else in the system temp directory.
    let staging_parent = match out.local_path() {
        Some(p) => {
            std::fs::create_dir_all(p).map_err(|e| DataError::io("create directory", p, e))?;
            remove_stale_staging(p);
            p.to_path_buf()
        }
        None => std::env::temp_dir(),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let staging =
        Staging(staging_parent.join(format!(".staging-{}-{}", std::process::id(), nanos)));
    std::fs::create_dir_all(&staging.0)
        .map_err(|e| DataError::io("create directory", &staging.0, e))?;

    let bar = progress_bar(opts.progress, input_bytes);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .thread_name(|i| format!("sigma-tok-{i}"))
        .build()
        .map_err(|e| {
            DataError::Other(format!(
                "cannot start {} tokenizer threads: {e}",
                opts.threads
            ))
        })?;

    // Reader thread: documents in batches of ~1 MiB of text.
    let (tx, rx) = sync_channel::<Result<Vec<Document>>>(opts.threads * 2 + 2);
    let text_field = opts.text_field.clone();
    let reader_files = files.clone();
    let bar_r = bar.clone();
    let reader = std::thread::Builder::new()
        .name("sigma-read".into())
        .spawn(move || {
            let mut batch = Vec::new();
            let mut batch_bytes = 0usize;
            let mut sent_error = false;
            for (file, size) in &reader_files {
                let tx2 = tx.clone();
                let mut emit = |d: Document| -> Result<()> {
                    batch_bytes += d.text.len();
                    batch.push(d);
                    if batch_bytes >= 1 << 20 {
                        batch_bytes = 0;
                        tx2.send(Ok(std::mem::take(&mut batch)))
                            .map_err(|_| DataError::Other("cancelled".into()))?;
                    }
                    Ok(())
                };
                if let Err(e) = block_on(read_file(file, &text_field, &mut emit)) {
                    let _ = tx.send(Err(e));
                    sent_error = true;
                    break;
                }
                bar_r.inc(*size);
            }
            if !sent_error && !batch.is_empty() {
                let _ = tx.send(Ok(batch));
            }
        })
        .map_err(|e| DataError::Other(format!("cannot start the reader thread: {e}")))?;

    let mut writers = [
        SplitWriter::new(Split::Train),
        SplitWriter::new(Split::Valid),
    ];
    let (mut docs, mut tokens, mut text_bytes) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    for batch in rx {
        let batch = batch?;
        let encoded: Vec<Result<Vec<u32>>> =
            pool.install(|| batch.par_iter().map(|d| tok.encode(&d.text)).collect());
        for (d, ids) in batch.iter().zip(encoded) {
            let ids = ids.map_err(|e| DataError::input(&d.source, e.to_string()))?;
            let hash = xxh3_64(d.text.as_bytes());
            let w = &mut writers[split_of(hash, opts.valid_fraction) as usize];
            w.add(&staging.0, opts, &tok.sha256, &ids, &d.source, hash)?;
            docs += 1;
            tokens += ids.len() as u64;
            text_bytes += d.text.len() as u64;
        }
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{docs} docs ({:.0}/s), {tokens} tokens ({:.2}M/s)",
            docs as f64 / dt,
            tokens as f64 / dt / 1e6
        ));
    }
    reader
        .join()
        .map_err(|_| DataError::Other("the reader thread panicked".into()))?;
    if docs == 0 {
        return Err(DataError::EmptyInputs {
            inputs: opts.inputs.join(", "),
        });
    }
    for w in &mut writers {
        w.close()?;
    }
    bar.finish_and_clear();

    // Describe the shards.
    let mut shards = Vec::new();
    for w in &writers {
        for (file, documents, tokens, row_groups) in &w.done {
            let path = staging.0.join(file);
            let data = std::fs::read(&path).map_err(|e| DataError::io("read", &path, e))?;
            shards.push(ShardInfo {
                file: file.clone(),
                split: w.split,
                bytes: data.len() as u64,
                sha256: sha256_hex(&data),
                documents: *documents,
                tokens: *tokens,
                row_groups: row_groups.clone(),
            });
        }
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        domain: opts.domain.clone(),
        created_by: format!("sigma {}", env!("CARGO_PKG_VERSION")),
        tokenizer: TokenizerInfo {
            sha256: tok.sha256.clone(),
            vocab_size: tok.vocab_size,
            eos_id: tok.eos_id,
            bos_id: tok.bos_id,
            pad_id: tok.pad_id,
            file: TOKENIZER_FILE.into(),
        },
        inputs: opts.inputs.clone(),
        text_field: opts.text_field.clone(),
        valid_fraction: opts.valid_fraction,
        row_group_tokens: opts.row_group_tokens,
        skipped_documents: 0,
        shards,
    };

    // Commit.
    block_on(async {
        if old.is_some() {
            manifest_loc.delete().await?;
        }
        for s in &manifest.shards {
            out.join(&s.file).put_file(&staging.0.join(&s.file)).await?;
        }
        out.join(TOKENIZER_FILE)
            .put_atomic(tok.json.clone())
            .await?;
        manifest_loc.put_atomic(manifest.to_json().into()).await?;
        if let Some(old) = &old {
            for s in old
                .shards
                .iter()
                .filter(|s| !manifest.shards.iter().any(|n| n.file == s.file))
            {
                out.join(&s.file).delete().await?;
            }
        }
        Ok::<(), DataError>(())
    })?;
    Ok(PrepareReport {
        manifest,
        input_bytes,
        text_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn remove_stale_staging(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            // Only staging directories of processes that are gone.
            if let Some(pid) = name
                .strip_prefix(".staging-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            {
                if !Path::new(&format!("/proc/{pid}")).exists() || pid == std::process::id() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

pub(crate) fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {msg} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}
