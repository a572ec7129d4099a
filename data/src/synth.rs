//! `sigma data synth`: the synthetic domain, generated deterministically from a
//! seed. Each document is a worksheet of system-domain exercises in the spirit
//! of CMDGen (natural-language request -> GPU/cluster command line: nvidia-smi,
//! NCCL tests, SLURM, DCGM, InfiniBand, Kubernetes) and NL2KQL (request ->
//! Kusto query over GPU telemetry and job tables).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{DataError, Result};
use crate::readers::{detect, Compression, Format};
use crate::rng::SplitMix64;

const PARTITIONS: &[&str] = &["gpu", "h100", "a100", "debug", "long", "batch"];
const CLUSTERS: &[&str] = &[
    "eastus-h100",
    "westeu-a100",
    "central-h200",
    "research-a100",
    "prod-h100",
];
const NAMESPACES: &[&str] = &[
    "training",
    "inference",
    "ml-platform",
    "research",
    "default",
];
const OPS: &[&str] = &[
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "alltoall",
    "sendrecv",
];
const SIZES: &[&str] = &["8", "1K", "64K", "1M", "16M", "128M", "1G", "4G", "8G"];
const SCRIPTS: &[&str] = &[
    "train.sh",
    "pretrain.sbatch",
    "eval.sh",
    "nccl_test.sbatch",
    "finetune.sh",
];
const REASONS: &[&str] = &[
    "xid 79 on gpu 3",
    "bad dimm",
    "nvlink errors",
    "firmware update",
    "ib link flapping",
];

struct Ex {
    kind: &'static str,
    request: String,
    answer: String,
}

fn node(r: &mut SplitMix64) -> String {
    format!("node{:03}", r.below(512))
}

/// A request for a command line and its answer. The kind of exercise is
/// drawn once (22 kinds); the function of its group draws what it needs.
fn cmdgen(r: &mut SplitMix64) -> Ex {
    let gpu = r.below(8);
    let kind = r.below(22);
    let (request, answer) = match kind {
        0..=7 => nvidia_smi(r, kind, gpu),
        8..=11 => nccl_tests(r, kind),
        12..=18 => slurm(r, kind),
        _ => node_tools(r, kind),
    };
    Ex {
        kind: "command",
        request,
        answer,
    }
}

/// Kinds 0-7: GPU queries and settings with nvidia-smi.
fn nvidia_smi(r: &mut SplitMix64, kind: u64, gpu: u64) -> (String, String) {
    match kind {
        0 => {
            let n = 1 + r.below(10);
            (format!("Show utilization and memory use of every GPU, refreshing every {n} seconds."),
             format!("nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv -l {n}"))
        }
        1 => (format!("List the processes running on GPU {gpu} with their memory use."),
              format!("nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv -i {gpu}")),
        2 => ("Print the interconnect topology matrix (NVLink, PCIe, NUMA affinity) of this node.".into(), "nvidia-smi topo -m".into()),
        3 => {
            let w = 300 + 50 * r.below(9);
            (format!("Cap the power draw of GPU {gpu} at {w} W."), format!("sudo nvidia-smi -i {gpu} -pl {w}"))
        }
        4 => ("Turn on persistence mode on all GPUs.".into(), "sudo nvidia-smi -pm 1".into()),
        5 => (format!("Show the ECC error counters of GPU {gpu}."), format!("nvidia-smi -q -d ECC -i {gpu}")),
        6 => (format!("Check the state of every NVLink of GPU {gpu}."), format!("nvidia-smi nvlink --status -i {gpu}")),
        7 => {
            let c = 1000 + 100 * r.below(10);
            (format!("Lock the graphics clock of GPU {gpu} at {c} MHz."), format!("sudo nvidia-smi -i {gpu} -lgc {c},{c}"))
        }
        _ => unreachable!("cmdgen routes only kinds 0-7 here"),
    }
}

