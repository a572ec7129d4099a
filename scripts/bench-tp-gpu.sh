#!/usr/bin/env bash
# Tensor-parallel benchmarks and GPU checks on one host with 4 GPUs (issue #11):
#   scripts/bench-tp-gpu.sh
# 0. checks: two ranks started by hand (srun-style, no launcher, no library set-up)
#    train tiny with NCCL data parallelism; tiny in fp32 at tp 2 against tp 1 on GPU.
# 1. SIGMA-1.5B, seq 4096, on 2 GPUs: dp 2 against tp 2 (sequence parallel), same
#    micro-batch per GPU group: tokens/s per GPU, MFU, memory per GPU; one tp 2 run
#    with SIGMA_TIME_COLLECTIVES=1 for the time in TP collectives per step.
# 2. SIGMA-10B, seq 4096, tp 4 on 4 GPUs: micro-batch 1 and 2 with activation
#    checkpointing, 1 without: tokens/s, MFU, memory per GPU.
# Needs target/release/sigma and a python3 whose torch 2.11 (CUDA) provides libtorch.
# Writes $BENCH_OUT (default runs/bench-tp)/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
sigma=${SIGMA_BIN:-target/release/sigma}
out=${BENCH_OUT:-runs/bench-tp}
steps=${STEPS:-6}
# A hung collective ends its run (instead of the whole call) after this long.
export SIGMA_DIST_TIMEOUT_S=${SIGMA_DIST_TIMEOUT_S:-120}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
for d in general system synthetic; do
  $sigma data prepare --input "data/sample/$d.jsonl.zst" --domain "$d" --tokenizer data/sample/tokenizer.json \
    --output "runs/sample-shards/$d" --row-group-tokens 65536 --valid-fraction 0.05 --overwrite --quiet >/dev/null || exit 1
done
run() {
  local name=$1; shift
  local t0=$(date +%s)
  if "$@" > "$out/$name.log" 2>&1; then echo "$name: ok ($(( $(date +%s) - t0 )) s)"
  else echo "$name: FAILED ($(( $(date +%s) - t0 )) s): $(grep -m1 -iE 'error|memory' "$out/$name.log" | cut -c1-300)"; fi
}
# 0a. srun-style start: sigma must find libtorch's NCCL itself.
tiny=(--config configs/tiny.toml --quiet --set train.steps=3 --set train.log_every=1 --set train.eval_steps=1 --set metrics.plot=false)
(
  export SIGMA_JOB_SECRET=check MASTER_PORT=29555 WORLD_SIZE=2
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r timeout 120 $sigma train "${tiny[@]}" --set parallel.dp=2 --set train.device='"cuda"' \
      --set metrics.output_dir="\"$out/srun-style\"" > "$out/srun-style-$r.log" 2>&1 &
  done
  wait
)
grep -q '"loss"' "$out/srun-style/metrics.jsonl" 2>/dev/null && echo "srun-style NCCL dp 2: ok" || echo "srun-style NCCL dp 2: FAILED"
# 0b. tp 2 against tp 1 on GPU, fp32.
fp32=(--config configs/tiny.toml --quiet --set train.steps=10 --set train.log_every=1 --set train.eval_steps=1
  --set metrics.plot=false --set train.precision='"fp32"' --set train.device='"cuda"')
run tiny-tp1 $sigma train "${fp32[@]}" --set metrics.output_dir="\"$out/tiny-tp1\""
run tiny-tp2 $sigma launch --nproc-per-node 2 --log-dir "$out/logs" -- train "${fp32[@]}" --set parallel.tp=2 --set metrics.output_dir="\"$out/tiny-tp2\""
# 1. SIGMA-1.5B on 2 GPUs.
b15=(--config configs/sigma-1.5b.toml --quiet --set train.steps="$steps" --set train.log_every=1 --set train.eval_steps=1
  --set train.grad_accum_steps=2 --set metrics.plot=false)
run 1.5b-dp2-mbs4-ac $sigma launch --nproc-per-node 2 --log-dir "$out/logs" -- train "${b15[@]}" --set parallel.dp=2 \
  --set train.micro_batch_size=4 --set train.activation_checkpointing=true --set metrics.output_dir="\"$out/1.5b-dp2-mbs4-ac\""
