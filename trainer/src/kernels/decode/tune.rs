//! Which [`Plan`] a step uses, per device: `SIGMA_DECODE_TUNING`, when set,
//! fixes the rule for the process (no search); otherwise the first step of
//! each (GPU name, shape, batch, context bucket) times every candidate plan
//! ([`super::plan::candidates`]) on the step's own operands, a few runs
//! each with CUDA events on libtorch's stream, and keeps the fastest for
//! the process and in the tuning cache file (`SIGMA_DECODE_TUNING_CACHE`,
//! by default under the user's cache directory; written whole to a
//! temporary name, synced, then renamed over the old one:
//! `sigma_data::fsutil::write_atomic`). A file that
//! cannot be read as one is reported once and ignored (the next search
//! rewrites it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use sigma_data::env;

use super::launch::{kernels, prepare, run, Loaded, Operands, Ready};
use super::nvrtc::StreamTimer;
use super::plan::{
    candidates, context_bucket, fastest, format_cache, parse_cache, Choice, DecodeShape, Plan,
    Rows, TuneKey, Tuning, MAX_SPLITS,
};
use crate::error::Result;
use tch::{Kind, Tensor};

/// Timed runs per candidate (the median counts), after [`WARMUP`] untimed
/// ones. Before each, L2 is flushed (a buffer of twice its size read),
/// which also keeps the device busy while the host launches the run: the
/// time is the device's reading the cache from memory, as a step of a
/// model whose layers each read their own cache does, not the host's
/// launch work (about what a step of one sequence takes the device) nor
/// reads from an L2 that the previous run filled.
const RUNS: usize = 7;
const WARMUP: usize = 2;

/// `SIGMA_DECODE_TUNING` read once: None when unset; a bad value is an
/// error naming the variable and the field.
pub fn env_tuning() -> std::result::Result<Option<Tuning>, sigma_data::DataError> {
    static T: OnceLock<std::result::Result<Option<Tuning>, String>> = OnceLock::new();
    let text = env::var(env::DECODE_TUNING);
    let parsed = T.get_or_init(|| text.as_deref().map(Tuning::parse).transpose());
    parsed
        .clone()
        .map_err(|message| sigma_data::DataError::Env {
            name: env::DECODE_TUNING.into(),
            value: text.unwrap_or_default(),
            message,
        })
}

/// The rows and form of the kernel a step of `shape` starts from:
/// `SIGMA_DECODE_TUNING`'s ([`Tuning::rows_for`]), else [`Rows::DEFAULT`]
/// (a search may then choose another kernel).
pub fn env_rows(shape: DecodeShape) -> std::result::Result<Rows, sigma_data::DataError> {
    Ok(env_tuning()?.map_or(Rows::DEFAULT, |t| t.rows_for(&shape)))
}

/// The search results of this process, with those of the cache file read
/// at first use.
fn known() -> &'static Mutex<BTreeMap<TuneKey, Choice>> {
    static KNOWN: OnceLock<Mutex<BTreeMap<TuneKey, Choice>>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let from_file = env::decode_tuning_cache()
            .map(|p| read_cache(&p))
            .unwrap_or_default();
        Mutex::new(from_file)
    })
}

/// The entries of the cache file at `path` (none if it does not exist;
/// a bad file is reported and ignored).
fn read_cache(path: &Path) -> BTreeMap<TuneKey, Choice> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_cache(&text).unwrap_or_else(|e| {
            eprintln!(
                "warning: decode tuning cache {}: {e}; ignored (the next search rewrites it)",
                path.display()
            );
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            eprintln!(
                "warning: decode tuning cache {}: {e}; ignored",
                path.display()
            );
            BTreeMap::new()
        }
    }
}

/// Add `key -> choice` to the cache file (merged with what it holds now,
/// which another process may have added to); a failure is a warning.
fn save(key: &TuneKey, choice: Choice) {
    let Some(path) = env::decode_tuning_cache() else {
        return;
    };
    let mut all = read_cache(&path);
    all.insert(key.clone(), choice);
    if let Err(e) = sigma_data::fsutil::write_atomic(&path, format_cache(&all).as_bytes()) {
        eprintln!(
            "warning: decode tuning cache {}: not written: {e}",
            path.display()
        );
    }
}

