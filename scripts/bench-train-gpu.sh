#!/usr/bin/env bash
# Single-GPU training benchmark of configs/sigma-1.5b.toml at seq_len 4096 (issues #3, #13):
# tokens/s, MFU, peak memory and time per phase for several micro-batch sizes with and
# without activation checkpointing, the output head in chunks, and a GQA 16/16 model of
# equal width (no AugQ). Peak memory is the caching allocator's peak allocation
# (`allocated_mib_peak`; binaries before it existed logged nvidia-smi's `gpu_mib_peak`).
# Needs: a sigma binary (SIGMA_BIN, default target/release/sigma) and a python3 whose
# torch 2.11 (CUDA) provides libtorch. Writes $BENCH_OUT (default runs/bench-train)/summary.txt.
#   STEPS=8 ACCUM=2 scripts/bench-train-gpu.sh
#   LABEL=before SIGMA_BIN=old/sigma RUNS="mbs2 mbs4-ac" scripts/bench-train-gpu.sh   # a subset, prefixed
#   LABEL=unfused EXTRA="--set train.fused_weight_grad=false" RUNS=mbs2 scripts/bench-train-gpu.sh  # overrides for every run
#   RUNS="mbs2 peer-compile-mbs2" scripts/bench-train-gpu.sh   # sigma beside the PyTorch peer (scripts/peer-torch.py)
#   CONFIG=configs/sigma-10b.toml EXTRA="--set model.num_layers=6" RUNS=mbs1 scripts/bench-train-gpu.sh  # another model
# Peer runs (peer-eager-mbsN, peer-compile-mbsN, peer-gqa16-compile-mbs2, and with torchao's FP8
# peer-fp8-tensorwise-compile-mbsN, peer-fp8-rowwise-compile-mbsN) take STEPS and ACCUM too.
set -uo pipefail
cd "$(dirname "$0")/.."
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
sigma=${SIGMA_BIN:-target/release/sigma}
config=${CONFIG:-configs/sigma-1.5b.toml}
out=${BENCH_OUT:-runs/bench-train}
steps=${STEPS:-8}
accum=${ACCUM:-2}
label=${LABEL:-}
extra=${EXTRA:-}
runs=${RUNS:-mbs1 mbs2 mbs4 mbs4-chunk mbs4-ac mbs8-ac gqa16-mbs2 gqa16-mbs4-ac}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for d in general system synthetic; do
  [ -f "runs/sample-shards/$d/manifest.json" ] && continue
  $sigma data prepare --input "data/sample/$d.jsonl.zst" --domain "$d" --tokenizer data/sample/tokenizer.json \
    --output "runs/sample-shards/$d" --row-group-tokens 65536 --valid-fraction 0.05 --overwrite --quiet >/dev/null || exit 1
