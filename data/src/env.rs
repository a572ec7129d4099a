//! The process environment: every variable sigma reads is read here and
//! only here (a test holds it: `tests/it/architecture.rs`), in the crate
//! every binary links. The table [`SIGMA_VARS`] lists sigma's own variables
//! with what each does; `sigma` checks them all at start-up
//! ([`check_sigma_vars`]), so a malformed value is refused, naming the
//! variable, before anything runs. The job's layout (torchrun's and SLURM's
//! variables) is interpreted by `sigma_trainer::dist::env`, through [`var`].

use crate::error::{DataError, Result};

/// What a variable holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `1`/`on`/`true` or `0`/`off`/`false`.
    Switch,
    /// A whole number from `min` to `max`.
    Number { min: u64, max: u64 },
    /// Free text (a secret, a path, a list), interpreted where it is used.
    Text,
}

/// One of sigma's variables.
#[derive(Clone, Copy, Debug)]
pub struct Var {
    pub name: &'static str,
    pub kind: Kind,
    pub meaning: &'static str,
}

pub const STORE_RETRIES: &str = "SIGMA_STORE_RETRIES";
pub const STORE_TIMEOUT_S: &str = "SIGMA_STORE_TIMEOUT_S";
pub const TIME_COLLECTIVES: &str = "SIGMA_TIME_COLLECTIVES";
pub const TRAIN_KERNELS: &str = "SIGMA_TRAIN_KERNELS";
pub const DECODE_KERNEL: &str = "SIGMA_DECODE_KERNEL";
pub const GEMV_KERNEL: &str = "SIGMA_GEMV_KERNEL";
pub const GEMV_NORM: &str = "SIGMA_GEMV_NORM";
pub const DECODE_PDL: &str = "SIGMA_DECODE_PDL";
pub const DECODE_PREFETCH: &str = "SIGMA_DECODE_PREFETCH";
pub const DECODE_ROPE: &str = "SIGMA_DECODE_ROPE";
pub const DECODE_FOLD_APPEND: &str = "SIGMA_DECODE_FOLD_APPEND";
/// The version of the decode kernel's tuning cache format, in one place:
/// the file's default name and its first line (the trainer's
/// `kernels::decode::plan`) both take it, so a new format gets a new file.
#[macro_export]
macro_rules! decode_tuning_version {
    () => {
        5
    };
}

pub const DECODE_TUNING: &str = "SIGMA_DECODE_TUNING";
pub const DECODE_TUNING_CACHE: &str = "SIGMA_DECODE_TUNING_CACHE";
pub const KERNEL_CACHE: &str = "SIGMA_KERNEL_CACHE";
pub const FAULT_ABORT: &str = "SIGMA_FAULT_ABORT";
pub const FAULT_SAVE_DELAY_MS: &str = "SIGMA_FAULT_SAVE_DELAY_MS";
pub const JOB_SECRET: &str = "SIGMA_JOB_SECRET";
pub const STORE_HOSTED: &str = "SIGMA_STORE_HOSTED";
pub const RESTART_COUNT: &str = "SIGMA_RESTART_COUNT";
pub const DIST_TIMEOUT_S: &str = "SIGMA_DIST_TIMEOUT_S";
pub const CUDA_LIBS_DIR: &str = "SIGMA_CUDA_LIBS_DIR";
pub const MAX_INPUT_MIB: &str = "SIGMA_MAX_INPUT_MIB";