/// Kinds 8-11: NCCL tests on one node and across nodes.
fn nccl_tests(r: &mut SplitMix64, kind: u64) -> (String, String) {
    match kind {
        8 | 9 => {
            let op = r.pick(OPS);
            let g = [2, 4, 8][r.below(3) as usize];
            let (b, e) = (r.below(4) as usize, 4 + r.below(5) as usize);
            (format!("Measure {} bus bandwidth on {g} local GPUs for message sizes from {} to {} bytes, doubling each step.", op.replace('_', "-"), SIZES[b], SIZES[e]),
             format!("./build/{op}_perf -b {} -e {} -f 2 -g {g}", SIZES[b], SIZES[e]))
        }
        10 => {
            let nodes = 2 + r.below(7);
            let hosts: Vec<String> = (0..nodes.min(4))
                .map(|i| format!("node{:03}:8", i + 1))
                .collect();
            (format!("Run the NCCL all-reduce test across {nodes} nodes with 8 GPUs each, one process per GPU, with NCCL debug output."),
             format!("mpirun -np {} -H {}{} -x NCCL_DEBUG=INFO ./build/all_reduce_perf -b 8 -e 8G -f 2 -g 1", nodes * 8, hosts.join(","), if nodes > 4 { ",..." } else { "" }))
        }
        11 => (
            "Run the all-reduce benchmark on 8 GPUs with NVLink SHARP (NVLS) disabled.".into(),
            "NCCL_NVLS_ENABLE=0 ./build/all_reduce_perf -b 1M -e 4G -f 2 -g 8".into(),
        ),
        _ => unreachable!("cmdgen routes only kinds 8-11 here"),
    }
}

/// Kinds 12-18: SLURM jobs and nodes.
fn slurm(r: &mut SplitMix64, kind: u64) -> (String, String) {
    match kind {
        12 => {
            let (p, n, g, h) = (
                r.pick(PARTITIONS),
                1 + r.below(16),
                [1, 2, 4, 8][r.below(4) as usize],
                1 + r.below(48),
            );
            let s = r.pick(SCRIPTS);
            (format!("Submit {s} to the {p} partition on {n} nodes with {g} GPUs per node for {h} hours."),
             format!("sbatch -p {p} -N {n} --gpus-per-node={g} -t {h}:00:00 {s}"))
        }
        13 => (
            "Show my pending and running jobs.".into(),
            "squeue -u $USER".into(),
        ),
        14 => {
            let id = 100_000 + r.below(900_000);
            (format!("Cancel job {id}."), format!("scancel {id}"))
        }
        15 => {
            let (p, g) = (r.pick(PARTITIONS), [1, 2, 4, 8][r.below(4) as usize]);
            (
                format!("Open an interactive shell on one node of partition {p} with {g} GPUs."),
                format!("srun -p {p} -N 1 --gpus-per-node={g} --pty bash"),
            )
        }
        16 => {
            let id = 100_000 + r.below(900_000);
            (
                format!("Show the elapsed time, state and exit code of job {id}."),
                format!("sacct -j {id} --format=JobID,JobName,Elapsed,State,ExitCode"),
            )
        }
        17 => {
            let n = node(r);
            let reason = r.pick(REASONS);
            (
                format!("Drain {n} because of {reason}."),
                format!("sudo scontrol update NodeName={n} State=DRAIN Reason=\"{reason}\""),
            )
        }
        18 => {
            let p = r.pick(PARTITIONS);
            (
                format!("List every node of partition {p} with its state."),
                format!("sinfo -p {p} -N -l"),
            )
        }
        _ => unreachable!("cmdgen routes only kinds 12-18 here"),
    }
}

/// Kinds 19-21: DCGM, InfiniBand and Kubernetes.
fn node_tools(r: &mut SplitMix64, kind: u64) -> (String, String) {
    match kind {
        19 => {
            let level = 1 + r.below(3);
            (
                format!("Run the level-{level} DCGM diagnostic on all GPUs of this node."),
                format!("dcgmi diag -r {level}"),
            )
        }
        20 => (
            "Show the state and rate of the InfiniBand ports on this host.".into(),
            "ibstat".into(),
        ),
        _ => {
            let ns = r.pick(NAMESPACES);
            (
                format!("List the pods of namespace {ns} with the nodes they run on."),
                format!("kubectl get pods -n {ns} -o wide"),
            )
        }
    }
}

