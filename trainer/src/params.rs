//! Parameters in one flat fp32 buffer. Each named parameter is a view of the
//! buffer (a leaf that requires grad), so the optimizer updates all of them
//! with a handful of whole-buffer operations. Parameters that receive weight
//! decay come first, so "decayed" is a prefix of the buffer.

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

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub kind: ParamKind,
}

impl ParamSpec {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

pub struct Params {
    pub specs: Vec<ParamSpec>,
    pub tensors: Vec<Tensor>,
    pub offsets: Vec<i64>,
    pub flat: Tensor,
    /// Elements `0..num_decayed` of `flat` receive weight decay.
    pub num_decayed: i64,
}

impl Params {
    /// Lay out `specs` (decayed first, order otherwise kept), initialise on the
    /// CPU from `seed` in that order, then move to `device`. CPU and GPU runs
    /// therefore start from identical weights.
    pub fn new(
        mut specs: Vec<ParamSpec>,
        decayed: impl Fn(&ParamSpec) -> bool,
        seed: u64,
        std: f64,
        num_layers: usize,
        device: Device,
    ) -> Params {
        specs.sort_by_key(|s| !decayed(s)); // stable: decayed first
        let num_decayed: i64 = specs.iter().filter(|s| decayed(s)).map(|s| s.numel()).sum();
        let total: i64 = specs.iter().map(|s| s.numel()).sum();
        tch::manual_seed(seed as i64);
        let flat_cpu = Tensor::zeros([total], (Kind::Float, Device::Cpu));
        let mut offsets = Vec::with_capacity(specs.len());
        let mut off = 0;
        tch::no_grad(|| {
            for s in &specs {
                offsets.push(off);
                let mut v = flat_cpu.narrow(0, off, s.numel());
                match s.kind {
                    ParamKind::Norm => {
                        let _ = v.fill_(1.0);
                    }
                    ParamKind::Linear | ParamKind::Embedding => {
                        let _ = v.normal_(0.0, std);
                    }
                    ParamKind::ResidualOut => {
                        let _ = v.normal_(0.0, std / (2.0 * num_layers as f64).sqrt());
                    }
                }
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
        Params {
            specs,
            tensors,
            offsets,
            flat,
            num_decayed,
        }
    }

    pub fn get(&self, name: &str) -> &Tensor {
        let i = self
            .specs
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        &self.tensors[i]
    }

    pub fn numel(&self) -> i64 {
        self.flat.numel() as i64
    }
}
