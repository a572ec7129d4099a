#!/usr/bin/env bash
# The README's main job, on the embedded sample data (data/sample/):
#   1. set up (idempotent: venv with torch, build),
#   2. prepare the three sample domains into tokenized shards (runs/sample-shards/),
#   3. inspect them and preview the data mixture,
#   4. train configs/tiny.toml (GPU when one is usable, else CPU; ~3 minutes on 2 CPU cores),
#      print validation loss per domain and write runs/tiny/loss.png next to the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
sigma=target/release/sigma
out=runs/sample-shards
for d in general system synthetic; do
  $sigma data prepare --input "data/sample/$d.jsonl.zst" --domain "$d" \
    --tokenizer data/sample/tokenizer.json --output "$out/$d" \
    --row-group-tokens 65536 --valid-fraction 0.05 --overwrite
done
for d in general system synthetic; do
  $sigma data inspect "$out/$d" --verify
done
$sigma data preview --config configs/sample-mix.toml --show 1
$sigma train --config configs/tiny.toml "$@"
