//! Errors of the trainer crate; each names the config field, file or tensor.

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config `{field}`: {message}")]
    Config { field: String, message: String },
    #[error(transparent)]
    Data(#[from] sigma_data::DataError),
    #[error("torch: {}", clean_torch_message(&.0.to_string()))]
    Tch(#[from] tch::TchError),
    /// A libtorch failure caught by `guard::catch`: what ran, libtorch's message, a hint.
    #[error("libtorch failed during {what}: {message}{}", if hint.is_empty() { String::new() } else { format!("\n  hint: {hint}") })]
    Torch {
        what: String,
        message: String,
        hint: String,
    },
    /// An invariant of sigma's own broken: a bug in sigma.
    #[error("internal error (a bug in sigma, please report it): {what}")]
    Invariant { what: String },
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
    /// A broken invariant (a bug in sigma), described.
    pub fn internal_state(what: impl Into<String>) -> Self {
        TrainError::Invariant { what: what.into() }
    }
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(o) => out.push(o),
            None => {}
        }
    }
    out
}

/// libtorch's message without the C++ stack: the text before
/// "Exception raised from" / the first "frame #", trimmed.
pub fn clean_torch_message(raw: &str) -> String {
    // tch's panics read `called `Result::unwrap()` on an `Err` value: Torch("...")`.
    let inner = match raw.find("Torch(\"") {
        Some(i) => {
            let body = &raw[i + 7..];
            unescape(body.strip_suffix("\")").unwrap_or(body))
        }
        None => raw.to_string(),
    };
    let mut cut = inner.len();
    for marker in ["Exception raised from", "frame #"] {
        if let Some(i) = inner.find(marker) {
            cut = cut.min(i);
        }
    }
    let text = inner[..cut].trim();
    // Collapse the message onto few lines.
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
