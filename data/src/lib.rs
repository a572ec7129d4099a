//! sigma-data: everything between raw text and the token batches the trainer
//! consumes. No libtorch here: batches are plain `u32` buffers.
//!
//! Flow: [`readers`] -> [`tokenizer`] -> [`prepare`] (Parquet [`shard`]s plus a
//! [`manifest`]) -> [`mixer`] (which domain each global sample comes from) ->
//! [`stream`] (per-domain epochs, shuffling, packing) -> [`loader`] (prefetch,
//! data-parallel slicing).

pub mod config;
pub mod env;
pub mod error;
pub mod fsutil;
pub mod inspect;
pub mod loader;
pub mod manifest;
pub mod mixer;
pub mod prepare;
pub mod readers;
pub mod rng;
pub mod shard;
pub mod store;
pub mod stream;
pub mod synth;
pub mod tokenizer;

pub use config::DataConfig;
pub use error::{DataError, Result};
pub use loader::{Batch, DataState, Dataset, Loader};
pub use tokenizer::Tokenizer;
