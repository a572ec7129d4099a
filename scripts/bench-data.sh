#!/usr/bin/env bash
# Data-path benchmarks for docs/benchmarks.md:
#   prepare throughput (MB/s of text, tokens/s) on one core and on all cores, and
#   loader throughput (tokens/s, mixing + packing from local shards) on one core.
# Input: the real sample text (general + system) repeated REPEAT times (default 8,
# about 50 MB of text) so the run is long enough to time. Output under runs/bench-data/.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=${REPEAT:-8}
scripts/setup.sh >/dev/null
sigma=target/release/sigma
w=runs/bench-data
rm -rf "$w" && mkdir -p "$w"
for d in general system; do
  for i in $(seq "$repeat"); do zstd -dc "data/sample/$d.jsonl.zst"; done > "$w/$d.jsonl"
done
ls -la "$w"/*.jsonl
echo "== prepare, 1 thread pinned to one core"
taskset -c 0 $sigma data prepare --input "$w/general.jsonl" "$w/system.jsonl" --domain general \
  --tokenizer data/sample/tokenizer.json --output "$w/one" --threads 1 --quiet
echo "== prepare, $(nproc) threads"
$sigma data prepare --input "$w/general.jsonl" "$w/system.jsonl" --domain general \
  --tokenizer data/sample/tokenizer.json --output "$w/all" --threads "$(nproc)" --quiet
$sigma data synth --seed 9 --num-docs 20000 --output "$w/synthetic.jsonl"
$sigma data prepare --input "$w/synthetic.jsonl" --domain synthetic \
  --tokenizer data/sample/tokenizer.json --output "$w/synth" --quiet
cat > "$w/bench.toml" <<TOML
[data]
seq_len = 4096
seed = 1
shuffle_window = 4
[[data.sources]]
manifest = "$w/all"
domain = "general"
[[data.sources]]
manifest = "$w/synth"
[data.mixture]
general = 0.7
synthetic = 0.3
TOML
echo "== loader, one core, seq_len 4096, global batch 16, shuffle window 4 row groups"
taskset -c 0 $sigma data bench --config "$w/bench.toml" --global-batch 16 --batches 600
