//! Saving: snapshot this rank's owned range of the three flat buffers into
//! host memory (pinned on GPUs, reused between saves), then write it, in the
//! background when `checkpoint.async = true`, while training goes on.
//!
//! Commit protocol (rank 0 coordinates, the directory is shared by all ranks):
//! 1. rank 0 removes leftovers of interrupted saves and creates
//!    `.step-NNNNNNN.tmp/`; all ranks meet at a store barrier;
//! 2. each rank writes and fsyncs its shard there and reports (bytes, xxh3)
//!    or its error through the store;
//! 3. rank 0 waits for every report, writes and fsyncs `metadata.json` and the
//!    tokenizer, fsyncs the directory, renames it to `step-NNNNNNN/`, fsyncs
//!    the parent, and finally writes `COMMITTED` atomically. Only directories
//!    with that marker are checkpoints; anything else is a leftover;
//! 4. retention: markers of checkpoints beyond `keep_last` (and not a multiple
//!    of `keep_every`) are removed first, then their directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use sigma_data::fsutil::{sync_dir, write_atomic};
use sigma_data::store::{block_on, Location};
use tch::{Device, Kind, Tensor};

use super::*;
use crate::config::{CheckpointConfig, RunConfig};
use crate::dist::{DistEnv, MeshDims, StoreClient};
use crate::error::{Result, TrainError};
use crate::model::params::{ParamSpec, Params};
use crate::optim::AdamW;

/// Values by tensor name (a shard's data and its pieces).
type Named<T> = Vec<(String, T)>;

/// Fault injection for tests: milliseconds each writer sleeps after writing
/// its shard and before reporting it (widens the window in which a kill lands mid-save).
pub use sigma_data::env::FAULT_SAVE_DELAY_MS;

/// Everything about a save except the tensors.
#[derive(Clone, Debug)]
pub struct SaveInfo {
    pub progress: Progress,
    pub data: DataState,
    pub adam_steps: u64,
    pub last_lr: f64,
}

/// The index entry of every logical tensor (global shapes, no pieces yet):
/// for each of the three buffers and each parameter.
pub fn entries(specs: &[ParamSpec]) -> BTreeMap<String, TensorEntry> {
    let mut out = BTreeMap::new();
    for spec in specs {
        for buf in BUFFERS {
            out.insert(
                tensor_name(buf, &spec.name()),
                TensorEntry {
                    shape: spec.global_shape.clone(),
                    dtype: "F32".into(),
                    pieces: Vec::new(),
                },
            );
        }
    }
    out
}

pub struct Saver {
    pub root: PathBuf,
    cfg: CheckpointConfig,
    run: RunConfig,
    tokenizer: Option<Vec<u8>>,
    rank: usize,
    world: usize,
    dims: MeshDims,
    env: Option<DistEnv>,
    /// Host copies of this rank's owned range of the three buffers.
    host: Option<Vec<Tensor>>,
    writer: Option<JoinHandle<Result<()>>>,
    pub last_save: Instant,
}

/// Root directory of a run's checkpoints: `checkpoint.dir`, else `<metrics.output_dir>/checkpoints`.
pub fn root_dir(cfg: &RunConfig) -> PathBuf {
    match &cfg.checkpoint.dir {
        Some(d) => PathBuf::from(d),
        None => Path::new(&cfg.metrics.output_dir).join("checkpoints"),
    }
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::io(p.display().to_string(), e)
}

