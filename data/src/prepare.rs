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
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{DataError, Result};
use crate::fsutil::sha256_file;
use crate::manifest::{
    valid_domain_name, Manifest, ShardInfo, Split, TokenizerInfo, FORMAT, FORMAT_VERSION,
    MANIFEST_FILE, TOKENIZER_FILE,
};
use crate::readers::{read_file, Document};
use crate::shard::ShardWriter;
use crate::store::{block_on, expand_inputs, Location};
use crate::tokenizer::Tokenizer;

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
    if !valid_domain_name(domain) {
        return Err(DataError::flag(
            "--domain",
            format!("{domain:?} is not a valid domain name (use letters, digits, '-' and '_')"),
        ));
    }
    Ok(())
}

/// Bounds of the size flags of `data prepare`, checked before anything is read or written.
pub const MAX_ROW_GROUP_TOKENS: u64 = 1 << 24;
pub const MAX_SHARD_TOKENS: u64 = 1 << 34;
pub const MAX_THREADS: usize = 1024;

/// Every option on its own, before any input is read or output touched.
fn check_options(opts: &PrepareOptions) -> Result<()> {
    check_domain_name(&opts.domain)?;
    if !(0.0..1.0).contains(&opts.valid_fraction) {
        return Err(DataError::flag(
            "--valid-fraction",
            format!("must be in [0, 1), got {}", opts.valid_fraction),
        ));
    }
    // The split is decided in millionths: a fraction that rounds to none or
    // to all of them would silently give no validation or no training data.
    let cut = (opts.valid_fraction * 1_000_000.0).round();
    if (opts.valid_fraction > 0.0 && cut == 0.0) || cut >= 1_000_000.0 {
        return Err(DataError::flag(
            "--valid-fraction",
            format!("{} rounds to {} at the split's resolution of 0.000001; use 0 for no validation split, or a fraction from 0.000001 to 0.999999", opts.valid_fraction, if cut == 0.0 { "0" } else { "1" }),
        ));
    }
    if opts.text_field.is_empty() {
        return Err(DataError::flag(
            "--text-field",
            "empty: name the JSON field or Parquet column that holds the text",
        ));
    }
    let sizes = [
        (
            "--row-group-tokens",
            opts.row_group_tokens,
            MAX_ROW_GROUP_TOKENS,
            "a row group is decoded in memory whole, by the loader too",
        ),
        (
            "--shard-tokens",
            opts.shard_tokens,
            MAX_SHARD_TOKENS,
            "64 GiB of token ids per file",
        ),
        (
            "--threads",
            opts.threads as u64,
            MAX_THREADS as u64,
            "one tokenizer thread each",
        ),
    ];
    for (flag, v, max, why) in sizes {
        if v == 0 || v > max {
            return Err(DataError::flag(
                flag,
                format!("must be from 1 to {max} ({why}), got {v}"),
            ));
        }
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

/// The staging directory, removed when the run ends (emptied by a commit,
/// or holding what a failed run wrote), and the directories the run made
/// for its output, removed too if they are still empty: a refused or
/// failed run leaves no trace.
struct Staging {
    dir: PathBuf,
    /// Directories this run created, deepest first.
    created: Vec<PathBuf>,
}
impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        for d in &self.created {
            let _ = std::fs::remove_dir(d); // only when empty
        }
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
                self.split,
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
    check_options(opts)?;
    let start = Instant::now();
    let tok = Tokenizer::load(&opts.tokenizer)?;
    let files = block_on(expand_inputs(&opts.inputs))?;
    let input_bytes: u64 = files.iter().map(|f| f.1).sum();
    let out = Location::parse(&opts.output).map_err(|e| e.for_flag("--output"))?;
    let old = block_on(check_output(&out, opts.overwrite))?;
    let staging = Staging::create(&out)?;
    let (writers, text_bytes) = tokenize(opts, &tok, &files, &staging.dir, input_bytes)?;
    let manifest = describe(opts, &tok, &writers, &staging.dir)?;
    block_on(commit(&out, &staging.dir, &tok, &manifest, &old))?;
    Ok(PrepareReport {
        manifest,
        input_bytes,
        text_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What the output held before: whether it had a manifest, and that manifest
/// when it could be read (its shards are removed once the new data is in).
struct OldOutput {
    had_manifest: bool,
    manifest: Option<Manifest>,
}

/// prepare writes into an empty (or new) directory; into one that holds
/// anything else only with `--overwrite`. Nothing is written here.
async fn check_output(out: &Location, overwrite: bool) -> Result<OldOutput> {
    if let Some(p) = out.local_path() {
        match crate::fsutil::file_in_the_way(p) {
            Some(f) if f == p => {
                return Err(DataError::flag(
                    "--output",
                    format!("{} is a file; give a directory to prepare into", out.url),
                ))
            }
            Some(f) => {
                // Named as the user gave the output: as many components up from it.
                let up = p.components().count() - f.components().count();
                let given = std::path::Path::new(&out.url).ancestors().nth(up);
                let shown = given.map_or(f.display().to_string(), |g| g.display().to_string());
                return Err(DataError::flag(
                    "--output",
                    format!(
                        "{} is inside {shown}, which is not a directory; give a directory to prepare into",
                        out.url
                    ),
                ));
            }
            None => {}
        }
    }
    let manifest_loc = out.join(MANIFEST_FILE);
    let had_manifest = manifest_loc.size().await?.is_some();
    let first_entry = first_entry(out).await?;
    if !overwrite {
        if had_manifest {
            return Err(DataError::store(
                &out.url,
                "already holds prepared data (manifest.json); pass --overwrite to replace it",
            ));
        }
        if let Some(name) = first_entry {
            return Err(DataError::store(
                &out.url,
                format!("is not empty (it holds {name}); prepare writes into an empty directory: choose another --output, or pass --overwrite to write into it (files named like prepare's are replaced)"),
            ));
        }
    }
    // With --overwrite a manifest that cannot be read is replaced too; only
    // its shards cannot be cleaned up (they are not known).
    let manifest = if had_manifest {
        Manifest::load(&out.url).await.ok().map(|(m, _)| m)
    } else {
        None
    };
    Ok(OldOutput {
        had_manifest,
        manifest,
    })
}

/// The first thing inside `out` (by name), not counting staging directories
/// of earlier runs of prepare.
async fn first_entry(out: &Location) -> Result<Option<String>> {
    if let Some(p) = out.local_path() {
        if !p.is_dir() {
            return Ok(None);
        }
        let mut names: Vec<String> = std::fs::read_dir(p)
            .map_err(|e| DataError::io("list", p, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".staging-"))
            .collect();
        names.sort();
        return Ok(names.into_iter().next());
    }
    let prefix = format!("{}/", out.url);
    Ok(out
        .list()
        .await?
        .into_iter()
        .map(|(l, _)| l.url.strip_prefix(&prefix).unwrap_or(&l.url).to_string())
        .next())
}

impl Staging {
    /// A private directory for the shards being written: inside the output
    /// directory when it is local (same file system, so the final move is a
    /// rename), else in the system temp directory.
    fn create(out: &Location) -> Result<Staging> {
        let mut created = Vec::new();
        let parent = match out.local_path() {
            Some(p) => {
                let mut missing = Some(p);
                while let Some(d) = missing.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                    created.push(d.to_path_buf());
                    missing = d.parent();
                }
                crate::fsutil::create_dir_all(p)?;
                remove_stale_staging(p);
                p.to_path_buf()
            }
            None => std::env::temp_dir(),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!(".staging-{}-{}", std::process::id(), nanos));
        let staging = Staging { dir, created };
        crate::fsutil::create_dir_all(&staging.dir)?;
        Ok(staging)
    }
}

/// Batches of documents from the reader thread (or the error that stopped it).
type DocBatches = Receiver<Result<Vec<Document>>>;

/// Read the inputs on a thread, in batches of about 1 MiB of text.
fn spawn_reader(
    files: Vec<(Location, u64)>,
    text_field: String,
    bar: ProgressBar,
    threads: usize,
) -> Result<(DocBatches, std::thread::JoinHandle<()>)> {
    let (tx, rx) = sync_channel::<Result<Vec<Document>>>(threads * 2 + 2);
    let reader = std::thread::Builder::new()
        .name("sigma-read".into())
        .spawn(move || {
            let mut batch = Vec::new();
            let mut batch_bytes = 0usize;
            for (file, size) in &files {
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
                    return;
                }
                bar.inc(*size);
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch));
            }
        })
        .map_err(|e| DataError::Other(format!("cannot start the reader thread: {e}")))?;
    Ok((rx, reader))
}

