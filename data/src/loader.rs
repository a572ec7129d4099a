//! The dataset (manifests + streams + mixer) and the prefetching loader.
//!
//! Global batch `b` is global samples `[b*G, (b+1)*G)`; data-parallel rank `r`
//! of `dp` reads the contiguous slice `[b*G + r*G/dp, b*G + (r+1)*G/dp)`. The
//! resume state is the consumed-sample count, so a run resumed with another
//! `dp` (same `G`) reads the same global stream.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::DataConfig;
use crate::error::{DataError, Result};
use crate::manifest::{Manifest, Split, TokenizerInfo, TOKENIZER_FILE};
use crate::mixer::{Cursor, Mixer};
use crate::shard::ShardReader;
use crate::store::{block_on, Location};
use crate::stream::{DomainStream, RowGroupRef, ShardHandle};
use crate::tokenizer::Tokenizer;

/// Everything needed to resume the data stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    pub consumed_samples: u64,
    /// Mixture stage of the next sample (derivable; kept for logs and checks).
    pub stage: usize,
}

/// One sample: `seq_len + 1` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub index: u64,
    pub domain: u16,
    pub tokens: Vec<u32>,
    pub doc_starts: Vec<u32>,
}

/// A rank's share of one global batch. `tokens` is row-major `[rows, seq_len + 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub tokens: Vec<u32>,
    /// Domain index (into `Dataset::domains`) of each row.
    pub domains: Vec<u16>,
    /// Row `i`'s document starts are `doc_starts[doc_start_offsets[i]..doc_start_offsets[i+1]]`.
    pub doc_starts: Vec<u32>,
    pub doc_start_offsets: Vec<usize>,
    /// Global sample index of each row.
    pub sample_indices: Vec<u64>,
    /// The state after this global batch.
    pub state: DataState,
}

impl Batch {
    pub fn row(&self, i: usize) -> &[u32] {
        let w = self.seq_len + 1;
        &self.tokens[i * w..(i + 1) * w]
    }
    pub fn row_doc_starts(&self, i: usize) -> &[u32] {
        &self.doc_starts[self.doc_start_offsets[i]..self.doc_start_offsets[i + 1]]
    }
}

pub struct Source {
    pub manifest_url: String,
    pub domain: String,
    pub manifest: Manifest,
    pub dir: Location,
}

pub struct Dataset {
    pub config: DataConfig,
    pub mixer: Mixer,
    pub domains: Vec<String>,
    pub sources: Vec<Source>,
    pub tokenizer: TokenizerInfo,
    train: Vec<Arc<DomainStream>>,
    valid: Vec<Arc<DomainStream>>,
}

/// Shard footers read at once when a dataset is opened (remote stores: requests in flight).
const OPEN_CONCURRENCY: usize = 32;

impl Dataset {
    /// Read the manifests of all sources, validate the config against them,
    /// and check every shard a stream will read against its manifest from the
    /// file's footer (present, size, row groups, domain, split, tokenizer),
    /// so a missing, truncated or foreign shard is refused here rather than
    /// at the first batch that reaches it.
    pub async fn open(config: &DataConfig) -> Result<Dataset> {
        config.validate()?;
        let sources = load_sources(config).await?;
        let tokenizer = common_tokenizer(&sources)?;
        if let Some(t) = &config.tokenizer {
            check_config_tokenizer(t, &tokenizer, &sources[0].manifest_url).await?;
        }
        let source_domains: Vec<String> = sources.iter().map(|s| s.domain.clone()).collect();
        let stages = config.stages(&source_domains)?;
        let domains = config.domains();
        let shards = open_shards(&sources, &domains).await?;
        let (train, valid) = build_streams(config, &domains, &sources, &shards, tokenizer.eos_id);
        for (i, d) in domains.iter().enumerate() {
            let used = stages.iter().any(|s| s.weights[i] > 0.0);
            if used && train[i].epoch_tokens() <= config.seq_len as u64 {
                return Err(DataError::config(
                    format!("data.mixture.{d}"),
                    format!("domain `{d}` has only {} training tokens, fewer than one sample of seq_len {}", train[i].epoch_tokens(), config.seq_len),
                ));
            }
        }
        Ok(Dataset {
            mixer: Mixer::new(domains.clone(), stages, config.seq_len),
            config: config.clone(),
            domains,
            sources,
            tokenizer,
            train,
            valid,
        })
    }

