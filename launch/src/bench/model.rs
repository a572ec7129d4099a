//! `sigma bench decode --model CONFIG`: whole-model decoding tokens/s of a
//! config's model (random weights: speed does not depend on them) against
//! its GQA counterpart, at each batch size and context length, with the
//! decode kernel and with the tensor-operation path (steps launched from the
//! host), and with the decode kernel recorded as a CUDA graph and replayed
//! (on a GPU: infer::decoder), and how close a step comes to the memory bound: the weights and the cache read once per step
//! at the memory's bandwidth (a table by GPU name, `--peak-gbps`, or a
//! measured device-to-device copy; the header says which).

use anyhow::{bail, Result};
use sigma_trainer::config::{KCompression, ModelConfig, RunConfig};
use sigma_trainer::infer::decoder::{Decoder, StepMode};
use sigma_trainer::infer::generate::KvCache;
use sigma_trainer::model::ModelInit;
use sigma_trainer::train::profile::{Profiler, Window};
use sigma_trainer::{kernels, Model};
use tch::{Device, Kind, Tensor};

use super::args::DecodeArgs;
use super::timing::{device_name, median_time};

/// The config's model with `n` K and V heads of the full head dimension.
fn gqa_counterpart(c: &ModelConfig, n: usize) -> ModelConfig {
    ModelConfig {
        num_k_heads: n,
        num_v_heads: n,
        k_compression: KCompression::None,
        k_dim: None,
        ..c.clone()
    }
}

fn build(cfg: &ModelConfig, device: Device) -> Model {
    let m = Model::new(
        cfg,
        &ModelInit {
            seed: 0,
            decay_norms: true,
            decay_embeddings: false,
            device: Device::Cpu,
            mixed: device.is_cuda(),
        },
    );
    sigma_trainer::infer::eval::move_model(m, device) // bf16 working weights on a GPU
}

pub fn run(a: &DecodeArgs, config: &str, device: Device) -> Result<()> {
    if a.profile && !device.is_cuda() {
        bail!("--profile profiles the CUDA-graph step: it needs --device cuda");
    }
    let cfg = RunConfig::load(config, &[])?.model;
    if a.gqa_kv <= 0 || cfg.num_q_heads % a.gqa_kv as usize != 0 {
        bail!(
            "--gqa-kv {}: must divide the model's {} query heads",
            a.gqa_kv,
            cfg.num_q_heads
        );
    }
    let variants = [
        ("DiffQKV", cfg.clone()),
        ("GQA", gqa_counterpart(&cfg, a.gqa_kv as usize)),
    ];
    println!(
        "whole-model decoding, {config} (random weights) on {}: one new token per sequence per step, median of {} steps",
        device_name(device),
        a.steps
    );
    if device.is_cuda() {
        for (name, c) in &variants {
            println!(
                "{name}: \"kernel\" attends through {}",
                attention_path(c, device)
            );
        }
    }
    let (gbps, source) = bandwidth(a.peak_gbps, device)?;
    println!("memory bandwidth {gbps:.1} GB/s ({source}); the bound of a step: its weights and its sequences' cache read once at that rate");
    println!("\"kernel\" and \"ops\": steps launched from the host; \"graph\": the kernel's step recorded as a CUDA graph and replayed (GPU); \"of bound\": the fastest step's share of the bound");
    println!(
        "{:<8} {:>9} {:>6} {:>8} {:>10} {:>10} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9}",
        "model",
        "heads",
        "batch",
        "context",
        "weights MB",
        "cache MB",
        "kernel tok/s",
        "ops tok/s",
        "graph tok/s",
        "kernel ms",
        "graph ms",
        "bound ms",
        "of bound"
    );
    for (name, c) in variants {
        // The model is drawn on the host in fp32 before any move to the GPU.
        // (the config's checked count, as loading a checkpoint asks it).
        let params = c.param_count().unwrap_or(u64::MAX);
        sigma_trainer::model::summary::check_host_memory(
            params as f64 * 4.0,
            &format!("building {config}'s {name} model"),
        )?;
        let model = build(&c, device);
        let heads = format!("{}/{}/{}", c.num_q_heads, c.num_k_heads, c.num_v_heads);
        let weights = weight_bytes_read(&c, if device.is_cuda() { 2 } else { 4 });
        for &b in &a.batch {
            for &s in &a.context {
                let case = Case {
                    name,
                    heads: &heads,
                    weights,
                    gbps,
                };
                time_case(a, &case, &c, &model, (b, s), device)?;
            }
        }
    }
    Ok(())
}

