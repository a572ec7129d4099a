#!/usr/bin/env bash
# Pipeline-parallel benchmarks on one host with 4 GPUs (issue #12):
#   scripts/bench-pp-gpu.sh          (part 2 is skipped on a machine with fewer than 4 GPUs)
#   PARTS=10b scripts/bench-pp-gpu.sh  (one part only: PARTS lists "1.5b" and/or "10b")
# 1. SIGMA-1.5B, seq 4096, micro-batch 4 with activation checkpointing, on 2 GPUs:
#    dp 2, tp 2, pp 2 (1F1B, 8 micro-batches) and pp 2 interleaved (2 chunks per
#    rank): tokens/s per GPU, memory; the pipeline runs record a trace of
#    steps 2-4 (metrics.trace), whose bubble is compared with (p-1)/(v m + p-1).
#    1.5b-tp2-noov is tp 2 without parallel.tp_comm_overlap (the same operations: its
#    losses should equal tp 2's); 1.5b-tp2t is tp 2 again with SIGMA_TIME_COLLECTIVES=1 (the time in TP collectives
#    per step, measured by synchronising around each; it slows the run).
# 2. SIGMA-10B, seq 4096, micro-batch 1, on 4 GPUs, without activation checkpointing (it
#    fits since the bf16 working weights and the fused kernels; CKPT10=true turns it on):
#    pp 4 (1F1B) at 32 and M10 (default 16) micro-batches per step, pp 4 interleaved
#    (2 chunks), tp 2 x pp 2, and tp 4 at 4 micro-batches. A real SIGMA-10B step has
#    hundreds of micro-batches per pipeline (4.2 M tokens), so 16-32 understate, not
#    overstate, what a pipeline achieves. Each run is cut off after RUN_TIMEOUT seconds.
# 3. PARTS=10b2: SIGMA-10B on 2 GPUs (H200, 141 GB), micro-batch 1, M10 micro-batches,
#    CKPT10 as above: tp 2 (with sequence parallelism; again without
#    parallel.tp_comm_overlap), pp 2 (1F1B) and pp 2 interleaved (2 chunks), for a host
#    that lends only two GPUs.
# PROFILE=1 profiles 1.5b-tp2, 1.5b-dp2 and 10b2-tp2 (metrics.profile: time per kernel category).
# ONLY="name ..." runs those runs alone. RUN_TIMEOUT (seconds) and BENCH_DEADLINE (epoch seconds) cut runs short on a lent machine.
# Tokens/s and MFU are medians over the steps after the traced ones.
# Needs target/release/sigma and a python3 whose torch 2.11 (CUDA) provides libtorch.
set -uo pipefail
cd "$(dirname "$0")/.."
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 SIGMA_DIST_TIMEOUT_S=${SIGMA_DIST_TIMEOUT_S:-120}
sigma=${SIGMA_BIN:-target/release/sigma}
out=${BENCH_OUT:-runs/bench-pp}
parts=${PARTS:-1.5b 10b}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
for d in general system synthetic; do
  $sigma data prepare --input "data/sample/$d.jsonl.zst" --domain "$d" --tokenizer data/sample/tokenizer.json \
    --output "runs/sample-shards/$d" --row-group-tokens 65536 --valid-fraction 0.05 --overwrite --quiet >/dev/null || exit 1
done
run() {
  local name=$1 n=$2; shift 2
  local t0=$(date +%s) limit=${RUN_TIMEOUT:-600}
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return
  if [ -n "${BENCH_DEADLINE:-}" ]; then  # epoch seconds by which every run must have ended
    (( BENCH_DEADLINE - t0 < limit )) && limit=$(( BENCH_DEADLINE - t0 ))
    (( limit < 60 )) && { echo "$name: skipped (deadline)"; return; }
  fi
  if timeout -k 20 "$limit" $sigma launch --nproc-per-node "$n" --log-dir "$out/logs" -- train "$@" --set metrics.output_dir="\"$out/$name\"" \
      > "$out/$name.log" 2>&1; then echo "$name: ok ($(( $(date +%s) - t0 )) s)"
  else echo "$name: FAILED ($(( $(date +%s) - t0 )) s): $(grep -m1 -iE 'error' "$out/$name.log" | cut -c1-300)"; fi
}
b15=(--config configs/sigma-1.5b.toml --quiet --set train.steps=8 --set train.log_every=1 --set train.eval_steps=1
  --set metrics.plot=false --set train.micro_batch_size=4 --set train.activation_checkpointing=true)
if [[ " $parts " == *" 1.5b "* ]]; then
run 1.5b-tp2 2 "${b15[@]}" --set parallel.tp=2 --set train.grad_accum_steps=4 ${PROFILE:+--set metrics.profile=true}
run 1.5b-tp2-noov 2 "${b15[@]}" --set parallel.tp=2 --set train.grad_accum_steps=4 --set parallel.tp_comm_overlap=false
SIGMA_TIME_COLLECTIVES=1 run 1.5b-tp2t 2 "${b15[@]}" --set parallel.tp=2 --set train.grad_accum_steps=4
run 1.5b-dp2 2 "${b15[@]}" --set parallel.dp=2 --set train.grad_accum_steps=2 ${PROFILE:+--set metrics.profile=true}
run 1.5b-pp2 2 "${b15[@]}" --set parallel.pp=2 --set train.grad_accum_steps=8 --set metrics.trace=true
run 1.5b-pp2i 2 "${b15[@]}" --set parallel.pp=2 --set parallel.pp_schedule='"interleaved"' --set train.grad_accum_steps=8 --set metrics.trace=true
fi
ngpu=$(nvidia-smi -L | wc -l)
m10=${M10:-16}
ck10=${CKPT10:-false}
b10=(--config configs/sigma-10b.toml --quiet --set train.steps=7 --set train.log_every=1 --set train.eval_steps=1
  --set metrics.plot=false --set train.micro_batch_size=1 --set train.activation_checkpointing=$ck10)
