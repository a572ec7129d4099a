#!/usr/bin/env bash
# Checkpoint benchmarks and resume across data-parallel layouts on one host (issues #5, #6):
#   scripts/bench-checkpoint-gpu.sh N        (N GPUs, N even; 4 gives the 4 <-> 2 resumes)
# configs/sigma-1.5b.toml (seq 4096, micro-batch 4, activation checkpointing), STEPS steps
# (default 6), asynchronous checkpoints every STEPS/2 steps:
# 1. one GPU: training stall per save, write time and throughput, then a resume from the
#    middle checkpoint (load time) whose losses are compared with the uninterrupted run;
# 2. N GPUs with ZeRO-1 saved, resumed on N/2 GPUs (same global batch);
# 3. N/2 GPUs with ZeRO-1 saved, resumed on N GPUs.
# PARTS (default "1 n h") selects the parts: 1, n (N saved, N/2 resumed), h (N/2 saved, N resumed).
# Needs target/release/sigma and a python3 whose torch 2.11 (CUDA) provides libtorch.
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: bench-checkpoint-gpu.sh NUM_GPUS}
h=$((n / 2))
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
sigma=${SIGMA_BIN:-target/release/sigma}
out=${BENCH_OUT:-runs/bench-checkpoint}
steps=${STEPS:-6}
mid=$((steps / 2))
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
df -h . | tail -1 | tee "$out/disk.txt"
for d in general system synthetic; do
  $sigma data prepare --input "data/sample/$d.jsonl.zst" --domain "$d" --tokenizer data/sample/tokenizer.json \
    --output "runs/sample-shards/$d" --row-group-tokens 65536 --valid-fraction 0.05 --overwrite --quiet >/dev/null || exit 1
done
common=(--config configs/sigma-1.5b.toml --quiet --set train.steps="$steps" --set train.log_every=1 --set train.eval_steps=1
  --set train.micro_batch_size=4 --set train.activation_checkpointing=true --set metrics.plot=false
  --set checkpoint.every_steps="$mid" --set checkpoint.async=true --set checkpoint.keep_last=1 --set checkpoint.keep_every="$mid")
run() {
  local name=$1; shift
  local t0=$(date +%s)
  if "$@" > "$out/$name.log" 2>&1; then echo "$name: ok ($(( $(date +%s) - t0 )) s)"; else echo "$name: FAILED: $(grep -m1 -iE 'error|memory' "$out/$name.log" | cut -c1-300)"; fi
}
train() { # name gpus accum [extra...]
  local name=$1 g=$2 a=$3; shift 3
  local args=("${common[@]}" --set train.grad_accum_steps="$a" --set metrics.output_dir="\"$out/$name\"" "$@")
  if [ "$g" = 1 ]; then run "$name" $sigma train "${args[@]}"
  else run "$name" $sigma launch --nproc-per-node "$g" --log-dir "$out/logs-$name" -- train "${args[@]}" --set parallel.dp="$g" --set parallel.zero=1; fi
}
ck() { printf '%s/%s/checkpoints/step-%07d' "$out" "$1" "$mid"; }
parts=" ${PARTS:-1 n h} "
if [[ $parts == *" 1 "* ]]; then
  train dp1 1 2
  train dp1-resumed 1 2 --resume "$(ck dp1)" --set checkpoint.every_steps=0
  timeout 120 $sigma checkpoint inspect "$(ck dp1)" > "$out/inspect-dp1.txt" 2>&1 || true
  rm -rf "$out/dp1/checkpoints" "$out/dp1-resumed/checkpoints"
fi
if [[ $parts == *" n "* ]]; then
  train "dp$n" "$n" 2
  train "dp$n-to-dp$h" "$h" 4 --resume "$(ck dp$n)" --set checkpoint.every_steps=0
  rm -rf "$out/dp$n/checkpoints" "$out/dp$n-to-dp$h/checkpoints"
fi
if [[ $parts == *" h "* ]]; then
  train "dp$h" "$h" 4
  train "dp$h-to-dp$n" "$n" 2 --resume "$(ck dp$h)" --set checkpoint.every_steps=0
  rm -rf "$out/dp$h/checkpoints" "$out/dp$h-to-dp$n/checkpoints"
fi
python3 - "$out" "$n" "$h" <<'PY' | tee "$out/summary.txt"
import json, os, re, sys
out, n, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def recs(name):
    p = os.path.join(out, name, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
def log(name):
    p = os.path.join(out, name + ".log")
    return open(p).read() if os.path.exists(p) else ""
for name in ["dp1", f"dp{n}", f"dp{h}"]:
    stalls = [r["checkpoint"]["stall_s"] for r in recs(name) if "checkpoint" in r]
    commits = re.findall(r"committed (\S+) \(([\d.]+) GB in ([\d.]+) s, ([\d.]+) GB/s", log(name))
    print(f"{name}: stall per save {['%.3f s' % s for s in stalls]}; commits " +
          "; ".join(f"{os.path.basename(c[0])} {c[1]} GB in {c[2]} s ({c[3]} GB/s)" for c in commits))
for ref, res in [("dp1", "dp1-resumed"), (f"dp{n}", f"dp{n}-to-dp{h}"), (f"dp{h}", f"dp{h}-to-dp{n}")]:
    a = {r["step"]: r["loss"] for r in recs(ref) if "loss" in r}
    b = {r["step"]: r["loss"] for r in recs(res) if "loss" in r}
    load = re.findall(r"loaded and verified in ([\d.]+) s \(([\d.]+) GB", log(res))
    common = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) for s in common]
    print(f"{res}: load {load}; steps {common}; reference {[round(a[s], 5) for s in common]}; resumed {[round(b[s], 5) for s in common]}; max |diff| {max(diffs) if diffs else 'n/a'}")
PY
