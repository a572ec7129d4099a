//! What every benchmark shares: waiting for the device, the median time of a
//! closure (run from the host, or recorded in a CUDA graph and replayed),
//! the device's name for the header line, and the relative error of a
//! result against its reference.

use anyhow::Result;
use sigma_trainer::kernels::decode;
use tch::Device;

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median seconds of `f` over `steps` runs (after 5 warm-up runs): on a GPU
/// the device time between CUDA events recorded on libtorch's stream around
/// each run, on the CPU the host clock.
pub fn median_time(d: Device, steps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    sync(d);
    let timer = match d {
        Device::Cuda(i) => Some(decode::StreamTimer::new(i).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let mut t = Vec::with_capacity(steps);
    for _ in 0..steps {
        match &timer {
            Some(timer) => {
                timer.start().map_err(anyhow::Error::msg)?;
                f()?;
                t.push(timer.stop_ms().map_err(anyhow::Error::msg)? / 1e3);
            }
            None => {
                let s = std::time::Instant::now();
                f()?;
                t.push(s.elapsed().as_secs_f64());
            }
        }
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Calls of the timed closure recorded in one CUDA graph by [`graph_time`].
pub const GRAPH_CALLS: usize = 16;

/// Median device seconds of one call of `f(i)` (`i` = 0, 1, ...) when
/// [`GRAPH_CALLS`] calls are recorded in a CUDA graph on device `device`
/// and the graph is replayed `steps` times between CUDA events (after 3
/// untimed replays; each timed replay follows an untimed one, so the
/// device is busy when the host launches it): what the calls cost the
/// GPU, without the host's launch work (as in a decoding step recorded as
/// a graph). Before the recording each `f(i)` runs once on the graph's
/// stream (first-use work: a tuning search, a compilation, per-stream
/// state). `f` must not copy to or from the host.
pub fn graph_time(
    device: usize,
    steps: usize,
    f: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<f64> {
    use sigma_trainer::error::TrainError;
    use sigma_trainer::kernels::cuda_graph::CudaGraph;
    // Every call once, an error named by `what`.
    let mut calls = |what: &str| -> sigma_trainer::error::Result<()> {
        for i in 0..GRAPH_CALLS {
            f(i).map_err(|e| TrainError::gpu("CUDA graph", what, format!("{e:#}")))?;
        }
        Ok(())
    };
    let mut g = CudaGraph::new(device, None)?;
    g.on_side(|| calls("a call run before the recording"))?;
    sync(Device::Cuda(device));
    g.capture(|| calls("a call recorded for timing"))?;
    for _ in 0..3 {
        g.replay()?;
    }
    sync(Device::Cuda(device));
    let timer = decode::StreamTimer::new(device).map_err(anyhow::Error::msg)?;
    let mut t = Vec::with_capacity(steps);
    for _ in 0..steps {
        g.replay()?;
        timer.start().map_err(anyhow::Error::msg)?;
        g.replay()?;
        t.push(timer.stop_ms().map_err(anyhow::Error::msg)? / 1e3 / GRAPH_CALLS as f64);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// The GPU's name (or `cuda:N` when it is not known), or "cpu".
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => {
            sigma_trainer::train::metrics::gpu_name(i).unwrap_or_else(|| format!("cuda:{i}"))
        }
        _ => "cpu".into(),
    }
}

/// Largest |a - b| over the largest |b|, in f64 (NaN as infinity).
pub fn rel_err(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    use tch::Kind;
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let top = b.abs().max().double_value(&[]);
    let e = (a - &b).abs().max().double_value(&[]) / top;
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}
