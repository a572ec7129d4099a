//! Parameters in one flat fp32 buffer. Each parameter is a view of the buffer
//! (a leaf that requires grad), so the optimizer updates all of them with a
//! handful of whole-buffer operations. Parameters that receive weight decay
//! come first, so "decayed" is a prefix of the buffer.
//!
//! Each parameter carries its sharding: the global tensor it is a block of
//! (shape and, per dimension, the offset and length of this rank's block)
//! and how its gradient is made whole across tensor-parallel ranks
//! ([`GradSync`]). Without tensor parallelism every block is the whole tensor.
//! Code refers to parameters through [`ParamId`] handles, not by name.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

pub use crate::model::decl::ParamKind;
use crate::model::key::{declare, ParamKey};

/// How the gradient of a parameter held by several tensor-parallel ranks is
/// made whole. A parameter split across ranks (each holds a different block)
/// is `Own`: its gradient is complete on its rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GradSync {
    /// Complete on this rank (a split block, or tensor parallelism off).
    Own,
    /// A copy on every rank of the tensor-parallel group, whose gradient is
    /// already identical everywhere (it saw identical inputs and output
    /// gradients): nothing to reduce.
    Identical,
    /// A copy on every rank of the tensor-parallel group, each holding part of
    /// the gradient (e.g. a norm under sequence parallelism): sum over the group.
    SumTp,
    /// A copy on each of `size` consecutive tensor-parallel ranks (a K or V
    /// head shared by their query heads): sum over those ranks.
    SumReplicas { size: usize },
}

