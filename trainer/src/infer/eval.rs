//! Evaluation: loss, perplexity and bits per byte per domain, on the
//! validation windows of a data config (the windows training validates on)
//! or on raw text files. Training's validation and `sigma eval` both run
//! `evaluate`, so a checkpoint evaluated later gives the numbers its run
//! logged at that step.

use std::path::Path;

use serde::Serialize;
use sigma_data::store::block_on;
use sigma_data::{Dataset, Tokenizer};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::load::Checkpoint;
use crate::config::{ModelConfig, RunConfig};
use crate::engine::{ExecOptions, Runner};
use crate::error::{Result, TrainError};
use crate::model::summary::check_host_memory;
use crate::model::{Fwd, Model, ModelInit};
use crate::parallel::tp::TpPlan;

/// Windows of `seq_len + 1` tokens, by domain.
pub trait Windows {
    fn domains(&self) -> Vec<String>;
    /// Windows of domain `d`.
    fn count(&self, d: usize) -> u64;
    fn window(&self, d: usize, k: u64) -> Result<Vec<u32>>;
}

/// A dataset's validation split (documents in manifest order).
pub struct Validation<'a>(pub &'a Dataset);

impl Windows for Validation<'_> {
    fn domains(&self) -> Vec<String> {
        self.0.domains.clone()
    }
    fn count(&self, d: usize) -> u64 {
        self.0.num_valid_samples(d)
    }
    fn window(&self, d: usize, k: u64) -> Result<Vec<u32>> {
        Ok(block_on(self.0.valid_sample(d, k))?.tokens)
    }
}

/// Raw files, each one "domain": its documents tokenized, joined by EOS, cut
/// into consecutive windows (the tail shorter than a window is left out).
pub struct Files {
    names: Vec<String>,
    windows: Vec<Vec<Vec<u32>>>,
}

impl Files {
    pub fn read(
        inputs: &[String],
        tok: &Tokenizer,
        seq_len: usize,
        text_field: &str,
    ) -> Result<Files> {
        let mut names = Vec::new();
        let mut windows = Vec::new();
        for input in inputs {
            let loc = sigma_data::store::Location::parse(input)?;
            let mut stream: Vec<u32> = Vec::new();
            let mut texts: Vec<String> = Vec::new();
            block_on(sigma_data::readers::read_file(&loc, text_field, &mut |d| {
                texts.push(d.text);
                Ok(())
            }))?;
            for t in texts {
                stream.extend(tok.encode(&t)?);
                stream.push(tok.eos_id);
            }
            let w: Vec<Vec<u32>> = stream
                .chunks_exact(seq_len + 1)
                .map(|c| c.to_vec())
                .collect();
            if w.is_empty() {
                return Err(TrainError::file(
                    input,
                    format!(
                        "{} tokens, fewer than one window of data.seq_len + 1 = {}",
                        stream.len(),
                        seq_len + 1
                    ),
                ));
            }
            names.push(input.clone());
            windows.push(w);
        }
        Ok(Files { names, windows })
    }
}

impl Windows for Files {
    fn domains(&self) -> Vec<String> {
        self.names.clone()
    }
    fn count(&self, d: usize) -> u64 {
        self.windows[d].len() as u64
    }
    fn window(&self, d: usize, k: u64) -> Result<Vec<u32>> {
        Ok(self.windows[d][k as usize].clone())
    }
}

/// What one domain scored.
#[derive(Clone, Debug, Serialize)]
pub struct DomainScore {
    pub domain: String,
    pub windows: u64,
    /// Target tokens scored.
    pub tokens: u64,
    /// Sum of their losses, nats.
    pub loss_sum: f64,
    /// UTF-8 bytes of the scored targets' text (special tokens decode to none).
    pub bytes: Option<u64>,
}

impl DomainScore {
    /// Mean loss, nats per token.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.tokens.max(1) as f64
    }
    pub fn perplexity(&self) -> f64 {
        self.loss().exp()
    }
    pub fn bits_per_byte(&self) -> Option<f64> {
        self.bytes
            .filter(|&b| b > 0)
            .map(|b| self.loss_sum / std::f64::consts::LN_2 / b as f64)
    }
}

