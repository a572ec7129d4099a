//! `sigma checkpoint inspect` and `sigma checkpoint export`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;
use sigma_data::fsutil::{sync_dir, write_atomic};
use tch::Kind;

use super::load::Checkpoint;
use super::*;
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::model::summary::check_host_memory;
use tch::Tensor;

fn mb(b: u64) -> String {
    format!("{:.2} MB", b as f64 / 1e6)
}

/// A readable report: progress, layout, files, tensors, and health (every
/// checksum, and non-finite values in weights and moments).
pub fn inspect(dir: &Path) -> Result<String> {
    let mut ck = Checkpoint::open(dir)?;
    let m = ck.meta.clone();
    let mut o = String::new();
    let _ = writeln!(o, "checkpoint {} (committed)", dir.display());
    describe_state(&mut o, &m);
    describe_contents(&mut o, &m);
    ck.verify_all()?;
    let mut bad = BTreeMap::new();
    for (name, e) in &m.tensors {
        let n: i64 = e.shape.iter().product();
        let t = ck.read(name)?;
        let nonfinite = n - i64::try_from(t.isfinite().sum(Kind::Int64)).unwrap_or(0);
        if nonfinite > 0 {
            bad.insert(name.clone(), nonfinite);
        }
    }
    let _ = writeln!(o, "health       all {} checksums match", m.files.len());
    if bad.is_empty() {
        let _ = writeln!(o, "             weights and moments are finite");
    } else {
        for (k, n) in &bad {
            let _ = writeln!(o, "             {k}: {n} non-finite value(s)");
        }
    }
    Ok(o)
}

/// Format, progress, data position, optimizer, seeds and layout.
fn describe_state(o: &mut String, m: &Metadata) {
    let l = &m.layout;
    let _ = writeln!(
        o,
        "format       {} v{}, saved at unix time {}",
        m.format, m.format_version, m.saved_unix_s
    );
    let _ = writeln!(
        o,
        "progress     step {} of {}, {} tokens, {} samples, {} skipped step(s)",
        m.progress.step,
        m.scheduler.total_steps,
        m.progress.consumed_tokens,
        m.progress.consumed_samples,
        m.progress.skipped_steps
    );
    let _ = writeln!(
        o,
        "data         mixture stage {}, next sample {}",
        m.data.stage, m.data.consumed_samples
    );
    let _ = writeln!(
        o,
        "optimizer    AdamW, {} update(s); last lr {:.4e}",
        m.optimizer.adam_steps, m.scheduler.last_lr
    );
    let _ = writeln!(
        o,
        "rng          seed {}, data seed {}",
        m.rng.seed, m.rng.data_seed
    );
    let _ = writeln!(
        o,
        "layout       dp {}{} tp {} pp {} zero {}; {} elements in rank 0's local buffers",
        l.dp,
        if l.cp > 1 {
            format!(" cp {}", l.cp)
        } else {
            String::new()
        },
        l.tp,
        l.pp,
        l.zero,
        l.flat_numel
    );
}

/// Every file with its size and checksum, every parameter with its shape.
fn describe_contents(o: &mut String, m: &Metadata) {
    let total: u64 = m.files.values().map(|f| f.bytes).sum();
    let _ = writeln!(o, "files        {} file(s), {}", m.files.len(), mb(total));
    for (name, f) in &m.files {
        let _ = writeln!(o, "  {name:<40} {:>12}  xxh3 {}", mb(f.bytes), f.xxh3);
    }
    let params: Vec<&String> = m
        .tensors
        .keys()
        .filter(|k| k.starts_with("model/"))
        .collect();
    let _ = writeln!(
        o,
        "tensors      {} buffers x {} parameters",
        BUFFERS.len(),
        params.len()
    );
    for name in &params {
        let e = &m.tensors[*name];
        let n: i64 = e.shape.iter().product();
        let _ = writeln!(
            o,
            "  {:<40} {:>18} {} {:>12}  {} piece(s)",
            name.trim_start_matches("model/"),
            format!("{:?}", e.shape),
            e.dtype,
            mb(n as u64 * 4),
            e.pieces.len()
        );
    }
}

/// Where an export's weights come from: a checkpoint (its run's config,
/// progress and tokenizer record) or a freshly initialised model (`--init`).
struct Origin {
    run: RunConfig,
    step: u64,
    tokens: u64,
    /// The tokenizer's xxh3 (null without one).
    tokenizer_xxh3: serde_json::Value,
    /// `--init`: the seed of the draws (no training).
    init_seed: Option<u64>,
}

impl Origin {
    fn of_checkpoint(meta: &Metadata) -> Result<Origin> {
        Ok(Origin {
            run: meta.run_config()?,
            step: meta.progress.step,
            tokens: meta.progress.consumed_tokens,
            tokenizer_xxh3: tokenizer_xxh3(meta),
            init_seed: None,
        })
    }

