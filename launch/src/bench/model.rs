//! `sigma bench decode --model CONFIG`: whole-model decoding tokens/s of a
//! config's model (random weights: speed does not depend on them) against
//! its GQA counterpart, at each batch size and context length, with the
//! decode kernel and with the tensor-operation path.

use anyhow::{bail, Result};
use sigma_trainer::config::{KCompression, ModelConfig, RunConfig};
use sigma_trainer::infer::generate::KvCache;
use sigma_trainer::model::ModelInit;
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
    println!(
        "{:<8} {:>9} {:>6} {:>8} {:>14} {:>12} {:>12} {:>12}",
        "model", "heads", "batch", "context", "cache MB", "kernel tok/s", "ops tok/s", "kernel ms"
    );
    for (name, c) in variants {
        let model = build(&c, device);
        let heads = format!("{}/{}/{}", c.num_q_heads, c.num_k_heads, c.num_v_heads);
        for &b in &a.batch {
            for &s in &a.context {
                time_case(a, (name, &heads), &c, &model, (b, s), device)?;
            }
        }
    }
    Ok(())
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

/// One row: `model` (named `name`, heads `heads`) decoding batch `b` at
/// context `s`, with the decode kernel and with the tensor path (a note
/// instead when the cache does not fit or the run is out of memory).
fn time_case(
    a: &DecodeArgs,
    (name, heads): (&str, &str),
    c: &ModelConfig,
    model: &Model,
    (b, s): (i64, i64),
    device: Device,
) -> Result<()> {
    let capacity = s + a.steps as i64 + 8;
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
    let (kernel, ops) = match timed {
        Ok(t) => t,
        Err(e) if e.to_string().contains("out of memory") => {
            println!("{name:<8} {heads:>9} {b:>6} {s:>8}  (out of memory: skipped)");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    println!(
        "{name:<8} {heads:>9} {b:>6} {s:>8} {:>14.0} {:>12.0} {:>12.0} {:>12.3}",
        bytes as f64 / 1e6,
        b as f64 / kernel,
        b as f64 / ops,
        kernel * 1e3
    );
    Ok(())
}
