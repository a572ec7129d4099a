//! How a decoding step's attention is cut into blocks, with no device in
//! sight: the shapes the kernel takes ([`DecodeShape`]), the plan of one
//! launch ([`Plan`]: chunk length, splits, whether the combine is folded
//! into the split kernel, the rows each lane loads ahead, the head groups
//! a sequence's blocks divide its heads into), the candidates the per-device search times
//! ([`candidates`]), the key its result is remembered under ([`TuneKey`]),
//! the choice of the fastest ([`fastest`]), the tuning cache file's text
//! ([`format_cache`], [`parse_cache`]) and the `SIGMA_DECODE_TUNING`
//! override ([`Tuning`]). Everything here is tested on the CPU; only the
//! timing itself (tune.rs) needs a GPU.

use std::collections::BTreeMap;

/// Splits the separate combine kernel takes (one float of shared memory each).
pub const MAX_SPLITS: i64 = 8192;
/// Dynamic shared memory a split block may use (scores of its chunk, q, output).
pub const MAX_SMEM: i64 = 96 * 1024;
/// The most splits whose merge the last block of a sequence takes on, per
/// head group (see [`Plan::grouped`]); more use the combine kernel. That
/// block reads `splits x n_q / groups x (d_v + 2)` floats from L2 alone,
/// through one multiprocessor: for SIGMA-1.5B in one group 8 KiB a split.
/// At 128 splits (1 MiB) the folded merge tripled the batch-1 graph step
/// of SIGMA-1.5B on an H100 (docs/benchmarks.md); 16 bound it to 128
/// KiB, which the combine kernel's launch costs about as much as.
pub const MAX_FOLD_SPLITS: i64 = 16;
/// The head groups a plan may divide a sequence's heads into (those that
/// divide the shape's K and V heads, [`DecodeShape::takes_groups`]).
pub const GROUPS: [i64; 4] = [1, 2, 4, 8];
/// Warps per block of the split kernel (its THREADS / 32).
pub const SPLIT_WARPS: i64 = 8;
/// The chunk lengths the search tries (each also bounded by shared memory).
const CHUNKS: [i64; 7] = [32, 64, 128, 256, 512, 1024, 2048];

/// `SIGMA_DECODE_TUNING`: when set, no search runs and every step uses the
/// fixed rule of [`DecodeShape::plan`] with these values over the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// The longest chunk of slots one block takes (a multiple of 32).
    pub max_chunk: i64,
    /// Blocks per multiprocessor the split aims at.
    pub blocks_per_sm: i64,
    /// Key rows and value rows a lane loads before using any (compiled in).
    pub uk: i64,
    pub uv: i64,
    /// Fold the combine into the split kernel (up to [`MAX_FOLD_SPLITS`] splits a group).
    pub fold: bool,
    /// Head groups per sequence, where the shape takes them (else 1).
    pub groups: i64,
    /// The warp-local form of the split kernel, where a block of the
    /// plan's head group takes it ([`DecodeShape::takes_local`]; else the
    /// block form).
    pub local: bool,
}

impl Tuning {
    pub const DEFAULT: Tuning = Tuning {
        max_chunk: 512,
        blocks_per_sm: 8,
        uk: 4,
        uv: 8,
        fold: true,
        groups: 1,
        local: false,
    };

    /// The kernel's rows loaded ahead and form that this rule fixes for
    /// `shape`: the warp-local form only where the shape takes it.
    pub fn rows_for(&self, shape: &DecodeShape) -> Rows {
        Rows {
            uk: self.uk,
            uv: self.uv,
            local: self.local && shape.takes_local(),
        }
    }

    /// `key=value` pairs separated by commas, over the defaults; an error
    /// names the field and what it takes.
    pub fn parse(text: &str) -> Result<Tuning, String> {
        let mut t = Tuning::DEFAULT;
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            let flag = match key {
                "fold" => Some(&mut t.fold),
                "local" => Some(&mut t.local),
                _ => None,
            };
            if let Some(flag) = flag {
                *flag = match value {
                    "1" | "on" | "true" => true,
                    "0" | "off" | "false" => false,
                    _ => return Err(format!("{key} = {value:?} is not 1 (on) or 0 (off)")),
                };
                continue;
            }
            let v: i64 = value
                .parse()
                .map_err(|_| format!("{key} = {value:?} is not an integer"))?;
            let (field, ok, range) = match key {
                "max_chunk" => (
                    &mut t.max_chunk,
                    (32..=4096).contains(&v) && v % 32 == 0,
                    "a multiple of 32 from 32 to 4096",
                ),
                "blocks_per_sm" => (&mut t.blocks_per_sm, (1..=64).contains(&v), "1 to 64"),
                "uk" => (&mut t.uk, (1..=16).contains(&v), "1 to 16"),
                "uv" => (&mut t.uv, (1..=16).contains(&v), "1 to 16"),
                "groups" => (&mut t.groups, GROUPS.contains(&v), "1, 2, 4 or 8"),
                k => {
                    return Err(format!(
                        "unknown key {k:?} (max_chunk, blocks_per_sm, uk, uv, fold, groups, local)"
                    ))
                }
            };
            if !ok {
                return Err(format!("{key} = {v} is out of range ({range})"));
            }
            *field = v;
        }
        Ok(t)
    }
}

/// The key rows and value rows each lane of the split kernel loads before
/// it uses any, and the kernel's form (compiled into the kernel: each is
/// its own module). The block form takes a block's chunk phase by phase
/// with a barrier between the scores, the softmax and p·V; the warp-local
/// form (`local`) gives each warp a key head and a part of the chunk
/// through all three phases alone and merges the warps' parts at the end
/// (csrc/decode_attention.cu, `WL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rows {
    pub uk: i64,
    pub uv: i64,
    pub local: bool,
}

impl Rows {
    /// What the kernel used before the search chose (and the fixed rule's default).
    pub const DEFAULT: Rows = Rows {
        uk: 4,
        uv: 8,
        local: false,
    };
    /// Twice as many loads in flight per lane (more registers).
    pub const DEEP: Rows = Rows {
        uk: 8,
        uv: 16,
        local: false,
    };
    /// The warp-local form of each.
    pub const LOCAL: Rows = Rows {
        local: true,
        ..Rows::DEFAULT
    };
    pub const LOCAL_DEEP: Rows = Rows {
        local: true,
        ..Rows::DEEP
    };
}

