//! Metrics: one JSON object per logged step in `metrics.jsonl`, the same
//! scalars in a TensorBoard event file, device facts (peak FLOP/s, memory).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// Dense bf16 peak FLOP/s of known GPUs, matched by substring of the device name
/// (first match wins). Override with `metrics.peak_flops`.
pub const PEAK_BF16_FLOPS: &[(&str, f64)] = &[
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
];

pub fn peak_flops_for(name: &str) -> Option<f64> {
    PEAK_BF16_FLOPS
        .iter()
        .find(|(k, _)| name.contains(k))
        .map(|&(_, f)| f)
}

/// Name of CUDA device `index` as nvidia-smi reports it.
pub fn gpu_name(index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name",
            "--format=csv,noheader",
            "-i",
            &index.to_string(),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Peak resident memory of this process (bytes), from /proc.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

pub struct MetricsWriter {
    jsonl: File,
    tb: Option<TbWriter>,
    pub dir: PathBuf,
}

impl MetricsWriter {
    /// Start `dir/metrics.jsonl`. A run resumed at step `keep_through > 0`
    /// keeps the records up to that step and appends after them, so the file
    /// reads like one uninterrupted run; otherwise the file starts empty.
    pub fn create(dir: &Path, tensorboard: bool, keep_through: u64) -> Result<MetricsWriter> {
        sigma_data::fsutil::create_dir_all(dir)?;
        let p = dir.join("metrics.jsonl");
        let kept: String = if keep_through > 0 {
            std::fs::read_to_string(&p)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s <= keep_through)
                })
                .map(|l| format!("{l}\n"))
                .collect()
        } else {
            String::new()
        };
        sigma_data::fsutil::write_atomic(&p, kept.as_bytes())?;
        let jsonl = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| TrainError::io(p.display().to_string(), e))?;
        let tb = if tensorboard {
            Some(TbWriter::create(dir)?)
        } else {
            None
        };
        Ok(MetricsWriter {
            jsonl,
            tb,
            dir: dir.to_path_buf(),
        })
    }

    /// Write one record: JSONL line with everything, TensorBoard scalars for numeric fields.
    pub fn log(&mut self, step: u64, record: &serde_json::Value) -> Result<()> {
        let line = serde_json::to_string(record).expect("json");
        writeln!(self.jsonl, "{line}")
            .and_then(|_| self.jsonl.flush())
            .map_err(|e| TrainError::io("metrics.jsonl", e))?;
        if let Some(tb) = &mut self.tb {
            let mut scalars = Vec::new();
            flatten_scalars("", record, &mut scalars);
            tb.write_scalars(step, &scalars)?;
        }
        Ok(())
    }
}

fn flatten_scalars(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f32)>) {
    crate::config::flatten_json(prefix, "/", v, &mut |k, x| {
        if let (serde_json::Value::Number(n), false) = (x, k == "step") {
            out.push((k.to_string(), n.as_f64().unwrap_or(0.0) as f32));
        }
    });
}

/// A minimal TensorBoard event-file writer: TFRecord framing (length, masked
/// CRC32C of the length, payload, masked CRC32C of the payload) around
/// hand-encoded `Event` protobufs carrying scalar summaries.
pub struct TbWriter {
    file: File,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

impl TbWriter {
    pub fn create(dir: &Path) -> Result<TbWriter> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
        let p = dir.join(format!("events.out.tfevents.{now}.{}", host.trim()));
        let file = File::create(&p).map_err(|e| TrainError::io(p.display().to_string(), e))?;
        let mut w = TbWriter { file };
        let mut ev = Vec::new();
        Self::header(0, &mut ev);
        field_bytes(3, b"brain.Event:2", &mut ev);
        w.record(&ev)?;
        Ok(w)
    }

    fn header(step: u64, ev: &mut Vec<u8>) {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        ev.push((1 << 3) | 1); // wall_time: double
        ev.extend_from_slice(&wall.to_le_bytes());
        ev.push(2 << 3); // step: int64 varint
        varint(step, ev);
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io("tensorboard events", e))
    }

    pub fn write_scalars(&mut self, step: u64, scalars: &[(String, f32)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            field_bytes(1, tag.as_bytes(), &mut value);
            value.push((2 << 3) | 5); // simple_value: float
            value.extend_from_slice(&v.to_le_bytes());
            field_bytes(1, &value, &mut summary);
        }
        let mut ev = Vec::new();
        Self::header(step, &mut ev);
        field_bytes(5, &summary, &mut ev);
        self.record(&ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_masking_match_the_tfrecord_definition() {
        // CRC32C("123456789") = 0xE3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let c: u32 = 0xE306_9283;
        assert_eq!(
            masked_crc(b"123456789"),
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn known_gpus_have_peaks() {
        assert_eq!(peak_flops_for("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(peak_flops_for("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(peak_flops_for("NVIDIA H200"), Some(989e12));
        assert_eq!(peak_flops_for("cpu"), None);
    }
}
