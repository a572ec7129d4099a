#!/usr/bin/env bash
# Build a sigma corpus from Debian packages plus the synthetic generator.
#   scripts/build-corpus.sh sample             -> data/sample/ (the committed sample, a few MB)
#   scripts/build-corpus.sh large OUT_DIR      -> hundreds of MB for GPU experiments
# Needs: Debian/Ubuntu with apt (installs fortunes, manpages, man-db, groff, zstd) and
# target/release/sigma (scripts/setup.sh builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:?usage: build-corpus.sh sample|large [OUT_DIR]}
case "$scale" in
  sample) out=data/sample; synth_docs=1500 ;;
  large)  out=${2:?usage: build-corpus.sh large OUT_DIR}; synth_docs=400000 ;;
  *) echo "error: scale must be 'sample' or 'large', got '$scale'" >&2; exit 2 ;;
esac
need=()
for p in fortunes fortunes-min manpages manpages-dev man-db groff-base zstd; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
if [ "$scale" = large ]; then
  # Every manual page that these packages install is used at large scale.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coreutils iproute2 procps util-linux \
    openssh-client rsync git curl tcpdump ethtool pciutils numactl hwloc lvm2 mdadm \
    systemd nftables iptables strace ltrace gdb >/dev/null
fi
mkdir -p "$out"
python3 scripts/corpus_from_debian.py --scale "$scale" --output "$out"
for d in general system; do
  zstd -q -19 -f --rm "$out/$d.jsonl" -o "$out/$d.jsonl.zst"
done
target/release/sigma data synth --seed 1 --num-docs "$synth_docs" --output "$out/synthetic.jsonl.zst" --overwrite
ls -la "$out"