fn nl2kql(r: &mut SplitMix64) -> Ex {
    let c = r.pick(CLUSTERS);
    let (request, answer) = match r.below(7) {
        0 => {
            let h = [6, 12, 24, 48][r.below(4) as usize];
            (format!("Count failed jobs per cluster in the last {h} hours, most failures first."),
             format!("JobEvents\n| where Timestamp > ago({h}h) and State == \"Failed\"\n| summarize FailedJobs = count() by Cluster\n| order by FailedJobs desc"))
        }
        1 => {
            let t = 80 + r.below(15);
            (format!("Which GPUs in {c} ran hotter than {t} C today?"),
             format!("GpuTelemetry\n| where Timestamp > startofday(now()) and Cluster == \"{c}\" and TemperatureC > {t}\n| distinct Node, GpuIndex"))
        }
        2 => {
            let m = [30, 60, 120][r.below(3) as usize];
            (format!("Average GPU utilization per node in {c} over the last {m} minutes, in 5-minute bins."),
             format!("GpuTelemetry\n| where Timestamp > ago({m}m) and Cluster == \"{c}\"\n| summarize AvgUtil = avg(Utilization) by Node, bin(Timestamp, 5m)"))
        }
        3 => {
            let x = [13, 31, 43, 48, 63, 74, 79, 94][r.below(8) as usize];
            let d = 1 + r.below(14);
            (format!("List the nodes that reported Xid {x} errors in the past {d} days, with how often."),
             format!("GpuTelemetry\n| where Timestamp > ago({d}d) and XidCode == {x}\n| summarize Events = count() by Node\n| order by Events desc"))
        }
        4 => {
            let k = 3 + r.below(8);
            (format!("Who are the {k} users with the most GPU hours this week?"),
             format!("JobEvents\n| where Timestamp > ago(7d) and State == \"Completed\"\n| summarize GpuHours = sum(NumGpus * DurationHours) by User\n| top {k} by GpuHours"))
        }
        5 => {
            let id = 100_000 + r.below(900_000);
            (format!("Find the NCCL timeout messages of job {id} in time order."),
             format!("NcclLogs\n| where JobId == \"{id}\" and Message has \"timeout\"\n| project Timestamp, Node, Rank, Message\n| order by Timestamp asc"))
        }
        _ => {
            let pct = 5 + r.below(20);
            (format!("Find nodes in {c} whose GPU memory use stayed above {}% for the last hour.", 100 - pct),
             format!("GpuTelemetry\n| where Timestamp > ago(1h) and Cluster == \"{c}\"\n| summarize MinUse = min(100.0 * MemoryUsedMB / MemoryTotalMB) by Node, GpuIndex\n| where MinUse > {}", 100 - pct))
        }
    };
    Ex {
        kind: "query",
        request,
        answer,
    }
}

/// The text of synthetic document `i` for `seed`.
pub fn document(seed: u64, i: u64) -> String {
    let mut r = SplitMix64::new(crate::rng::derive_seed(seed, &[b"synth", &i.to_le_bytes()]));
    let n = 3 + r.below(6);
    let mut out = String::new();
    let intro = [
        "Cluster operations worksheet.",
        "GPU fleet exercises.",
        "Exercises: from request to command or query.",
        "On-call practice set.",
    ];
    out.push_str(r.pick::<&str>(&intro));
    out.push_str("\n\n");
    for k in 0..n {
        let ex = if r.below(3) == 0 {
            nl2kql(&mut r)
        } else {
            cmdgen(&mut r)
        };
        let label = if ex.kind == "query" { "KQL" } else { "Command" };
        out.push_str(&format!(
            "Exercise {}\nRequest: {}\n{label}:\n{}\n\n",
            k + 1,
            ex.request,
            ex.answer
        ));
    }
    out
}

/// Most documents `data synth` writes (about 100 GB of text).
pub const MAX_SYNTH_DOCS: u64 = 100_000_000;
/// Up to this many documents (about 60 MB of text) a `.zst` output gets the
/// densest zstd level (the committed sample); larger corpora a fast one.
const DENSE_ZSTD_DOCS: u64 = 50_000;

