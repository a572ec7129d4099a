//! FP8 training (`train.precision = "fp8"`, docs/precision.md): which
//! weights multiply in FP8, their FP8 copies, and what the device and the
//! shapes must allow.
//!
//! Which: a block's matmul weights (every [`LayerWeight`] declared
//! `Linear` or `ResidualOut`: q, k, v, o, AugQ's gate, up and down, K's
//! up-projection, the FFN's gate, up and down) in every block except the
//! first `fp8.bf16_first_layers` and the last `fp8.bf16_last_layers` of the
//! whole model. Everything else stays as in bf16 runs: the embedding, the
//! output head and loss, the norms, attention (SDPA), and the blocks at
//! either end. It follows from the declarations (`model/block.rs`): a
//! weight added there is FP8 when it is a matmul weight of a block.
//!
//! The FP8 copies ([`Fp8Weights`]) are made from the fp32 master weights
//! once per change of them, as the bf16 working copy is (`Params::weight`):
//! at a weight's first matmul after the optimizer's update or a checkpoint
//! load, not per micro-batch or recompute. Gate and up (the FFN's and
//! AugQ's), which read one input, are one FP8 weight: their merged matrix,
//! with scales over both ([`Fp8Weights::merged`]).
//!
//! [`LayerWeight`]: crate::model::block::LayerWeight

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use tch::{Device, Tensor};

use crate::config::{Fp8Config, Fp8Format, Fp8Recipe, WeightGrad};
use crate::error::{Result, TrainError};
use crate::kernels::fp8::{Format, Fp8Opts, Fp8Weight, Gemm, Scaling};
use crate::model::key::ParamKey;
use crate::model::params::{ParamId, ParamKind, Params};

/// The compute capability (major * 10 + minor) FP8 GEMMs need: Ada (8.9),
/// Hopper (9.0) and later.
pub const MIN_CAPABILITY: i32 = 89;

/// Both dimensions of every FP8 GEMM operand must be multiples of this
/// (`_scaled_mm`'s rule, from cuBLASLt's FP8 alignment).
pub const ALIGN: i64 = 16;

/// The FP8 settings of a model: the GEMM options and which blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Plan {
    pub opts: Fp8Opts,
    pub bf16_first_layers: usize,
    pub bf16_last_layers: usize,
    pub num_layers: usize,
}

impl Fp8Plan {
    /// The plan of `f` for a model of `num_layers` blocks, computing by `gemm`.
    pub fn new(f: &Fp8Config, num_layers: usize, gemm: Gemm) -> Fp8Plan {
        let format = |f: Fp8Format| match f {
            Fp8Format::E4m3 => Format::E4m3,
            Fp8Format::E5m2 => Format::E5m2,
        };
        Fp8Plan {
            opts: Fp8Opts {
                scaling: match f.recipe {
                    Fp8Recipe::Tensorwise => Scaling::Tensorwise,
                    Fp8Recipe::Rowwise => Scaling::Rowwise,
                },
                grad: format(f.grad_format()),
                wgrad_fp8: f.weight_grad == WeightGrad::Fp8,
                margin: f.margin,
                fast_accum: f.fast_accum,
                gemm,
            },
            bf16_first_layers: f.bf16_first_layers,
            bf16_last_layers: f.bf16_last_layers,
            num_layers,
        }
    }

    /// Whether block `l`'s matmuls run in FP8.
    pub fn fp8_layer(&self, l: usize) -> bool {
        l >= self.bf16_first_layers && l + self.bf16_last_layers < self.num_layers
    }

    /// Whether the parameter `key` (declared `kind`) multiplies in FP8.
    pub fn runs_in_fp8(&self, key: ParamKey, kind: ParamKind) -> bool {
        let matmul = matches!(kind, ParamKind::Linear | ParamKind::ResidualOut);
        matches!(key, ParamKey::Layer(l, _) if matmul && self.fp8_layer(l))
    }

    /// Elements of the parameters `share` holds that multiply in FP8 (each
    /// has FP8 copies: the memory estimate counts them).
    pub fn params_in_fp8(&self, share: &crate::model::Share) -> i64 {
        share
            .specs
            .iter()
            .zip(&share.held)
            .filter(|(s, &held)| held && self.runs_in_fp8(s.key, s.kind))
            .map(|(s, _)| s.shape.iter().product::<i64>())
            .sum()
    }