/// The rows and forms the search tries (each a compiled kernel; the
/// warp-local ones where the shape takes them): on an H100 (f334865, the
/// fixed rule at 1 block per multiprocessor) [`Rows::DEEP`] was 2-6 %
/// faster at batch 4 and 1-3 % slower at batch 1 (docs/benchmarks.md).
pub const ROWS: [Rows; 4] = [Rows::DEFAULT, Rows::DEEP, Rows::LOCAL, Rows::LOCAL_DEEP];

/// One launch of the decode kernel: chunks of `chunk` slots, `splits` of
/// them per sequence and head group (`groups` of them divide a sequence's
/// heads, each group's blocks taking `n_q / groups` query heads with their
/// K and V heads: `splits x groups` blocks a sequence); with one split the
/// block writes its heads' output itself, else `fold` says whether the
/// last block of each group merges the partial results (one launch) or
/// the combine kernel does (two); by the kernel compiled with `rows` and
/// `groups`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub chunk: i64,
    pub splits: i64,
    pub fold: bool,
    pub rows: Rows,
    pub groups: i64,
}

impl Plan {
    /// `len` slots in chunks of `chunk`, all heads in one group, folded if
    /// `fold` and the splits allow it, by the kernel of [`Rows::DEFAULT`].
    pub fn new(chunk: i64, len: i64, fold: bool) -> Plan {
        Plan::grouped(chunk, len, fold, 1)
    }

    /// [`Plan::new`] with the heads in `groups` groups: the folded merge of
    /// a group reads `1 / groups` of a sequence's partials per split, so it
    /// is offered up to `groups x` [`MAX_FOLD_SPLITS`] splits.
    pub fn grouped(chunk: i64, len: i64, fold: bool, groups: i64) -> Plan {
        let splits = (len + chunk - 1) / chunk;
        Plan {
            chunk,
            splits,
            fold: fold && splits > 1 && splits <= MAX_FOLD_SPLITS * groups,
            rows: Rows::DEFAULT,
            groups,
        }
    }

    /// The same plan by the kernel of `rows`.
    pub fn with_rows(self, rows: Rows) -> Plan {
        Plan { rows, ..self }
    }

    /// The plan of `len` slots that a search's [`Choice`] stands for.
    pub fn chosen(c: Choice, len: i64) -> Plan {
        Plan::grouped(c.chunk, len, c.fold, c.groups).with_rows(c.rows)
    }

    /// Kernel launches this plan takes.
    pub fn launches(&self) -> u32 {
        if self.splits == 1 || self.fold {
            1
        } else {
            2
        }
    }
}

/// Head counts and dimensions that select one compiled decode kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecodeShape {
    pub n_q: i64,
    pub n_k: i64,
    pub n_v: i64,
    pub d_k: i64,
    pub d_v: i64,
}

impl DecodeShape {
    /// Why the kernel cannot take this shape (None: it can).
    pub fn unsupported(&self) -> Option<String> {
        let lanes_ok = |d: i64| d > 0 && d % 8 == 0 && 32 % (d / 8) == 0;
        let group_ok = |g: i64| g <= 8 || g % 8 == 0;
        let s = self;
        if s.n_k <= 0 || s.n_v <= 0 || s.n_q % s.n_k != 0 || s.n_q % s.n_v != 0 {
            Some(format!(
                "n_k {} and n_v {} must divide n_q {}",
                s.n_k, s.n_v, s.n_q
            ))
        } else if !lanes_ok(s.d_k) || !lanes_ok(s.d_v) {
            Some(format!(
                "head dimensions {} (K) and {} (V) must be 8, 16, 32, 64, 128 or 256",
                s.d_k, s.d_v
            ))
        } else if !group_ok(s.n_q / s.n_k) || !group_ok(s.n_q / s.n_v) {
            Some(format!(
                "query heads per K head ({}) and per V head ({}) must be at most 8 or a multiple of 8",
                s.n_q / s.n_k,
                s.n_q / s.n_v
            ))
        } else if self.max_chunk(i64::MAX, false) < 32 {
            Some(format!(
                "{} query heads leave no room for a chunk in shared memory",
                s.n_q
            ))
        } else {
            None
        }
    }

    /// Whether a plan may divide this shape's heads into `groups` groups
    /// (one of [`GROUPS`]): each group must have whole K and V heads, and
    /// (beyond one group) at least 4 V heads, so that no V head is summed
    /// by more than two of a block's 8 warps (two adds into shared memory
    /// give the same bits in either order; more would not) and its block
    /// fits a chunk of 32 slots.
    pub fn takes_groups(&self, groups: i64) -> bool {
        let s = self;
        GROUPS.contains(&groups)
            && (groups == 1
                || (s.n_k % groups == 0
                    && s.n_v % groups == 0
                    && s.n_v / groups >= 4
                    && s.grouped(groups).unsupported().is_none()))
    }

    /// Whether the warp-local form can take this shape: each K head's
    /// query heads read whole V heads (`n_k` divides `n_v`) and are at most
    /// 8 (one pass over the key rows), and its block fits a chunk of 32
    /// slots beside its parts' outputs.
    pub fn takes_local(&self) -> bool {
        self.n_v % self.n_k == 0 && self.n_q / self.n_k <= 8 && self.max_chunk(i64::MAX, true) >= 32
    }

    /// Whether a block of this shape (a plan's group: `grouped(groups)`)
    /// in the warp-local form if `local` can take a chunk of `chunk` slots:
    /// the form takes the shape and the chunk fits its shared memory.
    pub fn fits(&self, chunk: i64, local: bool) -> bool {
        (!local || self.takes_local()) && chunk <= self.max_chunk(i64::MAX, local)
    }

    /// The head groups a plan of this shape may take ([`Self::takes_groups`]).
    pub fn groups(&self) -> Vec<i64> {
        GROUPS
            .into_iter()
            .filter(|&g| self.takes_groups(g))
            .collect()
    }

    /// The heads one block of a plan in `groups` groups takes: `1 /
    /// groups` of each kind, same dimensions (its shared memory is this
    /// shape's; `groups` divides the heads, [`Self::takes_groups`]).
    pub fn grouped(&self, groups: i64) -> DecodeShape {
        DecodeShape {
            n_q: self.n_q / groups,
            n_k: self.n_k / groups,
            n_v: self.n_v / groups,
            ..*self
        }
    }