/// GB/s of peak memory bandwidth of some GPUs, by a part of the name the
/// driver gives (the first that matches, so the more specific first).
const PEAK_GBPS: &[(&str, f64)] = &[
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0), // SXM (HBM3)
    ("H800", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-PCIE-40GB", 1555.0),
    ("A100-SXM4-40GB", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
];

/// The table's bandwidth for a GPU name, if it is listed.
fn table_gbps(name: &str) -> Option<f64> {
    PEAK_GBPS
        .iter()
        .find(|(part, _)| name.contains(part))
        .map(|&(_, g)| g)
}

/// The bandwidth the bound uses and where it came from: `--peak-gbps`, the
/// table (a GPU it lists) or a measured copy (anything else, the CPU too).
fn bandwidth(flag: Option<f64>, device: Device) -> Result<(f64, String)> {
    if let Some(g) = flag {
        return Ok((g, "--peak-gbps".into()));
    }
    let name = device_name(device);
    if device.is_cuda() {
        if let Some(g) = table_gbps(&name) {
            return Ok((g, format!("table: {name}")));
        }
    }
    let mb = if device.is_cuda() { 1024 } else { 64 };
    let n = mb * (1 << 20) / 4;
    let src = Tensor::f_ones([n], (Kind::Float, device))?;
    let mut dst = Tensor::f_empty([n], (Kind::Float, device))?;
    let t = median_time(device, 5, &mut || {
        dst.f_copy_(&src)?;
        Ok(())
    })?;
    let gbps = 2.0 * (mb as f64 * (1 << 20) as f64) / t / 1e9;
    Ok((
        gbps,
        format!("measured on {name}: a copy of {mb} MiB, read and written"),
    ))
}

/// Bytes of weights one decoding step reads at `elt` bytes per parameter:
/// every parameter but an untied input embedding (of which a step reads
/// one row per sequence, left out); tied, the head reads it whole.
fn weight_bytes_read(c: &ModelConfig, elt: i64) -> i64 {
    let params = sigma_trainer::model::summary::summarize(c, 1).params;
    let embedding = if c.tie_embeddings {
        0
    } else {
        (c.vocab_size * c.d_model) as i64
    };
    (params - embedding) * elt
}

/// The memory bound of a step (seconds to read `bytes` at `gbps`) and the
/// share of it a step of `seconds` reaches.
fn bound(bytes: i64, gbps: f64, seconds: f64) -> (f64, f64) {
    let t = bytes as f64 / (gbps * 1e9);
    (t, t / seconds)
}

/// What a row of the table is about besides its batch and context.
struct Case<'a> {
    name: &'a str,
    heads: &'a str,
    weights: i64,
    gbps: f64,
}

/// Which path a model's decode attention takes on a GPU (its shapes, bf16).
fn attention_path(c: &ModelConfig, device: Device) -> String {
    let z =
        |n: usize, d: usize| Tensor::zeros([1, n as i64, 1, d as i64], (Kind::BFloat16, device));
    let (dd, dv) = (c.dot_dim(), c.v_head_dim);
    match kernels::decode::decode_kernel_available(
        &z(c.num_q_heads, dd),
        &z(c.num_k_heads, dd),
        &z(c.num_v_heads, dv),
    ) {
        Ok(()) => "the decode kernel".to_string(),
        Err(why) => format!("tensor operations ({why})"),
    }
}

