//! The KV cache of generation: per layer `n_k` key heads at the cached K
//! dimension and `n_v` value heads, preallocated for prompt + new tokens
//! (layout: infer::generate's module doc), and which slots hold tokens.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::model::block::LayerWeight as W;
use crate::model::key::ParamKey;
use crate::model::Model;

/// What the cache keeps of the keys under the projected K-compression
/// reading (`model.k_compression = "projected"`; other models cache their
/// keys one way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyCache {
    /// Up-projected and rotated once, when written: the keys attention
    /// reads, so a decoding step reads the cache once (keys at the
    /// dot-product dimension).
    #[default]
    Expanded,
    /// The compressed keys (k_dim: the smallest cache), up-projected and
    /// rotated again at every step (each step writes and reads the whole
    /// expanded keys once more).
    Compressed,
}

/// Per-layer cached keys and values.
pub struct KvCache {
    pub(super) k: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
    /// Filled slots (the same for every sequence: padding fills the rest).
    pub len: i64,
    pub capacity: i64,
    /// [b, capacity] bool: the slot holds a real token of that sequence.
    pub(super) valid: Tensor,
    /// The projected reading: keys are cached before up-projection and RoPE.
    pub(super) raw_keys: bool,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` tokens
    /// (keys [`KeyCache::Expanded`]); an error (not a panic) when it does
    /// not fit the device.
    pub fn new(model: &Model, batch: i64, capacity: i64, device: Device) -> Result<KvCache> {
        Self::with_keys(model, batch, capacity, device, KeyCache::default())
    }

    /// [`KvCache::new`] keeping the keys of the projected reading as `keys` says.
    pub fn with_keys(
        model: &Model,
        batch: i64,
        capacity: i64,
        device: Device,
        keys: KeyCache,
    ) -> Result<KvCache> {
        let c = &model.cfg;
        let kind = model.compute;
        let projected = model.try_id(ParamKey::Layer(0, W::KUp)).is_some();
        let raw_keys = projected && keys == KeyCache::Compressed;
        let (nk, nv) = (c.num_k_heads as i64, c.num_v_heads as i64);
        let dk = if projected && !raw_keys {
            c.dot_dim()
        } else {
            c.k_cache_dim()
        } as i64;
        let dv = c.v_head_dim as i64;
        let bytes = batch as f64
            * capacity as f64
            * c.num_layers as f64
            * (nk * dk + nv * dv) as f64
            * kind.elt_size_in_bytes() as f64;
        if device == Device::Cpu {
            let what = format!("the KV cache of {batch} sequences x {capacity} tokens");
            crate::model::summary::check_host_memory(bytes, &what)?;
        }
        let alloc = |shape: [i64; 4]| {
            Tensor::f_zeros(shape, (kind, device)).map_err(|e| {
                let gb = (batch * capacity * c.num_layers as i64 * (nk * dk + nv * dv)) as f64
                    * kind.elt_size_in_bytes() as f64
                    / 1e9;
                TrainError::input(
                    "the KV cache",
                    format!(
                        "{batch} sequences x {capacity} tokens ({gb:.2} GB) do not fit on {device:?}: {}",
                        crate::error::clean_torch_message(&e.to_string())
                    ),
                )
            })
        };
        let mut k = Vec::with_capacity(c.num_layers);
        let mut v = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            k.push(alloc([batch, nk, capacity, dk])?);
            v.push(alloc([batch, nv, capacity, dv])?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
            valid: Tensor::f_zeros([batch, capacity], (Kind::Bool, device))?,
            raw_keys,
        })
    }

    /// Mark the first `len` slots of every sequence as holding tokens,
    /// whatever they hold, and the rest as empty: for timing decoding at a
    /// given context without a prefill (`sigma bench decode --model`).
    pub fn pretend_filled(&mut self, len: i64) {
        let len = len.min(self.capacity);
        let _ = self.valid.narrow(1, 0, len).fill_(1);
        let _ = self.valid.narrow(1, len, self.capacity - len).fill_(0);
        self.len = len;
    }

    /// The device the cache is on.
    pub fn device(&self) -> Device {
        self.valid.device()
    }

    /// Sequences the cache holds.
    pub fn batch(&self) -> i64 {
        self.valid.size()[0]
    }

    /// Bytes the cache holds per token (all layers), at its dtype.
    pub fn bytes_per_token(&self) -> i64 {
        let per = |t: &Tensor| t.size()[1] * t.size()[3] * t.kind().elt_size_in_bytes() as i64;
        self.k
            .iter()
            .zip(&self.v)
            .map(|(k, v)| per(k) + per(v))
            .sum()
    }
}
