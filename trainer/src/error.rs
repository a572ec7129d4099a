//! Errors of the trainer crate; each names the config field, file or tensor.

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config `{field}`: {message}")]
    Config { field: String, message: String },
    #[error(transparent)]
    Data(#[from] sigma_data::DataError),
    #[error("torch: {}", crate::guard::clean_torch_message(&.0.to_string()))]
    Tch(#[from] tch::TchError),
    /// A libtorch failure caught by `guard::catch`: what ran, libtorch's message, a hint.
    #[error("libtorch failed during {what}: {message}{}", if hint.is_empty() { String::new() } else { format!("\n  hint: {hint}") })]
    Torch {
        what: String,
        message: String,
        hint: String,
    },
    /// A panic that is not a libtorch failure: a bug in sigma.
    #[error("internal error (a bug in sigma, please report it): {message} at {location}")]
    Internal { message: String, location: String },
    /// The job is being stopped (a lost peer or store; see `dist::abort`).
    #[error("{0}")]
    Aborted(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Config {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
