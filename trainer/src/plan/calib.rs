//! Calibrations: the measured rates and bandwidths `sigma plan`'s model
//! runs on, one TOML file per kind of GPU, every number with its source (a
//! run recorded in docs/benchmarks.md with its commit, a vendor figure named
//! as such, or an assumption said to be one). The defaults for H100 and
//! H200 ship in `trainer/assets/plan/`; `sigma plan calibrate` writes a
//! measured one (docs/plan.md).

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// One number and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Param {
    pub value: f64,
    pub source: String,
}

/// bf16 GEMM throughput for weights whose smaller side is at most `up_to`
/// (0: any larger), in TFLOP/s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmRate {
    pub up_to: usize,
    pub tflops: f64,
    pub source: String,
}

/// Causal attention (forward and backward, FLOPs counted as `sigma model
/// summary` does) for one head dimension, in TFLOP/s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionRate {
    pub head_dim: usize,
    pub tflops: f64,
    pub source: String,
}

/// An all-reduce's bus bandwidth (nccl-tests' convention) over `gpus` GPUs
/// of one node for a message of `mib` MiB, in GB/s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusPoint {
    pub gpus: usize,
    pub mib: f64,
    pub gbps: f64,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryCal {
    /// What the card has (nvidia-smi's total).
    pub capacity_mib: Param,
    /// The CUDA context and libraries' handles, outside the caching allocator.
    pub cuda_context_mib: Param,
    /// Reserved beyond allocated, as a fraction of the allocated peak.
    pub fragmentation: Param,
    /// NCCL's own buffers per communicator, outside the caching allocator.
    pub nccl_mib_per_communicator: Param,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeCal {
    /// The dense bf16 peak MFU is counted against.
    pub peak_tflops: Param,
    pub gemm: Vec<GemmRate>,
    pub attention: Vec<AttentionRate>,
    /// Activation bytes the elementwise work (norms, residual adds, SwiGLU,
    /// RoPE, casts, loss) gets through per second, forward; backward twice.
    pub elementwise_gbps: Param,
    /// The optimizer step per updated parameter (norm, clipping, AdamW).
    pub optimizer_ps_per_param: Param,
    /// The bf16 working copy's refresh per held parameter.
    pub work_copy_ps_per_param: Param,
    /// The host's share of a step the device idles through.
    pub host_ms_per_step: Param,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCal {
    pub nvlink_allreduce: Vec<BusPoint>,
    /// All-gather and reduce-scatter bus bandwidth inside a node, GB/s.
    pub nvlink_gather_gbps: Param,
    /// What each tensor-parallel collective of the engine costs beyond its
    /// transfer (launch, the stream events around it, the copies' setup).
    pub tp_collective_us: Param,
    pub nvlink_latency_us: Param,
    /// A pipeline's point-to-point message inside a node, GB/s.
    pub nvlink_p2p_gbps: Param,
    /// Bus bandwidth per GPU between nodes, GB/s.
    pub internode_gbps: Param,
    pub internode_latency_us: Param,
    /// The share of a backward tensor-parallel collective hidden behind the
    /// weight-gradient GEMMs it overlaps (`parallel.tp_comm_overlap`).
    pub tp_overlap: Param,
    /// The share of the data-parallel buckets' all-reduce hidden behind backward.
    pub dp_overlap: Param,
}

/// A calibration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// The device it describes, as the driver names it.
    pub gpu: String,
    /// How it was made (the command, the date, the commit).
    pub made_by: String,
    pub memory: MemoryCal,
    pub compute: ComputeCal,
    pub network: NetworkCal,
}

/// The shipped calibrations, by the name `--gpu` takes.
pub const BUILT_IN: [(&str, &str); 2] = [
    ("h100", include_str!("../../assets/plan/h100.toml")),
    ("h200", include_str!("../../assets/plan/h200.toml")),
];

impl Calibration {
    /// The shipped calibration of `name` (h100, h200).
    pub fn built_in(name: &str) -> Result<Calibration> {
        match BUILT_IN.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Calibration::parse(&format!("built-in calibration {n}"), text),
            None => Err(TrainError::input(
                "--gpu",
                format!(
                    "no built-in calibration for {name}; the shipped ones: {}",
                    BUILT_IN.map(|b| b.0).join(", ")
                ),
            )),
        }
    }

    /// Read a calibration file.
    pub fn load(path: &str) -> Result<Calibration> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Calibration::parse(path, &text)
    }

    /// Parse and check: every value finite and in range, every source given.
    pub fn parse(file: &str, text: &str) -> Result<Calibration> {
        let c: Calibration =
            toml::from_str(text).map_err(|e| TrainError::file(file, e.message().to_string()))?;
        c.check()
            .map_err(|(key, why)| TrainError::file(file, format!("{key}: {why}")))?;
        Ok(c)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a calibration serializes")
    }

    /// Every parameter with its key.
    fn params(&self) -> Vec<(String, f64, &str)> {
        let (m, c, n) = (&self.memory, &self.compute, &self.network);
        let mut v: Vec<(String, f64, &str)> = [
            ("memory.capacity_mib", &m.capacity_mib),
            ("memory.cuda_context_mib", &m.cuda_context_mib),
            ("memory.fragmentation", &m.fragmentation),
            (
                "memory.nccl_mib_per_communicator",
                &m.nccl_mib_per_communicator,
            ),
            ("compute.peak_tflops", &c.peak_tflops),
            ("compute.elementwise_gbps", &c.elementwise_gbps),
            ("compute.optimizer_ps_per_param", &c.optimizer_ps_per_param),
            ("compute.work_copy_ps_per_param", &c.work_copy_ps_per_param),
            ("compute.host_ms_per_step", &c.host_ms_per_step),
            ("network.nvlink_gather_gbps", &n.nvlink_gather_gbps),
            ("network.tp_collective_us", &n.tp_collective_us),
            ("network.nvlink_latency_us", &n.nvlink_latency_us),
            ("network.nvlink_p2p_gbps", &n.nvlink_p2p_gbps),
            ("network.internode_gbps", &n.internode_gbps),
            ("network.internode_latency_us", &n.internode_latency_us),
            ("network.tp_overlap", &n.tp_overlap),
            ("network.dp_overlap", &n.dp_overlap),
        ]
        .into_iter()
        .map(|(k, p)| (k.to_string(), p.value, p.source.as_str()))
        .collect();
        for (i, g) in c.gemm.iter().enumerate() {
            v.push((format!("compute.gemm[{i}]"), g.tflops, &g.source));
        }
        for (i, a) in c.attention.iter().enumerate() {
            v.push((format!("compute.attention[{i}]"), a.tflops, &a.source));
        }
        for (i, b) in n.nvlink_allreduce.iter().enumerate() {
            v.push((format!("network.nvlink_allreduce[{i}]"), b.gbps, &b.source));
        }
        v
    }

    fn check(&self) -> std::result::Result<(), (String, String)> {
        for (key, value, source) in self.params() {
            if source.trim().is_empty() {
                return Err((key, "has no source: name the run (docs/benchmarks.md and its commit), the vendor figure or the assumption".into()));
            }
            let fraction = key.ends_with("fragmentation") || key.ends_with("_overlap");
            let zero_ok =
                fraction || key.ends_with("tp_collective_us") || key.ends_with("host_ms_per_step");
            let ok = value.is_finite()
                && if zero_ok { value >= 0.0 } else { value > 0.0 }
                && (!fraction || value <= 1.0);
            if !ok {
                let want = if fraction {
                    "in 0..=1"
                } else if zero_ok {
                    ">= 0"
                } else {
                    "> 0"
                };
                return Err((key, format!("{value} must be {want}")));
            }
        }
        let (c, n) = (&self.compute, &self.network);
        for (key, empty) in [
            ("compute.gemm", c.gemm.is_empty()),
            ("compute.attention", c.attention.is_empty()),
            ("network.nvlink_allreduce", n.nvlink_allreduce.is_empty()),
        ] {
            if empty {
                return Err((key.into(), "needs at least one entry".into()));
            }
        }
        if n.nvlink_allreduce
            .iter()
            .any(|b| b.gpus < 2 || b.mib.is_nan() || b.mib <= 0.0)
        {
            return Err((
                "network.nvlink_allreduce".into(),
                "each entry needs gpus >= 2 and mib > 0".into(),
            ));
        }
        Ok(())
    }

    /// GEMM throughput (FLOP/s) for a weight whose smaller side is `side`.
    pub fn gemm_flops(&self, side: usize) -> f64 {
        let g = &self.compute.gemm;
        let pick = g
            .iter()
            .filter(|r| r.up_to == 0 || side <= r.up_to)
            .min_by_key(|r| if r.up_to == 0 { usize::MAX } else { r.up_to })
            .or_else(|| g.iter().max_by_key(|r| r.up_to))
            .expect("checked: not empty");
        pick.tflops * 1e12
    }

    /// Attention throughput (FLOP/s) at head dimension `dim`: the entry of
    /// the nearest measured dimension.
    pub fn attention_flops(&self, dim: usize) -> f64 {
        let a = &self.compute.attention;
        let near = a
            .iter()
            .min_by_key(|r| r.head_dim.abs_diff(dim))
            .expect("checked: not empty");
        near.tflops * 1e12
    }

    /// All-reduce bus bandwidth (bytes/s) over `gpus` GPUs of a node for a
    /// message of `bytes`: the entries of the nearest measured GPU count,
    /// interpolated in the logarithm of the size (clamped at the ends).
    pub fn nvlink_allreduce(&self, gpus: usize, bytes: f64) -> f64 {
        let pts = &self.network.nvlink_allreduce;
        let g = pts
            .iter()
            .map(|p| p.gpus)
            .min_by_key(|&n| n.abs_diff(gpus))
            .expect("checked: not empty");
        let mut row: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.gpus == g)
            .map(|p| ((p.mib * 1048576.0).ln(), p.gbps))
            .collect();
        row.sort_by(|a, b| a.0.total_cmp(&b.0));
        let x = bytes.max(1.0).ln();
        let gbps = match row.iter().position(|p| p.0 >= x) {
            Some(0) => row[0].1,
            None => row[row.len() - 1].1,
            Some(i) => {
                let (a, b) = (row[i - 1], row[i]);
                a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0)
            }
        };
        gbps * 1e9
    }
}