/// `output` and `num_docs` of `data synth`, checked before anything is
/// written: the file name must say JSONL (`.jsonl`, `.ndjson` or `.json`,
/// optionally `.gz` or `.zst`), since `data prepare` picks the format by
/// extension and would read anything else as one plain-text document.
pub fn check_options(path: &Path, num_docs: u64) -> Result<()> {
    crate::fsutil::check_file_target(path).map_err(|_| {
        DataError::flag(
            "--output",
            format!(
                "{:?} is a directory or not a file name; give a .jsonl file",
                path.display().to_string()
            ),
        )
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if detect(&name).0 != Format::Jsonl {
        return Err(DataError::flag(
            "--output",
            format!("{name}: data synth writes JSON lines, and `data prepare` reads those only from .jsonl, .ndjson or .json files (optionally .gz or .zst); name it e.g. {}.jsonl", name.split('.').next().unwrap_or("synthetic")),
        ));
    }
    if num_docs == 0 || num_docs > MAX_SYNTH_DOCS {
        return Err(DataError::flag(
            "--num-docs",
            format!("must be from 1 to {MAX_SYNTH_DOCS} (about 1 KB of text each), got {num_docs}"),
        ));
    }
    Ok(())
}

/// Write `num_docs` synthetic documents as JSONL (`.zst`/`.gz` by extension)
/// atomically, streamed (memory does not grow with `num_docs`). Returns the
/// file's size.
pub fn write(path: &Path, seed: u64, num_docs: u64) -> Result<u64> {
    check_options(path, num_docs)?;
    let comp = detect(&path.to_string_lossy()).1;
    let io = |e: std::io::Error| DataError::io("write", path, e);
    crate::fsutil::replace_with(path, |tmp| {
        let file = File::create(tmp).map_err(|e| DataError::io("create", path, e))?;
        let file = match comp {
            Compression::Zstd => {
                let level = if num_docs <= DENSE_ZSTD_DOCS { 19 } else { 3 };
                let mut enc = zstd::Encoder::new(file, level).map_err(io)?;
                write_documents(&mut enc, seed, num_docs).map_err(io)?;
                enc.finish().map_err(io)?
            }
            Compression::Gzip => {
                let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::best());
                write_documents(&mut enc, seed, num_docs).map_err(io)?;
                enc.finish().map_err(io)?
            }
            Compression::None => {
                let mut w = BufWriter::new(file);
                write_documents(&mut w, seed, num_docs).map_err(io)?;
                w.into_inner().map_err(|e| io(e.into_error()))?
            }
        };
        file.sync_all().map_err(|e| DataError::io("sync", path, e))
    })?;
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| DataError::io("stat", path, e))
}

/// One JSON object per line: `{"text": ..., "source": "synth:SEED:I"}`.
fn write_documents(w: &mut impl Write, seed: u64, num_docs: u64) -> std::io::Result<()> {
    let mut line = Vec::new();
    for i in 0..num_docs {
        line.clear();
        let doc =
            serde_json::json!({"text": document(seed, i), "source": format!("synth:{seed}:{i}")});
        serde_json::to_writer(&mut line, &doc)?;
        line.push(b'\n');
        w.write_all(&line)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_and_varied() {
        assert_eq!(super::document(1, 5), super::document(1, 5));
        assert_ne!(super::document(1, 5), super::document(2, 5));
        let all: String = (0..200).map(|i| super::document(3, i)).collect();
        for needle in [
            "nvidia-smi",
            "sbatch",
            "_perf",
            "| where",
            "kubectl",
            "dcgmi",
        ] {
            assert!(all.contains(needle), "{needle}");
        }
    }

    /// The old writer: the whole file in memory, compressed in one call.
    fn one_shot(seed: u64, n: u64, comp: super::Compression) -> Vec<u8> {
        use std::io::Write;
        let mut buf = Vec::new();
        super::write_documents(&mut buf, seed, n).unwrap();
        match comp {
            super::Compression::Zstd => zstd::encode_all(&buf[..], 19).unwrap(),
            super::Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                e.write_all(&buf).unwrap();
                e.finish().unwrap()
            }
            super::Compression::None => buf,
        }
    }

    #[test]
    fn streamed_files_equal_the_one_shot_encoding() {
        let d = tempfile::tempdir().unwrap();
        for (name, comp) in [
            ("s.jsonl", super::Compression::None),
            ("s.jsonl.zst", super::Compression::Zstd),
            ("s.jsonl.gz", super::Compression::Gzip),
        ] {
            let p = d.path().join(name);
            let n = super::write(&p, 3, 300).unwrap();
            let got = std::fs::read(&p).unwrap();
            assert_eq!(n, got.len() as u64);
            assert!(got == one_shot(3, 300, comp), "{name} differs");
        }
    }

    #[test]
    fn outputs_that_prepare_would_misread_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for name in ["x.txt", "x.parquet", "x.jsonl.txt", "x"] {
            let e = super::write(&d.path().join(name), 1, 5)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--output") && e.contains(".jsonl"),
                "{name}: {e}"
            );
        }
        let e = super::write(&d.path().join("x.jsonl"), 1, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--num-docs"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