    pub fn open_blocking(config: &DataConfig) -> Result<Arc<Dataset>> {
        block_on(Dataset::open(config)).map(Arc::new)
    }

    pub fn seq_len(&self) -> usize {
        self.config.seq_len
    }

    /// The tokenizer.json stored next to the first source's shards.
    pub fn tokenizer_url(&self) -> String {
        self.sources[0].dir.join(TOKENIZER_FILE).url
    }

    /// That tokenizer, checked against the sha256 its manifest records.
    pub fn load_tokenizer(&self) -> Result<Tokenizer> {
        let s = &self.sources[0];
        block_on(Tokenizer::load_verified(
            &s.dir.join(&s.manifest.tokenizer.file).url,
            &self.tokenizer.sha256,
            &format!("the manifest of {}", s.manifest_url),
        ))
    }

    /// Training tokens per domain per epoch (EOS included).
    pub fn epoch_tokens(&self, domain: usize) -> u64 {
        self.train[domain].epoch_tokens()
    }

    /// Read domain sample `j` of `domain` (training stream).
    pub async fn domain_sample(
        &self,
        domain: usize,
        j: u64,
        out: &mut Vec<u32>,
        doc_starts: &mut Vec<u32>,
    ) -> Result<()> {
        let l = self.config.seq_len;
        self.train[domain]
            .read(j * l as u64, l + 1, out, doc_starts)
            .await
    }

    /// Number of validation samples of a domain.
    pub fn num_valid_samples(&self, domain: usize) -> u64 {
        self.valid[domain]
            .num_samples(self.config.seq_len)
            .unwrap_or(0)
    }

    /// Validation sample `j` of `domain` (documents in manifest order, no shuffle).
    pub async fn valid_sample(&self, domain: usize, j: u64) -> Result<Sample> {
        let l = self.config.seq_len;
        let mut s = Sample {
            index: j,
            domain: domain as u16,
            tokens: Vec::with_capacity(l + 1),
            doc_starts: Vec::new(),
        };
        self.valid[domain]
            .read(j * l as u64, l + 1, &mut s.tokens, &mut s.doc_starts)
            .await?;
        Ok(s)
    }

    /// Global sample `index` (replays the mixer from the start; for previews and tests).
    pub async fn sample(&self, index: u64) -> Result<Sample> {
        let mut c = self.mixer.seek(index);
        self.next_sample(&mut c).await
    }

    /// The sample at the cursor, which moves on by one (walking a cursor reads
    /// consecutive samples without replaying the mixer for each).
    pub async fn next_sample(&self, c: &mut Cursor) -> Result<Sample> {
        let index = c.index;
        let (d, j) = self.mixer.next(c);
        let mut s = Sample {
            index,
            domain: d as u16,
            tokens: Vec::with_capacity(self.config.seq_len + 1),
            doc_starts: Vec::new(),
        };
        self.domain_sample(d, j, &mut s.tokens, &mut s.doc_starts)
            .await?;
        Ok(s)
    }
}

/// The manifest of every source; one prepared directory may be listed once.
async fn load_sources(config: &DataConfig) -> Result<Vec<Source>> {
    let mut sources: Vec<Source> = Vec::new();
    for (i, s) in config.sources.iter().enumerate() {
        let field = format!("data.sources[{i}].manifest");
        let (manifest, dir) = Manifest::load(&s.manifest)
            .await
            .map_err(|e| DataError::config(&field, e.to_string()))?;
        let key = |l: &Location| {
            l.local_path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| l.url.clone())
        };
        if let Some(j) = sources.iter().position(|o| key(&o.dir) == key(&dir)) {
            return Err(DataError::config(
                field,
                format!("{} is the directory of data.sources[{j}] ({}); a source listed twice would be read twice as often", s.manifest, sources[j].manifest_url),
            ));
        }
        let domain = s.domain.clone().unwrap_or_else(|| manifest.domain.clone());
        sources.push(Source {
            manifest_url: s.manifest.clone(),
            domain,
            manifest,
            dir,
        });
    }
    Ok(sources)
}

