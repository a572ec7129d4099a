//! What every benchmark shares: waiting for the device, the median time of a
//! closure, the device's name for the header line, and the relative error
//! of a result against its reference.

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
