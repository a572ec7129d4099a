#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
# libtorch's CPU kernels and MKL's matrix multiplies pinned to AVX2 (AVX-512
# ones round differently): the golden losses reproduce bit for bit on any
# x86-64 CI machine. The harness sets the same for every sigma it starts
# (tests/it/lib.rs, CPU_PINS).
export ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT
# The integration tests run target/release/sigma, so it is built first (setup.sh)
# and the tests share its release profile.
cargo test --release --locked --workspace "$@"