/// The tokenizer all sources were prepared with (they must agree).
fn common_tokenizer(sources: &[Source]) -> Result<TokenizerInfo> {
    let first = sources
        .first()
        .ok_or_else(|| DataError::config("data.sources", "no sources"))?;
    let tokenizer = first.manifest.tokenizer.clone();
    for s in &sources[1..] {
        if s.manifest.tokenizer.sha256 != tokenizer.sha256 {
            return Err(DataError::config(
                "data.sources",
                format!(
                    "{} was tokenized with a different tokenizer (sha256 {}) than {} ({}); prepare all sources with one tokenizer",
                    s.manifest_url, &s.manifest.tokenizer.sha256[..12], first.manifest_url, &tokenizer.sha256[..12]
                ),
            ));
        }
    }
    Ok(tokenizer)
}

/// `data.tokenizer`, when given, must be the tokenizer that prepared the shards.
async fn check_config_tokenizer(
    t: &str,
    tokenizer: &TokenizerInfo,
    first_source: &str,
) -> Result<()> {
    let tok = Tokenizer::load_async(t)
        .await
        .map_err(|e| DataError::config("data.tokenizer", e.to_string()))?;
    if tok.vocab_size != tokenizer.vocab_size {
        return Err(DataError::config(
            "data.tokenizer",
            format!(
                "{t} has a vocabulary of {} tokens but {first_source} was prepared with {} tokens; use the tokenizer the shards were prepared with",
                tok.vocab_size, tokenizer.vocab_size
            ),
        ));
    }
    if tok.sha256 != tokenizer.sha256 {
        return Err(DataError::config(
            "data.tokenizer",
            format!(
                "{t} (sha256 {}) differs from the tokenizer that prepared {first_source} ({})",
                &tok.sha256[..12],
                &tokenizer.sha256[..12]
            ),
        ));
    }
    Ok(())
}

/// Every shard of the sources that feed `domains`, opened and checked against
/// its manifest (footer reads only). Indexed like `sources[i].manifest.shards[j]`;
/// `None` for the shards of sources no mixture uses.
async fn open_shards(
    sources: &[Source],
    domains: &[String],
) -> Result<Vec<Vec<Option<Arc<ShardHandle>>>>> {
    use futures::StreamExt;
    let jobs = sources.iter().enumerate().flat_map(|(i, s)| {
        let used = domains.contains(&s.domain);
        s.manifest
            .shards
            .iter()
            .enumerate()
            .map(move |(j, sh)| (i, j, used, s, sh))
    });
    let opened: Vec<_> = futures::stream::iter(jobs)
        .map(|(i, j, used, s, sh)| async move {
            if !used {
                return Ok((i, j, None));
            }
            let r = ShardReader::open_checked(s.dir.join(&sh.file), &s.manifest, sh)
                .await
                .map_err(|e| {
                    DataError::config(format!("data.sources[{i}].manifest"), e.to_string())
                })?;
            Ok::<_, DataError>((i, j, Some(ShardHandle::opened(r))))
        })
        .buffered(OPEN_CONCURRENCY)
        .collect()
        .await;
    let mut out: Vec<Vec<Option<Arc<ShardHandle>>>> = sources
        .iter()
        .map(|s| vec![None; s.manifest.shards.len()])
        .collect();
    for r in opened {
        let (i, j, h) = r?;
        out[i][j] = h;
    }
    Ok(out)
}

/// The training and validation stream of each domain, from its sources' row groups.
fn build_streams(
    config: &DataConfig,
    domains: &[String],
    sources: &[Source],
    shards: &[Vec<Option<Arc<ShardHandle>>>],
    eos: u32,
) -> (Vec<Arc<DomainStream>>, Vec<Arc<DomainStream>>) {
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for d in domains {
        for (split, out) in [(Split::Train, &mut train), (Split::Valid, &mut valid)] {
            let mut groups = Vec::new();
            for (i, s) in sources.iter().enumerate().filter(|(_, s)| &s.domain == d) {
                for (j, sh) in s.manifest.shards.iter().enumerate() {
                    if sh.split != split {
                        continue;
                    }
                    let handle = shards[i][j]
                        .clone()
                        .unwrap_or_else(|| ShardHandle::new(s.dir.join(&sh.file)));
                    for (k, rg) in sh.row_groups.iter().enumerate() {
                        groups.push(RowGroupRef {
                            shard: handle.clone(),
                            index: k,
                            info: rg.clone(),
                        });
                    }
                }
            }
            out.push(DomainStream::new(
                d,
                groups,
                config.seed,
                config.shuffle_window,
                eos,
                split == Split::Train,
            ));
        }
    }
    (train, valid)
}

/// Most tokens one rank's batch may hold (16 GiB of ids).
pub const MAX_BATCH_TOKENS: u64 = 1 << 32;

