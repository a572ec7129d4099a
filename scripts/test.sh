#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
# The integration tests run target/release/sigma, so it is built first (setup.sh)
# and the tests share its release profile.
cargo test --release --locked --workspace "$@"
