//! `metrics.profile = true`: where the time of a training step goes, by
//! category, from libtorch's own profiler (Kineto, through the C++ shim
//! csrc/profiler.cpp). A few steps after the first are profiled, the
//! forward/backward stretch and the optimizer step each in a window of
//! their own; the result is printed as a table and written to
//! `profile-rank<r>.json` in the run directory.
//!
//! On GPU the categories are measured on the device: every CUDA kernel,
//! copy and set is put in a category by its name (GEMM kernels are matmuls,
//! flash/cuDNN/efficient attention kernels attention, NCCL kernels
//! communication, ...), and the time in a window when no kernel ran is the
//! host's (launch overhead, synchronisation, Rust code). On CPU the
//! categories are the operators' own time (a matmul's time without the
//! operators it calls), and the time outside every operator is the host's.
#![allow(unsafe_code)] // FFI: the profiler shim.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::time::Instant;

use serde::Serialize;

/// The steps profiled: the second to the fourth of a run (or of a resumed run).
pub const PROFILED_STEPS: std::ops::Range<u64> = 1..4;

extern "C" {
    fn sigma_profiler_start(cuda: i32) -> i32;
    fn sigma_profiler_stop(
        emit: extern "C" fn(*mut c_void, *const u8, usize, i32, u64, u64, u64),
        ctx: *mut c_void,
    ) -> i32;
}

#[derive(Clone, Debug)]
struct Event {
    name: String,
    on_cuda: bool,
    thread: u64,
    start: u64,
    dur: u64,
}

extern "C" fn collect(
    ctx: *mut c_void,
    name: *const u8,
    len: usize,
    on_cuda: i32,
    thread: u64,
    start: u64,
    dur: u64,
) {
    // SAFETY: `ctx` is the `Vec<Event>` that `stop` passes, alive for the call;
    // `name` points at `len` bytes owned by the shim for the duration of the call.
    let (events, bytes) = unsafe {
        (
            &mut *(ctx as *mut Vec<Event>),
            std::slice::from_raw_parts(name, len),
        )
    };
    events.push(Event {
        name: String::from_utf8_lossy(bytes).into_owned(),
        on_cuda: on_cuda != 0,
        thread,
        start,
        dur,
    });
}

fn start(cuda: bool) -> bool {
    // SAFETY: the shim catches every C++ exception and returns non-zero.
    unsafe { sigma_profiler_start(i32::from(cuda)) == 0 }
}

fn stop() -> Option<Vec<Event>> {
    let mut events: Vec<Event> = Vec::new();
    // SAFETY: `collect` only writes into `events`, which outlives the call.
    let rc = unsafe { sigma_profiler_stop(collect, &mut events as *mut Vec<Event> as *mut c_void) };
    (rc == 0).then_some(events)
}

/// The category of a CUDA kernel (or copy/set) by its name.
pub fn kernel_category(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| n.contains(k));
    if has(&["nccl"]) {
        "communication"
    } else if has(&["flash", "fmha", "attention", "sdpa", "cudnn", "diffqkv"]) {
        "attention"
    } else if has(&[
        "gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_",
    ]) {
        "matmul"
    } else if has(&["rms_norm", "rmsnorm", "layer_norm", "rowwisemoments"]) {
        "norms"
    } else if has(&["log_softmax", "softmax", "nll_loss", "cross_entropy"]) {
        "loss"
    } else if has(&["memcpy", "memset", "direct_copy", "copy_kernel"]) {
        "casts and copies"
    } else {
        "elementwise and other"
    }
}

/// The category of a CPU operator by its name.
pub fn op_category(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| n.contains(k));
    if has(&[
        "scaled_dot_product",
        "scaleddotproduct",
        "flash_attention",
        "efficient_attention",
    ]) {
        "attention"
    } else if has(&[
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::matmul",
        "aten::linear",
        ": mmbackward",
        ": addmmbackward",
        ": bmmbackward",
    ]) {
        "matmul"
    } else if has(&["rms_norm", "rmsnorm", "layer_norm"]) {
        "norms"
    } else if has(&[
        "log_softmax",
        "logsoftmax",
        "nll_loss",
        "nllloss",
        "cross_entropy",
    ]) {
        "loss"
    } else if has(&["aten::copy_", "aten::to", "aten::_to_copy", "aten::clone"]) {
        "casts and copies"
    } else {
        "elementwise and other"
    }
}

