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

use tch::{Device, Kind, Tensor};

/// How a parameter is initialised and whether it is decayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Normal(0, std) weight of a linear layer.
    Linear,
    /// Normal(0, std / sqrt(2 * num_layers)): projections that write into the residual stream.
    ResidualOut,
    Embedding,
    /// RMSNorm gain, initialised to 1.
    Norm,
}

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
    pub name: String,
    /// Shape of the block this rank holds.
    pub shape: Vec<i64>,
    /// Shape of the whole (logical) tensor.
    pub global_shape: Vec<i64>,
    /// Per dimension, (offset, length) of this rank's block in the whole tensor.
    pub block: Vec<(i64, i64)>,
    pub kind: ParamKind,
    pub sync: GradSync,
}

impl ParamSpec {
    /// A parameter held whole by this rank.
    pub fn whole(name: String, shape: Vec<i64>, kind: ParamKind) -> ParamSpec {
        ParamSpec {
            block: shape.iter().map(|&n| (0, n)).collect(),
            global_shape: shape.clone(),
            shape,
            name,
            kind,
            sync: GradSync::Own,
        }
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

/// Part `index` of `parts` equal parts of a flat buffer of `n` elements, as
/// (start, length): parts of `ceil(n / parts)` elements, the last ones
/// shorter or empty. ZeRO-1's optimizer shards and the ranges checkpoints
/// are written in are these parts.
pub fn shard_range(n: i64, parts: usize, index: usize) -> (i64, i64) {
    let size = (n + parts as i64 - 1) / parts as i64;
    let start = (index as i64 * size).min(n);
    (start, (n - start).clamp(0, size))
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
}

impl Params {
    /// Lay out `specs` (decayed first, order otherwise kept) and initialise
    /// them on the CPU from `seed`: each whole tensor is drawn in that order
    /// and this rank keeps its block, so every layout (tensor-parallel or
    /// not) starts from the same weights. Then move to `device`.
    /// Returns the parameters and, for each spec as given, its handle.
    pub fn new(
        specs: Vec<ParamSpec>,
        decayed: impl Fn(&ParamSpec) -> bool,
        seed: u64,
        std: f64,
        num_layers: usize,
        device: Device,
    ) -> (Params, Vec<ParamId>) {
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by_key(|&i| !decayed(&specs[i])); // stable: decayed first
        let mut ids = vec![ParamId(0); specs.len()];
        for (pos, &i) in order.iter().enumerate() {
            ids[i] = ParamId(pos);
        }
        let specs: Vec<ParamSpec> = order.iter().map(|&i| specs[i].clone()).collect();
        let num_decayed: i64 = specs.iter().filter(|s| decayed(s)).map(|s| s.numel()).sum();
        let total: i64 = specs.iter().map(|s| s.numel()).sum();
        tch::manual_seed(seed as i64);
        let flat_cpu = Tensor::zeros([total], (Kind::Float, Device::Cpu));
        let mut offsets = Vec::with_capacity(specs.len());
        let mut off = 0;
        tch::no_grad(|| {
            for s in &specs {
                offsets.push(off);
                let v = flat_cpu.narrow(0, off, s.numel());
                let mut whole = Tensor::zeros([s.global_numel()], (Kind::Float, Device::Cpu));
                match s.kind {
                    ParamKind::Norm => {
                        let _ = whole.fill_(1.0);
                    }
                    ParamKind::Linear | ParamKind::Embedding => {
                        let _ = whole.normal_(0.0, std);
                    }
                    ParamKind::ResidualOut => {
                        let _ = whole.normal_(0.0, std / (2.0 * num_layers as f64).sqrt());
                    }
                }
                let block = s.block_of(&whole.view(s.global_shape.as_slice()));
                v.view(s.shape.as_slice()).copy_(&block);
                off += s.numel();
            }
        });
        let flat = if device == Device::Cpu {
            flat_cpu
        } else {
            flat_cpu.to_device(device)
        };
        let tensors = specs
            .iter()
            .zip(&offsets)
            .map(|(s, &o)| {
                flat.narrow(0, o, s.numel())
                    .view(s.shape.as_slice())
                    .set_requires_grad(true)
            })
            .collect();
        (
            Params {
                specs,
                tensors,
                offsets,
                flat,
                num_decayed,
            },
            ids,
        )
    }

    pub fn tensor(&self, id: ParamId) -> &Tensor {
        &self.tensors[id.0]
    }

    pub fn spec(&self, id: ParamId) -> &ParamSpec {
        &self.specs[id.0]
    }

    /// The parameter called `name` (tests and tools; code uses handles).
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.specs.iter().position(|s| s.name == name).map(ParamId)
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
}
