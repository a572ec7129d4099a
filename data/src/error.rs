//! The one error type of the data crate. Every variant names the file, URL or
//! config field it concerns, so the binary can print it as is.

use std::path::PathBuf;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{url}: {message}")]
    Store { url: String, message: String },
    /// The system's reason is part of the message (not a separate cause),
    /// so the binary prints one line.
    #[error("cannot {op} {path}: {}", io_text(cause))]
    Io {
        /// What was attempted: "read", "write", "create directory", ...
        op: &'static str,
        path: PathBuf,
        cause: std::io::Error,
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
    /// A command-line flag (`--vocab-size`) whose value cannot be used.
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    /// An environment variable whose value cannot be used.
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: String,
        value: String,
        message: String,
    },
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
    pub fn flag(flag: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Flag {
            flag: flag.into(),
            message: message.into(),
        }
    }
    /// A path or URL error reported as one about `flag` (the value the user
    /// gave); other errors (an environment variable, say) stay as they are.
    pub fn for_flag(self, flag: &str) -> Self {
        match self {
            DataError::Store { url, message } => DataError::flag(flag, format!("{url}: {message}")),
            other => other,
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
            cause: source,
        }
    }
}

/// The system's reason for an I/O error, without the "(os error N)" suffix.
pub fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}