    /// The FP8 weights of `params` whose shapes `_scaled_mm` cannot take:
    /// both dimensions of each (this rank's block) and, with FP8 weight
    /// gradients, the tokens of a micro-batch (the contraction of that
    /// GEMM) must be multiples of 16. The emulation holds the same rule, so
    /// a CPU run finds what a GPU would refuse.
    pub fn check_shapes(&self, params: &Params, tokens: i64) -> Result<()> {
        let key = "train.precision";
        for spec in params
            .specs
            .iter()
            .filter(|s| self.runs_in_fp8(s.key, s.kind))
        {
            if let Some(d) = spec.shape.iter().find(|&&d| d % ALIGN != 0) {
                return Err(TrainError::config(
                    key,
                    format!(
                        "\"fp8\": {} is {:?} on this rank, and FP8 GEMMs (_scaled_mm) need both dimensions of a weight divisible by {ALIGN}; {d} is not. Change the model's sizes, keep that block in bf16 (fp8.bf16_first_layers, fp8.bf16_last_layers), or train in bf16",
                        spec.name(),
                        spec.shape
                    ),
                ));
            }
        }
        if self.opts.wgrad_fp8 && tokens % ALIGN != 0 {
            return Err(TrainError::config(
                "fp8.weight_grad",
                format!(
                    "\"fp8\" needs the tokens of a micro-batch (train.micro_batch_size x data.seq_len = {tokens}) divisible by {ALIGN}: they are the contraction of the FP8 weight-gradient GEMM; change them or set fp8.weight_grad = \"bf16\""
                ),
            ));
        }
        Ok(())
    }

    /// What runs where, in words (the start-up line).
    pub fn describe(&self) -> String {
        let o = &self.opts;
        let fp8: Vec<usize> = (0..self.num_layers)
            .filter(|&l| self.fp8_layer(l))
            .collect();
        let how = match o.gemm {
            Gemm::ScaledMm => "FP8 GEMMs (_scaled_mm)",
            Gemm::Emulated => "EMULATED (fp8.emulate: quantise-dequantise, fp32 matmuls)",
        };
        format!(
            "fp8: {} scaling (margin {}), e4m3 forward{}, {} gradients, weight gradients in {}; the block linears of layers {}..={} in FP8, layers 0..{} and {}..{} and the embedding, head, norms and attention in bf16; {how}",
            scaling_name(o.scaling),
            o.margin,
            if o.fast_accum { " (fast accumulation)" } else { "" },
            o.grad.name(),
            if o.wgrad_fp8 { "FP8" } else { "bf16 (fp32 accumulation)" },
            fp8.first().copied().unwrap_or(0),
            fp8.last().copied().unwrap_or(0),
            self.bf16_first_layers,
            self.num_layers - self.bf16_last_layers,
            self.num_layers,
        )
    }
}

fn scaling_name(s: Scaling) -> &'static str {
    match s {
        Scaling::Tensorwise => "tensorwise",
        Scaling::Rowwise => "rowwise",
    }
}

/// How FP8 matmuls run on `device`: `_scaled_mm` on a CUDA GPU of compute
/// capability 8.9 or later, the emulation when `emulate`; refused
/// otherwise, with what to do.
pub fn gemm_for(device: Device, emulate: bool) -> Result<Gemm> {
    let capability = match device {
        Device::Cuda(i) if !emulate => Some(
            crate::kernels::decode::device(i)
                .map(|(_, cc, _)| cc)
                .map_err(|e| {
                    TrainError::gpu("CUDA", "compute capability (train.precision = \"fp8\")", e)
                })?,
        ),
        _ => None,
    };
    choose_gemm(device.is_cuda(), capability, emulate)
}

/// [`gemm_for`]'s rule: `capability` is the GPU's (e.g. 90) on CUDA.
pub fn choose_gemm(cuda: bool, capability: Option<i32>, emulate: bool) -> Result<Gemm> {
    if emulate {
        return Ok(Gemm::Emulated);
    }
    let key = "train.precision";
    let emu = "set fp8.emulate = true to run the FP8 path emulated (a test and debug mode, slower than bf16), or train in bf16";
    match (cuda, capability) {
        (false, _) => Err(TrainError::config(
            key,
            format!("\"fp8\" needs a CUDA GPU of compute capability {}.{} or later (FP8 GEMMs through _scaled_mm); this run is on the CPU: {emu}", MIN_CAPABILITY / 10, MIN_CAPABILITY % 10),
        )),
        (true, Some(cc)) if cc < MIN_CAPABILITY => Err(TrainError::config(
            key,
            format!(
                "\"fp8\" needs compute capability {}.{} or later (Ada, Hopper: FP8 tensor cores); this GPU has {}.{}: {emu}",
                MIN_CAPABILITY / 10,
                MIN_CAPABILITY % 10,
                cc / 10,
                cc % 10
            ),
        )),
        _ => Ok(Gemm::ScaledMm),
    }
}