/// Score up to `max_windows` windows of every domain, `rows` windows per
/// forward pass; `loss_sum` returns the sum of token losses of a batch of
/// windows ([rows, seq_len + 1] token ids). With a tokenizer, also count the
/// bytes of the scored text (bits per byte).
pub fn evaluate(
    windows: &dyn Windows,
    rows: u64,
    max_windows: u64,
    device: Device,
    loss_sum: &mut dyn FnMut(&Tensor) -> Result<f64>,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<DomainScore>> {
    evaluate_part(
        windows,
        rows,
        max_windows,
        device,
        loss_sum,
        tokenizer,
        (0, 1),
    )
}

/// `evaluate` of part `part.0` of `part.1`: of every domain's batches of
/// `rows` windows, those whose index is `part.0` modulo `part.1` (data-parallel
/// ranks each score their part; the parts' sums add up to the whole).
pub fn evaluate_part(
    windows: &dyn Windows,
    rows: u64,
    max_windows: u64,
    device: Device,
    loss_sum: &mut dyn FnMut(&Tensor) -> Result<f64>,
    tokenizer: Option<&Tokenizer>,
    part: (u64, u64),
) -> Result<Vec<DomainScore>> {
    let mut out = Vec::new();
    for (d, name) in windows.domains().into_iter().enumerate() {
        let n = max_windows.min(windows.count(d));
        if n == 0 {
            continue;
        }
        let mut score = DomainScore {
            domain: name,
            windows: n,
            tokens: 0,
            loss_sum: 0.0,
            bytes: tokenizer.map(|_| 0),
        };
        let mut j = 0;
        let mut batch = 0u64;
        while j < n {
            let r = rows.max(1).min(n - j);
            batch += 1;
            if (batch - 1) % part.1.max(1) != part.0 {
                j += r;
                continue;
            }
            let mut ids: Vec<i64> = Vec::new();
            let mut seq = 0;
            for k in j..j + r {
                let w = windows.window(d, k)?;
                seq = w.len() as u64 - 1;
                if let (Some(tok), Some(b)) = (tokenizer, score.bytes.as_mut()) {
                    *b += tok.decode(&w[1..], true)?.len() as u64;
                }
                ids.extend(w.iter().map(|&t| t as i64));
            }
            let t = Tensor::from_slice(&ids)
                .view([r as i64, -1])
                .to_device(device);
            score.loss_sum += loss_sum(&t)?;
            score.tokens += r * seq;
            j += r;
        }
        out.push(score);
    }
    Ok(out)
}

/// A model loaded for evaluation on one device, from a checkpoint of any
/// layout or from an exported directory, with its tokenizer and, for a
/// checkpoint, the run's config.
pub struct Loaded {
    pub model: Model,
    /// How passes over it run: frozen weights; for a checkpoint, its run's
    /// chunking of the head, so validation sums add in the same order.
    pub opts: ExecOptions,
    pub tokenizer: Tokenizer,
    pub run: Option<RunConfig>,
}

impl Loaded {
    /// The model computing with frozen weights (generation).
    pub fn fwd(&self) -> Fwd<'_> {
        self.model.frozen()
    }

    /// Sum of token losses of a batch of windows [rows, seq_len + 1] (one device).
    pub fn loss_sum(&self, tokens: &Tensor) -> Result<Tensor> {
        let plan = TpPlan::single(&self.model.cfg);
        Runner::new(&self.model, &plan, self.opts).loss_sum(None, tokens)
    }
}

/// Load `path`: a checkpoint (`step-NNNNNNN/`, committed) or the output of
/// `sigma checkpoint export` (either format).
pub fn load(path: &Path, device: Device) -> Result<Loaded> {
    load_with(path, device, &mut |_| {})
}

/// [`load`], telling `on_config` the model's configuration as soon as it
/// is read and checked, before the weights are (`sigma generate` starts
/// building its kernels then: [`super::prebuild`]).
pub fn load_with(
    path: &Path,
    device: Device,
    on_config: &mut dyn FnMut(&ModelConfig),
) -> Result<Loaded> {
    if path.join(crate::checkpoint::METADATA).is_file() {
        return load_checkpoint(path, device, on_config);
    }
    let weights = path.join("model.safetensors");
    if !weights.is_file() || !path.join("config.json").is_file() {
        return Err(TrainError::file(
            path.display(),
            "neither a checkpoint (no metadata.json) nor an export (no model.safetensors and config.json)",
        ));
    }
    load_export(path, &weights, device, on_config)
}

/// A model of `cfg` on the host, its weights to be overwritten (fp32,
/// with a bf16 working copy where it will compute on a GPU).
fn host_model(cfg: &ModelConfig, seed: u64, device: Device) -> Model {
    Model::new(
        cfg,
        &ModelInit {
            seed,
            decay_norms: false,
            decay_embeddings: false,
            device: Device::Cpu,
            mixed: device.is_cuda(),
        },
    )
}

