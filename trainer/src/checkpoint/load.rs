//! Loading: find a committed checkpoint, check it (marker, format, every
//! file's size, the xxh3 of every piece read, the model's tensor shapes
//! against the config), and assemble any flat range of this rank's three
//! buffers from the pieces that cover it. The saved layout does not matter:
//! each parameter's block (its tensor-parallel share, or the whole tensor)
//! is assembled from whichever pieces of whichever shards overlap it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::safetensors::{hash_file, Reader};
use super::*;
use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::model::params::Params;
use crate::optim::AdamW;

fn err(dir: &Path, m: impl std::fmt::Display) -> TrainError {
    TrainError::BadCheckpoint {
        dir: dir.display().to_string(),
        message: m.to_string(),
    }
}

/// `--resume auto`: the newest committed checkpoint under `root` (None: start
/// fresh). `--resume PATH`: that checkpoint, which must be committed.
pub fn resolve(spec: &str, root: &Path) -> Result<Option<PathBuf>> {
    if spec == "auto" {
        return Ok(latest(root).map(|(_, p)| p));
    }
    Ok(Some(PathBuf::from(spec)))
}

/// The step a checkpoint says it holds, three times: its directory's name
/// (`step-NNNNNNN`, when it has that form), its commit marker and its
/// metadata. They must agree: a disagreement is a copied, renamed or edited
/// checkpoint, whose step would be trusted wrongly.
fn check_step(dir: &Path, meta: &Metadata) -> Result<()> {
    let step = meta.progress.step;
    let named = dir
        .file_name()
        .and_then(|n| crate::checkpoint::parse_step_dir(&n.to_string_lossy()));
    if let Some(n) = named.filter(|&n| n != step) {
        return Err(err(
            dir,
            format!("its name says step {n} but metadata.json says step {step}: renamed or edited; rename it or use the checkpoint it was"),
        ));
    }
    let marker = std::fs::read(dir.join(MARKER)).map_err(|e| err(dir, format!("{MARKER}: {e}")))?;
    let marked = serde_json::from_slice::<serde_json::Value>(&marker)
        .ok()
        .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
    match marked {
        Some(m) if m == step => Ok(()),
        Some(m) => Err(err(
            dir,
            format!("its {MARKER} marker says step {m} but metadata.json says step {step}: edited or mixed up"),
        )),
        None => Err(err(
            dir,
            format!("its {MARKER} marker is not the one a save writes ({{\"step\": N}})"),
        )),
    }
}

/// The saved layout agrees with itself and with the files: every axis has
/// a rank, ZeRO is 0 or 1, and the files are one shard per rank of the
/// job (`shard-R-of-W`, W the ranks of the layout) and at most the
/// tokenizer. Readers take each tensor by its recorded pieces, so an
/// edited layout would otherwise pass unnoticed.
fn check_layout(dir: &Path, meta: &Metadata) -> Result<()> {
    let l = &meta.layout;
    let bad = |m: String| err(dir, format!("metadata.json: {m} (edited or damaged)"));
    for (axis, n) in [("dp", l.dp), ("cp", l.cp), ("tp", l.tp), ("pp", l.pp)] {
        if n == 0 {
            return Err(bad(format!(
                "layout.{axis} is 0; every axis has at least one rank"
            )));
        }
    }
    if l.zero > 1 {
        return Err(bad(format!("layout.zero is {}; it is 0 or 1", l.zero)));
    }
    let world = [l.cp, l.tp, l.pp]
        .iter()
        .try_fold(l.dp, |w, &n| w.checked_mul(n))
        .ok_or_else(|| bad("layout's ranks overflow".into()))?;
    let ranks = format!(
        "layout dp {} x cp {} x tp {} x pp {} = {world} rank(s)",
        l.dp, l.cp, l.tp, l.pp
    );
    let shards: Vec<&String> = meta.files.keys().filter(|f| *f != TOKENIZER).collect();
    // Every name a rank's of this layout (each distinct: a map's keys) ...
    let mine =
        |f: &str| parse_shard(f).is_some_and(|r| r < world && f == shard_file_name(r, world));
    if let Some(f) = shards.iter().find(|f| !mine(f)) {
        return Err(bad(format!(
            "file {f} is not a shard of its {ranks} (shard-R-of-{world:05}.safetensors, R below {world})"
        )));
    }
    // ... and as many as ranks: every rank's file.
    if shards.len() != world {
        return Err(bad(format!(
            "its {ranks}, but it lists {} shard file(s)",
            shards.len()
        )));
    }
    Ok(())
}

/// The rank of a shard file's name (`shard-R-of-W.safetensors`).
fn parse_shard(name: &str) -> Option<usize> {
    name.strip_prefix("shard-")?
        .split_once("-of-")?
        .0
        .parse()
        .ok()
}