impl GradSync {
    /// How many ranks of the tensor-parallel group (of size `tp`) hold this copy.
    pub fn copies(self, tp: usize) -> usize {
        match self {
            GradSync::Own => 1,
            GradSync::Identical | GradSync::SumTp => tp,
            GradSync::SumReplicas { size } => size,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Which weight (its name on disk is derived from it).
    pub key: ParamKey,
    /// Shape of the block this rank holds.
    pub shape: Vec<i64>,
    /// Shape of the whole (logical) tensor.
    pub global_shape: Vec<i64>,
    /// Per dimension, (offset, length) of this rank's block in the whole tensor.
    pub block: Vec<(i64, i64)>,
    pub kind: ParamKind,
    pub sync: GradSync,
    /// This rank writes its copy into checkpoints (a copy held by several
    /// ranks is written by one of them).
    pub writer: bool,
    /// The tied embedding held by both the first and the last pipeline stage
    /// (as the embedding and as the output head): its gradient is summed
    /// over the two before the optimizer step.
    pub pp_tied: bool,
}

impl ParamSpec {
    /// A parameter held whole by this rank.
    pub fn whole(key: ParamKey, shape: Vec<i64>, kind: ParamKind) -> ParamSpec {
        ParamSpec {
            block: shape.iter().map(|&n| (0, n)).collect(),
            global_shape: shape.clone(),
            shape,
            key,
            kind,
            sync: GradSync::Own,
            writer: true,
            pp_tied: false,
        }
    }

    /// Ranks holding a copy of this exact block: tensor-parallel copies, and
    /// the two pipeline stages of a tied embedding.
    pub fn copies(&self, tp: usize) -> usize {
        self.sync.copies(tp) * if self.pp_tied { 2 } else { 1 }
    }

    /// The name in checkpoints and exports.
    pub fn name(&self) -> String {
        self.key.name()
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    pub fn global_numel(&self) -> i64 {
        self.global_shape.iter().product()
    }

    /// True when this rank holds the whole tensor.
    pub fn is_whole(&self) -> bool {
        self.shape == self.global_shape
    }

    /// This rank's block of a whole tensor `t` (in the global shape).
    pub fn block_of(&self, t: &Tensor) -> Tensor {
        let mut b = t.shallow_clone();
        for (d, &(off, len)) in self.block.iter().enumerate() {
            b = b.narrow(d as i64, off, len);
        }
        b
    }
}

/// Every parameter of `c`, held whole (one device), in model order.
pub fn whole_specs(c: &crate::config::ModelConfig) -> Vec<ParamSpec> {
    declare(c)
        .into_iter()
        .map(|(key, decl)| ParamSpec::whole(key, decl.shape, decl.kind))
        .collect()
}

/// Part `index` of `parts` equal parts of a flat buffer of `n` elements, as
/// (start, length): parts of `ceil(n / parts)` elements, the last ones
/// shorter or empty. ZeRO-1's optimizer shards and the ranges checkpoints
/// are written in are these parts.
pub fn shard_range(n: i64, parts: usize, index: usize) -> (i64, i64) {
    let size = (n + parts as i64 - 1) / parts as i64;
    let start = (index as i64 * size).min(n);
    (start, (n - start).clamp(0, size))
}

/// The overlap of two ranges, if not empty: the one place where owned
/// ranges (optimizer shards, checkpoint pieces) meet parameters.
pub fn intersect(a: Range<i64>, b: Range<i64>) -> Option<Range<i64>> {
    let r = a.start.max(b.start)..a.end.min(b.end);
    (r.start < r.end).then_some(r)
}

/// The lock every user of libtorch's global random generator takes in this
/// process (model initialisation; tests that seed and draw): seeded draws of
/// two threads would otherwise interleave.
pub fn global_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DRAWS.lock().unwrap_or_else(|e| e.into_inner())
}

/// How parameters are initialised: seeded draws, the same on every layout.
#[derive(Clone, Copy, Debug)]
pub struct Init {
    pub seed: u64,
    /// Standard deviation of the normal draws of matmul weights and embeddings.
    pub std: f64,
    /// Layers of the whole model (projections into the residual stream are
    /// drawn with `std / sqrt(2 * num_layers)`).
    pub num_layers: usize,
}

impl Init {
    /// Draw every whole tensor of `specs` on the CPU, decayed ones first and
    /// otherwise in model order (the order of one device's flat buffer), and
    /// copy into `flat` the block of each that this rank holds (`place(i)`:
    /// its offset, None when not held). The draws use libtorch's global
    /// generator under a process-wide lock.
    fn draw(
        &self,
        specs: &[ParamSpec],
        decays: &[bool],
        place: &dyn Fn(usize) -> Option<i64>,
        flat: &Tensor,
    ) {
        self.draw_whole(specs, decays, &mut |i, whole| {
            if let Some(off) = place(i) {
                let s = &specs[i];
                let block = s.block_of(&whole.view(s.global_shape.as_slice()));
                flat.narrow(0, off, s.numel())
                    .view(s.shape.as_slice())
                    .copy_(&block);
            }
        });
    }

    /// The draws of [`Init::draw`], each whole tensor (fp32, flat, on the
    /// CPU) handed to `take` with its index in `specs` as it is drawn: a
    /// consumer that keeps each in another form (an export in bf16) never
    /// holds the whole model in fp32.
    pub fn draw_whole(
        &self,
        specs: &[ParamSpec],
        decays: &[bool],
        take: &mut dyn FnMut(usize, Tensor),
    ) {
        let mut draw: Vec<usize> = (0..specs.len()).collect();
        draw.sort_by_key(|&i| !decays[i]);
        // libtorch's generator is global: one user draws at a time in a
        // process (threads of a test binary, say), or their draws interleave.
        let _draws = global_rng_lock();
        tch::manual_seed(self.seed as i64);
        let residual_std = self.std / (2.0 * self.num_layers as f64).sqrt();
        tch::no_grad(|| {
            for &i in &draw {
                let s = &specs[i];
                let mut whole = Tensor::zeros([s.global_numel()], (Kind::Float, Device::Cpu));
                let _ = match s.kind {
                    ParamKind::Norm => whole.fill_(1.0),
                    ParamKind::Linear | ParamKind::Embedding => whole.normal_(0.0, self.std),
                    ParamKind::ResidualOut => whole.normal_(0.0, residual_std),
                };
                take(i, whole);
            }
        });
    }
}

/// A handle to one parameter of a [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

pub struct Params {
    pub specs: Vec<ParamSpec>,
    pub tensors: Vec<Tensor>,
    pub offsets: Vec<i64>,
    pub flat: Tensor,
    /// Elements `0..num_decayed` of `flat` receive weight decay.
    pub num_decayed: i64,
    /// Working copies in the compute dtype (training in bf16), if enabled.
    work: Option<WorkCopy>,
    /// Changes of the master weights announced with [`Params::mark_changed`].
    changes: std::cell::Cell<u64>,
}

/// The parameters in the compute dtype (bf16), cast from `flat` once after
/// each change of it instead of at every matmul, micro-batch and recompute.
/// Each view is a leaf that requires grad: a matmul's weight gradient arrives
/// in bf16 (as it would through a cast) and the engine adds it into the fp32
/// gradient buffer, so the numbers are those of casting at each matmul.
struct WorkCopy {
    flat: Tensor,
    tensors: Vec<Tensor>,
    /// What the copy was made from: `flat`'s version counter and the count of
    /// announced changes. libtorch bumps the counter on in-place operations
    /// through its autograd layer (a `copy_` of a checkpoint load, a test's
    /// update), but not for kernels that write through raw pointers such as
    /// the fused AdamW: the optimizer announces its updates instead. Either
    /// changing refreshes the copy at its next use.
    made_from: std::cell::Cell<(i64, u64)>,
}

impl Params {
    /// Lay out the `specs` this rank `holds` (decayed first, order otherwise
    /// kept) and initialise them on the CPU from `seed`: every whole tensor of
    /// the model is drawn, decayed ones first and otherwise in model order
    /// (the order of one device's flat buffer), and this rank keeps the blocks it
    /// holds, so every layout (tensor- or pipeline-parallel or not) starts
    /// from the same weights. Then move to `device`. The draws use libtorch's
    /// global generator, under a process-wide lock. Returns the parameters
    /// and, for each spec as given, its handle if held.
    pub fn new(
        specs: Vec<ParamSpec>,
        holds: impl Fn(usize, &ParamSpec) -> bool,
        decayed: impl Fn(&ParamSpec) -> bool,
        init: Init,
        device: Device,
    ) -> (Params, Vec<Option<ParamId>>) {
        let decays: Vec<bool> = specs.iter().map(&decayed).collect();
        let held: Vec<usize> = (0..specs.len()).filter(|&i| holds(i, &specs[i])).collect();
        let mut order = held;
        order.sort_by_key(|&i| !decays[i]); // stable: decayed first
        let mut ids = vec![None; specs.len()];
        let mut offsets_of = vec![0i64; specs.len()];
        let mut off = 0;
        for (pos, &i) in order.iter().enumerate() {
            ids[i] = Some(ParamId(pos));
            offsets_of[i] = off;
            off += specs[i].numel();
        }
        let num_decayed: i64 = order
            .iter()
            .filter(|&&i| decays[i])
            .map(|&i| specs[i].numel())
            .sum();
        let flat_cpu = Tensor::zeros([off], (Kind::Float, Device::Cpu));
        let place = |i: usize| ids[i].map(|_| offsets_of[i]);
        init.draw(&specs, &decays, &place, &flat_cpu);
        let flat = if device == Device::Cpu {
            flat_cpu
        } else {
            flat_cpu.to_device(device)
        };
        let specs: Vec<ParamSpec> = order.iter().map(|&i| specs[i].clone()).collect();
        let offsets: Vec<i64> = order.iter().map(|&i| offsets_of[i]).collect();
        let mut params = Params {
            specs,
            tensors: Vec::new(),
            offsets,
            flat: Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            num_decayed,
            work: None,
            changes: std::cell::Cell::new(0),
        };
        params.replace_flat(flat);
        (params, ids)
    }

    pub fn tensor(&self, id: ParamId) -> &Tensor {
        &self.tensors[id.0]
    }

    /// Hold the parameters in `flat` (same layout; another dtype or device):
    /// the per-parameter tensors become its views, leaves that take gradients.
    pub fn replace_flat(&mut self, flat: Tensor) {
        self.tensors = self.views_of(&flat);
        self.flat = flat;
    }

    /// Per-parameter views of a buffer of this layout, leaves that take gradients.
    fn views_of(&self, flat: &Tensor) -> Vec<Tensor> {
        self.specs
            .iter()
            .zip(&self.offsets)
            .map(|(s, &o)| {
                flat.narrow(0, o, s.numel())
                    .view(s.shape.as_slice())
                    .set_requires_grad(true)
            })
            .collect()
    }

    /// Keep working copies of the parameters in `kind` (see [`WorkCopy`]);
    /// a no-op when `kind` is the parameters' own dtype.
    pub fn enable_work_copy(&mut self, kind: Kind) {
        if kind == self.flat.kind() {
            self.work = None;
            return;
        }
        let flat = Tensor::empty([self.numel()], (kind, self.flat.device()));
        let tensors = self.views_of(&flat);
        self.work = Some(WorkCopy {
            flat,
            tensors,
            made_from: std::cell::Cell::new((-1, 0)),
        });
    }

    /// The weight a matmul reads: the working copy when there is one
    /// (refreshed first if the master weights changed), else the parameter.
    pub fn weight(&self, id: ParamId) -> &Tensor {
        let Some(w) = &self.work else {
            return self.tensor(id);
        };
        let now = self.version();
        if w.made_from.get() != now {
            tch::no_grad(|| w.flat.shallow_clone().copy_(&self.flat));
            w.made_from.set(now);
        }
        &w.tensors[id.0]
    }

    /// The working copies of matmul weights `a` and `b` as one weight
    /// [rows_a + rows_b, in] when they are adjacent in the layout (b right
    /// after a) with one input width, refreshed like [`Params::weight`];
    /// with its offset in the flat buffer.
    pub fn merged_weight(&self, a: ParamId, b: ParamId) -> Option<(Tensor, i64)> {
        let (oa, n, shape) = self.merged_extent(a, b)?;
        let _ = self.weight(a); // refreshes the copy when stale
        let w = &self.work.as_ref()?.flat;
        Some((w.narrow(0, oa, n).view(shape), oa))
    }

    /// The fp32 master weights of matmul weights `a` and `b` as one matrix
    /// [rows_a + rows_b, in]: a view of the flat buffer where `b` follows
    /// `a` there and they read inputs of one width, else None.
    pub fn merged_master(&self, a: ParamId, b: ParamId) -> Option<Tensor> {
        let (oa, n, shape) = self.merged_extent(a, b)?;
        Some(tch::no_grad(|| self.flat.narrow(0, oa, n).view(shape)))
    }

    /// Where matmul weights `a` and `b` lie as one matrix in the flat layout:
    /// (offset, elements, [rows_a + rows_b, in]) when `b` follows `a` and
    /// they read inputs of one width.
    fn merged_extent(&self, a: ParamId, b: ParamId) -> Option<(i64, i64, [i64; 2])> {
        let (sa, sb) = (&self.specs[a.0].shape, &self.specs[b.0].shape);
        let (oa, ob) = (self.offsets[a.0], self.offsets[b.0]);
        let n = self.specs[a.0].numel();
        if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[1] || ob != oa + n {
            return None;
        }
        Some((oa, n + self.specs[b.0].numel(), [sa[0] + sb[0], sa[1]]))
    }

    /// Which state of the master weights this is: `flat`'s version counter
    /// and the count of announced changes (see [`WorkCopy`]). Copies made
    /// from the weights (the working copy, the FP8 copies of `model::fp8`)
    /// are stale when it moved.
    pub fn version(&self) -> (i64, u64) {
        (self.flat.internal_version(), self.changes.get())
    }

    /// Announce that the master weights changed (the optimizer, after every
    /// update): the working copy is refreshed before its next use.
    pub fn mark_changed(&self) {
        self.changes.set(self.changes.get() + 1);
    }

    /// Whether a working copy is kept.
    pub fn has_work_copy(&self) -> bool {
        self.work.is_some()
    }

    /// The working copy of a parameter, whose gradient also belongs to it.
    pub fn work_leaf(&self, id: ParamId) -> Option<&Tensor> {
        self.work.as_ref().map(|w| &w.tensors[id.0])
    }

    pub fn spec(&self, id: ParamId) -> &ParamSpec {
        &self.specs[id.0]
    }

    /// The parameter called `name` (tests and tools; code uses handles).
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.specs
            .iter()
            .position(|s| s.key.name() == name)
            .map(ParamId)
    }

    /// The parameters whose elements in the flat buffer overlap `range`:
    /// (handle, the overlap in flat-buffer positions). In layout order.
    pub fn overlapping(
        &self,
        range: Range<i64>,
    ) -> impl Iterator<Item = (ParamId, Range<i64>)> + '_ {
        self.specs
            .iter()
            .zip(&self.offsets)
            .enumerate()
            .filter_map(move |(i, (s, &o))| {
                intersect(o..o + s.numel(), range.clone()).map(|r| (ParamId(i), r))
            })
    }

    /// The parameter called `name`, which must exist (tests and tools).
    pub fn get(&self, name: &str) -> &Tensor {
        match self.find(name) {
            Some(id) => self.tensor(id),
            None => panic!("no parameter {name}"),
        }
    }

    pub fn numel(&self) -> i64 {
        self.flat.numel() as i64
    }

    /// (offset, length) of every parameter in the flat buffer, in layout order.
    pub fn layout(&self) -> Vec<(i64, i64)> {
        self.specs
            .iter()
            .zip(&self.offsets)
            .map(|(s, &o)| (o, s.numel()))
            .collect()
    }
}
