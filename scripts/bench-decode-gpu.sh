#!/usr/bin/env bash
# GPU check and benchmark of decoding (issue #15), on one NVIDIA GPU:
#  1. the DiffQKV decode kernel against an fp32 reference on many shapes, with
#     padding masks (`sigma bench decode --check`; non-zero exit past the tolerance);
#  2. decode attention time per step, the kernel and its tensor path against
#     GQA 16/16 through SDPA, SIGMA-1.5B's heads (32/4/16, d 64);
#  3. whole-model decoding tokens/s, SIGMA-1.5B against its GQA 16/16 counterpart.
# Needs: a sigma binary (SIGMA_BIN, default target/release/sigma) and a python3
# whose torch (CUDA) provides libtorch. Writes $BENCH_OUT (default runs/bench-decode)/*.txt.
#   PEAK_GBPS=3350 scripts/bench-decode-gpu.sh      # H100 SXM; H200: 4800
set -uo pipefail
cd "$(dirname "$0")/.."
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$torch_lib:${LD_LIBRARY_PATH:-}
sigma=${SIGMA_BIN:-target/release/sigma}
out=${BENCH_OUT:-runs/bench-decode}
peak=${PEAK_GBPS:-3350}
mkdir -p "$out"
$sigma bench decode --check 2>&1 | tee "$out/check.txt" || exit 1
$sigma bench decode --batch 1,4,16,64 --context 4096,16384,32768,65536 --steps 30 \
  --peak-gbps "$peak" 2>&1 | tee "$out/attention.txt"
$sigma bench decode --model configs/sigma-1.5b.toml --batch 1,16 --context 4096,32768 \
  --steps 10 2>&1 | tee "$out/model.txt"