/// sigma's own variables. A flat table: one entry per variable.
pub const SIGMA_VARS: &[Var] = &[
    Var {
        name: STORE_RETRIES,
        kind: Kind::Number { min: 0, max: 100 },
        meaning: "retries of a failed object-store request (default 3)",
    },
    Var {
        name: STORE_TIMEOUT_S,
        kind: Kind::Number { min: 1, max: 86_400 },
        meaning: "seconds an object-store request may take (default 30)",
    },
    Var {
        name: TIME_COLLECTIVES,
        kind: Kind::Switch,
        meaning: "time every tensor-parallel collective (logged as tp_comm_s; turns the communication overlap off)",
    },
    Var {
        name: TRAIN_KERNELS,
        kind: Kind::Switch,
        meaning: "use sigma's fused training kernels on a GPU (default on)",
    },
    Var {
        name: DECODE_KERNEL,
        kind: Kind::Switch,
        meaning: "use sigma's DiffQKV decode kernel on a GPU (default on)",
    },
    Var {
        name: GEMV_KERNEL,
        kind: Kind::Switch,
        meaning: "use sigma's matrix-vector kernels for decoding's matmuls on a GPU (default on)",
    },
    Var {
        name: GEMV_NORM,
        kind: Kind::Switch,
        meaning: "let the matrix-vector kernels run the RMSNorm (and residual add) before a block's products (default on)",
    },
    Var {
        name: DECODE_PDL,
        kind: Kind::Switch,
        meaning: "launch decoding's kernels (matrix-vector, attention, cache append) with programmatic dependent launch on sm_90 and later (default on)",
    },
    Var {
        name: DECODE_PREFETCH,
        kind: Kind::Switch,
        meaning: "let the decode attention kernel ask L2 for its chunk of the cache before it waits on the kernels before it, where the cache read fits half of L2 (default on)",
    },
    Var {
        name: DECODE_ROPE,
        kind: Kind::Switch,
        meaning: "let the decode attention kernel rotate the query by RoPE itself, instead of a kernel before it (default on)",
    },
    Var {
        name: DECODE_FOLD_APPEND,
        kind: Kind::Switch,
        meaning: "let the decode attention kernel write a static (graph) decoding step's new keys and values into the cache itself, instead of a kernel before it (default off: not yet run on a GPU)",
    },
    Var {
        name: DECODE_TUNING,
        kind: Kind::Text,
        meaning: "the decode kernel's split and chunking, fixed instead of searched per device (key=value pairs, docs/inference.md)",
    },
    Var {
        name: DECODE_TUNING_CACHE,
        kind: Kind::Text,
        meaning: concat!(
            "the file of the decode kernel's per-device search results (default: sigma/decode-tuning-v",
            decode_tuning_version!(),
            ".tsv in the user's cache directory; off: none)"
        ),
    },
    Var {
        name: KERNEL_CACHE,
        kind: Kind::Text,
        meaning: "the directory where sigma keeps its run-time compiled GPU kernels between processes (default: sigma/kernels in the user's cache directory; off: none, each process compiles its own)",
    },
    Var {
        name: FAULT_ABORT,
        kind: Kind::Text,
        meaning: "tests: RANK:STEP makes that rank abort when it starts that step",
    },
    Var {
        name: FAULT_SAVE_DELAY_MS,
        kind: Kind::Number { min: 0, max: 3_600_000 },
        meaning: "tests: milliseconds each checkpoint write is slowed down by",
    },
    Var {
        name: JOB_SECRET,
        kind: Kind::Text,
        meaning: "the secret every rendezvous connection must present",
    },
    Var {
        name: STORE_HOSTED,
        kind: Kind::Switch,
        meaning: "set by sigma launch: it hosts the rendezvous store",
    },
    Var {
        name: RESTART_COUNT,
        kind: Kind::Number { min: 0, max: 1_000_000 },
        meaning: "set by sigma launch: restarts of the job so far",
    },
    Var {
        name: DIST_TIMEOUT_S,
        kind: Kind::Text,
        meaning: "seconds any wait on a peer may take (a positive number; default 300)",
    },
    Var {
        name: MAX_INPUT_MIB,
        kind: Kind::Number {
            min: 1,
            max: 1 << 30,
        },
        meaning: "MiB one input file of `sigma data prepare` may hold once decompressed (default 16384); a larger one is refused",
    },
    Var {
        name: CUDA_LIBS_DIR,
        kind: Kind::Text,
        meaning: "set by sigma on GPU machines: libtorch's CUDA libraries, after its one re-exec",
    },
];

/// The value of environment variable `name`, if it is set (a value that is
/// not UTF-8 counts as set, with its lossy text).
pub fn var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// The decode kernel's tuning cache file: `SIGMA_DECODE_TUNING_CACHE` if
/// set (`off`, `0` or empty: none), else `sigma/decode-tuning-v5.tsv` (the
/// format's version, [`decode_tuning_version`]) in the
/// user's cache directory ([`user_cache_dir`]; None when there is none).
pub fn decode_tuning_cache() -> Option<std::path::PathBuf> {
    let name = concat!("decode-tuning-v", decode_tuning_version!(), ".tsv");
    cache_path(DECODE_TUNING_CACHE, name)
}

/// The directory of compiled GPU kernels kept between processes:
/// `SIGMA_KERNEL_CACHE` if set (`off`, `0` or empty: none), else
/// `sigma/kernels` in the user's cache directory ([`user_cache_dir`]).
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    cache_path(KERNEL_CACHE, "kernels")
}

/// Variable `name`'s path if it is set (`off`, `0` or empty: None), else
/// `sigma/DEFAULT` in the user's cache directory.
fn cache_path(name: &str, default: &str) -> Option<std::path::PathBuf> {
    if let Some(v) = var(name) {
        let v = v.trim();
        return match v.to_ascii_lowercase().as_str() {
            "" | "off" | "0" => None,
            _ => Some(v.into()),
        };
    }
    Some(user_cache_dir()?.join("sigma").join(default))
}