/// Remove what interrupted saves left under `root`: temporary directories and
/// step directories without a commit marker.
pub fn clean_leftovers(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(root).map_err(io(root))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let stale_tmp = name.starts_with(".step-") && name.ends_with(".tmp");
        let uncommitted = parse_step_dir(&name).is_some() && !p.join(MARKER).exists();
        if stale_tmp || uncommitted {
            std::fs::remove_dir_all(&p).map_err(io(&p))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// Apply `keep_last` / `keep_every`: returns the steps removed.
pub fn retain(root: &Path, keep_last: usize, keep_every: u64) -> Result<Vec<u64>> {
    let all = committed(root);
    let cut = all.len().saturating_sub(keep_last.max(1));
    let mut removed = Vec::new();
    for (step, dir) in &all[..cut] {
        if keep_every > 0 && step % keep_every == 0 {
            continue;
        }
        // Marker first: from here on the directory is a leftover, never a checkpoint.
        std::fs::remove_file(dir.join(MARKER)).map_err(io(dir))?;
        sync_dir(dir)?;
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
        removed.push(*step);
    }
    Ok(removed)
}

impl Saver {
    pub fn new(run: &RunConfig, env: Option<DistEnv>, tokenizer: Option<Vec<u8>>) -> Saver {
        let (rank, world) = env.as_ref().map(|e| (e.rank, e.world)).unwrap_or((0, 1));
        let dims = MeshDims::of(&run.parallel);
        Saver {
            dims,
            root: root_dir(run),
            cfg: run.checkpoint.clone(),
            run: run.clone(),
            tokenizer,
            rank,
            world,
            env,
            host: None,
            writer: None,
            last_save: Instant::now(),
        }
    }

    /// Allocate the host copies of this rank's range (pinned memory for GPU
    /// state, so the copy runs at full PCIe speed). Done once; the trainer
    /// calls it at start-up when checkpoints are scheduled, so the first save
    /// does not pay for it.
    pub fn allocate_host(&mut self, params: &Params) {
        if self.host.is_some() {
            return;
        }
        let (_, len) = self.owned(params);
        let device = params.flat.device();
        let make = || {
            let t = Tensor::zeros([len], (Kind::Float, Device::Cpu));
            match device {
                Device::Cuda(_) => t.pin_memory(device),
                _ => t,
            }
        };
        self.host = Some(vec![make(), make(), make()]);
    }

    /// The range of the local flat buffers this rank owns: its data-parallel share.
    fn owned(&self, params: &Params) -> (i64, i64) {
        // The ranks holding the same parameters (dp x cp) write a share each.
        let c = self.dims.coords(self.rank);
        owned_range(
            params.numel(),
            self.dims.replicas(),
            self.dims.replica_index(c),
        )
    }

    /// Wait for the background write of the previous save (and, on rank 0, its commit).
    pub fn wait(&mut self) -> Result<()> {
        match self.writer.take() {
            Some(h) => h
                .join()
                .map_err(|_| TrainError::internal_state("the checkpoint writer thread panicked"))?,
            None => Ok(()),
        }
    }

    /// Save the state after `info.progress.step` steps. Returns the training
    /// stall in seconds (what the caller waited for), or None when that step
    /// is already committed. Phases: wait for the previous save, prepare the
    /// staging directory (rank 0), snapshot this rank's range into host
    /// memory, then write (in the background with `checkpoint.async`).
    pub fn save(
        &mut self,
        params: &Params,
        optim: &AdamW,
        info: SaveInfo,
        store: Option<&mut StoreClient>,
    ) -> Result<Option<f64>> {
        let t0 = Instant::now();
        if self.writer.as_ref().is_some_and(|h| !h.is_finished()) && self.rank == 0 {
            eprintln!(
                "checkpoint: the previous save is still being written; training waits for it (saves are more frequent than the storage can take)"
            );
        }
        self.wait()?;
        self.last_save = Instant::now();
        let step = info.progress.step;
        let target = self.root.join(step_dir_name(step));
        if target.join(MARKER).is_file() {
            return Ok(None);
        }
        let tmp = self.root.join(format!(".{}.tmp", step_dir_name(step)));
        self.stage(&tmp, step, store)?;
        let (tensors, pieces) = self.snapshot(params, optim);
        let job = WriteJob {
            step,
            rank: self.rank,
            world: self.world,
            env: self.env.clone(),
            tmp,
            target,
            root: self.root.clone(),
            file: shard_file_name(self.rank, self.world),
            tensors,
            pieces,
            meta: (self.rank == 0).then(|| self.metadata(&info, params.numel())),
            tokenizer: if self.rank == 0 {
                self.tokenizer.clone()
            } else {
                None
            },
            cfg: self.cfg.clone(),
        };
        if self.cfg.async_save {
            self.writer = Some(
                std::thread::Builder::new()
                    .name("sigma-checkpoint".into())
                    .spawn(move || crate::guard::catch(|| job.run()))
                    .expect("checkpoint thread"),
            );
        } else {
            job.run()?;
        }
        Ok(Some(t0.elapsed().as_secs_f64()))
    }

    /// Rank 0 makes the staging directory `tmp` (removing leftovers of
    /// interrupted saves); every rank waits until it exists.
    fn stage(&self, tmp: &Path, step: u64, store: Option<&mut StoreClient>) -> Result<()> {
        if self.rank == 0 {
            sigma_data::fsutil::create_dir_all(&self.root)?;
            for p in clean_leftovers(&self.root)? {
                eprintln!(
                    "checkpoint: removed leftover of an interrupted save: {}",
                    p.display()
                );
            }
            sigma_data::fsutil::create_dir_all(tmp)?;
        }
        if let Some(s) = store {
            s.barrier(&format!("ckpt/{step}/dir"), self.world)?;
        }
        Ok(())
    }

    /// Copy this rank's range of the weights and moments into the host
    /// buffers, and list its pieces as views of them: (tensor name, data)
    /// and (tensor name, piece) for every parameter this rank writes (a copy
    /// held by several ranks is written by one of them).
    fn snapshot(&mut self, params: &Params, optim: &AdamW) -> (Named<Tensor>, Named<Piece>) {
        let (start, len) = self.owned(params);
        self.allocate_host(params);
        let host = self.host.as_ref().expect("host buffers");
        let moment_off = if optim.shard.is_some() { 0 } else { start };
        tch::no_grad(|| {
            host[0]
                .shallow_clone()
                .copy_(&params.flat.narrow(0, start, len));
            host[1]
                .shallow_clone()
                .copy_(&optim.exp_avg.narrow(0, moment_off, len));
            host[2]
                .shallow_clone()
                .copy_(&optim.exp_avg_sq.narrow(0, moment_off, len));
        });
        let mine = shard_file_name(self.rank, self.world);
        let mut tensors = Vec::new();
        let mut pieces = Vec::new();
        for (b, buf) in BUFFERS.iter().enumerate() {
            for (id, r) in params.overlapping(start..start + len) {
                let (spec, off) = (params.spec(id), params.offsets[id.0]);
                if !spec.writer {
                    continue;
                }
                let name = tensor_name(buf, &spec.name());
                tensors.push((
                    name.clone(),
                    host[b].narrow(0, r.start - start, r.end - r.start),
                ));
                pieces.push((
                    name,
                    Piece {
                        file: mine.clone(),
                        start: r.start - off,
                        end: r.end - off,
                        block: (!spec.is_whole()).then(|| spec.block.clone()),
                        xxh3: String::new(), // the writer fills it in
                    },
                ));
            }
        }
        (tensors, pieces)
    }

    /// Rank 0's metadata of the save (files and pieces filled in by the writer).
    fn metadata(&self, info: &SaveInfo, flat_numel: i64) -> Metadata {
        Metadata {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            progress: info.progress.clone(),
            data: info.data,
            optimizer: OptimizerState {
                adam_steps: info.adam_steps,
            },
            scheduler: SchedulerState {
                step: info.progress.step,
                total_steps: self.run.train.steps,
                last_lr: info.last_lr,
            },
            rng: RngState {
                seed: self.run.train.seed,
                data_seed: self.run.data.seed,
            },
            layout: Layout {
                dp: self.dims.dp,
                cp: self.dims.cp,
                tp: self.dims.tp,
                pp: self.dims.pp,
                zero: self.run.parallel.zero,
                flat_numel,
            },
            config: serde_json::to_value(&self.run).expect("config serializes"),
            tensors: entries(&crate::model::params::whole_specs(&self.run.model)),
            files: BTreeMap::new(),
            saved_unix_s: 0,
        }
    }
}

/// What a rank reports about its shard.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    file: FileEntry,
    /// Tensor name -> this rank's piece of it (checksum filled in).
    pieces: Vec<(String, Piece)>,
}

struct WriteJob {
    step: u64,
    rank: usize,
    world: usize,
    env: Option<DistEnv>,
    tmp: PathBuf,
    target: PathBuf,
    root: PathBuf,
    file: String,
    tensors: Vec<(String, Tensor)>,
    /// The piece each of `tensors` is, in the same order.
    pieces: Vec<(String, Piece)>,
    /// Rank 0 only: the metadata to complete and commit.
    meta: Option<Metadata>,
    tokenizer: Option<Vec<u8>>,
    cfg: CheckpointConfig,
}

fn fault_delay() {
    if let Some(ms) = sigma_data::env::var(FAULT_SAVE_DELAY_MS).and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

impl WriteJob {
    fn key(&self, rank: usize) -> String {
        format!("ckpt/{}/rank/{rank}", self.step)
    }

    /// Write this rank's shard and report it; on rank 0, gather every
    /// rank's report into the metadata and commit: metadata, fsync, rename,
    /// then the marker; retention and upload after.
    fn run(self) -> Result<()> {
        let t0 = Instant::now();
        let written = self.write_shard();
        fault_delay();
        let mut store = match &self.env {
            Some(env) => Some(crate::dist::connect(env)?),
            None => None,
        };
        // Report to rank 0: the file's entry and piece checksums, or the error.
        let report = match &written {
            Ok(r) => json!({ "ok": r }),
            Err(e) => json!({"err": e.to_string()}),
        };
        if let Some(s) = store.as_mut() {
            s.set(&self.key(self.rank), report.to_string().as_bytes())?;
        }
        let mine = written?;
        let Some(mut meta) = self.meta.clone() else {
            return Ok(());
        };
        let mut reports = vec![(self.file.clone(), mine)];
        if let Some(s) = store.as_mut() {
            reports.extend(self.gather_reports(s)?);
        }
        self.index_pieces(&mut meta, reports)?;
        self.commit(meta, t0)
    }

    /// This rank's shard file, with the checksums of the file and of each piece.
    fn write_shard(&self) -> Result<Report> {
        let path = self.tmp.join(&self.file);
        let format = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let w = super::safetensors::write(&path, &self.tensors, &format)?;
        Ok(Report {
            file: FileEntry {
                bytes: w.bytes,
                xxh3: format!("{:016x}", w.file_hash),
            },
            pieces: self
                .pieces
                .iter()
                .zip(&w.tensor_hashes)
                .map(|((n, p), h)| {
                    let mut p = p.clone();
                    p.xxh3 = format!("{h:016x}");
                    (n.clone(), p)
                })
                .collect(),
        })
    }

    /// Rank 0: every other rank's report, in rank order (an error if a rank
    /// reports none in time or reports that it failed).
    fn gather_reports(&self, s: &mut StoreClient) -> Result<Vec<(String, Report)>> {
        let step = self.step;
        let failed = |message: String| TrainError::Checkpoint { step, message };
        let mut reports = Vec::new();
        for r in 1..self.world {
            let k = self.key(r);
            s.wait(std::slice::from_ref(&k), s.timeout)
                .map_err(|e| failed(format!("rank {r} did not report its shard: {e}")))?;
            let v: serde_json::Value = serde_json::from_slice(&s.get(&k)?)
                .map_err(|e| failed(format!("the report of rank {r} does not parse: {e}")))?;
            if let Some(err) = v.get("err") {
                let err = err.as_str().unwrap_or_default();
                return Err(failed(format!("rank {r} could not write its shard: {err}")));
            }
            let rep: Report = serde_json::from_value(v["ok"].clone())
                .map_err(|e| failed(format!("the report of rank {r} does not parse: {e}")))?;
            reports.push((shard_file_name(r, self.world), rep));
            let _ = s.delete(&k);
        }
        Ok(reports)
    }

    /// Put every reported piece under its tensor (sorted) and every file in
    /// the file table; each tensor's pieces must cover it exactly.
    fn index_pieces(&self, meta: &mut Metadata, reports: Vec<(String, Report)>) -> Result<()> {
        let failed = |message: String| TrainError::Checkpoint {
            step: self.step,
            message,
        };
        for (file, rep) in reports {
            for (name, p) in rep.pieces {
                let e = meta.tensors.get_mut(&name).ok_or_else(|| {
                    failed(format!(
                        "{file} reports a piece of {name}, which rank 0's model does not have"
                    ))
                })?;
                e.pieces.push(p);
            }
            meta.files.insert(file, rep.file);
        }
        for (name, e) in meta.tensors.iter_mut() {
            e.pieces
                .sort_by(|a, b| (&a.block, a.start, &a.file).cmp(&(&b.block, b.start, &b.file)));
            let held: i64 = e.pieces.iter().map(|p| p.end - p.start).sum();
            let want = e.shape.iter().product::<i64>();
            if held != want {
                return Err(failed(format!(
                    "the pieces of {name} hold {held} elements, the tensor has {want}"
                )));
            }
        }
        Ok(())
    }

    /// Rank 0: the tokenizer and metadata into the staging directory, fsync,
    /// rename to `step-NNNNNNN/`, fsync, the marker; then retention and upload.
    fn commit(&self, mut meta: Metadata, t0: Instant) -> Result<()> {
        meta.saved_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Some(tok) = &self.tokenizer {
            write_atomic(&self.tmp.join(TOKENIZER), tok)?;
            // Checked like the shards whenever the checkpoint is opened, verified or exported.
            meta.files.insert(
                TOKENIZER.to_string(),
                FileEntry {
                    bytes: tok.len() as u64,
                    xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(tok)),
                },
            );
        }
        let text = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
        write_atomic(&self.tmp.join(METADATA), &text)?;
        sync_dir(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.target).map_err(io(&self.target))?;
        sync_dir(&self.root)?;
        write_atomic(
            &self.target.join(MARKER),
            json!({"step": self.step}).to_string().as_bytes(),
        )?;
        let total: u64 = meta.files.values().map(|f| f.bytes).sum();
        let dt = t0.elapsed().as_secs_f64();
        eprintln!(
            "checkpoint: committed {} ({:.2} GB in {:.2} s, {:.2} GB/s from rank 0's start)",
            self.target.display(),
            total as f64 / 1e9,
            dt,
            total as f64 / 1e9 / dt.max(1e-9)
        );
        let removed = retain(&self.root, self.cfg.keep_last, self.cfg.keep_every)?;
        if !removed.is_empty() {
            eprintln!("checkpoint: retention removed step(s) {removed:?}");
        }
        if let Some(url) = &self.cfg.upload {
            upload(&self.target, url)?;
        }
        Ok(())
    }
}

/// Copy a committed checkpoint to `url/step-NNNNNNN/`, the marker last.
pub fn upload(dir: &Path, url: &str) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dest = Location::parse(url)?.join(&name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != MARKER))
        .collect();
    files.sort();
    files.push(dir.join(MARKER));
    for f in files {
        let fname = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        block_on(dest.join(&fname).copy_file(&f))?;
    }
    eprintln!("checkpoint: uploaded {} to {url}/{name}", dir.display());
    Ok(())
}