    /// The compile-time constants of this shape's kernel, with `rows`
    /// loaded ahead and the heads in `groups` groups.
    pub fn defines(&self, threads: u32, rows: Rows, groups: i64) -> [(&'static str, i64); 10] {
        [
            ("NQ", self.n_q),
            ("NK", self.n_k),
            ("NV", self.n_v),
            ("DK", self.d_k),
            ("DV", self.d_v),
            ("THREADS", threads as i64),
            ("UK", rows.uk),
            ("UV", rows.uv),
            ("HG", groups),
            ("WL", i64::from(rows.local)),
        ]
    }

    /// The bf16 K and V bytes a launch over `len` slots of `batch` sequences reads.
    pub fn cache_bytes(&self, batch: i64, len: i64) -> i64 {
        batch * len * (self.n_k * self.d_k + self.n_v * self.d_v) * 2
    }

    /// The parts of a chunk whose outputs a block of the warp-local form
    /// merges (the source's WSUB): the warps per K head; 1 in the block form.
    pub fn local_parts(&self, local: bool) -> i64 {
        if local && self.n_k < SPLIT_WARPS {
            SPLIT_WARPS / self.n_k
        } else {
            1
        }
    }

    /// Shared memory of a split block taking all of this shape's heads
    /// (of a plan in groups: `grouped(groups).smem_bytes`), in bytes, for
    /// a chunk of `chunk` slots, in the warp-local form if `local` (an
    /// output, a max and a sum per query head and part).
    pub fn smem_bytes(&self, chunk: i64, local: bool) -> i64 {
        4 * self.n_q * (self.fixed_floats(local) + chunk)
    }

    /// A block's floats of shared memory per query head besides its scores.
    fn fixed_floats(&self, local: bool) -> i64 {
        let parts = self.local_parts(local);
        let part_ml = if local { 2 * parts } else { 0 };
        self.d_k + parts * self.d_v + 2 + part_ml
    }

    /// The largest chunk (a multiple of 32, at most `limit`) whose block
    /// (in the warp-local form if `local`) fits [`MAX_SMEM`].
    pub fn max_chunk(&self, limit: i64, local: bool) -> i64 {
        let free = MAX_SMEM / 4 - self.n_q * self.fixed_floats(local);
        ((free / self.n_q.max(1)) / 32 * 32).min(limit)
    }

    /// The fixed rule (`SIGMA_DECODE_TUNING`, or no search possible): the
    /// heads in `t.groups` groups where this shape takes them (else one),
    /// `len` slots of `batch` sequences split into chunks so that about
    /// `t.blocks_per_sm` blocks per multiprocessor exist, chunk a multiple
    /// of 32 and `splits * chunk >= len > (splits - 1) * chunk`.
    pub fn plan(&self, batch: i64, len: i64, sms: i64, t: &Tuning) -> Plan {
        let g = if self.takes_groups(t.groups) {
            t.groups
        } else {
            1
        };
        let rows = t.rows_for(&self.grouped(g));
        let seqs = batch * g;
        let want_splits = ((t.blocks_per_sm * sms + seqs - 1) / seqs).max(1);
        let chunk = (len + want_splits - 1) / want_splits;
        let most = self.grouped(g).max_chunk(t.max_chunk, rows.local).max(32);
        let chunk = ((chunk + 31) / 32 * 32).clamp(32, most);
        Plan::grouped(chunk, len, t.fold, g).with_rows(rows)
    }
}

/// The plans the search times for `len` slots: for every head groups the
/// shape takes ([`DecodeShape::groups`]), every chunk of [`CHUNKS`] whose
/// block fits shared memory up to the first that holds the whole context,
/// each with the combine folded and separate (one plan where one split
/// suffices or folding is not offered), none past [`MAX_SPLITS`]; each by
/// the kernel of every [`ROWS`] (the warp-local ones where the shape takes
/// them and the chunk fits their shared memory).
pub fn candidates(shape: &DecodeShape, len: i64) -> Vec<Plan> {
    let mut out = Vec::new();
    for groups in shape.groups() {
        let g = shape.grouped(groups);
        let most = g.max_chunk(i64::MAX, false);
        for chunk in CHUNKS.into_iter().filter(|&c| c <= most) {
            let folded = Plan::grouped(chunk, len, true, groups);
            if folded.splits <= MAX_SPLITS {
                let separate = Plan::grouped(chunk, len, false, groups);
                let plans = if separate != folded {
                    vec![folded, separate]
                } else {
                    vec![folded]
                };
                for p in plans {
                    let rows = ROWS.into_iter().filter(|r| g.fits(chunk, r.local));
                    out.extend(rows.map(|r| p.with_rows(r)));
                }
            }
            if chunk >= len {
                break;
            }
        }
    }
    out
}

/// The kernels (rows loaded ahead and form, head groups) that decoding
/// steps of `shape` may launch, each once: the one a step starts from
/// (`fixed`'s rows, else [`Rows::DEFAULT`], in one group), then under a
/// fixed rule (`SIGMA_DECODE_TUNING`) that rule's plan's, else every
/// search candidate's at any context (the union of [`candidates`] over
/// all lengths). What a generation builds ahead (`infer::prebuild`).
pub fn kernels_used(shape: &DecodeShape, fixed: Option<&Tuning>) -> Vec<(Rows, i64)> {
    let mut out = vec![(fixed.map_or(Rows::DEFAULT, |t| t.rows_for(shape)), 1)];
    let mut add = |k: (Rows, i64)| {
        if !out.contains(&k) {
            out.push(k);
        }
    };
    match fixed {
        Some(t) => {
            // The rule's kernel depends on neither batch, length nor device.
            let p = shape.plan(1, 32, 1, t);
            add((p.rows, p.groups));
        }
        None => {
            for groups in shape.groups() {
                let g = shape.grouped(groups);
                let most = g.max_chunk(i64::MAX, false);
                for rows in ROWS {
                    if CHUNKS.iter().any(|&c| c <= most && g.fits(c, rows.local)) {
                        add((rows, groups));
                    }
                }
            }
        }
    }
    out
}

/// Whether a launch asks L2 for its chunks before it waits on the kernels
/// before it: unless `allowed` is off (`SIGMA_DECODE_PREFETCH`), where the
/// launch's K and V (`bytes`) take at most half of L2 (`l2_bytes`); more
/// would evict lines before they are read. (Asked at the start of every
/// launch, as a plan the search could choose, it was never chosen and,
/// forced, 10-20 % slower at batch 1 and 4 on an H100: f334865.)
pub fn prefetches(allowed: bool, bytes: i64, l2_bytes: i64) -> bool {
    allowed && bytes <= l2_bytes / 2
}

/// The context lengths one search serves: the next power of two (at least 32).
pub fn context_bucket(len: i64) -> i64 {
    (len.max(32) as u64).next_power_of_two() as i64
}

/// What a search result is remembered under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TuneKey {
    /// The GPU's name, as its driver gives it.
    pub device: String,
    pub shape: DecodeShape,
    pub batch: i64,
    /// [`context_bucket`] of the context.
    pub bucket: i64,
}