/// Tokenize every document (a pool of `opts.threads`, order kept) into shards
/// in `staging`; returns the closed writers and the bytes of text read.
fn tokenize(
    opts: &PrepareOptions,
    tok: &Tokenizer,
    files: &[(Location, u64)],
    staging: &Path,
    input_bytes: u64,
) -> Result<([SplitWriter; 2], u64)> {
    let bar = progress_bar(opts.progress, input_bytes);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .thread_name(|i| format!("sigma-tok-{i}"))
        .build()
        .map_err(|e| {
            DataError::Other(format!(
                "cannot start {} tokenizer threads (--threads): {e}",
                opts.threads
            ))
        })?;
    let (rx, reader) = spawn_reader(
        files.to_vec(),
        opts.text_field.clone(),
        bar.clone(),
        opts.threads,
    )?;
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
            w.add(staging, opts, &tok.sha256, &ids, &d.source, hash)?;
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
    Ok((writers, text_bytes))
}

/// The manifest of the shards in `staging` (sizes and sha256 read back from the files).
fn describe(
    opts: &PrepareOptions,
    tok: &Tokenizer,
    writers: &[SplitWriter],
    staging: &Path,
) -> Result<Manifest> {
    let mut shards = Vec::new();
    for w in writers {
        for (file, documents, tokens, row_groups) in &w.done {
            let (bytes, sha256) = sha256_file(&staging.join(file))?;
            shards.push(ShardInfo {
                file: file.clone(),
                split: w.split,
                bytes,
                sha256,
                documents: *documents,
                tokens: *tokens,
                row_groups: row_groups.clone(),
            });
        }
    }
    Ok(Manifest {
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
    })
}

/// Old manifest out, shards in, tokenizer.json, the manifest last; then the
/// old shards the new manifest does not list.
async fn commit(
    out: &Location,
    staging: &Path,
    tok: &Tokenizer,
    manifest: &Manifest,
    old: &OldOutput,
) -> Result<()> {
    let manifest_loc = out.join(MANIFEST_FILE);
    if old.had_manifest {
        manifest_loc.delete().await?;
    }
    for s in &manifest.shards {
        out.join(&s.file).put_file(&staging.join(&s.file)).await?;
    }
    out.join(TOKENIZER_FILE)
        .put_atomic(tok.json.clone())
        .await?;
    manifest_loc.put_atomic(manifest.to_json().into()).await?;
    if let Some(old) = &old.manifest {
        for s in old
            .shards
            .iter()
            .filter(|s| !manifest.shards.iter().any(|n| n.file == s.file))
        {
            out.join(&s.file).delete().await?;
        }
    }
    Ok(())
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
