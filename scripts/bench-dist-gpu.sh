#!/usr/bin/env bash
# Distributed benchmarks on one host with N GPUs (issue #4; the same script serves 4 and 8):
#   scripts/bench-dist-gpu.sh N [M ...]     (several counts share the 1-GPU baseline)
# 1. NCCL all-reduce bus bandwidth by message size (bf16, 1 MiB .. 1 GiB) through sigma's
#    collective layer and through plain NCCL calls on the same buffers;
# 2. configs/sigma-1.5b.toml training (seq 4096, micro-batch 4, activation checkpointing,
#    2 accumulation steps, 8 steps) on 1 GPU and on N GPUs with plain DP (gradient buckets
#    reduced during backward, and for comparison after it) and with ZeRO-1:
#    tokens/s per GPU, weak-scaling efficiency, memory per GPU, optimizer state per GPU.
# Needs target/release/sigma and a python3 whose torch 2.11 (CUDA) provides libtorch.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench-dist-gpu.sh NUM_GPUS [NUM_GPUS ...]" >&2; exit 2; }
counts=("$@")
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
sigma=${SIGMA_BIN:-target/release/sigma}
out=${BENCH_OUT:-runs/bench-dist}
steps=${STEPS:-8}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
for d in general system synthetic; do
  $sigma data prepare --input "data/sample/$d.jsonl.zst" --domain "$d" --tokenizer data/sample/tokenizer.json \
    --output "runs/sample-shards/$d" --row-group-tokens 65536 --valid-fraction 0.05 --overwrite --quiet >/dev/null || exit 1
done
for n in "${counts[@]}"; do
  echo "== all-reduce, $n GPUs"
  $sigma launch --nproc-per-node "$n" --log-dir "$out/logs-ar" -- dist bench-allreduce --min-bytes 1048576 --max-bytes 1073741824 --iters 20 \
    | tee "$out/allreduce-$n.txt"
done
common=(--config configs/sigma-1.5b.toml --quiet --set train.steps="$steps" --set train.log_every=1 --set train.eval_steps=1
  --set train.micro_batch_size=4 --set train.activation_checkpointing=true --set train.grad_accum_steps=2 --set metrics.plot=false)
run() {
  local name=$1; shift
  local t0=$(date +%s)
  if "$@" > "$out/$name.log" 2>&1; then echo "$name: ok ($(( $(date +%s) - t0 )) s)"; else echo "$name: FAILED: $(grep -m1 -iE 'error|memory' "$out/$name.log" | cut -c1-300)"; fi
}
run dp1 $sigma train "${common[@]}" --set metrics.output_dir="\"$out/dp1\""
for n in "${counts[@]}"; do
run "dp$n" $sigma launch --nproc-per-node "$n" --log-dir "$out/logs-dp" -- train "${common[@]}" --set parallel.dp="$n" --set metrics.output_dir="\"$out/dp$n\""
run "dp$n-no-overlap" $sigma launch --nproc-per-node "$n" --log-dir "$out/logs-dp" -- train "${common[@]}" --set parallel.dp="$n" --set parallel.overlap_grad_reduce=false --set metrics.output_dir="\"$out/dp$n-no-overlap\""
run "dp$n-zero1" $sigma launch --nproc-per-node "$n" --log-dir "$out/logs-zero" -- train "${common[@]}" --set parallel.dp="$n" --set parallel.zero=1 --set metrics.output_dir="\"$out/dp$n-zero1\""
done
python3 - "$out" "${counts[@]}" <<'PY' | tee "$out/summary.txt"
import json, os, statistics, sys
out, counts = sys.argv[1], [int(c) for c in sys.argv[2:]]
def load(name):
    m = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(m):
        return None
    recs = [json.loads(l) for l in open(m) if '"loss"' in l]
    return recs[2:] if len(recs) > 3 else recs
base = load("dp1")
base_tps = statistics.median(r["tokens_per_s"] for r in base) if base else float("nan")
print(f"{'run':<12} {'GPUs':>4} {'tok/s':>9} {'tok/s/GPU':>10} {'weak eff':>8} {'MFU':>6} {'alloc MiB rank 0':>16} {'opt state GB/GPU':>16} {'losses':>s}")
for name, g in [("dp1", 1)] + [(f"dp{n}{z}", n) for n in counts for z in ("", "-no-overlap", "-zero1")]:
    w = load(name)
    if not w:
        print(f"{name:<12} {g:>4} failed"); continue
    tps = statistics.median(r["tokens_per_s"] for r in w)
    mfu = statistics.median(r["mfu"] for r in w)
    mem = max(r["memory"].get("allocated_mib_peak", r["memory"].get("gpu_mib_peak", 0)) for r in w)
    st = w[-1]["optimizer_state_bytes"] / 1e9
    print(f"{name:<12} {g:>4} {tps:>9.0f} {tps/g:>10.0f} {100*tps/(g*base_tps):>7.1f}% {100*mfu:>5.1f}% {mem:>16} {st:>16.2f} {[round(r['loss'],4) for r in w][:4]}")
PY