/// A search's result: the chunk, whether to fold, the rows loaded ahead
/// and the head groups; [`Plan::chosen`] makes the plan of any context of
/// the bucket from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub chunk: i64,
    pub fold: bool,
    pub rows: Rows,
    pub groups: i64,
}

impl Choice {
    pub fn of(p: Plan) -> Choice {
        Choice {
            chunk: p.chunk,
            fold: p.fold,
            rows: p.rows,
            groups: p.groups,
        }
    }
}

/// The fastest of `plans` by `seconds` (the same order; a time that is not
/// a positive finite number does not count); the earlier on a tie. None
/// when no time counts.
pub fn fastest(plans: &[Plan], seconds: &[f64]) -> Option<Plan> {
    plans
        .iter()
        .zip(seconds)
        .filter(|(_, t)| t.is_finite() && **t > 0.0)
        .fold(None, |best: Option<(Plan, f64)>, (p, &t)| match best {
            Some((_, bt)) if bt <= t => best,
            _ => Some((*p, t)),
        })
        .map(|(p, _)| p)
}

/// The first line of a tuning cache file (its format's version,
/// `sigma_data::decode_tuning_version!`, which also names the default
/// file). Earlier versions are not read, and their files had other default
/// names: 1 (choices timed from the host, before c8b5efc), 2 (a prefetch
/// column, c46dc6e to f334865), 3 (no head groups column, to 906b0eb), 4
/// (no local column, to 1a65694).
pub const CACHE_HEADER: &str = concat!(
    "# sigma decode tuning v",
    sigma_data::decode_tuning_version!(),
    ": device, n_q n_k n_v d_k d_v, batch, context bucket, chunk, fold, uk uv, groups, local (tab-separated)"
);

/// The text of a tuning cache file: the header, then one line per key, sorted.
pub fn format_cache(entries: &BTreeMap<TuneKey, Choice>) -> String {
    let mut out = format!("{CACHE_HEADER}\n");
    for (k, c) in entries {
        let s = &k.shape;
        out.push_str(&format!(
            "{}\t{} {} {} {} {}\t{}\t{}\t{}\t{}\t{} {}\t{}\t{}\n",
            k.device,
            s.n_q,
            s.n_k,
            s.n_v,
            s.d_k,
            s.d_v,
            k.batch,
            k.bucket,
            c.chunk,
            u8::from(c.fold),
            c.rows.uk,
            c.rows.uv,
            c.groups,
            u8::from(c.rows.local)
        ));
    }
    out
}

