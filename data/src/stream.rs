//! One domain's endless token stream.
//!
//! The training documents of a domain (all its sources, in config order) form
//! a list of row groups. Epoch `e` permutes that list with a seed derived from
//! (`seed`, domain name, `e`), cuts it into windows of `shuffle_window` row
//! groups, and permutes the documents inside each window with their own seed.
//! Each document is followed by EOS, and the documents of epoch 0, 1, 2, ... are
//! concatenated into one stream. Domain sample `j` is the `seq_len + 1` tokens
//! starting at stream position `j * seq_len`, so neighbouring samples share
//! one token, the last target of one being the first input of the next.
//! With `shuffle_window` at least the number of row groups, the per-epoch
//! document order is a uniform permutation; smaller windows bound memory and
//! keep reads sequential (see docs/data-format.md). Validation streams are the
//! valid documents in manifest order, one pass, no shuffle.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::{DataError, Result};
use crate::manifest::RowGroupInfo;
use crate::rng::{derive_seed, permutation};
use crate::shard::{RowGroupTokens, ShardReader};
use crate::store::Location;

/// A shard opened on first use (its footer is read once).
pub struct ShardHandle {
    pub loc: Location,
    reader: tokio::sync::OnceCell<ShardReader>,
}

impl ShardHandle {
    pub fn new(loc: Location) -> Arc<ShardHandle> {
        Arc::new(ShardHandle {
            loc,
            reader: tokio::sync::OnceCell::new(),
        })
    }
    /// A shard whose footer was already read (and checked) when the dataset was opened.
    pub fn opened(reader: ShardReader) -> Arc<ShardHandle> {
        Arc::new(ShardHandle {
            loc: reader.loc.clone(),
            reader: tokio::sync::OnceCell::new_with(Some(reader)),
        })
    }
    pub async fn reader(&self) -> Result<&ShardReader> {
        self.reader
            .get_or_try_init(|| ShardReader::open(self.loc.clone()))
            .await
    }
}

#[derive(Clone)]
pub struct RowGroupRef {
    pub shard: Arc<ShardHandle>,
    pub index: usize,
    pub info: RowGroupInfo,
}

impl RowGroupRef {
    async fn load(&self) -> Result<Arc<RowGroupTokens>> {
        let r = self.shard.reader().await?;
        Ok(Arc::new(r.read_row_group(self.index, &self.info).await?))
    }
    /// Stream tokens of this row group: its tokens plus one EOS per document.
    fn stream_tokens(&self) -> u64 {
        self.info.tokens + self.info.documents
    }
}

struct EpochLayout {
    order: Vec<u32>,
    /// Stream offset (within the epoch) where each window starts; one extra entry at the end.
    window_starts: Vec<u64>,
}

struct Window {
    groups: Vec<Arc<RowGroupTokens>>,
    /// (group, document) in stream order.
    docs: Vec<(u32, u32)>,
    /// Offset within the window where each document starts; one extra entry at the end.
    starts: Vec<u64>,
}

type WindowCell = Arc<tokio::sync::OnceCell<Arc<Window>>>;

pub struct DomainStream {
    pub name: String,
    seed: u64,
    shuffle: bool,
    repeat: bool,
    window: usize,
    eos: u32,
    groups: Vec<RowGroupRef>,
    epoch_tokens: u64,
    layouts: Mutex<BTreeMap<u64, Arc<EpochLayout>>>,
    windows: Mutex<BTreeMap<(u64, usize), WindowCell>>,
}

const KEEP_WINDOWS: usize = 4;

impl DomainStream {
    /// `repeat`/`shuffle`: true for training streams, false for validation.
    pub fn new(
        name: &str,
        groups: Vec<RowGroupRef>,
        seed: u64,
        window: usize,
        eos: u32,
        train: bool,
    ) -> Arc<DomainStream> {
        let epoch_tokens = groups.iter().map(|g| g.stream_tokens()).sum();
        Arc::new(DomainStream {
            name: name.to_string(),
            seed,
            shuffle: train,
            repeat: train,
            window: window.max(1),
            eos,
            groups,
            epoch_tokens,
            layouts: Mutex::new(BTreeMap::new()),
            windows: Mutex::new(BTreeMap::new()),
        })
    }

    /// Tokens in one epoch, EOS tokens included.
    pub fn epoch_tokens(&self) -> u64 {
        self.epoch_tokens
    }

    /// Samples available in a one-pass stream (validation); None for endless streams.
    pub fn num_samples(&self, seq_len: usize) -> Option<u64> {
        if self.repeat {
            return None;
        }
        Some(if self.epoch_tokens > seq_len as u64 {
            (self.epoch_tokens - 1) / seq_len as u64
        } else {
            0
        })
    }

