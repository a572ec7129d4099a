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
    /// A file that is not what it should be.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// A command-line flag or a request's value that a command cannot use.
    #[error("{input}: {message}")]
    Input { input: String, message: String },
    /// A collective across a process group failed (a lost or hung rank, a
    /// shape the group cannot split).
    #[error("collective {op} in group `{group}` (rank {rank} of {world}): {message}")]
    Collective {
        op: String,
        group: String,
        rank: usize,
        world: usize,
        message: String,
    },
    /// A GPU library or kernel failed: NCCL, the CUDA runtime, sigma's NVRTC
    /// kernels, libtorch's fused optimizer.
    #[error("{library} {what}: {message}")]
    Gpu {
        library: &'static str,
        what: String,
        message: String,
    },
    /// The rendezvous store (`addr`: where it is, or should be).
    #[error("rendezvous store {addr}: {message}")]
    Store { addr: String, message: String },
    /// A step's loss or gradient was not finite and `train.nan_policy` is "abort".
    #[error("step {step}: non-finite loss {loss} / grad norm {grad_norm}; aborting (train.nan_policy = \"abort\")")]
    NonFinite {
        step: u64,
        loss: f64,
        grad_norm: f64,
    },
    /// A checkpoint directory that cannot be read as one.
    #[error("checkpoint {dir}: {message}")]
    BadCheckpoint { dir: String, message: String },
    /// A checkpoint's ranks did not all write their shards.
    #[error("checkpoint step {step}: {message}")]
    Checkpoint { step: u64, message: String },
    /// The process could not set up what it needs (threads, signal handlers).
    #[error("cannot {what}: {message}")]
    Setup { what: String, message: String },
}

impl TrainError {
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Config {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn file(path: impl std::fmt::Display, message: impl Into<String>) -> Self {
        TrainError::File {
            path: path.to_string(),
            message: message.into(),
        }
    }
    pub fn input(input: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Input {
            input: input.into(),
            message: message.into(),
        }
    }
    pub fn gpu(library: &'static str, what: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Gpu {
            library,
            what: what.into(),
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
