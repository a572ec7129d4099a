//! Tokenizers: any HF `tokenizer.json` (for example Llama 3's), and training of
//! a byte-level BPE with sigma's special tokens.

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::store::{block_on, Location};

/// Special tokens of tokenizers trained by sigma, in id order (ids 0, 1, 2).
pub const EOS: &str = "<|endoftext|>";
pub const BOS: &str = "<|begin_of_text|>";
pub const PAD: &str = "<|pad|>";

/// Names recognised as end-of-document tokens in foreign tokenizers, in order of preference.
const EOS_NAMES: &[&str] = &[EOS, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>"];
const BOS_NAMES: &[&str] = &[BOS, "<s>", "<bos>"];
const PAD_NAMES: &[&str] = &[PAD, "<pad>", "<|finetune_right_pad_id|>"];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it was loaded from (for messages).
    pub url: String,
    /// sha256 of the tokenizer.json bytes, hex.
    pub sha256: String,
    pub vocab_size: u32,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// The raw tokenizer.json (copied next to shards so they describe themselves).
    pub json: bytes::Bytes,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer({}, vocab {}, sha256 {})",
            self.url,
            self.vocab_size,
            &self.sha256[..12]
        )
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The bytes of tokenizer `url` must hash to `sha256`, as recorded in `recorded_in`.
pub fn check_sha256(url: &str, data: &[u8], sha256: &str, recorded_in: &str) -> Result<()> {
    let found = sha256_hex(data);
    if found != sha256 {
        return Err(DataError::Tokenizer {
            path: url.into(),
            message: format!(
                "sha256 {} but {recorded_in} records {}: this copy was modified or damaged after it was recorded; restore it (or prepare the data again)",
                &found[..16.min(found.len())],
                &sha256[..16.min(sha256.len())]
            ),
        });
    }
    Ok(())
}

/// Largest tokenizer.json sigma reads (the largest in use are tens of MB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;
/// Largest vocabulary `data tokenizer train` trains: ids are u32, but BPE
/// training reserves about 70 bytes per entry before it reads a pair, and
/// the largest vocabularies in use are about 2^18.
pub const MAX_VOCAB_SIZE: u32 = 1 << 20;
/// Smallest: the 256 byte tokens and the three special tokens.
pub const MIN_VOCAB_SIZE: u32 = 256 + 3;

/// The bytes of a tokenizer.json, refused when missing or implausibly large.
async fn read_tokenizer_file(url: &str) -> Result<bytes::Bytes> {
    let err = |m: String| DataError::Tokenizer {
        path: url.into(),
        message: m,
    };
    let loc = Location::parse(url)?;
    if loc.local_path().is_some_and(|p| p.is_dir()) {
        return Err(err("is a directory; give the tokenizer.json file".into()));
    }
    match loc.size().await.map_err(|e| err(e.to_string()))? {
        None => Err(err("not found".into())),
        Some(n) if n > MAX_TOKENIZER_BYTES => Err(err(format!(
            "{n} bytes, more than the {MAX_TOKENIZER_BYTES} a tokenizer.json may have: not a tokenizer"
        ))),
        Some(_) => loc.get().await.map_err(|e| err(e.to_string())),
    }
}

/// `--vocab-size` of `data tokenizer train`, checked before any input is read.
pub fn check_vocab_size(vocab_size: u32) -> Result<()> {
    if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
        return Err(DataError::flag(
            "--vocab-size",
            format!(
                "must be from {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE} (256 bytes + 3 special tokens at least; training reserves memory for every entry up front), got {vocab_size}"
            ),
        ));
    }
    Ok(())
}

impl Tokenizer {
    /// Load a tokenizer.json from a path or URL.
    pub fn load(url: &str) -> Result<Tokenizer> {
        block_on(Tokenizer::load_async(url))
    }

    pub async fn load_async(url: &str) -> Result<Tokenizer> {
        let json = read_tokenizer_file(url).await?;
        Tokenizer::from_bytes(url, json)
    }