/// The plan of this step: the fixed rule under `SIGMA_DECODE_TUNING`, the
/// remembered choice of its key, or a search now, which also leaves the
/// chosen plan's output in `o.out` (then the flag is true).
pub fn plan_for(
    kern: &Loaded,
    ordinal: usize,
    shape: DecodeShape,
    o: &Operands,
) -> Result<(Plan, bool)> {
    let (b, len) = (o.q.size()[0], o.k.size()[2]);
    if let Some(t) = env_tuning()? {
        return Ok((shape.plan(b, len, kern.sms, &t), false));
    }
    let key = TuneKey {
        device: kern.device_name.clone(),
        shape,
        batch: b,
        bucket: context_bucket(len),
    };
    let remembered = known()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    if let Some(c) = remembered {
        let p = Plan::chosen(c, len);
        if p.splits <= MAX_SPLITS {
            return Ok((p, false));
        }
    }
    let Some((p, written)) = search(kern, ordinal, shape, o)? else {
        // Nothing could be timed: the fixed rule, neither remembered nor run.
        return Ok((shape.plan(b, len, kern.sms, &Tuning::DEFAULT), false));
    };
    let choice = Choice::of(p);
    known()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.clone(), choice);
    save(&key, choice);
    Ok((p, written))
}

/// Time every candidate plan on these operands (each by the kernel of its
/// rows and head groups; those not built yet are compiled first, in
/// parallel; a kernel that does not compile leaves its plans out) and return the fastest, with whether its output is
/// now in `o.out`; None when the device could not time any.
fn search(
    kern: &Loaded,
    ordinal: usize,
    shape: DecodeShape,
    o: &Operands,
) -> Result<Option<(Plan, bool)>> {
    let (b, len) = (o.q.size()[0], o.k.size()[2]);
    let Ok(timer) = StreamTimer::new(ordinal) else {
        return Ok(None);
    };
    // Where the scratch does not fit, the runs are timed without the flush.
    let flush = Tensor::f_zeros(
        [2 * kern.l2_bytes.max(1 << 20)],
        (Kind::Uint8, o.q.device()),
    )
    .ok();
    let plans = candidates(&shape, len);
    // Every candidate's kernel built at once, in parallel, before any is timed.
    let builds: Vec<(Rows, i64)> = plans.iter().map(|p| (p.rows, p.groups)).collect();
    prepare(ordinal, shape, &builds);
    let mut seconds = Vec::with_capacity(plans.len());
    for &p in &plans {
        let t = match kernels(ordinal, shape, p.rows, p.groups) {
            Ok(k) => time_plan(&k, ordinal, shape, o, p, (&timer, flush.as_ref()))?,
            Err(_) => f64::NAN,
        };
        seconds.push(t);
    }
    let Some(best) = fastest(&plans, &seconds) else {
        return Ok(None);
    };
    eprintln!(
        "note: decode kernel tuned on {} for {shape:?}, batch {b}, contexts to {}: chunk {}, {}, rows {}/{}{}, heads in {} ({} candidates)",
        kern.device_name,
        context_bucket(len),
        best.chunk,
        if best.launches() == 1 { "one launch" } else { "with the combine kernel" },
        best.rows.uk,
        best.rows.uv,
        if best.rows.local { " warp-local" } else { "" },
        match best.groups {
            1 => "one group".to_string(),
            g => format!("{g} groups"),
        },
        plans.len()
    );
    // Leave the chosen plan's output in `o.out`, by its kernel (compiled:
    // a plan whose kernel did not compile was not timed).
    let written = match kernels(ordinal, shape, best.rows, best.groups) {
        Ok(k) => run(&k, ordinal, shape, o, best)?,
        Err(_) => false,
    };
    Ok(Some((best, written)))
}

/// Median seconds of `RUNS` runs of plan `p`, each after an L2 flush (a
/// reduction that reads `flush`, where there is one), timed by `timer`
/// (NaN if it could not run or be timed).
fn time_plan(
    kern: &Loaded,
    ordinal: usize,
    shape: DecodeShape,
    o: &Operands,
    p: Plan,
    (timer, flush): (&StreamTimer, Option<&Tensor>),
) -> Result<f64> {
    let Some(ready) = Ready::new(kern, ordinal, shape, o, p)? else {
        return Ok(f64::NAN);
    };
    for _ in 0..WARMUP {
        ready.launch()?;
    }
    let mut t = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        if let Some(f) = flush {
            let _ = f.f_max()?;
        }
        if timer.start().is_err() {
            return Ok(f64::NAN);
        }
        ready.launch()?;
        match timer.stop_ms() {
            Ok(ms) => t.push(ms / 1e3),
            Err(_) => return Ok(f64::NAN),
        }
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}
