//! `sigma data synth`: the synthetic domain, generated deterministically from a
//! seed. Each document is a worksheet of system-domain exercises in the spirit
//! of CMDGen (natural-language request -> GPU/cluster command line: nvidia-smi,
//! NCCL tests, SLURM, DCGM, InfiniBand, Kubernetes) and NL2KQL (request ->
//! Kusto query over GPU telemetry and job tables).

use std::io::Write;

use crate::error::{DataError, Result};
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

fn cmdgen(r: &mut SplitMix64) -> Ex {
    let gpu = r.below(8);
    let (request, answer) = match r.below(22) {
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
        8 | 9 => {
            let op = r.pick(OPS);
            let g = [2, 4, 8][r.below(3) as usize];
            let (b, e) = (r.below(4) as usize, 4 + r.below(5) as usize);
            (format!("Measure {} bus bandwidth on {g} local GPUs for message sizes from {} to {} bytes, doubling each step.", op.replace('_', "-"), SIZES[b], SIZES[e]),
             format!("./build/{op}_perf -b {} -e {} -f 2 -g {g}", SIZES[b], SIZES[e]))
        }
        10 => {
            let nodes = 2 + r.below(7);
            let hosts: Vec<String> = (0..nodes.min(4)).map(|i| format!("node{:03}:8", i + 1)).collect();
            (format!("Run the NCCL all-reduce test across {nodes} nodes with 8 GPUs each, one process per GPU, with NCCL debug output."),
             format!("mpirun -np {} -H {}{} -x NCCL_DEBUG=INFO ./build/all_reduce_perf -b 8 -e 8G -f 2 -g 1", nodes * 8, hosts.join(","), if nodes > 4 { ",..." } else { "" }))
        }
        11 => ("Run the all-reduce benchmark on 8 GPUs with NVLink SHARP (NVLS) disabled.".into(),
               "NCCL_NVLS_ENABLE=0 ./build/all_reduce_perf -b 1M -e 4G -f 2 -g 8".into()),
        12 => {
            let (p, n, g, h) = (r.pick(PARTITIONS), 1 + r.below(16), [1, 2, 4, 8][r.below(4) as usize], 1 + r.below(48));
            let s = r.pick(SCRIPTS);
            (format!("Submit {s} to the {p} partition on {n} nodes with {g} GPUs per node for {h} hours."),
             format!("sbatch -p {p} -N {n} --gpus-per-node={g} -t {h}:00:00 {s}"))
        }
        13 => ("Show my pending and running jobs.".into(), "squeue -u $USER".into()),
        14 => {
            let id = 100_000 + r.below(900_000);
            (format!("Cancel job {id}."), format!("scancel {id}"))
        }
        15 => {
            let (p, g) = (r.pick(PARTITIONS), [1, 2, 4, 8][r.below(4) as usize]);
            (format!("Open an interactive shell on one node of partition {p} with {g} GPUs."),
             format!("srun -p {p} -N 1 --gpus-per-node={g} --pty bash"))
        }
        16 => {
            let id = 100_000 + r.below(900_000);
            (format!("Show the elapsed time, state and exit code of job {id}."),
             format!("sacct -j {id} --format=JobID,JobName,Elapsed,State,ExitCode"))
        }
        17 => {
            let n = node(r);
            let reason = r.pick(REASONS);
            (format!("Drain {n} because of {reason}."), format!("sudo scontrol update NodeName={n} State=DRAIN Reason=\"{reason}\""))
        }
        18 => {
            let p = r.pick(PARTITIONS);
            (format!("List every node of partition {p} with its state."), format!("sinfo -p {p} -N -l"))
        }
        19 => {
            let level = 1 + r.below(3);
            (format!("Run the level-{level} DCGM diagnostic on all GPUs of this node."), format!("dcgmi diag -r {level}"))
        }
        20 => ("Show the state and rate of the InfiniBand ports on this host.".into(), "ibstat".into()),
        _ => {
            let ns = r.pick(NAMESPACES);
            (format!("List the pods of namespace {ns} with the nodes they run on."), format!("kubectl get pods -n {ns} -o wide"))
        }
    };
    Ex {
        kind: "command",
        request,
        answer,
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

/// Write `num_docs` synthetic documents as JSONL (`.zst`/`.gz` by extension) atomically.
pub fn write(path: &std::path::Path, seed: u64, num_docs: u64) -> Result<u64> {
    let mut buf = Vec::new();
    for i in 0..num_docs {
        let line =
            serde_json::json!({"text": document(seed, i), "source": format!("synth:{seed}:{i}")});
        serde_json::to_writer(&mut buf, &line).map_err(|e| DataError::Other(e.to_string()))?;
        buf.push(b'\n');
    }
    let name = path.to_string_lossy();
    let data = if name.ends_with(".zst") {
        // Small files (the committed sample) get the densest level; large corpora a fast one.
        let level = if buf.len() < 64 << 20 { 19 } else { 3 };
        zstd::encode_all(&buf[..], level).map_err(|e| DataError::io("compress into", path, e))?
    } else if name.ends_with(".gz") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&buf)
            .map_err(|e| DataError::io("write", path, e))?;
        enc.finish().map_err(|e| DataError::io("write", path, e))?
    } else {
        buf
    };
    crate::fsutil::write_atomic(path, &data)?;
    Ok(data.len() as u64)
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
}