/// Categories that claim the operators they call (a norm's multiplications
/// are the norm's time).
fn claims(cat: &str) -> bool {
    matches!(cat, "matmul" | "attention" | "norms" | "loss")
}

/// Exclusive (own) time of each CPU operator, its duration less that of the
/// operators it encloses on the same thread, and its category: that of the
/// outermost enclosing operator of a claiming category, else its own.
fn exclusive_times(events: &[Event]) -> Vec<(usize, u64, &'static str)> {
    let mut by_thread: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate().filter(|(_, e)| !e.on_cuda) {
        by_thread.entry(e.thread).or_default().push(i);
    }
    let mut out: Vec<(usize, u64, &'static str)> = Vec::new();
    for (_, mut idx) in by_thread {
        idx.sort_by_key(|&i| (events[i].start, std::cmp::Reverse(events[i].dur)));
        // Open operators: (event, end, own time so far, category).
        let mut stack: Vec<(usize, u64, u64, &'static str)> = Vec::new();
        for i in idx {
            let e = &events[i];
            while stack.last().is_some_and(|top| e.start >= top.1) {
                let (j, _, t, c) = stack.pop().expect("checked");
                out.push((j, t, c));
            }
            let inherited = stack.iter().map(|s| s.3).find(|&c| claims(c));
            if let Some(top) = stack.last_mut() {
                top.2 = top.2.saturating_sub(e.dur);
            }
            let cat = inherited.unwrap_or_else(|| op_category(&e.name));
            stack.push((i, e.start + e.dur, e.dur, cat));
        }
        out.extend(stack.into_iter().map(|(j, _, t, c)| (j, t, c)));
    }
    out
}

/// A kernel's name without its return type, template parameters and
/// arguments, and without anonymous namespaces
/// ("void at::native::(anonymous namespace)::k<4, F>(int)" is
/// "at::native::k"); at most its last 48 characters (what the chain table
/// prints; the end is the kernel's own name).
fn short_name(name: &str) -> String {
    let name = name.replace("(anonymous namespace)::", "");
    let (mut bare, mut depth) = (String::new(), 0usize);
    for c in name.chars() {
        match c {
            '<' => depth += 1,
            '>' if depth > 0 => depth -= 1,
            '(' if depth == 0 => break,
            _ if depth == 0 => bare.push(c),
            _ => {}
        }
    }
    let last = bare.split_whitespace().last().unwrap_or("");
    let skip = last.chars().count().saturating_sub(48);
    last.chars().skip(skip).collect()
}

/// What each kernel of a chain of dependent kernels (one stream: a kernel
/// ends after the one before it, though under programmatic dependent launch
/// it may start before that one ends) adds to the chain: the kernels in
/// order of their ends, each adding the time from the previous end to its
/// own, of which `idle` is the part before it started (the device ran
/// nothing of the chain). Keyed by the previous kernel's short name and its
/// own ("a > b"), so one kernel after different ones (a product after the
/// attention or after another product) is told apart. `(key, adds ns, idle
/// ns)`; the adds sum to the span from the first start to the last end.
fn chain_adds(kernels: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
    let mut order: Vec<&(&str, u64, u64)> = kernels.iter().collect();
    order.sort_by_key(|&&(_, start, end)| (end, start));
    let Some(first) = kernels.iter().map(|k| k.1).min() else {
        return Vec::new();
    };
    let (mut prev, mut prev_end) = ("(start)".to_string(), first);
    let mut out = Vec::with_capacity(order.len());
    for &&(name, start, end) in &order {
        let name = short_name(name);
        let idle = start.saturating_sub(prev_end);
        out.push((
            format!("{prev} > {name}"),
            end.saturating_sub(prev_end),
            idle,
        ));
        prev_end = prev_end.max(end);
        prev = name;
    }
    out
}

/// Total length of the union of intervals.
fn busy(mut iv: Vec<(u64, u64)>) -> u64 {
    iv.sort_unstable();
    let (mut total, mut cur): (u64, Option<(u64, u64)>) = (0, None);
    for (s, e) in iv {
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    total + cur.map_or(0, |(s, e)| e - s)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    ForwardBackward,
    Optimizer,
    /// One decoding step (`sigma bench decode --model --profile`).
    Decode,
}

/// Per-step seconds by category, accumulated over the profiled steps.
#[derive(Default, Serialize)]
pub struct Profile {
    pub device: String,
    pub steps: u64,
    /// Seconds per category (the optimizer window's device time is "optimizer").
    pub seconds: BTreeMap<String, f64>,
    /// Wall seconds of the windows and of data loading.
    pub wall: BTreeMap<String, f64>,
    /// The operators (CPU) or kernels (GPU) that took most time: (name, seconds, count).
    pub top: Vec<(String, f64, u64)>,
    /// Decoding windows: what each kernel adds to the step's chain of
    /// kernels ([`chain_adds`]), the largest first: (kernel after kernel,
    /// seconds added, of them idle, count).
    pub chain: Vec<(String, f64, f64, u64)>,
    #[serde(skip)]
    by_name: HashMap<String, (f64, u64)>,
    #[serde(skip)]
    by_link: HashMap<String, (f64, f64, u64)>,
}

pub struct Profiler {
    cuda: Option<usize>,
    profile: Profile,
    open: Option<(Window, Instant)>,
    /// False once the profiler failed (a warning was printed): training goes on.
    working: bool,
}

impl Profiler {
    pub fn new(cuda: Option<usize>, device: String) -> Profiler {
        Profiler {
            cuda,
            profile: Profile {
                device,
                ..Profile::default()
            },
            open: None,
            working: true,
        }
    }

    fn sync(&self) {
        if let Some(i) = self.cuda {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Open a window (the device is synchronised first).
    pub fn begin(&mut self, w: Window) {
        if !self.working {
            return;
        }
        self.sync();
        if start(self.cuda.is_some()) {
            self.open = Some((w, Instant::now()));
        } else {
            eprintln!("warning: libtorch's profiler did not start: metrics.profile gives no table");
            self.working = false;
        }
    }

    /// Close the window opened last and add its events.
    pub fn end(&mut self) {
        let Some((w, t0)) = self.open.take() else {
            return;
        };
        self.sync();
        let wall = t0.elapsed().as_secs_f64();
        let Some(events) = stop() else {
            eprintln!(
                "warning: libtorch's profiler failed to stop: metrics.profile gives no table"
            );
            self.working = false;
            return;
        };
        self.add(w, wall, &events);
    }

    /// Data loading of a profiled step (wall seconds) and the step's end.
    pub fn add_step(&mut self, data_s: f64) {
        *self.profile.wall.entry("data".into()).or_default() += data_s;
        self.profile.steps += 1;
    }

    fn add(&mut self, w: Window, wall: f64, events: &[Event]) {
        let p = &mut self.profile;
        let window = match w {
            Window::ForwardBackward => "forward_backward",
            Window::Optimizer => "optimizer",
            Window::Decode => "decoding step",
        };
        *p.wall.entry(window.into()).or_default() += wall;
        let mut add = |cat: &str, name: &str, ns: u64| {
            let s = ns as f64 * 1e-9;
            let cat = match (w, cat) {
                (_, "communication") => "communication",
                (Window::Optimizer, _) => "optimizer",
                (_, c) => c,
            };
            *p.seconds.entry(cat.into()).or_default() += s;
            let e = p.by_name.entry(name.into()).or_default();
            e.0 += s;
            e.1 += 1;
        };
        let (device_busy, named): (u64, Vec<(&str, &str, u64)>) = if self.cuda.is_some() {
            let k: Vec<&Event> = events.iter().filter(|e| e.on_cuda).collect();
            (
                busy(k.iter().map(|e| (e.start, e.start + e.dur)).collect()),
                k.iter()
                    .map(|e| (kernel_category(&e.name), e.name.as_str(), e.dur))
                    .collect(),
            )
        } else {
            let own = exclusive_times(events);
            (
                own.iter().map(|&(_, t, _)| t).sum(),
                own.iter()
                    .map(|&(i, t, c)| (c, events[i].name.as_str(), t))
                    .collect(),
            )
        };
        for (cat, name, ns) in named {
            add(cat, name, ns);
        }
        if w == Window::Decode && self.cuda.is_some() {
            let k: Vec<(&str, u64, u64)> = events
                .iter()
                .filter(|e| e.on_cuda)
                .map(|e| (e.name.as_str(), e.start, e.start + e.dur))
                .collect();
            for (key, adds, idle) in chain_adds(&k) {
                let e = p.by_link.entry(key).or_default();
                e.0 += adds as f64 * 1e-9;
                e.1 += idle as f64 * 1e-9;
                e.2 += 1;
            }
        }
        let host = (wall - device_busy as f64 * 1e-9).max(0.0);
        *p.seconds.entry("host (device idle)".into()).or_default() += host;
    }

    /// The profile so far, per step, with its top entries.
    pub fn finish(&mut self) -> &Profile {
        let p = &mut self.profile;
        let n = p.steps.max(1) as f64;
        for v in p.seconds.values_mut().chain(p.wall.values_mut()) {
            *v /= n;
        }
        let mut top: Vec<(String, f64, u64)> =
            p.by_name.drain().map(|(k, (s, c))| (k, s / n, c)).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(40);
        p.top = top;
        let mut chain: Vec<(String, f64, f64, u64)> = p
            .by_link
            .drain()
            .map(|(k, (a, i, c))| (k, a / n, i / n, c))
            .collect();
        chain.sort_by(|a, b| b.1.total_cmp(&a.1));
        p.chain = chain;
        p.steps = p.steps.max(1);
        p
    }
}

impl Profile {
    /// The table: per step, milliseconds and share of the step by category,
    /// and the 8 entries that took most time.
    pub fn table(&self) -> String {
        self.table_top(8)
    }

    /// [`Profile::table`] with the `n` entries that took most time (at most 40 are kept).
    pub fn table_top(&self, n: usize) -> String {
        let step: f64 = self.wall.values().sum();
        // The windows a step had, in the order of a training step.
        let parts: Vec<String> = ["data", "forward_backward", "optimizer", "decoding step"]
            .iter()
            .filter_map(|&k| {
                let v = self.wall.get(k).copied()?;
                let name = if k == "forward_backward" {
                    "forward/backward"
                } else {
                    k
                };
                (k != "data" || v > 0.0 || self.wall.contains_key("forward_backward"))
                    .then(|| format!("{name} {:.1} ms", v * 1e3))
            })
            .collect();
        let mut out = format!(
            "profile of {} step(s) on {} (per step: {:.1} ms; {})\n",
            self.steps,
            self.device,
            step * 1e3,
            parts.join(", ")
        );
        out += &format!("{:<24} {:>10} {:>7}\n", "category", "ms/step", "share");
        let mut rows: Vec<(&String, &f64)> = self.seconds.iter().collect();
        rows.sort_by(|a, b| b.1.total_cmp(a.1));
        for (k, v) in rows {
            out += &format!(
                "{k:<24} {:>10.2} {:>6.1}%\n",
                v * 1e3,
                100.0 * v / step.max(1e-12)
            );
        }
        out += "top entries (ms/step, calls):\n";
        for (name, s, c) in self.top.iter().take(n) {
            let short: String = name.chars().take(70).collect();
            out += &format!("  {:>9.2} {:>6}  {short}\n", s * 1e3, c);
        }
        if !self.chain.is_empty() {
            let total: f64 = self.chain.iter().map(|c| c.1).sum();
            out += &format!(
                "the step's chain of kernels, {:.3} ms/step: what each adds (its end after the \
                 previous kernel's end; ms/step, of it idle, calls):\n",
                total * 1e3
            );
            for (link, adds, idle, c) in &self.chain {
                out += &format!(
                    "  {:>8.3} {:>7.3} {:>6}  {link}\n",
                    adds * 1e3,
                    idle * 1e3,
                    c
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_and_operators_fall_into_their_categories() {
        for (k, c) in [
            (
                "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64",
                "matmul",
            ),
            ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
            (
                "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128>",
                "matmul",
            ),
            ("diffqkv_decode_split", "attention"),
            ("diffqkv_decode_combine", "attention"),
            (
                "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>",
                "attention",
            ),
            ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
            (
                "void at::native::(anonymous namespace)::vectorized_rms_norm_kernel",
                "norms",
            ),
            (
                "void at::native::(anonymous namespace)::cunn_SoftMaxForward",
                "loss",
            ),
            ("Memcpy HtoD (Pageable -> Device)", "casts and copies"),
            (
                "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>",
                "elementwise and other",
            ),
        ] {
            assert_eq!(kernel_category(k), c, "{k}");
        }
        for (o, c) in [
            ("aten::mm", "matmul"),
            (
                "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                "attention",
            ),
            ("aten::_fused_rms_norm", "norms"),
            ("aten::_log_softmax", "loss"),
            ("aten::copy_", "casts and copies"),
            ("aten::mul", "elementwise and other"),
        ] {
            assert_eq!(op_category(o), c, "{o}");
        }
    }

    #[test]
    fn exclusive_times_remove_nested_operators_which_inherit_a_claiming_category() {
        let ev = |name: &str, start, dur| Event {
            name: name.into(),
            on_cuda: false,
            thread: 1,
            start,
            dur,
        };
        // linear [0, 100) encloses mm [10, 70) which encloses copy [20, 30);
        // add [100, 120) stands alone and encloses mul [105, 110).
        let events = vec![
            ev("aten::linear", 0, 100),
            ev("aten::mm", 10, 60),
            ev("aten::copy_", 20, 10),
            ev("aten::add", 100, 20),
            ev("aten::mul", 105, 5),
        ];
        let mut own = exclusive_times(&events);
        own.sort();
        // The copy inside the matmul is the matmul's time; the mul inside an add is its own.
        assert_eq!(
            own,
            vec![
                (0, 40, "matmul"),
                (1, 50, "matmul"),
                (2, 10, "matmul"),
                (3, 15, "elementwise and other"),
                (4, 5, "elementwise and other")
            ]
        );
    }

    #[test]
    fn a_chain_charges_each_kernel_from_the_previous_end_to_its_own() {
        // b starts before a ends (dependent launch), c after a gap of 5,
        // b again after c; the kernels come in no particular order.
        let k = [
            ("c<float>(int)", 30, 45),
            ("void a(float*)", 0, 20),
            ("b", 40, 50),
            ("b", 10, 25),
        ];
        let got = chain_adds(&k);
        let want = [
            ("(start) > a", 20, 0),
            ("a > b", 5, 0),
            ("b > c", 20, 5),
            ("c > b", 5, 0),
        ];
        assert_eq!(got.len(), want.len());
        for ((key, adds, idle), (wk, wa, wi)) in got.iter().zip(want) {
            assert_eq!((key.as_str(), *adds, *idle), (wk, wa, wi));
        }
        // The adds make up the span from the first start to the last end.
        assert_eq!(got.iter().map(|g| g.1).sum::<u64>(), 50);
        assert!(chain_adds(&[]).is_empty());
    }

    #[test]
    fn a_short_name_is_the_kernels_own_name() {
        let cases = [
            ("sigma_gemv_u4w2", "sigma_gemv_u4w2"),
            ("void a(float*)", "a"),
            (
                "void at::native::(anonymous namespace)::vectorized_elementwise_kernel<4, \
                 at::native::AddFunctor<float>, std::array<char*, 3ul> >(int, float)",
                "at::native::vectorized_elementwise_kernel",
            ),
            // The return type is a template: cuBLAS's gemv.
            (
                "std::enable_if<!(false), void>::type internal::gemvx::kernel<int, int, \
                 __nv_bfloat16, float, false, true>(cublasGemvParamsEx<int>)",
                "internal::gemvx::kernel",
            ),
            (
                "void cutlass::Kernel2<cutlass_80_tensorop_gemm>(Params)",
                "cutlass::Kernel2",
            ),
            ("", ""),
        ];
        for (name, want) in cases {
            assert_eq!(short_name(name), want, "{name}");
        }
        let long = format!("ns::{}", "k".repeat(60));
        assert_eq!(short_name(&long), "k".repeat(48));
    }

    #[test]
    fn busy_time_merges_overlapping_kernels() {
        assert_eq!(busy(vec![(30, 40), (0, 10), (5, 20)]), 30);
        assert_eq!(busy(Vec::new()), 0);
    }
}
