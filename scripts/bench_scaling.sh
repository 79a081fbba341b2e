#!/bin/bash
# Scaling note of the README: the digits M2N2 benchmark with no mesh and on 1, 2, 4, 8 forced host devices.
# Run it on an otherwise idle machine; each line of output is one device count.
#   bash scripts/bench_scaling.sh [steps] [repeats]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-500}; repeats=${2:-3}
for d in 0 1 2 4 8; do
  fps=$(python scripts/bench_digits.py --seeds 8 --steps "$steps" --repeats "$repeats" --devices "$d" \
        | awk '/^forward_passes_per_s:/ {print $2}')
  echo "devices=$d forward_passes_per_s=$fps load=$(cut -d' ' -f1 /proc/loadavg)"
done