/// The FP8 copies of a model's FP8 weights (see the module header).
pub struct Fp8Weights {
    pub plan: Fp8Plan,
    /// By parameter: whether it multiplies in FP8.
    fp8: Vec<bool>,
    /// By parameter: its FP8 forms, made at its first use after a change.
    copies: RefCell<Vec<Option<Fp8Weight>>>,
    /// Merged pairs (gate and up) by their first parameter: the FP8 forms
    /// of the two as one weight, made at first use after a change.
    merged: RefCell<HashMap<usize, Fp8Weight>>,
    /// The master weights' version the copies were made from (`Params::version`).
    made_from: Cell<Option<(i64, u64)>>,
    refreshes: Cell<u64>,
}

impl Fp8Weights {
    /// The FP8 weights of `params` under `plan` (copies made at first use).
    pub fn new(plan: Fp8Plan, params: &Params) -> Fp8Weights {
        let fp8: Vec<bool> = params
            .specs
            .iter()
            .map(|s| plan.runs_in_fp8(s.key, s.kind))
            .collect();
        Fp8Weights {
            copies: RefCell::new(fp8.iter().map(|_| None).collect()),
            merged: RefCell::new(HashMap::new()),
            fp8,
            plan,
            made_from: Cell::new(None),
            refreshes: Cell::new(0),
        }
    }

    /// Whether parameter `id` multiplies in FP8.
    pub fn covers(&self, id: ParamId) -> bool {
        self.fp8[id.0]
    }

    /// The parameters that multiply in FP8, in layout order.
    pub fn ids(&self) -> Vec<ParamId> {
        (0..self.fp8.len())
            .filter(|&i| self.fp8[i])
            .map(ParamId)
            .collect()
    }

    /// Drop the copies when the master weights `params` changed since they
    /// were made (each is made again at its next use).
    fn sync(&self, params: &Params) {
        let now = params.version();
        if self.made_from.get() != Some(now) {
            self.copies.borrow_mut().iter_mut().for_each(|c| *c = None);
            self.merged.borrow_mut().clear();
            self.made_from.set(Some(now));
            self.refreshes.set(self.refreshes.get() + 1);
        }
    }

    fn make(&self, w: &Tensor) -> Fp8Weight {
        Fp8Weight::new(w, self.plan.opts.scaling, self.plan.opts.margin)
    }

    /// The FP8 forms of parameter `id` when it multiplies in FP8, made anew
    /// from the master weights `params` first if those changed.
    pub fn weight(&self, params: &Params, id: ParamId) -> Option<Fp8Weight> {
        if !self.fp8[id.0] {
            return None;
        }
        self.sync(params);
        let mut copies = self.copies.borrow_mut();
        let c = copies[id.0].get_or_insert_with(|| self.make(params.tensor(id)));
        Some(c.shallow_clone())
    }

    /// The FP8 forms of matmul weights `a` and `b` as one weight [rows_a +
    /// rows_b, in]: gate and up, which read one input, so that it is
    /// quantised once and multiplied by one GEMM. Its scales cover both
    /// (tensorwise: one for the pair; rowwise: per row of each form, so the
    /// transposed form's rows span both). None unless both multiply in FP8
    /// and read inputs of one width.
    pub fn merged(&self, params: &Params, a: ParamId, b: ParamId) -> Option<Fp8Weight> {
        let (wa, wb) = (params.tensor(a), params.tensor(b));
        if !(self.fp8[a.0] && self.fp8[b.0]) || wa.dim() != 2 || wa.size()[1..] != wb.size()[1..] {
            return None;
        }
        self.sync(params);
        let mut merged = self.merged.borrow_mut();
        let c = merged.entry(a.0).or_insert_with(|| {
            // The pair's master weights side by side in the flat buffer are
            // the merged matrix already: a view, no copy.
            let w = params
                .merged_master(a, b)
                .unwrap_or_else(|| tch::no_grad(|| Tensor::cat(&[wa, wb], 0)));
            self.make(&w)
        });
        Some(c.shallow_clone())
    }

    /// How many times the copies were made so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.get()
    }

    /// The recipe and what it covers, for the metrics and checkpoints.
    pub fn record(&self, params: &Params) -> serde_json::Value {
        let o = &self.plan.opts;
        let ids = self.ids();
        let numel: i64 = ids.iter().map(|&id| params.spec(id).numel()).sum();
        serde_json::json!({
            "recipe": scaling_name(o.scaling),
            "margin": o.margin,
            "fast_accum": o.fast_accum,
            "forward_format": "e4m3",
            "grad_format": o.grad.name(),
            "weight_grad": if o.wgrad_fp8 { "fp8" } else { "bf16" },
            "fp8_layers": (0..self.plan.num_layers).filter(|&l| self.plan.fp8_layer(l)).collect::<Vec<_>>(),
            "fp8_weights": ids.len(),
            "fp8_params": numel,
            "gemm": match o.gemm { Gemm::ScaledMm => "scaled_mm", Gemm::Emulated => "emulated" },
        })
    }
}
