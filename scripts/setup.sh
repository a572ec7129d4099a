#!/usr/bin/env bash
# Idempotent set-up, run by both README commands: installs what is missing and
# builds target/release/sigma. Safe to run again; does nothing that is done.
#   - checks for the Rust toolchain (cargo)
#   - creates the Python venv .venv (ignored by git) with torch 2.11.0 (libtorch for
#     tch; the CUDA build, which also runs on CPU-only machines) and the test
#     services (moto[server], an S3-compatible server for the object-store tests)
#     and transformers (the Hugging Face export is loaded and compared in a test),
#     and the CUDA runtime's crt headers (the CUDA-graph shim builds against them)
#   - builds the sigma binary in release mode against that libtorch
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install the Rust toolchain (https://rustup.rs) and re-run." >&2
  exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "error: python3 not found. Install Python 3.10+ with venv and pip, then re-run." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating Python venv in .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' >/dev/null 2>&1; then
  say "installing torch 2.11.0 into .venv (about 4.6 GB, a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.11.0
fi
# The CUDA runtime's crt/ headers, which torch's CUDA wheels leave out: the CUDA-graph
# shim (trainer/csrc/cuda_graph.cpp) is built against them; a small wheel (~170 kB).
cuda=$(.venv/bin/python -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)
if [ "${cuda%%.*}" = 13 ] && ! .venv/bin/python -c 'import glob, sys, sysconfig; sys.exit(not glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia/cu13/include/crt/host_config.h"))' >/dev/null 2>&1; then
  say "installing the CUDA $cuda crt headers into .venv (for CUDA graphs)"
  .venv/bin/pip install -q --disable-pip-version-check "nvidia-cuda-crt~=$cuda.0"
fi
if ! .venv/bin/python -c 'import moto.server, flask' >/dev/null 2>&1; then
  say "installing moto[server] into .venv"
  .venv/bin/pip install -q --disable-pip-version-check 'moto[server]>=5,<6'
fi
if ! .venv/bin/python -c 'import transformers, safetensors' >/dev/null 2>&1; then
  say "installing transformers into .venv (the Hugging Face export test)"
  .venv/bin/pip install -q --disable-pip-version-check 'transformers>=5,<6' 'safetensors>=0.4'
fi
# SLURM and munge for the SLURM test (tests/it/slurm.rs brings up a local cluster with
# scripts/slurm-local.sh): installed only as root with apt-get; never fails set-up.
slurm_missing=""
for b in slurmctld slurmd sbatch munged; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || slurm_missing="$slurm_missing $b"
done
if [ -n "$slurm_missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing slurm-wlm and munge with apt-get (for the SLURM test)"
    slurm_log=$(mktemp)
    slurm_install() {
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >"$slurm_log" 2>&1
    }
    if ! slurm_install && ! { apt-get update >"$slurm_log" 2>&1 && slurm_install; }; then
      say "could not install slurm-wlm and munge ($(grep -v '^\s*$' "$slurm_log" | tail -n 1)): the SLURM test will be skipped"
    fi
    rm -f "$slurm_log"
  else
    say "slurm-wlm and munge are not installed (installing needs root and apt-get): the SLURM test will be skipped"
  fi
fi

# tch's build finds libtorch through the python3 on PATH (LIBTORCH_USE_PYTORCH=1).
export PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
say "building target/release/sigma"
cargo build --release --locked --bin sigma