/// [`load_with`] of a committed checkpoint directory.
fn load_checkpoint(
    path: &Path,
    device: Device,
    on_config: &mut dyn FnMut(&ModelConfig),
) -> Result<Loaded> {
    let mut ck = Checkpoint::open(path)?;
    if ck.meta.files.contains_key(crate::checkpoint::TOKENIZER) {
        ck.verify(crate::checkpoint::TOKENIZER)?;
    }
    let run = ck.meta.run_config()?;
    run.model.validate()?;
    let tok_path = path.join(crate::checkpoint::TOKENIZER);
    let tokenizer = Tokenizer::load(&tok_path.to_string_lossy())?;
    check_vocab(&run.model, &tokenizer, &tok_path)?;
    on_config(&run.model);
    let n = run.model.param_count().unwrap_or(u64::MAX) as f64;
    check_host_memory(8.0 * n, "loading the checkpoint's model")?;
    let model = host_model(&run.model, run.train.seed, device);
    ck.check_model(&run.model)?;
    let n = model.params.numel();
    let w = ck.read_flat(crate::checkpoint::BUFFERS[0], &model.params, 0, n)?;
    tch::no_grad(|| model.params.flat.shallow_clone().copy_(&w));
    let model = move_model(model, device);
    Ok(Loaded {
        model,
        opts: frozen(run.train.loss_chunk_tokens),
        tokenizer,
        run: Some(run),
    })
}

/// [`load_with`] of the output of `sigma checkpoint export` (`weights`
/// its model.safetensors).
fn load_export(
    path: &Path,
    weights: &Path,
    device: Device,
    on_config: &mut dyn FnMut(&ModelConfig),
) -> Result<Loaded> {
    let tok_path = path.join(crate::checkpoint::TOKENIZER);
    let cfg = exported_model_config(&path.join("config.json"))?;
    check_export_tokenizer(&path.join("config.json"), &tok_path)?;
    let tokenizer = Tokenizer::load(&tok_path.to_string_lossy())?;
    check_vocab(&cfg, &tokenizer, &tok_path)?;
    let n = cfg.param_count().unwrap_or(u64::MAX) as f64;
    check_host_memory(8.0 * n, "loading the exported model")?;
    let mut r = crate::checkpoint::safetensors::Reader::open(weights)?;
    check_export_shapes(&cfg, &r, weights)?;
    on_config(&cfg);
    let model = host_model(&cfg, 0, device);
    tch::no_grad(|| -> Result<()> {
        for (i, spec) in model.params.specs.iter().enumerate() {
            let t = r.read(&spec.name())?;
            model.params.tensors[i]
                .shallow_clone()
                .copy_(&t.to_kind(Kind::Float).view(spec.shape.as_slice()));
        }
        Ok(())
    })?;
    let model = move_model(model, device);
    Ok(Loaded {
        model,
        opts: frozen(0),
        tokenizer,
        run: None,
    })
}

/// The export's tokenizer.json must be the one it was made with: its xxh3
/// against what config.json records (`sigma_tokenizer_xxh3`). Exports of
/// earlier versions record none: said, and not checked.
fn check_export_tokenizer(config: &Path, tokenizer: &Path) -> Result<()> {
    let text =
        std::fs::read(config).map_err(|e| TrainError::io(config.display().to_string(), e))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| TrainError::file(config.display(), format!("not JSON: {e}")))?;
    let key = crate::checkpoint::tools::TOKENIZER_XXH3;
    let Some(recorded) = v.get(key) else {
        eprintln!(
            "note: {} records no tokenizer checksum (an export of an earlier sigma): {} is not checked",
            config.display(),
            tokenizer.display()
        );
        return Ok(());
    };
    let Some(recorded) = recorded.as_str() else {
        return Ok(()); // the checkpoint had no tokenizer to record
    };
    let bytes =
        std::fs::read(tokenizer).map_err(|e| TrainError::io(tokenizer.display().to_string(), e))?;
    let have = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
    if have != recorded {
        return Err(TrainError::file(
            tokenizer.display(),
            format!(
                "is not the tokenizer this export was made with (xxh3 {have}; {} records {recorded}): put the export's own tokenizer.json back",
                config.display()
            ),
        ));
    }
    Ok(())
}