if [[ " $parts " == *" 10b2 "* ]]; then
run 10b2-tp2 2 "${b10[@]}" --set parallel.tp=2 --set train.grad_accum_steps=$m10 --set metrics.trace=true ${PROFILE:+--set metrics.profile=true}
run 10b2-tp2-noov 2 "${b10[@]}" --set parallel.tp=2 --set train.grad_accum_steps=$m10 --set metrics.trace=true --set parallel.tp_comm_overlap=false
run 10b2-pp2 2 "${b10[@]}" --set parallel.pp=2 --set train.grad_accum_steps=$m10 --set metrics.trace=true
run 10b2-pp2i 2 "${b10[@]}" --set parallel.pp=2 --set parallel.pp_schedule='"interleaved"' --set train.grad_accum_steps=$m10 --set metrics.trace=true
fi
if [[ " $parts " != *" 10b "* ]]; then
  :
elif [ "$ngpu" -ge 4 ]; then
run 10b-pp4-m32 4 "${b10[@]}" --set parallel.pp=4 --set train.grad_accum_steps=32 --set metrics.trace=true
run 10b-pp4 4 "${b10[@]}" --set parallel.pp=4 --set train.grad_accum_steps=$m10 --set metrics.trace=true
run 10b-pp4i 4 "${b10[@]}" --set parallel.pp=4 --set parallel.pp_schedule='"interleaved"' --set train.grad_accum_steps=$m10 --set metrics.trace=true
run 10b-tp2pp2 4 "${b10[@]}" --set parallel.tp=2 --set parallel.pp=2 --set train.grad_accum_steps=$m10 --set metrics.trace=true
run 10b-tp4 4 "${b10[@]}" --set parallel.tp=4 --set train.grad_accum_steps=4
else
  echo "SIGMA-10B runs need 4 GPUs; this machine has $ngpu: skipped"
fi
for r in 1.5b-pp2 1.5b-pp2i 10b2-pp2 10b2-pp2i 10b-pp4-m32 10b-pp4 10b-pp4i 10b-tp2pp2; do
  [ -f "$out/$r/trace-rank0.json" ] && $sigma trace plot "$out/$r" --output "$out/$r-trace.png" > "$out/$r-plot.txt" 2>&1
done
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, statistics, sys
out = sys.argv[1]
gpus = {"1.5b": 2, "10b2": 2, "10b": 4}
print(f"{'run':<14} {'GPUs':>4} {'tok/s':>8} {'tok/s/GPU':>9} {'MFU':>6} {'alloc MiB':>9} {'bubble':>7} {'theory':>7} {'TP comm':>7} losses")
for name in ["1.5b-dp2", "1.5b-tp2", "1.5b-tp2-noov", "1.5b-tp2t", "1.5b-pp2", "1.5b-pp2i", "10b2-tp2", "10b2-tp2-noov", "10b2-pp2", "10b2-pp2i", "10b-tp4", "10b-tp2pp2", "10b-pp4", "10b-pp4i", "10b-pp4-m32"]:
    m = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(m):
        print(f"{name:<14} not run or failed"); continue
    lines = [json.loads(l) for l in open(m)]
    r = [x for x in lines if "loss" in x]
    b = [x for x in lines if "pipeline_bubble" in x]
    w = r[4:] if len(r) > 5 else r[-2:]
    if not w:
        print(f"{name:<14} no steps logged"); continue
    g = gpus[name.split("-")[0]]
    tps = statistics.median(x["tokens_per_s"] for x in w)
    mfu = statistics.median(x["mfu"] for x in w)
    mem = max(x["memory"].get("allocated_mib_peak", x["memory"].get("gpu_mib_peak", 0)) for x in r)
    bub = f"{100*b[-1]['pipeline_bubble']:.1f}%" if b else "-"
    th = f"{100*b[-1]['pipeline_bubble_theory']:.1f}%" if b else "-"
    comm = [x["tp_comm_s"] for x in w if x.get("tp_comm_s") is not None]
    cs = f"{statistics.median(comm):.2f}s" if comm else "-"
    print(f"{name:<14} {g:>4} {tps:>8.0f} {tps/g:>9.0f} {100*mfu:>5.1f}% {mem:>9} {bub:>7} {th:>7} {cs:>7} {[round(x['loss'],4) for x in r][:3]}")
def losses(name):
    m = os.path.join(out, name, "metrics.jsonl")
    return [json.loads(l)["loss"] for l in open(m) if '"loss"' in l] if os.path.exists(m) else None
for a in ["1.5b-tp2", "10b2-tp2"]:
    x, y = losses(a), losses(a + "-noov")
    if x and y:
        d = max(abs(u - v) / abs(u) for u, v in zip(x, y))
        print(f"{a} with and without parallel.tp_comm_overlap over {min(len(x), len(y))} steps: "
              + ("losses bit-identical" if x == y else f"max relative loss difference {d:.1e}"))
PY
