//! The one error type of the data crate. Every variant names the file, URL or
//! config field it concerns, so the binary can print it as is.

use std::path::PathBuf;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{url}: {message}")]
    Store { url: String, message: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was attempted: "read", "write", "create directory", ...
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Input { file: String, message: String },
    #[error("no documents found in the inputs ({inputs}): every input file was empty")]
    EmptyInputs { inputs: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("manifest {url}: {message}")]
    Manifest { url: String, message: String },
    #[error("shard {url}: {message}")]
    Shard { url: String, message: String },
    #[error("checksum mismatch in {url} ({what}): expected {expected}, found {found}; the file was modified or corrupted after `sigma data prepare` wrote it")]
    Checksum {
        url: String,
        what: String,
        expected: String,
        found: String,
    },
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl DataError {
    pub fn input(file: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Input {
            file: file.into(),
            message: message.into(),
        }
    }
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Config {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn store(url: impl Into<String>, message: impl std::fmt::Display) -> Self {
        DataError::Store {
            url: url.into(),
            message: message.to_string(),
        }
    }
    pub fn manifest(url: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Manifest {
            url: url.into(),
            message: message.into(),
        }
    }
    pub fn shard(url: impl Into<String>, message: impl std::fmt::Display) -> Self {
        DataError::Shard {
            url: url.into(),
            message: message.to_string(),
        }
    }
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