#[derive(Clone, Copy, Debug)]
pub struct LoaderOptions {
    pub global_batch: usize,
    pub dp_rank: usize,
    pub dp_size: usize,
    pub start: DataState,
}

/// Prefetching loader for one data-parallel rank. Batches are produced on a
/// dedicated thread running a single-threaded tokio runtime and handed over
/// through a bounded queue of `data.prefetch_batches`.
pub struct Loader {
    rx: tokio::sync::mpsc::Receiver<Result<Batch>>,
    thread: Option<std::thread::JoinHandle<()>>,
    state: DataState,
}

impl Loader {
    pub fn new(ds: Arc<Dataset>, opts: LoaderOptions) -> Result<Loader> {
        let LoaderOptions {
            global_batch: g,
            dp_rank,
            dp_size,
            start,
        } = opts;
        if dp_size == 0 || dp_rank >= dp_size {
            return Err(DataError::config(
                "parallel.dp",
                format!("rank {dp_rank} is not in 0..{dp_size}"),
            ));
        }
        if g == 0 || g % dp_size != 0 {
            return Err(DataError::config(
                "global batch",
                format!("{g} samples cannot be split evenly over {dp_size} data-parallel ranks"),
            ));
        }
        let per_rank_tokens = (g / dp_size).checked_mul(ds.config.seq_len + 1);
        if per_rank_tokens.is_none_or(|t| t as u64 > MAX_BATCH_TOKENS) {
            return Err(DataError::config(
                "global batch",
                format!(
                    "{} samples of {} tokens per rank is more than the {MAX_BATCH_TOKENS} tokens a batch may hold in memory; use a smaller batch or data.seq_len",
                    g / dp_size,
                    ds.config.seq_len + 1
                ),
            ));
        }
        if start.consumed_samples % g as u64 != 0 {
            return Err(DataError::config(
                "resume",
                format!(
                    "consumed samples {} is not a multiple of the global batch {g}",
                    start.consumed_samples
                ),
            ));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(ds.config.prefetch_batches);
        let thread = std::thread::Builder::new()
            .name(format!("sigma-loader-{dp_rank}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(DataError::Other(format!(
                            "cannot start the loader runtime: {e}"
                        ))));
                        return;
                    }
                };
                rt.block_on(produce(ds, g, dp_rank, dp_size, start, tx));
            })
            .map_err(|e| DataError::Other(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader {
            rx,
            thread: Some(thread),
            state: start,
        })
    }

    /// The next batch of this rank (blocks until it is ready).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let b = self
            .rx
            .blocking_recv()
            .ok_or_else(|| DataError::Other("the loader thread stopped".into()))??;
        self.state = b.state;
        Ok(b)
    }

    /// State after the last batch returned (what a checkpoint stores).
    pub fn state(&self) -> DataState {
        self.state
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn produce(
    ds: Arc<Dataset>,
    g: usize,
    rank: usize,
    dp: usize,
    start: DataState,
    tx: tokio::sync::mpsc::Sender<Result<Batch>>,
) {
    let mut cursor = ds.mixer.seek(start.consumed_samples);
    let per_rank = g / dp;
    let l = ds.config.seq_len;
    loop {
        let mut b = Batch {
            rows: per_rank,
            seq_len: l,
            tokens: Vec::with_capacity(per_rank * (l + 1)),
            domains: Vec::with_capacity(per_rank),
            doc_starts: Vec::new(),
            doc_start_offsets: vec![0],
            sample_indices: Vec::with_capacity(per_rank),
            state: DataState::default(),
        };
        let mut result = Ok(());
        for k in 0..g {
            let index = cursor.index;
            let (d, j) = ds.mixer.next(&mut cursor);
            if k / per_rank != rank {
                continue;
            }
            if let Err(e) = ds
                .domain_sample(d, j, &mut b.tokens, &mut b.doc_starts)
                .await
            {
                result = Err(e);
                break;
            }
            b.domains.push(d as u16);
            b.sample_indices.push(index);
            b.doc_start_offsets.push(b.doc_starts.len());
        }
        // The stage of the next sample.
        let mut peek = cursor.clone();
        ds.mixer.next(&mut peek);
        b.state = DataState {
            consumed_samples: cursor.index,
            stage: peek.stage,
        };
        let failed = result.is_err();
        if tx.send(result.map(|_| b)).await.is_err() || failed {
            return;
        }
    }
}