done
run() {
  local name=${label:+$label-}$1; shift
  local t0=$(date +%s)
  if $sigma train --config "$config" --quiet --set train.steps="$steps" --set train.log_every=1 \
      --set train.eval_steps=1 --set train.grad_accum_steps="$accum" --set metrics.output_dir="\"$out/$name\"" \
      --set metrics.plot=false "$@" $extra > "$out/$name.log" 2>&1; then
    echo "$name: ok ($(( $(date +%s) - t0 )) s)"
  else
    echo "$name: FAILED ($(( $(date +%s) - t0 )) s): $(grep -m1 -iE 'error|out of memory' "$out/$name.log" | cut -c1-200)"
  fi
}
gqa="--set model.num_k_heads=16 --set model.aug_q_dim=0"
peer() {
  local name=${label:+$label-}$1; shift
  local t0=$(date +%s)
  if python3 scripts/peer-torch.py --config "$config" --steps "$steps" --accum "$accum" "$@" \
      > "$out/$name.json" 2> "$out/$name.log"; then
    echo "$name: ok ($(( $(date +%s) - t0 )) s)"
  else
    echo "$name: FAILED ($(( $(date +%s) - t0 )) s): $(grep -m1 -iE 'error|out of memory' "$out/$name.log" | cut -c1-200)"
  fi
}
for r in $runs; do
  case $r in
    mbs1)          run $r --set train.micro_batch_size=1 ;;
    mbs2)          run $r --set train.micro_batch_size=2 ;;
    mbs4)          run $r --set train.micro_batch_size=4 ;;
    mbs4-profile)  run $r --set train.micro_batch_size=4 --set metrics.profile=true ;;
    mbs4-chunk)    run $r --set train.micro_batch_size=4 --set train.loss_chunk_tokens=4096 ;;
    mbs8)          run $r --set train.micro_batch_size=8 ;;
    mbs4-ac)       run $r --set train.micro_batch_size=4 --set train.activation_checkpointing=true ;;
    mbs8-ac)       run $r --set train.micro_batch_size=8 --set train.activation_checkpointing=true ;;
    gqa16-mbs2)    run $r --set train.micro_batch_size=2 $gqa ;;
    gqa16-mbs4-ac) run $r --set train.micro_batch_size=4 --set train.activation_checkpointing=true $gqa ;;
    peer-eager-mbs[0-9]*)   peer $r --mbs "${r##*mbs}" ;;
    peer-compile-mbs[0-9]*) peer $r --mbs "${r##*mbs}" --compile ;;
    peer-gqa16-compile-mbs2) peer $r --mbs 2 --compile --set num_k_heads=16 --set aug_q_dim=0 ;;
    peer-fp8-tensorwise-compile-mbs[0-9]*) peer $r --mbs "${r##*mbs}" --compile --float8 tensorwise ;;
    peer-fp8-rowwise-compile-mbs[0-9]*)    peer $r --mbs "${r##*mbs}" --compile --float8 rowwise ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, statistics, sys
out = sys.argv[1]
# The loss of the first and last step too: a speed figure of a run that does not learn is not one.
print(f"{'run':<22} {'tok/s':>9} {'MFU':>6} {'peak MiB':>9} {'data s':>7} {'fwd+bwd s':>9} {'optim s':>8} {'steps':>5} {'loss first -> last':>18}")
for name in sorted(os.listdir(out)):
    m = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(m):
        continue
    recs = [json.loads(l) for l in open(m) if '"loss"' in l]
    warm = recs[2:] if len(recs) > 3 else recs
    if not warm:
        print(f"{name:<22} no steps logged"); continue
    med = lambda k: statistics.median(r[k] for r in warm)
    ph = lambda k: statistics.median(r["phase_s"][k] for r in warm)
    mfu = statistics.median(r["mfu"] for r in warm) if warm[0].get("mfu") is not None else float("nan")
    mem = max(r.get("memory", {}).get("allocated_mib_peak", r.get("memory", {}).get("gpu_mib_peak", 0)) for r in recs)
    src = "alloc" if "allocated_mib_peak" in recs[-1].get("memory", {}) else "smi"
    print(f"{name:<22} {med('tokens_per_s'):>9.0f} {100*mfu:>5.1f}% {mem:>7} {src:<5} {ph('data'):>7.3f} {ph('forward_backward'):>9.3f} {ph('optimizer'):>8.3f} {len(recs):>5} {recs[0]['loss']:>8.4f} -> {recs[-1]['loss']:.4f}")
for name in sorted(os.listdir(out)):
    if name.endswith(".json") and "peer-" in name:
        try:
            r = json.loads(open(os.path.join(out, name)).read().strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"{name[:-5]:<22} no result"); continue
        print(f"{name[:-5]:<22} {r['tokens_per_s']:>9.0f} {'':>6} {r['allocated_mib_peak']:>7} alloc {'':>7} {'':>9} {'':>8} {r['steps']:>5} {r['loss_first']:>8.4f} -> {r['loss_last']:.4f}")
PY