    /// The keys every config.json of an export records about its origin.
    fn keys(&self) -> serde_json::Value {
        let mut v = json!({
            "sigma_checkpoint_step": self.step,
            "sigma_tokens_seen": self.tokens,
            "sigma_tokenizer_xxh3": self.tokenizer_xxh3,
        });
        if let (Some(seed), Some(o)) = (self.init_seed, v.as_object_mut()) {
            o.insert("sigma_init_seed".into(), json!(seed));
        }
        v
    }
}

/// Merge the object `extra` into the object `v`.
fn extend(v: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
}

/// Architecture description for use outside sigma: the [model] section plus
/// the names and conventions a reader needs.
fn config_json(origin: &Origin, dtype: &str) -> serde_json::Value {
    let run = &origin.run;
    let mut v = serde_json::to_value(&run.model).expect("model config serializes");
    let extra = json!({
        "architectures": ["SigmaForCausalLM"],
        "model_type": "sigma",
        "torch_dtype": dtype,
        "max_position_embeddings": run.data.seq_len,
        "attention": "DiffQKV: num_q_heads query, num_k_heads key (dim qk_head_dim) and num_v_heads value (dim v_head_dim) heads; when aug_q_dim > 0 the projected query q passes through down(silu(gate(q)) * up(q)) (width aug_q_dim) before RoPE; linear weights are [out, in]",
        "tensor_names": "as in sigma: embed.weight, layers.{i}.*, final_norm.weight, lm_head.weight (absent when tie_embeddings)",
    });
    extend(&mut v, extra);
    extend(&mut v, origin.keys());
    v
}

/// The key of an export's config.json that records the xxh3 of its
/// tokenizer.json (`sigma eval` and `sigma generate` check it).
pub const TOKENIZER_XXH3: &str = "sigma_tokenizer_xxh3";

/// The checkpoint's record of its tokenizer's xxh3 (null without one).
fn tokenizer_xxh3(meta: &Metadata) -> serde_json::Value {
    meta.files
        .get(TOKENIZER)
        .map_or(serde_json::Value::Null, |f| json!(f.xxh3))
}

/// The weight dtype of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
}

impl ExportDtype {
    pub fn kind(self) -> Kind {
        match self {
            ExportDtype::F32 => Kind::Float,
            ExportDtype::Bf16 => Kind::BFloat16,
        }
    }

    /// The name config.json gives it (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
        }
    }
}

/// What `sigma checkpoint export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// model.safetensors, config.json (the [model] section and a description), tokenizer.json.
    Sigma,
    /// A Hugging Face model directory: the same weights, a config.json with
    /// `auto_map`, modeling_sigma.py and configuration_sigma.py (DiffQKV, AugQ,
    /// both K-compression readings), tokenizer.json and tokenizer_config.json,
    /// for `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
    HuggingFace,
}

static HF_MODELING: &str = include_str!("../../assets/hf/modeling_sigma.py");
static HF_CONFIGURATION: &str = include_str!("../../assets/hf/configuration_sigma.py");

/// config.json of a Hugging Face export.
fn hf_config_json(
    origin: &Origin,
    dtype: &str,
    tok: Option<&sigma_data::Tokenizer>,
) -> serde_json::Value {
    let run = &origin.run;
    let mut v = serde_json::to_value(&run.model).expect("model config serializes");
    let token = |id: Option<u32>| {
        id.map(|i| serde_json::json!(i))
            .unwrap_or(serde_json::Value::Null)
    };
    let extra = json!({
        "architectures": ["SigmaForCausalLM"],
        "model_type": "sigma",
        "auto_map": {
            "AutoConfig": "configuration_sigma.SigmaConfig",
            "AutoModelForCausalLM": "modeling_sigma.SigmaForCausalLM",
        },
        "torch_dtype": dtype,
        "max_position_embeddings": run.data.seq_len,
        "tie_word_embeddings": run.model.tie_embeddings,
        "eos_token_id": token(tok.map(|t| t.eos_id)),
        "bos_token_id": token(tok.and_then(|t| t.bos_id)),
        "pad_token_id": token(tok.and_then(|t| t.pad_id)),
        "use_cache": false,
    });
    extend(&mut v, extra);
    extend(&mut v, origin.keys());
    v
}

/// tokenizer_config.json for `AutoTokenizer`: the fast tokenizer of tokenizer.json and its special tokens.
fn hf_tokenizer_config(tok: &sigma_data::Tokenizer, max_len: usize) -> serde_json::Value {
    let name = |id: Option<u32>| id.and_then(|i| tok.token(i));
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": name(Some(tok.eos_id)),
        "bos_token": name(tok.bos_id),
        "pad_token": name(tok.pad_id),
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": false,
    })
}