/// The entries of a tuning cache file; an error names the first bad line
/// and what is wrong with it (the caller then ignores the whole file).
pub fn parse_cache(text: &str) -> Result<BTreeMap<TuneKey, Choice>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(CACHE_HEADER) {
        return Err(format!(
            "line 1: not a sigma decode tuning file of version {}",
            sigma_data::decode_tuning_version!()
        ));
    }
    let mut out = BTreeMap::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (key, choice) = parse_line(line).map_err(|e| format!("line {}: {e}", i + 2))?;
        out.insert(key, choice);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<(TuneKey, Choice), String> {
    let f: Vec<&str> = line.split('\t').collect();
    let [device, shape, batch, bucket, chunk, fold, rows, groups, local] = f[..] else {
        return Err(format!("{} fields, not 9", f.len()));
    };

    let num = |what: &str, s: &str| -> Result<i64, String> {
        s.trim()
            .parse::<i64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{what} {s:?} is not a positive integer"))
    };
    let dims = shape
        .split(' ')
        .map(|s| num("head count or dimension", s))
        .collect::<Result<Vec<_>, _>>()?;
    let [n_q, n_k, n_v, d_k, d_v] = dims[..] else {
        return Err(format!("shape {shape:?} is not n_q n_k n_v d_k d_v"));
    };
    let shape = DecodeShape {
        n_q,
        n_k,
        n_v,
        d_k,
        d_v,
    };
    if let Some(why) = shape.unsupported() {
        return Err(format!("shape {shape:?}: {why}"));
    }
    let groups = num("head groups", groups)?;
    if !shape.takes_groups(groups) {
        return Err(format!(
            "head groups {groups}: not 1, 2, 4 or 8 that divide the shape's K and V heads (at least 4 V heads a group)"
        ));
    }
    let chunk = num("chunk", chunk)?;
    let flag = |what: &str, s: &str| match s.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(format!("{what} {other:?} is not 0 or 1")),
    };
    let (fold, local) = (flag("fold", fold)?, flag("local", local)?);
    if local && !shape.grouped(groups).takes_local() {
        return Err(format!(
            "local 1: the warp-local form does not take {shape:?} in {groups} groups"
        ));
    }
    if chunk % 32 != 0 || chunk > shape.grouped(groups).max_chunk(i64::MAX, local) {
        return Err(format!(
            "chunk {chunk} is not a multiple of 32 that fits shared memory"
        ));
    }
    let rows = match rows
        .split(' ')
        .map(|s| num("rows", s))
        .collect::<Result<Vec<_>, _>>()?[..]
    {
        [uk, uv] if uk <= 16 && uv <= 16 => Rows { uk, uv, local },
        _ => return Err(format!("rows {rows:?} are not uk uv, each 1 to 16")),
    };
    let key = TuneKey {
        device: device.to_string(),
        shape,
        batch: num("batch", batch)?,
        bucket: num("context bucket", bucket)?,
    };
    Ok((
        key,
        Choice {
            chunk,
            fold,
            rows,
            groups,
        },
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SIGMA-1.5B's heads (32/4/16, d 64), for the tests of this folder.
    pub(crate) fn sigma_1_5b() -> DecodeShape {
        DecodeShape {
            n_q: 32,
            n_k: 4,
            n_v: 16,
            d_k: 64,
            d_v: 64,
        }
    }

    #[test]
    fn plans_cover_the_context_exactly_and_fill_the_device() {
        let s = sigma_1_5b();
        let t = Tuning::DEFAULT;
        for (b, len) in [
            (1, 1),
            (1, 4096),
            (16, 32768),
            (64, 4096),
            (3, 1000),
            (1, 65536),
        ] {
            let p = s.plan(b, len, 132, &t);
            assert_eq!(p.chunk % 32, 0);
            assert!(
                p.splits * p.chunk >= len && (p.splits - 1) * p.chunk < len,
                "{b} {len}"
            );
            assert!(s.smem_bytes(p.chunk, p.rows.local) <= MAX_SMEM);
            // Enough blocks for the 132 multiprocessors whenever the context allows it.
            if len >= 32 * 1056 / b {
                assert!(b * p.splits >= 132, "{b} {len}: {p:?}");
            }
            assert_eq!(p.fold, p.splits > 1 && p.splits <= MAX_FOLD_SPLITS);
        }
        let p = s.plan(64, 2048, 132, &t);
        assert_eq!(
            (p.chunk, p.splits, p.fold, p.launches()),
            (128, 16, true, 1)
        );
        // 64 splits: too many to fold.
        let p = s.plan(16, 32768, 132, &t);
        assert_eq!(
            (p.chunk, p.splits, p.fold, p.launches()),
            (512, 64, false, 2)
        );
        // One split: one launch, nothing to fold.
        let p = s.plan(64, 32, 132, &t);
        assert_eq!((p.splits, p.fold, p.launches()), (1, false, 1));
        // Too many splits to fold, or folding turned off: the combine kernel.
        let p = s.plan(1, 65536, 132, &t);
        assert_eq!(
            (p.chunk, p.splits, p.fold, p.launches()),
            (64, 1024, false, 2)
        );
        let off = Tuning { fold: false, ..t };
        assert_eq!(s.plan(64, 2048, 132, &off).launches(), 2);
    }

    /// The plans by the kernel of [`Rows::DEFAULT`] in `groups` groups.
    fn in_groups(plans: &[Plan], groups: i64) -> Vec<Plan> {
        plans
            .iter()
            .copied()
            .filter(|p| p.rows == Rows::DEFAULT && p.groups == groups)
            .collect()
    }

    /// The plans by the kernel of [`Rows::DEFAULT`], all heads in one group.
    fn defaults(plans: &[Plan]) -> Vec<Plan> {
        in_groups(plans, 1)
    }

    #[test]
    fn candidates_cover_the_context_fit_shared_memory_and_offer_both_combines() {
        let s = sigma_1_5b();
        for len in [1, 31, 32, 33, 100, 1000, 4096, 5000, 32768, 65536, 1 << 20] {
            let all = candidates(&s, len);
            // For 1, 2 and 4 groups in turn (SIGMA's 4 K heads allow no
            // more), every plan by the kernel of each rows, in turn.
            let each: Vec<Plan> = [1, 2, 4]
                .into_iter()
                .flat_map(|g| in_groups(&all, g))
                .flat_map(|p| ROWS.map(|r| p.with_rows(r)))
                .collect();
            assert_eq!(all, each, "{len}");
            for g in [1, 2, 4] {
                let c = in_groups(&all, g);
                assert!(!c.is_empty(), "{len}");
                for p in &c {
                    assert!(p.splits * p.chunk >= len && (p.splits - 1) * p.chunk < len);
                    assert!(s.grouped(g).smem_bytes(p.chunk, false) <= MAX_SMEM, "{p:?}");
                    assert!(p.splits <= MAX_SPLITS && p.chunk % 32 == 0);
                    assert!(!p.fold || p.splits <= MAX_FOLD_SPLITS * g);
                }
                // No two alike; no chunk beyond the first that holds the context.
                for (i, p) in c.iter().enumerate() {
                    assert!(!c[i + 1..].contains(p), "{len}: {p:?} twice");
                }
                assert!(c.iter().filter(|p| p.splits == 1).count() <= 1, "{len}");
            }
        }
        // 4096 slots: chunks 32..512 (SIGMA's shared memory stops at 608),
        // folded where 16 splits or fewer, and always separately.
        let c = defaults(&candidates(&s, 4096));
        let chunks: Vec<i64> = c.iter().map(|p| p.chunk).collect();
        assert_eq!(chunks, [32, 64, 128, 256, 256, 512, 512]);
        assert_eq!((c[0].splits, c[0].fold), (128, false));
        assert_eq!((c[3].splits, c[3].fold, c[4].fold), (16, true, false));
        assert_eq!(c.iter().filter(|p| p.fold).count(), 2);
        // A million slots: chunks of 32 and 64 would take too many splits,
        // and 8,192 splits are too many to fold.
        let c = defaults(&candidates(&s, 1 << 20));
        assert_eq!(c[0], Plan::new(128, 1 << 20, false));
        assert!(c.iter().all(|p| p.chunk >= 128));
        // A short context ends with the single split.
        let c = defaults(&candidates(&s, 40));
        assert_eq!(c.last(), Some(&Plan::new(64, 40, true)));
        assert_eq!(c.last().map(|p| (p.splits, p.launches())), Some((1, 1)));
        // Smaller heads fit longer chunks.
        let small = DecodeShape {
            n_q: 8,
            n_k: 2,
            n_v: 4,
            d_k: 16,
            d_v: 16,
        };
        assert!(candidates(&small, 65536).iter().any(|p| p.chunk == 2048));
    }

    /// What a generation builds ahead is exactly what its steps can ask
    /// for: every candidate's kernel at any context (and no other), the
    /// starting kernel first; under a fixed rule the starting kernel and
    /// the rule's plan's, whatever the batch, context or device.
    #[test]
    fn the_kernels_built_ahead_are_those_the_steps_launch() {
        let shapes = [
            sigma_1_5b(),
            DecodeShape {
                n_k: 1,
                ..sigma_1_5b()
            },
            DecodeShape {
                n_q: 16,
                n_k: 16,
                n_v: 16,
                d_k: 64,
                d_v: 64,
            },
            DecodeShape {
                n_q: 8,
                n_k: 2,
                n_v: 4,
                d_k: 16,
                d_v: 16,
            },
            DecodeShape {
                n_q: 4,
                n_k: 4,
                n_v: 4,
                d_k: 256,
                d_v: 256,
            },
        ];
        for s in shapes {
            let used = kernels_used(&s, None);
            assert_eq!(used[0], (Rows::DEFAULT, 1), "{s:?}");
            for (i, k) in used.iter().enumerate() {
                assert!(!used[i + 1..].contains(k), "{s:?}: {k:?} twice");
            }
            let mut union: Vec<(Rows, i64)> = Vec::new();
            for len in [1, 31, 32, 100, 4096, 65536, 1 << 20] {
                for p in candidates(&s, len) {
                    assert!(used.contains(&(p.rows, p.groups)), "{s:?} {len}: {p:?}");
                    if !union.contains(&(p.rows, p.groups)) {
                        union.push((p.rows, p.groups));
                    }
                }
            }
            let extra: Vec<_> = used.iter().filter(|k| !union.contains(k)).collect();
            // Only the starting kernel may be no candidate (a shape whose
            // one-group block fits no chunk of the default rows).
            assert!(extra.is_empty() || extra == [&used[0]], "{s:?}: {extra:?}");
        }
        let s = sigma_1_5b();
        assert_eq!(
            kernels_used(&s, None).len(),
            12,
            "SIGMA-1.5B's search builds 12 modules"
        );
        let t = Tuning {
            groups: 4,
            local: true,
            uk: 2,
            ..Tuning::DEFAULT
        };
        let fixed = kernels_used(&s, Some(&t));
        let start = t.rows_for(&s);
        for (batch, len, sms) in [(1, 4096, 132), (64, 65536, 114), (3, 40, 8)] {
            let p = s.plan(batch, len, sms, &t);
            assert!(fixed.contains(&(p.rows, p.groups)), "{p:?}");
        }
        assert_eq!(fixed[0], (start, 1));
        assert!(fixed.len() <= 2);
        let one = Tuning {
            groups: 1,
            ..Tuning::DEFAULT
        };
        assert_eq!(kernels_used(&s, Some(&one)), [(Rows::DEFAULT, 1)]);
    }

    #[test]
    fn head_groups_divide_the_heads_fit_longer_chunks_and_fold_more_splits() {
        let s = sigma_1_5b();
        // 4 K heads and 16 V heads: 1, 2 or 4 groups (8 would leave half a K head).
        assert_eq!(s.groups(), [1, 2, 4]);
        assert_eq!(
            s.grouped(4),
            DecodeShape {
                n_q: 8,
                n_k: 1,
                n_v: 4,
                ..s
            }
        );
        // A group's block holds a quarter of the heads: chunks to 2,048 fit.
        let c = in_groups(&candidates(&s, 65536), 4);
        assert_eq!(
            c.iter().map(|p| p.chunk).max(),
            Some(2048),
            "{:?}",
            c.iter().map(|p| p.chunk).collect::<Vec<_>>()
        );
        assert!(
            s.grouped(4).smem_bytes(2048, false) <= MAX_SMEM
                && s.smem_bytes(2048, false) > MAX_SMEM
        );
        // The folded merge reads a quarter per split: offered to 64 splits.
        assert!(Plan::grouped(256, 16384, true, 4).fold);
        assert!(!Plan::grouped(256, 16384 + 1, true, 4).fold);
        assert!(!Plan::new(256, 16384, true).fold);
        // Fewer than 4 V heads a group, K or V heads the groups do not
        // divide, or a count not offered: refused.
        let gqa = DecodeShape {
            n_q: 16,
            n_k: 16,
            n_v: 16,
            d_k: 64,
            d_v: 64,
        };
        assert_eq!(gqa.groups(), [1, 2, 4]);
        let augq = DecodeShape { n_k: 1, ..s };
        assert_eq!(augq.groups(), [1]);
        let odd = DecodeShape {
            n_q: 12,
            n_k: 3,
            n_v: 6,
            ..s
        };
        assert_eq!(odd.groups(), [1]);
        assert!(!s.takes_groups(3) && !s.takes_groups(0) && !s.takes_groups(16));
        assert!(candidates(&augq, 4096).iter().all(|p| p.groups == 1));
        // The fixed rule: blocks counted over the groups (a quarter the
        // splits, about 8 blocks per multiprocessor still), one group where
        // the shape does not take the tuning's.
        let t = Tuning {
            groups: 4,
            ..Tuning::DEFAULT
        };
        let p = s.plan(1, 65536, 132, &t);
        assert_eq!((p.groups, p.chunk, p.splits, p.fold), (4, 256, 256, false));
        let p = s.plan(16, 4096, 132, &t);
        assert_eq!((p.groups, p.chunk, p.splits, p.fold), (4, 256, 16, true));
        assert_eq!(augq.plan(1, 65536, 132, &t).groups, 1);
    }

    #[test]
    fn the_fastest_counts_only_real_times_and_keeps_the_first_on_a_tie() {
        let p: Vec<Plan> = [32, 64, 128].map(|c| Plan::new(c, 1000, true)).to_vec();
        assert_eq!(fastest(&p, &[3.0, 1.0, 2.0]), Some(p[1]));
        assert_eq!(fastest(&p, &[2.0, f64::NAN, 2.0]), Some(p[0]));
        assert_eq!(fastest(&p, &[f64::INFINITY, 0.0, 5.0]), Some(p[2]));
        assert_eq!(fastest(&p, &[f64::NAN; 3]), None);
        assert_eq!(fastest(&[], &[]), None);
    }

    #[test]
    fn the_prefetch_runs_where_allowed_and_the_cache_fits_half_of_l2() {
        let l2 = 50 << 20;
        assert!(prefetches(true, l2 / 2, l2));
        assert!(!prefetches(true, l2 / 2 + 1, l2));
        assert!(!prefetches(false, 1, l2));
    }

    #[test]
    fn buckets_are_powers_of_two_that_hold_the_context() {
        for (len, b) in [(1, 32), (32, 32), (33, 64), (4096, 4096), (4097, 8192)] {
            assert_eq!(context_bucket(len), b, "{len}");
        }
    }

    #[test]
    fn the_cache_file_round_trips() {
        let mut m = BTreeMap::new();
        let key = |device: &str, batch, bucket| TuneKey {
            device: device.into(),
            shape: sigma_1_5b(),
            batch,
            bucket,
        };
        m.insert(
            key("NVIDIA H100 80GB HBM3", 1, 4096),
            Choice {
                chunk: 128,
                fold: true,
                rows: Rows::DEEP,
                groups: 1,
            },
        );
        m.insert(
            key("NVIDIA H200", 16, 32768),
            Choice {
                chunk: 512,
                fold: false,
                rows: Rows::DEFAULT,
                groups: 1,
            },
        );
        m.insert(
            key("NVIDIA H200", 1, 65536),
            Choice {
                chunk: 2048,
                fold: true,
                rows: Rows::DEFAULT,
                groups: 4,
            },
        );
        m.insert(
            key("NVIDIA H100 80GB HBM3", 4, 16384),
            Choice {
                chunk: 1024,
                fold: false,
                rows: Rows::LOCAL_DEEP,
                groups: 2,
            },
        );
        let text = format_cache(&m);
        assert_eq!(parse_cache(&text), Ok(m.clone()));
        assert!(
            text.contains("NVIDIA H200\t32 4 16 64 64\t16\t32768\t512\t0\t4 8\t1\t0\n"),
            "{text}"
        );
        assert!(
            text.contains("NVIDIA H200\t32 4 16 64 64\t1\t65536\t2048\t1\t4 8\t4\t0\n"),
            "{text}"
        );
        assert!(
            text.contains("NVIDIA H100 80GB HBM3\t32 4 16 64 64\t4\t16384\t1024\t0\t8 16\t2\t1\n"),
            "{text}"
        );
        assert!(text.starts_with("# sigma decode tuning v5: "), "{text}");
        assert_eq!(
            parse_cache(&format_cache(&BTreeMap::new())),
            Ok(BTreeMap::new())
        );
    }

    #[test]
    fn a_bad_cache_file_is_refused_naming_the_line_and_field() {
        let line = "NVIDIA H200\t32 4 16 64 64\t16\t32768\t512\t0\t8 16\t2\t1";
        let bad =
            |body: &str| parse_cache(&format!("{CACHE_HEADER}\n{line}\n{body}\n")).unwrap_err();
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\t1\t4 8\t1").contains("line 3: 8 fields, not 9"));
        assert!(bad("x\t32 4 16 64\t1\t64\t64\t1\t4 8\t1\t0").contains("not n_q n_k n_v d_k d_v"));
        assert!(bad("x\t32 5 16 64 64\t1\t64\t64\t1\t4 8\t1\t0").contains("must divide"));
        assert!(bad("x\t32 4 16 64 64\t0\t64\t64\t1\t4 8\t1\t0").contains("batch \"0\""));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t100\t1\t4 8\t1\t0").contains("chunk 100"));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t4096\t1\t4 8\t1\t0").contains("fits shared memory"));
        // 2,048 slots fit a block of one of 4 groups, not of one group.
        assert!(bad("x\t32 4 16 64 64\t1\t64\t2048\t1\t4 8\t1\t0").contains("fits shared memory"));
        assert!(parse_cache(&format!(
            "{CACHE_HEADER}\nx\t32 4 16 64 64\t1\t64\t2048\t1\t4 8\t4\t1\n"
        ))
        .is_ok());
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\tyes\t4 8\t1\t0").contains("fold \"yes\""));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\t1\t4\t1\t0").contains("rows \"4\" are not uk uv"));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\t1\t4 17\t1\t0").contains("rows \"4 17\""));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\t1\t0 8\t1\t0")
            .contains("rows \"0\" is not a positive"));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\t1\t4 8\t8\t0").contains("head groups 8"));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\t1\t4 8\t3\t0").contains("head groups 3"));
        assert!(bad("x\t32 4 16 64 64\t1\t64\t64\t1\t4 8\tx\t0").contains("head groups \"x\""));
        // The warp-local flag: 0 or 1, for a shape (in its groups) the form
        // takes, with a chunk that fits the form's shared memory (its parts'
        // outputs: one K head's 8 warps leave a block of 8 query heads 2,464
        // slots, not the block form's 2,912).
        assert!(
            bad("x\t32 4 16 64 64\t1\t64\t64\t1\t4 8\t1\t2").contains("local \"2\" is not 0 or 1")
        );
        assert!(bad("x\t64 4 2 64 64\t1\t64\t64\t1\t4 8\t1\t1")
            .contains("warp-local form does not take"));
        let wide = "x\t8 1 4 64 64\t1\t4096\t2912\t1\t4 8\t1";
        assert!(parse_cache(&format!("{CACHE_HEADER}\n{wide}\t0\n")).is_ok());
        assert!(bad(&format!("{wide}\t1")).contains("fits shared memory"));
        assert!(parse_cache(&format!(
            "{CACHE_HEADER}\nx\t8 1 4 64 64\t1\t4096\t2464\t1\t4 8\t1\t1\n"
        ))
        .is_ok());
        // Files of version 1 (no rows column, choices timed from the host),
        // 3 (no groups column) and 4 (no local column) are not read.
        let v1 = "# sigma decode tuning v1: device, n_q n_k n_v d_k d_v, batch, context bucket, chunk, fold (tab-separated)\nNVIDIA H200\t32 4 16 64 64\t16\t32768\t512\t1\n";
        let v3 = "# sigma decode tuning v3: device, n_q n_k n_v d_k d_v, batch, context bucket, chunk, fold, uk uv (tab-separated)\nNVIDIA H200\t32 4 16 64 64\t16\t32768\t512\t1\t4 8\n";
        let v4 = "# sigma decode tuning v4: device, n_q n_k n_v d_k d_v, batch, context bucket, chunk, fold, uk uv, groups (tab-separated)\nNVIDIA H200\t32 4 16 64 64\t16\t32768\t512\t1\t4 8\t1\n";
        for old in [v1, v3, v4] {
            assert!(parse_cache(old)
                .unwrap_err()
                .contains("line 1: not a sigma decode tuning file of version 5"));
        }
        assert!(parse_cache("garbage\n").unwrap_err().contains("line 1"));
        assert!(parse_cache("").unwrap_err().contains("line 1"));
    }

    #[test]
    fn tuning_overrides_parse_and_bad_ones_are_named() {
        assert_eq!(Tuning::parse("").unwrap(), Tuning::DEFAULT);
        let t = Tuning::parse("max_chunk=256, uv=4, fold=0").unwrap();
        assert_eq!(
            (t.max_chunk, t.uv, t.uk, t.fold),
            (256, 4, Tuning::DEFAULT.uk, false)
        );
        let e = Tuning::parse("max_chunk=100").unwrap_err();
        assert!(
            e.contains("max_chunk = 100 is out of range (a multiple of 32"),
            "{e}"
        );
        assert!(Tuning::parse("uv=x")
            .unwrap_err()
            .contains("uv = \"x\" is not an integer"));
        assert!(Tuning::parse("uk=17").unwrap_err().contains("uk = 17"));
        assert!(Tuning::parse("fold=2")
            .unwrap_err()
            .contains("fold = \"2\""));
        // The fixed rule's plan is by the kernel of its rows.
        let t = Tuning::parse("uk=8,uv=16").unwrap();
        assert_eq!(sigma_1_5b().plan(1, 4096, 132, &t).rows, Rows::DEEP);
        assert_eq!(
            sigma_1_5b().plan(1, 4096, 132, &Tuning::DEFAULT).rows,
            Rows::DEFAULT
        );
        assert!(Tuning::parse("warps=4")
            .unwrap_err()
            .contains("unknown key \"warps\""));
        assert_eq!(Tuning::parse("groups=4").unwrap().groups, 4);
        assert!(Tuning::parse("groups=3")
            .unwrap_err()
            .contains("groups = 3 is out of range (1, 2, 4 or 8)"));
        assert!(Tuning::parse("uk").unwrap_err().contains("not key=value"));
        // The warp-local form where the shape takes it, else the block form.
        let t = Tuning::parse("local=on,uk=8,uv=16").unwrap();
        assert!(t.local);
        assert_eq!(sigma_1_5b().plan(1, 4096, 132, &t).rows, Rows::LOCAL_DEEP);
        let no_local = DecodeShape {
            n_q: 64,
            n_v: 2,
            ..sigma_1_5b()
        };
        assert!(!no_local.takes_local());
        assert_eq!(no_local.plan(1, 4096, 132, &t).rows, Rows::DEEP);
        // The form is that of the plan's group: 256-wide heads leave a
        // block of all of 32/4/16's heads no chunk in the warp-local form,
        // a block of a quarter of them (2,322 floats a query head) 736 slots.
        let wide = DecodeShape {
            d_k: 256,
            d_v: 256,
            ..sigma_1_5b()
        };
        assert!(!wide.takes_local() && wide.grouped(4).takes_local());
        let t = Tuning::parse("local=1, groups=4").unwrap();
        let p = wide.plan(1, 4096, 132, &t);
        assert!(p.rows.local && p.groups == 4 && p.chunk <= 736, "{p:?}");
        let one = wide.plan(1, 4096, 132, &Tuning { groups: 1, ..t });
        assert!(!one.rows.local && one.groups == 1, "{one:?}");
        assert!(Tuning::parse("local=2")
            .unwrap_err()
            .contains("local = \"2\" is not 1 (on) or 0 (off)"));
    }

    #[test]
    fn the_warp_local_form_is_offered_where_it_takes_the_shape_and_its_chunk_fits() {
        let s = sigma_1_5b();
        // SIGMA's 32/4/16 in 1, 2 and 4 groups: 2, 4 and 8 parts of a chunk,
        // and the same chunks as the block form (their outputs fit beside).
        for (g, parts) in [(1, 2), (2, 4), (4, 8)] {
            let b = s.grouped(g);
            assert!(b.takes_local());
            assert_eq!(b.local_parts(true), parts);
            assert_eq!(b.local_parts(false), 1);
            assert_eq!(
                b.smem_bytes(64, true) - b.smem_bytes(64, false),
                4 * b.n_q * (parts - 1) * (b.d_v + 2) + 8 * b.n_q
            );
            let all = candidates(&s, 5000);
            let form = |local: bool| -> Vec<(i64, bool)> {
                all.iter()
                    .filter(|p| p.groups == g && p.rows.local == local)
                    .map(|p| (p.chunk, p.fold))
                    .collect()
            };
            assert!(!form(true).is_empty());
            assert_eq!(form(true), form(false), "{g} groups");
        }
        // A K head with more than 8 query heads, or V heads that K heads do
        // not divide: never offered.
        for shape in [
            DecodeShape { n_k: 1, ..s },
            DecodeShape {
                n_q: 64,
                n_v: 2,
                ..s
            },
        ] {
            assert!(!shape.takes_local());
            assert!(candidates(&shape, 5000).iter().all(|p| !p.rows.local));
        }
        // Wide heads whose parts' outputs leave no room for 32 slots (one
        // group of 32/4/16 at d 256: 2 parts of 256 floats a query head):
        // not taken, and the fixed rule's local=1 runs the block form.
        let wide_heads = DecodeShape {
            d_k: 256,
            d_v: 256,
            ..s
        };
        assert!(wide_heads.unsupported().is_none() && !wide_heads.takes_local());
        assert!(wide_heads.max_chunk(i64::MAX, false) >= 32);
        let t = Tuning {
            local: true,
            ..Tuning::DEFAULT
        };
        let p = wide_heads.plan(1, 4096, 132, &t);
        assert!(!p.rows.local && wide_heads.smem_bytes(p.chunk, false) <= MAX_SMEM);
        // 8 K heads or more: one part (each warp takes whole K heads).
        let wide = DecodeShape {
            n_k: 16,
            n_v: 16,
            ..s
        };
        assert!(wide.takes_local() && wide.local_parts(true) == 1);
        // Where the form's outputs leave less room: its chunks stop earlier.
        let one = DecodeShape {
            n_q: 8,
            n_k: 1,
            n_v: 4,
            ..s
        };
        assert_eq!(
            (
                one.max_chunk(i64::MAX, false),
                one.max_chunk(i64::MAX, true)
            ),
            (2912, 2464)
        );
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_named() {
        let ok = sigma_1_5b();
        assert_eq!(ok.unsupported(), None);
        let bad = DecodeShape { d_k: 48, ..ok };
        assert!(bad.unsupported().unwrap().contains("48"));
        let bad = DecodeShape {
            n_q: 48,
            n_k: 4,
            ..ok
        };
        assert!(bad.unsupported().unwrap().contains("per K head (12)"));
        let bad = DecodeShape { n_k: 5, ..ok };
        assert!(bad.unsupported().unwrap().contains("must divide"));
    }
}