/// The user's cache directory: `$XDG_CACHE_HOME`, else `$HOME/.cache`;
/// None when neither is set.
pub fn user_cache_dir() -> Option<std::path::PathBuf> {
    match var("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        Some(d) => Some(std::path::PathBuf::from(d)),
        None => {
            Some(std::path::PathBuf::from(var("HOME").filter(|h| !h.is_empty())?).join(".cache"))
        }
    }
}

/// Whether `name` is set at all.
pub fn is_set(name: &str) -> bool {
    std::env::var_os(name).is_some()
}

fn switch_value(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Switch `name`: `default` when unset. A value that is neither on nor off
/// reads as `default` here; [`check_sigma_vars`] refuses it at start-up.
pub fn switch(name: &str, default: bool) -> bool {
    var(name).and_then(|v| switch_value(&v)).unwrap_or(default)
}

/// A switch read from the environment at its first use (on unless set
/// off, or off unless set on: [`ProcessSwitch::off_by_default`]), then
/// held for the process, which may turn it on or off itself (benchmarks
/// and tests comparing both paths, a kernel that failed).
pub struct ProcessSwitch {
    name: &'static str,
    default: bool,
    /// 0: not yet read, 1: on, 2: off.
    state: std::sync::atomic::AtomicU8,
}

impl ProcessSwitch {
    pub const fn new(name: &'static str) -> ProcessSwitch {
        ProcessSwitch {
            name,
            default: true,
            state: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// A switch that is off unless its variable turns it on.
    pub const fn off_by_default(name: &'static str) -> ProcessSwitch {
        ProcessSwitch {
            default: false,
            ..ProcessSwitch::new(name)
        }
    }

    /// Whether it is on (reading the environment the first time).
    pub fn get(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        match self.state.load(Relaxed) {
            0 => {
                let on = switch(self.name, self.default);
                self.state.store(if on { 1 } else { 2 }, Relaxed);
                on
            }
            v => v == 1,
        }
    }

    /// Turn it on or off for the rest of the process.
    pub fn set(&self, on: bool) {
        let v = if on { 1 } else { 2 };
        self.state.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turn it off; true when it was not off already (to warn once).
    pub fn turn_off(&self) -> bool {
        self.state.swap(2, std::sync::atomic::Ordering::Relaxed) != 2
    }
}

/// Number `name` (unset: `default`); refused when malformed or outside the
/// table's range for it (or `range` for a variable not in the table).
pub fn number(name: &str, default: u64, range: (u64, u64)) -> Result<u64> {
    let (lo, hi) = match SIGMA_VARS.iter().find(|v| v.name == name).map(|v| v.kind) {
        Some(Kind::Number { min, max }) => (min, max),
        _ => range,
    };
    let bad = |value: String, why: &str| DataError::Env {
        name: name.into(),
        value,
        message: format!(
            "{why}; set an integer from {lo} to {hi}, or unset it for the default {default}"
        ),
    };
    match var(name) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(n),
            Ok(_) => Err(bad(v, "out of range")),
            Err(_) => Err(bad(v, "not a whole number")),
        },
    }
}

/// Check every switch and number of [`SIGMA_VARS`] that is set: the first
/// malformed one is refused, naming it, its value and what it takes.
pub fn check_sigma_vars() -> Result<()> {
    for v in SIGMA_VARS {
        let Some(value) = var(v.name) else {
            continue;
        };
        match v.kind {
            Kind::Switch if switch_value(&value).is_none() => {
                return Err(DataError::Env {
                    name: v.name.into(),
                    value,
                    message: format!(
                        "not a switch; set 1 (on) or 0 (off), or unset it ({})",
                        v.meaning
                    ),
                })
            }
            Kind::Number { .. } => {
                number(v.name, 0, (0, u64::MAX))?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_read_on_and_off_and_every_table_entry_is_sigmas() {
        for (v, want) in [
            ("1", Some(true)),
            ("off", Some(false)),
            (" TRUE ", Some(true)),
            ("2", None),
        ] {
            assert_eq!(switch_value(v), want, "{v:?}");
        }
        for v in SIGMA_VARS {
            assert!(v.name.starts_with("SIGMA_"), "{}", v.name);
            assert!(!v.meaning.is_empty(), "{}", v.name);
        }
        let mut names: Vec<&str> = SIGMA_VARS.iter().map(|v| v.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SIGMA_VARS.len(), "a variable listed twice");
    }
}