/// The files of an export, into `tmp`: `tensors` (sigma's names, in the
/// export's dtype), the tokenizer (its tokenizer.json bytes, if any).
fn write_export(
    origin: &Origin,
    tensors: &[(String, Tensor)],
    dtype: ExportDtype,
    tokenizer: Option<&(Vec<u8>, sigma_data::Tokenizer)>,
    tmp: &Path,
    format: ExportFormat,
) -> Result<()> {
    let md = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("sigma_step".to_string(), origin.step.to_string()),
    ]);
    super::safetensors::write(&tmp.join("model.safetensors"), tensors, &md)?;
    if let Some((data, _)) = tokenizer {
        write_atomic(&tmp.join(TOKENIZER), data)?;
    }
    let tokenizer = tokenizer.map(|(_, t)| t);
    let cfg = match format {
        ExportFormat::Sigma => config_json(origin, dtype.torch_name()),
        ExportFormat::HuggingFace => {
            write_atomic(&tmp.join("modeling_sigma.py"), HF_MODELING.as_bytes())?;
            write_atomic(
                &tmp.join("configuration_sigma.py"),
                HF_CONFIGURATION.as_bytes(),
            )?;
            if let Some(t) = tokenizer {
                let tc = hf_tokenizer_config(t, origin.run.data.seq_len);
                write_atomic(
                    &tmp.join("tokenizer_config.json"),
                    serde_json::to_string_pretty(&tc).expect("json").as_bytes(),
                )?;
            }
            hf_config_json(origin, dtype.torch_name(), tokenizer)
        }
    };
    write_atomic(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&cfg).expect("json").as_bytes(),
    )?;
    sync_dir(tmp)?;
    Ok(())
}

/// An existing non-empty `out` is refused.
fn check_output(out: &Path) -> Result<()> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(TrainError::file(
            out.display(),
            "exists and is not empty; refusing to overwrite it (remove it or choose another --output)",
        ));
    }
    Ok(())
}

/// Run `write` on a temporary directory next to `out` and rename it to `out`
/// when it succeeds; on any failure the temporary directory goes, so nothing
/// half-written stays behind.
fn publish(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Failures before the rename name the output asked for, not the
    // temporary directory beside it.
    let unwritable = |e: std::io::Error| {
        let why = match sigma_data::fsutil::file_in_the_way(parent) {
            Some(f) => format!("{} is not a directory", f.display()),
            None => e.to_string(),
        };
        TrainError::file(out.display(), format!("cannot be written: {why}"))
    };
    std::fs::create_dir_all(parent).map_err(unwritable)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(unwritable)?;
    let written = write(&tmp);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| TrainError::io(out.display().to_string(), e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| TrainError::io(out.display().to_string(), e))?;
    sync_dir(parent)?;
    Ok(())
}

/// One consolidated `model.safetensors` (weights only, in `dtype`),
/// `config.json` and the tokenizer, written into a temporary directory that is
/// renamed to `out` when complete. An existing non-empty `out` is refused.
pub fn export(dir: &Path, out: &Path, dtype: ExportDtype, format: ExportFormat) -> Result<()> {
    check_output(out)?;
    let mut ck = Checkpoint::open(dir)?;
    let meta = ck.meta.clone();
    let tok = dir.join(TOKENIZER);
    if meta.files.contains_key(TOKENIZER) {
        // The tokenizer must be the one the checkpoint recorded, byte for byte.
        ck.verify(TOKENIZER)?;
    }
    let origin = Origin::of_checkpoint(&meta)?;
    // The tensors must be the model its config describes (config.json says
    // that model): the check loading for generation or evaluation makes.
    origin.run.model.validate()?;
    ck.check_model(&origin.run.model)?;
    publish(out, |tmp| {
        let mut tensors = Vec::new();
        for name in meta.tensors.keys().filter(|k| k.starts_with("model/")) {
            let t = ck.read(name)?.to_kind(dtype.kind());
            tensors.push((name.trim_start_matches("model/").to_string(), t));
        }
        let tokenizer = if tok.is_file() {
            let data =
                std::fs::read(&tok).map_err(|e| TrainError::io(tok.display().to_string(), e))?;
            let t =
                sigma_data::Tokenizer::from_bytes(&tok.display().to_string(), data.clone().into())?;
            Some((data, t))
        } else {
            None
        };
        write_export(&origin, &tensors, dtype, tokenizer.as_ref(), tmp, format)
    })
}