    fn layout(&self, epoch: u64) -> Arc<EpochLayout> {
        let mut layouts = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = layouts.get(&epoch) {
            return l.clone();
        }
        let order: Vec<u32> = if self.shuffle {
            permutation(
                self.groups.len(),
                derive_seed(
                    self.seed,
                    &[self.name.as_bytes(), b"row-groups", &epoch.to_le_bytes()],
                ),
            )
        } else {
            (0..self.groups.len() as u32).collect()
        };
        let mut window_starts = vec![0u64];
        for chunk in order.chunks(self.window) {
            let t: u64 = chunk
                .iter()
                .map(|&g| self.groups[g as usize].stream_tokens())
                .sum();
            window_starts.push(window_starts.last().copied().unwrap_or(0) + t);
        }
        let l = Arc::new(EpochLayout {
            order,
            window_starts,
        });
        layouts.insert(epoch, l.clone());
        while layouts.len() > 2 {
            let first = *layouts.keys().next().expect("non-empty");
            layouts.remove(&first);
        }
        l
    }

    async fn build_window(&self, epoch: u64, w: usize) -> Result<Arc<Window>> {
        let layout = self.layout(epoch);
        let ids = &layout.order[w * self.window..((w + 1) * self.window).min(layout.order.len())];
        let groups =
            futures::future::try_join_all(ids.iter().map(|&g| self.groups[g as usize].load()))
                .await?;
        let mut docs: Vec<(u32, u32)> = groups
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| (0..g.num_docs() as u32).map(move |d| (gi as u32, d)))
            .collect();
        if self.shuffle {
            let seed = derive_seed(
                self.seed,
                &[
                    self.name.as_bytes(),
                    b"documents",
                    &epoch.to_le_bytes(),
                    &(w as u64).to_le_bytes(),
                ],
            );
            crate::rng::shuffle(&mut docs, seed);
        }
        let mut starts = Vec::with_capacity(docs.len() + 1);
        let mut at = 0u64;
        for &(g, d) in &docs {
            starts.push(at);
            at += groups[g as usize].doc(d as usize).len() as u64 + 1;
        }
        starts.push(at);
        Ok(Arc::new(Window {
            groups,
            docs,
            starts,
        }))
    }

    fn window_cell(&self, epoch: u64, w: usize) -> WindowCell {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let cell = windows.entry((epoch, w)).or_default().clone();
        while windows.len() > KEEP_WINDOWS {
            let first = *windows.keys().next().expect("non-empty");
            if first == (epoch, w) {
                break;
            }
            windows.remove(&first);
        }
        cell
    }

    async fn window(self: &Arc<Self>, epoch: u64, w: usize) -> Result<Arc<Window>> {
        let cell = self.window_cell(epoch, w);
        let fresh = !cell.initialized();
        let win = cell
            .get_or_try_init(|| self.build_window(epoch, w))
            .await?
            .clone();
        if fresh {
            // Start reading the next window in the background.
            let layout = self.layout(epoch);
            let next = if w + 2 < layout.window_starts.len() {
                Some((epoch, w + 1))
            } else if self.repeat {
                Some((epoch + 1, 0))
            } else {
                None
            };
            if let Some((e, nw)) = next {
                let me = self.clone();
                tokio::spawn(async move {
                    let cell = me.window_cell(e, nw);
                    let _ = cell.get_or_try_init(|| me.build_window(e, nw)).await;
                });
            }
        }
        Ok(win)
    }

    /// Append `len` tokens starting at stream position `pos` to `out`; push to
    /// `doc_starts` the offsets (relative to `pos`) where a document begins.
    pub async fn read(
        self: &Arc<Self>,
        pos: u64,
        len: usize,
        out: &mut Vec<u32>,
        doc_starts: &mut Vec<u32>,
    ) -> Result<()> {
        if self.epoch_tokens == 0 {
            return Err(DataError::Other(format!(
                "domain `{}` has no training tokens",
                self.name
            )));
        }
        let mut p = pos;
        let end = pos + len as u64;
        while p < end {
            let epoch = p / self.epoch_tokens;
            if !self.repeat && epoch > 0 {
                return Err(DataError::Other(format!(
                    "read past the end of the one-pass stream of domain `{}`",
                    self.name
                )));
            }
            let off = p % self.epoch_tokens;
            let layout = self.layout(epoch);
            let w = layout.window_starts.partition_point(|&s| s <= off) - 1;
            let win = self.window(epoch, w).await?;
            let woff = off - layout.window_starts[w];
            let mut di = win.starts.partition_point(|&s| s <= woff) - 1;
            let mut o = (woff - win.starts[di]) as usize;
            // Copy documents from this window until done or the window ends.
            while p < end && di < win.docs.len() {
                let (g, d) = win.docs[di];
                let doc = win.groups[g as usize].doc(d as usize);
                if o == 0 {
                    doc_starts.push((p - pos) as u32);
                }
                let want = (end - p) as usize;
                let from_doc = doc.len().saturating_sub(o).min(want);
                out.extend_from_slice(&doc[o.min(doc.len())..o.min(doc.len()) + from_doc]);
                p += from_doc as u64;
                o += from_doc;
                if p < end && o == doc.len() {
                    out.push(self.eos);
                    p += 1;
                    o += 1;
                }
                if o > doc.len() {
                    di += 1;
                    o = 0;
                }
            }
        }
        Ok(())
    }
}