/// An opened, verified checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: Metadata,
    readers: HashMap<String, Reader>,
}

impl Checkpoint {
    /// Open `dir`: the marker must be there, the metadata readable, and every
    /// file present with the size the metadata records.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(err(dir, "no such directory"));
        }
        if !dir.join(MARKER).is_file() {
            return Err(err(
                dir,
                format!(
                    "not committed (no {MARKER} marker): an interrupted save, not a checkpoint"
                ),
            ));
        }
        let meta = Metadata::read(dir)?;
        check_step(dir, &meta)?;
        check_layout(dir, &meta)?;
        for (name, f) in &meta.files {
            let p = dir.join(name);
            let len = std::fs::metadata(&p)
                .map_err(|e| err(dir, format!("{name}: {e}")))?
                .len();
            if len != f.bytes {
                return Err(err(
                    dir,
                    format!(
                        "{name} has {len} bytes, metadata.json records {} (truncated?)",
                        f.bytes
                    ),
                ));
            }
        }
        for (t, e) in &meta.tensors {
            if let Some(p) = e.pieces.iter().find(|p| !meta.files.contains_key(&p.file)) {
                return Err(err(
                    dir,
                    format!("tensor {t}: piece in unknown file {}", p.file),
                ));
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            meta,
            readers: HashMap::new(),
        })
    }

    /// Hash every file against the metadata.
    pub fn verify_all(&self) -> Result<()> {
        for name in self.meta.files.keys() {
            self.verify(name)?;
        }
        Ok(())
    }

    /// Hash file `name` against the metadata.
    pub fn verify(&self, name: &str) -> Result<()> {
        let f = &self.meta.files[name];
        let (_, h) = hash_file(&self.dir.join(name))?;
        if format!("{h:016x}") != f.xxh3 {
            return Err(err(
                &self.dir,
                format!(
                    "{name}: checksum mismatch (xxh3 {h:016x} on disk, {} in metadata.json): the file is corrupt",
                    f.xxh3
                ),
            ));
        }
        Ok(())
    }

    /// A whole logical tensor, in its shape.
    pub fn read(&mut self, name: &str) -> Result<Tensor> {
        let shape = self
            .meta
            .tensors
            .get(name)
            .ok_or_else(|| err(&self.dir, format!("no tensor {name}")))?
            .shape
            .clone();
        let whole: Vec<(i64, i64)> = shape.iter().map(|&n| (0, n)).collect();
        Ok(PieceReader {
            dir: &self.dir,
            meta: &self.meta,
            readers: &mut self.readers,
        }
        .read_block(name, &whole)?
        .view(shape.as_slice()))
    }

    /// Flat range `[start, start + len)` of `buffer`, laid out like `params`.
    /// Parameters are read by several threads, each with its own file
    /// handles, writing disjoint parts of the result.
    pub fn read_flat(
        &mut self,
        buffer: &str,
        params: &Params,
        start: i64,
        len: i64,
    ) -> Result<Tensor> {
        let out = Tensor::zeros([len], (Kind::Float, tch::Device::Cpu));
        // (tensor name, this rank's block of it, range in the block, position in `out`), largest first.
        type Item = (String, Vec<(i64, i64)>, i64, i64, i64);
        let mut items: Vec<Item> = Vec::new();
        for (id, r) in params.overlapping(start..start + len) {
            let (spec, off) = (params.spec(id), params.offsets[id.0]);
            items.push((
                tensor_name(buffer, &spec.name()),
                spec.block.clone(),
                r.start - off,
                r.end - off,
                r.start - start,
            ));
        }
        items.sort_by_key(|it| std::cmp::Reverse(it.3 - it.2));
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        // Deal the items greedily to the least loaded worker.
        let mut groups: Vec<(i64, Vec<Item>)> = vec![(0, Vec::new()); threads];
        for it in items {
            let g = groups.iter_mut().min_by_key(|g| g.0).expect("a worker");
            g.0 += it.3 - it.2;
            g.1.push(it);
        }
        let (dir, meta) = (&self.dir, &self.meta);
        std::thread::scope(|scope| {
            let workers: Vec<_> = groups
                .into_iter()
                .map(|(_, group)| {
                    let out = out.shallow_clone();
                    // libtorch failures in the worker come back as errors (guard.rs).
                    scope.spawn(move || {
                        crate::guard::catch(|| -> Result<()> {
                            let mut readers = HashMap::new();
                            let mut r = PieceReader {
                                dir,
                                meta,
                                readers: &mut readers,
                            };
                            for (name, block, a, b, pos) in group {
                                let part = r.read_part(&name, &block, a, b)?;
                                out.narrow(0, pos, b - a).copy_(&part);
                            }
                            Ok(())
                        })
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().map_err(|_| {
                        TrainError::internal_state("a checkpoint reader thread panicked")
                    })?
                })
                .collect::<Result<Vec<()>>>()
        })?;
        Ok(out)
    }

    /// The model must have exactly the checkpoint's tensors, in the same
    /// (whole) shapes, whatever part of it this rank holds.
    pub fn check_model(&self, model: &ModelConfig) -> Result<()> {
        let mut expected = BTreeMap::new();
        for s in &crate::model::params::whole_specs(model) {
            for b in BUFFERS {
                expected.insert(tensor_name(b, &s.name()), s.global_shape.clone());
            }
        }
        for (name, shape) in &expected {
            match self.meta.tensors.get(name) {
                None => {
                    return Err(err(
                        &self.dir,
                        format!("has no tensor {name}, which the configured model needs: the [model] section differs from the checkpoint's"),
                    ))
                }
                Some(e) if &e.shape != shape => {
                    return Err(err(
                        &self.dir,
                        format!(
                            "tensor {name} has shape {:?} in the checkpoint but {shape:?} in the configured model{}",
                            e.shape,
                            model_diff(&self.meta.config)
                        ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(extra) = self
            .meta
            .tensors
            .keys()
            .find(|k| !expected.contains_key(*k))
        {
            return Err(err(
                &self.dir,
                format!("tensor {extra} is not part of the configured model"),
            ));
        }
        Ok(())
    }

    /// Load weights and optimizer state into this rank's buffers: all
    /// weights, and the moments of the range the optimizer keeps (its ZeRO-1
    /// shard, or everything).
    pub fn restore(
        &mut self,
        model: &ModelConfig,
        params: &Params,
        optim: &mut AdamW,
    ) -> Result<()> {
        self.check_model(model)?;
        let n = params.numel();
        let w = self.read_flat(BUFFERS[0], params, 0, n)?;
        let (start, len) = match optim.shard {
            Some(s) => owned_range(n, s.world, s.rank),
            None => (0, n),
        };
        let m = self.read_flat(BUFFERS[1], params, start, len)?;
        let v = self.read_flat(BUFFERS[2], params, start, len)?;
        tch::no_grad(|| {
            params.flat.shallow_clone().copy_(&w);
            let _ = optim.exp_avg.zero_();
            let _ = optim.exp_avg_sq.zero_();
            optim.exp_avg.narrow(0, 0, len).copy_(&m);
            optim.exp_avg_sq.narrow(0, 0, len).copy_(&v);
        });
        optim.steps = self.meta.optimizer.adam_steps;
        Ok(())
    }
}

/// Reads pieces of logical tensors through its own open files.
struct PieceReader<'a> {
    dir: &'a Path,
    meta: &'a Metadata,
    readers: &'a mut HashMap<String, Reader>,
}

impl PieceReader<'_> {
    /// A file's reader (its header checked against its length).
    fn reader(&mut self, file: &str) -> Result<&mut Reader> {
        if !self.readers.contains_key(file) {
            let r = Reader::open(&self.dir.join(file))?;
            self.readers.insert(file.to_string(), r);
        }
        Ok(self.readers.get_mut(file).expect("reader"))
    }

    /// A whole piece of tensor `name`, checked against its checksum.
    fn read_piece(&mut self, name: &str, p: &Piece) -> Result<Tensor> {
        let (buf, kind) = self.reader(&p.file)?.read_bytes(name, 0, p.end - p.start)?;
        let h = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&buf));
        if h != p.xxh3 {
            return Err(err(
                self.dir,
                format!(
                    "{}: checksum mismatch in {name} (xxh3 {h} on disk, {} in metadata.json): the file is corrupt",
                    p.file, p.xxh3
                ),
            ));
        }
        Ok(Tensor::from_data_size(&buf, &[p.end - p.start], kind))
    }

    /// Elements `[a, b)` of block `block` of tensor `name`, flattened (1-D, CPU).
    fn read_part(&mut self, name: &str, block: &[(i64, i64)], a: i64, b: i64) -> Result<Tensor> {
        let e = self
            .meta
            .tensors
            .get(name)
            .ok_or_else(|| err(self.dir, format!("no tensor {name}")))?;
        let whole_block = block
            .iter()
            .zip(&e.shape)
            .all(|(&(o, l), &n)| o == 0 && l == n);
        if whole_block && e.pieces.iter().all(|p| p.block.is_none()) {
            return self.read_range(name, a, b);
        }
        Ok(self.read_block(name, block)?.narrow(0, a, b - a))
    }

    /// Block `want` ((offset, length) per dimension) of tensor `name`,
    /// flattened (1-D, CPU), assembled from every piece that overlaps it.
    fn read_block(&mut self, name: &str, want: &[(i64, i64)]) -> Result<Tensor> {
        let e = self
            .meta
            .tensors
            .get(name)
            .ok_or_else(|| err(self.dir, format!("no tensor {name}")))?
            .clone();
        let shape = e.shape.clone();
        let whole: Vec<(i64, i64)> = shape.iter().map(|&n| (0, n)).collect();
        let view = |t: &Tensor, blk: &[(i64, i64)]| {
            let mut v = t.shallow_clone();
            for (d, &(o, l)) in blk.iter().enumerate() {
                v = v.narrow(d as i64, o, l);
            }
            v
        };
        let overlaps = |blk: &[(i64, i64)]| {
            blk.iter()
                .zip(want)
                .all(|(&(o, l), &(wo, wl))| o < wo + wl && wo < o + l)
        };
        let opts = (Kind::Float, tch::Device::Cpu);
        let global = Tensor::zeros(shape.as_slice(), opts);
        let filled = Tensor::zeros(shape.as_slice(), (Kind::Bool, tch::Device::Cpu));
        // Pieces of one block go into a staging buffer of that block first.
        type Staged = (Vec<(i64, i64)>, Tensor, Tensor); // block, values, filled
        let mut staged: Vec<Staged> = Vec::new();
        for p in &e.pieces {
            let blk = p.block.clone().unwrap_or_else(|| whole.clone());
            if !overlaps(&blk) {
                continue;
            }
            let data = self.read_piece(name, p)?.to_kind(Kind::Float);
            let i = match staged.iter().position(|(b, _, _)| *b == blk) {
                Some(i) => i,
                None => {
                    let n: i64 = blk.iter().map(|&(_, l)| l).product();
                    staged.push((
                        blk.clone(),
                        Tensor::zeros([n], opts),
                        Tensor::zeros([n], (Kind::Bool, tch::Device::Cpu)),
                    ));
                    staged.len() - 1
                }
            };
            let (_, buf, mask) = &staged[i];
            buf.narrow(0, p.start, p.end - p.start).copy_(&data);
            let _ = mask.narrow(0, p.start, p.end - p.start).fill_(1);
        }
        for (blk, buf, mask) in &staged {
            let dims: Vec<i64> = blk.iter().map(|&(_, l)| l).collect();
            view(&global, blk).copy_(&buf.view(dims.as_slice()));
            view(&filled, blk).copy_(&mask.view(dims.as_slice()));
        }
        if !bool::try_from(view(&filled, want).all()).unwrap_or(false) {
            return Err(err(
                self.dir,
                format!("tensor {name}: block {want:?} is not covered by its pieces"),
            ));
        }
        Ok(view(&global, want).contiguous().view([-1]))
    }

    /// Elements `[start, end)` of logical tensor `name` saved whole, flattened (1-D, CPU).
    fn read_range(&mut self, name: &str, start: i64, end: i64) -> Result<Tensor> {
        let e = self
            .meta
            .tensors
            .get(name)
            .ok_or_else(|| err(self.dir, format!("no tensor {name}")))?;
        let out = Tensor::zeros([end - start], (Kind::Float, tch::Device::Cpu));
        let mut covered = 0;
        for p in &e.pieces {
            let Some(r) = crate::model::params::intersect(p.start..p.end, start..end) else {
                continue;
            };
            let (a, b) = (r.start, r.end);
            let piece = self.read_piece(name, p)?;
            out.narrow(0, a - start, b - a)
                .copy_(&piece.narrow(0, a - p.start, b - a).to_kind(Kind::Float));
            covered += b - a;
        }
        if covered != end - start {
            return Err(err(
                self.dir,
                format!("tensor {name}: elements {start}..{end} are not all in its pieces"),
            ));
        }
        Ok(out)
    }
}

/// A note on which [model] keys differ, for shape errors.
fn model_diff(saved: &serde_json::Value) -> String {
    match saved.get("model") {
        Some(m) => format!(" (the checkpoint's [model] is {m})"),
        None => String::new(),
    }
}

/// `section.key: old -> new` for every config value that differs.
pub fn config_changes(saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let flat = |v: &serde_json::Value, out: &mut BTreeMap<String, String>| {
        crate::config::flatten_json("", ".", v, &mut |k, x| {
            out.insert(k.to_string(), x.to_string());
        })
    };
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flat(saved, &mut a);
    flat(now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} -> {}",
                a.get(k).map(String::as_str).unwrap_or("(unset)"),
                b.get(k).map(String::as_str).unwrap_or("(unset)")
            )
        })
        .collect()
}
