#!/usr/bin/env bash
# Single-GPU training benchmark of configs/sigma-1.5b.toml at seq_len 4096 (issue #3):
# tokens/s, MFU, GPU memory and time per phase, for several micro-batch sizes with and
# without activation checkpointing, and a GQA 16/16 model of equal width (no AugQ)
# for comparison. Needs: target/release/sigma (built by scripts/setup.sh) and a python3
# whose torch 2.11 (CUDA) provides libtorch. Writes $BENCH_OUT (default runs/bench-train)/summary.txt.
#   STEPS=8 ACCUM=2 scripts/bench-train-gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
sigma=${SIGMA_BIN:-target/release/sigma}
out=${BENCH_OUT:-runs/bench-train}
steps=${STEPS:-8}
accum=${ACCUM:-2}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for d in general system synthetic; do
  $sigma data prepare --input "data/sample/$d.jsonl.zst" --domain "$d" --tokenizer data/sample/tokenizer.json \
    --output "runs/sample-shards/$d" --row-group-tokens 65536 --valid-fraction 0.05 --overwrite --quiet >/dev/null || exit 1
done
run() {
  local name=$1; shift
  local t0=$(date +%s)
  if $sigma train --config configs/sigma-1.5b.toml --quiet --set train.steps="$steps" --set train.log_every=1 \
      --set train.eval_steps=1 --set train.grad_accum_steps="$accum" --set metrics.output_dir="\"$out/$name\"" \
      --set metrics.plot=false "$@" > "$out/$name.log" 2>&1; then
    echo "$name: ok ($(( $(date +%s) - t0 )) s)"
  else
    echo "$name: FAILED ($(( $(date +%s) - t0 )) s): $(grep -m1 -iE 'error|out of memory' "$out/$name.log" | cut -c1-200)"
  fi
}
gqa="--set model.num_k_heads=16 --set model.aug_q_dim=0"
run sigma-mbs1          --set train.micro_batch_size=1
run sigma-mbs2          --set train.micro_batch_size=2
run sigma-mbs4          --set train.micro_batch_size=4
run sigma-mbs8          --set train.micro_batch_size=8
run sigma-mbs4-ac       --set train.micro_batch_size=4 --set train.activation_checkpointing=true
run sigma-mbs8-ac       --set train.micro_batch_size=8 --set train.activation_checkpointing=true
run gqa16-mbs4          --set train.micro_batch_size=4 $gqa
run gqa16-mbs8          --set train.micro_batch_size=8 $gqa
run gqa16-mbs8-ac       --set train.micro_batch_size=8 $gqa --set train.activation_checkpointing=true
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, statistics, sys
out = sys.argv[1]
print(f"{'run':<16} {'tok/s':>9} {'MFU':>6} {'GPU MiB':>8} {'data s':>7} {'fwd+bwd s':>9} {'optim s':>8} {'steps':>5}")
for name in sorted(os.listdir(out)):
    m = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(m):
        continue
    recs = [json.loads(l) for l in open(m) if '"loss"' in l]
    warm = recs[2:] if len(recs) > 3 else recs
    if not warm:
        continue
    med = lambda k: statistics.median(r[k] for r in warm)
    ph = lambda k: statistics.median(r["phase_s"][k] for r in warm)
    mfu = statistics.median(r["mfu"] for r in warm) if warm[0].get("mfu") is not None else float("nan")
    mem = max(r.get("memory", {}).get("gpu_mib_peak", 0) for r in recs)
    print(f"{name:<16} {med('tokens_per_s'):>9.0f} {100*mfu:>5.1f}% {mem:>8} {ph('data'):>7.3f} {ph('forward_backward'):>9.3f} {ph('optimizer'):>8.3f} {len(recs):>5}")
PY