/// What `export_init` exports.
pub struct InitExport<'a> {
    /// The run config (TOML) whose [model] is initialised.
    pub config: &'a Path,
    /// `--set` overrides of it.
    pub overrides: &'a [String],
    /// The seed of the draws (`train.seed` of a run that starts from them).
    pub seed: u64,
    /// A tokenizer.json (path or URL); None: the config's `data.tokenizer`.
    pub tokenizer: Option<&'a str>,
}

/// Export a freshly initialised model of a run config, without training:
/// the weights a one-device run of that config with `train.seed = seed`
/// starts from (the same draws, in the same order), each drawn in fp32 and
/// kept in `dtype` (the whole model is never held in fp32), with the
/// tokenizer `init.tokenizer` or the config's `data.tokenizer` names. Files
/// as [`export`]'s; config.json records `sigma_init_seed` and step 0.
pub fn export_init(
    init: &InitExport,
    out: &Path,
    dtype: ExportDtype,
    format: ExportFormat,
) -> Result<()> {
    check_output(out)?;
    let file = init.config.display().to_string();
    let run = RunConfig::load(&file, init.overrides)?;
    run.model.validate()?;
    let (data, tok) = init_tokenizer(init, &run, &file)?;
    let tensors = init_weights(&run, init.seed, dtype)?;
    let origin = Origin {
        run,
        step: 0,
        tokens: 0,
        tokenizer_xxh3: json!(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data))),
        init_seed: Some(init.seed),
    };
    publish(out, |tmp| {
        write_export(&origin, &tensors, dtype, Some(&(data, tok)), tmp, format)
    })
}

/// The tokenizer an `--init` export is for (`--tokenizer`, else the
/// config's `data.tokenizer`), its bytes and itself; its vocabulary must
/// fit the model's.
fn init_tokenizer(
    init: &InitExport,
    run: &RunConfig,
    file: &str,
) -> Result<(Vec<u8>, sigma_data::Tokenizer)> {
    let (source, what, named) = match (init.tokenizer, run.data.tokenizer.as_deref()) {
        (Some(t), _) => (t.to_string(), "--tokenizer", String::new()),
        (None, Some(t)) => (
            t.to_string(),
            "data.tokenizer",
            format!(" (named by {file}; a relative path is from the working directory)"),
        ),
        (None, None) => {
            return Err(TrainError::config(
                file,
                "names no tokenizer (data.tokenizer): give --tokenizer tokenizer.json, the tokenizer the model is for (the sample corpus's is data/sample/tokenizer.json)",
            ))
        }
    };
    let tok = sigma_data::Tokenizer::load(&source)
        .map_err(|e| TrainError::config(what, format!("{e}{named}")))?;
    if (run.model.vocab_size as u64) < tok.vocab_size as u64 {
        return Err(TrainError::config(
            "model.vocab_size",
            format!(
                "{} is smaller than the vocabulary of {source} ({} tokens, {what}{named})",
                run.model.vocab_size, tok.vocab_size
            ),
        ));
    }
    Ok((tok.json.to_vec(), tok))
}

/// The first weights of a one-device run of `run` seeded `seed`, whole
/// and named, in `dtype` (each drawn in fp32 and cast at once, so the
/// model is never held in fp32).
fn init_weights(run: &RunConfig, seed: u64, dtype: ExportDtype) -> Result<Vec<(String, Tensor)>> {
    use crate::model::params::{whole_specs, Init};
    let specs = whole_specs(&run.model);
    let elt = dtype.kind().elt_size_in_bytes() as f64;
    let numels: Vec<i64> = specs.iter().map(|s| s.global_numel()).collect();
    let largest = numels.iter().copied().max().unwrap_or(0) as f64;
    let total = numels.iter().sum::<i64>() as f64;
    // The weights in `dtype`, one whole tensor in fp32 as it is drawn, one
    // tensor's bytes as the file is written.
    check_host_memory(
        total * elt + largest * (4.0 + elt),
        "initialising and exporting the model",
    )?;
    let mi = crate::model::ModelInit {
        seed,
        decay_norms: run.optim.decay_norms,
        decay_embeddings: run.optim.decay_embeddings,
        device: tch::Device::Cpu,
        mixed: false,
    };
    let decays: Vec<bool> = specs.iter().map(|s| mi.decays(s.kind)).collect();
    let draws = Init {
        seed,
        std: run.model.init_std,
        num_layers: run.model.num_layers,
    };
    let mut drawn: Vec<Option<Tensor>> = specs.iter().map(|_| None).collect();
    draws.draw_whole(&specs, &decays, &mut |i, whole| {
        let t = whole
            .view(specs[i].global_shape.as_slice())
            .to_kind(dtype.kind());
        drawn[i] = Some(t);
    });
    Ok(specs
        .iter()
        .zip(drawn)
        .map(|(s, t)| (s.name(), t.expect("every tensor is drawn")))
        .collect())
}