    /// Load a tokenizer.json whose sha256 is recorded elsewhere (`recorded_in`,
    /// e.g. a manifest): a copy that was edited or damaged since is refused.
    pub async fn load_verified(url: &str, sha256: &str, recorded_in: &str) -> Result<Tokenizer> {
        let json = read_tokenizer_file(url).await?;
        check_sha256(url, &json, sha256, recorded_in)?;
        Tokenizer::from_bytes(url, json)
    }

    pub fn from_bytes(url: &str, json: bytes::Bytes) -> Result<Tokenizer> {
        let err = |m: String| DataError::Tokenizer {
            path: url.into(),
            message: m,
        };
        let mut inner = tokenizers::Tokenizer::from_bytes(&json)
            .map_err(|e| err(format!("not a valid tokenizer.json: {e}")))?;
        // A document that literally contains "<|endoftext|>" must not get a real EOS
        // in the middle: special tokens inside text are encoded as ordinary text.
        inner.set_encode_special_tokens(true);
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos_id = find(EOS_NAMES).ok_or_else(|| {
            err(format!(
                "no end-of-document token; looked for {}",
                EOS_NAMES.join(", ")
            ))
        })?;
        Ok(Tokenizer {
            vocab_size: inner.get_vocab_size(true) as u32,
            bos_id: find(BOS_NAMES),
            pad_id: find(PAD_NAMES),
            eos_id,
            sha256: sha256_hex(&json),
            url: url.to_string(),
            inner,
            json,
        })
    }

    /// The string of token `id` (e.g. "<|endoftext|>"), if it exists.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids of `text`, without special tokens (documents get EOS at packing time).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.url.clone(),
                message: format!("encoding failed: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| DataError::Tokenizer {
                path: self.url.clone(),
                message: format!("decoding failed: {e}"),
            })
    }
}

/// Train a byte-level BPE on `docs` with EOS/BOS/PAD as ids 0/1/2; returns tokenizer.json bytes.
pub fn train_bpe<I, S>(docs: I, vocab_size: u32, min_frequency: u64) -> Result<Vec<u8>>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder,
    };

    let err = |m: String| DataError::Tokenizer {
        path: "<training>".into(),
        message: m,
    };
    check_vocab_size(vocab_size)?;
    let specials = [EOS, BOS, PAD]
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect::<Vec<_>>();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size as usize)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()
    .map_err(|e| err(e.to_string()))?;
    tok.train(&mut trainer, docs)
        .map_err(|e| err(e.to_string()))?;
    let tok: tokenizers::Tokenizer = tok.into();
    let json = tok.to_string(false).map_err(|e| err(e.to_string()))?;
    Ok(json.into_bytes())
}

/// `sigma data tokenizer train`: read documents from `inputs`, train, and write
/// the tokenizer.json atomically (an existing `output` only with `overwrite`).
/// Returns the loaded result.
pub fn train_from_inputs(
    inputs: &[String],
    text_field: &str,
    vocab_size: u32,
    output: &str,
    overwrite: bool,
) -> Result<Tokenizer> {
    check_vocab_size(vocab_size)?;
    if text_field.is_empty() {
        return Err(DataError::flag(
            "--text-field",
            "empty: name the JSON field or Parquet column that holds the text",
        ));
    }
    let out = Location::parse(output).map_err(|e| e.for_flag("--output"))?;
    block_on(out.check_new_output(overwrite))?;
    let files = block_on(crate::store::expand_inputs(inputs))?;
    let mut docs: Vec<String> = Vec::new();
    for (f, _) in &files {
        let mut emit = |d: crate::readers::Document| {
            docs.push(d.text);
            Ok(())
        };
        block_on(crate::readers::read_file(f, text_field, &mut emit))?;
    }
    if docs.is_empty() {
        return Err(DataError::EmptyInputs {
            inputs: inputs.join(", "),
        });
    }
    let json = train_bpe(docs.iter(), vocab_size, 2)?;
    block_on(out.put_atomic(json.clone().into()))?;
    Tokenizer::from_bytes(output, json.into())
}