run 1.5b-tp2-mbs4-ac $sigma launch --nproc-per-node 2 --log-dir "$out/logs" -- train "${b15[@]}" --set parallel.tp=2 \
  --set train.micro_batch_size=4 --set train.activation_checkpointing=true --set metrics.output_dir="\"$out/1.5b-tp2-mbs4-ac\""
run 1.5b-tp2-mbs8-ac $sigma launch --nproc-per-node 2 --log-dir "$out/logs" -- train "${b15[@]}" --set parallel.tp=2 \
  --set train.micro_batch_size=8 --set train.activation_checkpointing=true --set metrics.output_dir="\"$out/1.5b-tp2-mbs8-ac\""
run 1.5b-tp2-mbs4 $sigma launch --nproc-per-node 2 --log-dir "$out/logs" -- train "${b15[@]}" --set parallel.tp=2 \
  --set train.micro_batch_size=4 --set metrics.output_dir="\"$out/1.5b-tp2-mbs4\""
SIGMA_TIME_COLLECTIVES=1 run 1.5b-tp2-mbs4-timed $sigma launch --nproc-per-node 2 --log-dir "$out/logs" -- train "${b15[@]}" \
  --set parallel.tp=2 --set train.micro_batch_size=4 --set metrics.output_dir="\"$out/1.5b-tp2-mbs4-timed\""
# 2. SIGMA-10B, tp 4.
b10=(--config configs/sigma-10b.toml --quiet --set train.steps="$steps" --set train.log_every=1 --set train.eval_steps=1
  --set train.grad_accum_steps=2 --set metrics.plot=false --set parallel.tp=4)
run 10b-tp4-mbs1-ac $sigma launch --nproc-per-node 4 --log-dir "$out/logs" -- train "${b10[@]}" \
  --set train.micro_batch_size=1 --set metrics.output_dir="\"$out/10b-tp4-mbs1-ac\""
run 10b-tp4-mbs1 $sigma launch --nproc-per-node 4 --log-dir "$out/logs" -- train "${b10[@]}" \
  --set train.micro_batch_size=1 --set train.activation_checkpointing=false --set metrics.output_dir="\"$out/10b-tp4-mbs1\""
run 10b-tp4-mbs2-ac $sigma launch --nproc-per-node 4 --log-dir "$out/logs" -- train "${b10[@]}" \
  --set train.micro_batch_size=2 --set metrics.output_dir="\"$out/10b-tp4-mbs2-ac\""
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, statistics, sys
out = sys.argv[1]
def recs(name):
    m = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(m):
        return []
    return [json.loads(l) for l in open(m) if '"loss"' in l]
a, b = recs("tiny-tp1"), recs("tiny-tp2")
if a and b:
    d = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
    print(f"tiny fp32 on GPU, tp 2 vs tp 1 over {len(a)} steps: max relative loss difference {d:.2e}")
gpus = {"1.5b-dp2": 2, "1.5b-tp2": 2, "10b-tp4": 4}
print(f"{'run':<22} {'GPUs':>4} {'tok/s':>8} {'tok/s/GPU':>9} {'MFU':>6} {'alloc MiB':>8} {'tp comm s/step':>14} {'step s':>7} losses")
for name in sorted(os.listdir(out)):
    r = recs(name)
    if not r or name.startswith("tiny") or name.startswith("srun"):
        continue
    w = r[2:] if len(r) > 3 else r
    g = next(v for k, v in gpus.items() if name.startswith(k))
    tps = statistics.median(x["tokens_per_s"] for x in w)
    mfu = statistics.median(x["mfu"] for x in w) if w[0].get("mfu") is not None else float("nan")
    mem = max(x.get("memory", {}).get("allocated_mib_peak", x.get("memory", {}).get("gpu_mib_peak", 0)) for x in r)
    comm = [x["tp_comm_s"] for x in w if x.get("tp_comm_s") is not None]
    cs = f"{statistics.median(comm):.3f}" if comm else "-"
    st = statistics.median(x["step_time_s"] for x in w)
    print(f"{name:<22} {g:>4} {tps:>8.0f} {tps/g:>9.0f} {100*mfu:>5.1f}% {mem:>8} {cs:>14} {st:>7.2f} {[round(x['loss'],4) for x in r][:3]}")
PY