/// One row: `model` (`case`: its name, heads, weight bytes) decoding
/// batch `b` at context `s`, with the decode kernel and with the tensor
/// path, and the kernel's step against the memory bound (a note instead
/// when the cache does not fit or the run is out of memory).
fn time_case(
    a: &DecodeArgs,
    case: &Case,
    c: &ModelConfig,
    model: &Model,
    (b, s): (i64, i64),
    device: Device,
) -> Result<()> {
    let (name, heads) = (case.name, case.heads);
    // Each timing starts from `s` filled slots: median_time's 5 warm-up
    // steps, the timed steps, and the profiled ones.
    let capacity = s + 5 + a.steps as i64 + PROFILED_STEPS as i64 + 8;
    let Ok(mut cache) = KvCache::new(model, b, capacity, device) else {
        println!("{name:<8} {heads:>9} {b:>6} {s:>8}  (the cache does not fit: skipped)");
        return Ok(());
    };
    let bytes = cache.bytes_per_token() * b * s;
    let time = |on: bool, cache: &mut KvCache| -> Result<f64> {
        kernels::decode::set_decode_kernel(on);
        cache.pretend_filled(s);
        let tokens = Tensor::randint(c.vocab_size as i64, [b], (Kind::Int64, device));
        median_time(device, a.steps, &mut || {
            let _ = tch::no_grad(|| model.frozen().decode_step(cache, &tokens))?;
            Ok(())
        })
    };
    let timed = time(true, &mut cache).and_then(|k| Ok((k, time(false, &mut cache)?)));
    kernels::decode::set_decode_kernel(true);
    let fwd = model.frozen();
    let graphed = match (&timed, device.is_cuda()) {
        (Ok(_), true) => time_graph(c, &fwd, cache, (b, s), a.steps, a.profile).map(Some),
        _ => Ok(None),
    };
    let (kernel, ops, graph) = match timed.and_then(|(k, o)| Ok((k, o, graphed?))) {
        Ok(t) => t,
        Err(e) if e.to_string().contains("out of memory") => {
            println!("{name:<8} {heads:>9} {b:>6} {s:>8}  (out of memory: skipped)");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let best = graph.map_or(kernel, |g| g.min(kernel));
    let (bound_s, share) = bound(case.weights + bytes, case.gbps, best);
    let dash = || "-".to_string();
    println!(
        "{name:<8} {heads:>9} {b:>6} {s:>8} {:>10.1} {:>10.3} {:>12.1} {:>12.1} {:>12} {:>10.3} {:>10} {:>10.4} {:>8.2}%",
        case.weights as f64 / 1e6,
        bytes as f64 / 1e6,
        b as f64 / kernel,
        b as f64 / ops,
        graph.map_or_else(dash, |g| format!("{:.1}", b as f64 / g)),
        kernel * 1e3,
        graph.map_or_else(dash, |g| format!("{:.3}", g * 1e3)),
        bound_s * 1e3,
        100.0 * share
    );
    Ok(())
}

/// Graph steps `--profile` profiles per case.
const PROFILED_STEPS: usize = 5;

/// The median step of batch `b` at context `s` recorded as CUDA graphs
/// and replayed (the first step of each bucket records, in the warm-up).
fn time_graph(
    c: &ModelConfig,
    fwd: &sigma_trainer::model::Fwd<'_>,
    mut cache: KvCache,
    (b, s): (i64, i64),
    steps: usize,
    profile: bool,
) -> Result<f64> {
    let device = cache.device();
    cache.pretend_filled(s);
    let mut decoder = Decoder::new(fwd, cache, StepMode::Graph)?;
    if decoder.mode() != StepMode::Graph {
        bail!("CUDA graphs cannot run here (see the warning above)");
    }
    let tokens = Tensor::randint(c.vocab_size as i64, [b], (Kind::Int64, device));
    let t = median_time(device, steps, &mut || {
        let _ = tch::no_grad(|| decoder.step(&tokens))?;
        Ok(())
    })?;
    if decoder.mode() != StepMode::Graph {
        bail!("recording the step as a CUDA graph failed (see the warning above)");
    }
    if profile {
        let Device::Cuda(ordinal) = device else {
            unreachable!("graphs run on CUDA devices only")
        };
        let mut p = Profiler::new(Some(ordinal), device_name(device));
        for _ in 0..PROFILED_STEPS {
            p.begin(Window::Decode);
            let _ = tch::no_grad(|| decoder.step(&tokens))?;
            p.end();
            p.add_step(0.0);
        }
        println!(
            "graph step, batch {b}, context {s}: {}",
            p.finish().table_top(20)
        );
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bandwidth_table_knows_the_cards_by_the_names_their_drivers_give() {
        for (name, want) in [
            ("NVIDIA H100 80GB HBM3", Some(3350.0)),
            ("NVIDIA H100 PCIe", Some(2000.0)),
            ("NVIDIA H100 NVL", Some(3900.0)),
            ("NVIDIA H200", Some(4800.0)),
            ("NVIDIA A100-SXM4-80GB", Some(2039.0)),
            ("NVIDIA GeForce RTX 4090", None),
            ("cpu", None),
        ] {
            assert_eq!(table_gbps(name), want, "{name}");
        }
    }

    #[test]
    fn the_bound_counts_weights_once_and_the_cache_per_sequence() {
        // 1 GB at 1,000 GB/s: 1 ms; a step of 2 ms reaches half of it.
        assert_eq!(bound(1_000_000_000, 1000.0, 2e-3), (1e-3, 0.5));
        let c = sigma_trainer::config::RunConfig::load(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/sigma-1.5b.toml"),
            &[],
        )
        .expect("the SIGMA-1.5B config")
        .model;
        // Tied: all 2.02 B parameters (the head reads the embedding whole).
        let tied = weight_bytes_read(&c, 2);
        assert!((4.0e9..4.1e9).contains(&(tied as f64)), "{tied}");
        // Untied: the input embedding is not read whole.
        let untied = ModelConfig {
            tie_embeddings: false,
            ..c.clone()
        };
        assert_eq!(weight_bytes_read(&untied, 2), tied);
    }
}