/// Every id of the tokenizer is a row of the model's embedding: a tokenizer
/// with more tokens than `vocab_size` is not the model's (its high ids
/// would fail inside the embedding).
fn check_vocab(cfg: &ModelConfig, tok: &Tokenizer, tok_path: &Path) -> Result<()> {
    if (cfg.vocab_size as u64) < tok.vocab_size as u64 {
        return Err(TrainError::file(
            tok_path.display(),
            format!(
                "has {} tokens, more than the model's vocab_size of {}: it is not the model's tokenizer",
                tok.vocab_size, cfg.vocab_size
            ),
        ));
    }
    Ok(())
}

/// Every weight `cfg` declares is in the export's safetensors file with the
/// shape `cfg` gives it, and the file holds no other tensor: an export
/// whose config.json and weights do not belong together is refused,
/// naming the first tensor that differs.
fn check_export_shapes(
    cfg: &ModelConfig,
    r: &crate::checkpoint::safetensors::Reader,
    weights: &Path,
) -> Result<()> {
    let specs = crate::model::params::whole_specs(cfg);
    let declared: std::collections::HashSet<String> = specs.iter().map(|s| s.name()).collect();
    let extra: Vec<&String> = r
        .entries
        .keys()
        .filter(|k| !declared.contains(*k))
        .collect();
    if let Some(name) = extra.first() {
        return Err(TrainError::file(
            weights.display(),
            format!(
                "has a tensor {name} (and {} more) that config.json's model does not have: the two are not one export",
                extra.len() - 1
            ),
        ));
    }
    for spec in specs {
        let name = spec.name();
        let Some(e) = r.entries.get(&name) else {
            return Err(TrainError::file(
                weights.display(),
                format!("has no tensor {name}, which config.json's model has: the two are not one export"),
            ));
        };
        if e.shape != spec.global_shape {
            return Err(TrainError::file(
                weights.display(),
                format!(
                    "{name} is {:?}, but config.json's model makes it {:?}: the two are not one export",
                    e.shape, spec.global_shape
                ),
            ));
        }
    }
    Ok(())
}

/// The options of passes over a loaded model: frozen weights, the head in
/// chunks of `loss_chunk_tokens` (0: the evaluation default).
fn frozen(loss_chunk_tokens: usize) -> ExecOptions {
    ExecOptions {
        loss_chunk_tokens,
        frozen: true,
        ..ExecOptions::default()
    }
}

/// Move a whole model loaded for evaluation or generation to `device`
/// (its passes run frozen: [`Loaded::opts`]). In bf16 (on a GPU) it gets bf16 working
/// weights there, cast once from the fp32 ones (2 bytes more per
/// parameter), as training keeps them: no cast of every weight at every
/// matmul of every decoding step. In fp32 there is no working copy.
pub fn move_model(model: Model, device: Device) -> Model {
    let mut m = model;
    if device != Device::Cpu {
        let flat = m.params.flat.to_device(device);
        m.params.replace_flat(flat);
    }
    // Made here, from the buffer on its device (a copy made before the move would be stale).
    let compute = m.compute;
    m.params.enable_work_copy(compute);
    m
}

/// The `[model]` section from an export's config.json (sigma's or Hugging
/// Face's: the model keys are the same; other keys are ignored).
pub fn exported_model_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read(path).map_err(|e| TrainError::io(path.display().to_string(), e))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| TrainError::file(path.display(), format!("not JSON: {e}")))?;
    if let Some(t) = v.get("model_type").filter(|t| t.as_str() != Some("sigma")) {
        return Err(TrainError::file(
            path.display(),
            format!("model_type {t}: not a sigma model (sigma's exports say \"sigma\")"),
        ));
    }
    let keys = [
        "vocab_size",
        "d_model",
        "num_layers",
        "ffn_dim",
        "num_q_heads",
        "num_k_heads",
        "num_v_heads",
        "qk_head_dim",
        "v_head_dim",
        "aug_q_dim",
        "k_compression",
        "k_dim",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
        "init_std",
    ];
    let mut m = serde_json::Map::new();
    for k in keys {
        if let Some(x) = v.get(k).filter(|x| !x.is_null()) {
            m.insert(k.to_string(), x.clone());
        }
    }
    let cfg: ModelConfig = serde_json::from_value(serde_json::Value::Object(m))
        .map_err(|e| TrainError::file(path.display(), format!("not a sigma model config: {e}")))?;
    cfg.validate()?;
    Ok(cfg)
}
