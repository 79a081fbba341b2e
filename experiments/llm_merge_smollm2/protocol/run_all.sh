#!/usr/bin/env bash
# The M2N2 paper's language-model protocol on the SmolLM2 specialists: every method of this folder, one
# after another, each resumed where it stopped (a complete run is skipped), so the set can be run across
# as many sittings as it needs:
#
#   bash experiments/llm_merge_smollm2/protocol/run_all.sh [EVALUATIONS [METHOD ...]]
#
# EVALUATIONS (default 1000, the paper's) is the same budget for every method; the warm-up of the archive
# methods is 5 % of it (the paper's 50 of 1,000). Runs go to runs/llm_protocol_smollm2/e<EVALUATIONS>/<method>.
# Then: python experiments/llm_merge/table.py runs/llm_protocol_smollm2/e<EVALUATIONS> --test-split test_large
set -euo pipefail
cd "$(dirname "$0")/../../.."
evaluations=${1:-1000}
shift || true
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(m2n2 m2n2_no_split_point m2n2_no_attraction ga map_elites cmaes_slerp)
warmup=$(( evaluations / 20 > 0 ? evaluations / 20 : 1 ))
out=runs/llm_protocol_smollm2/e$evaluations
mkdir -p "$out"
for m in "${methods[@]}"; do
  dir=$out/$m
  if [ -f "$dir/summary.json" ] && grep -q '"status": "complete"' "$dir/summary.json"; then
    echo "$m: complete"; continue
  fi
  if [ -d "$dir/checkpoints" ] && [ -n "$(ls -A "$dir/checkpoints" 2>/dev/null)" ]; then
    evojax-merge run --resume "$dir"
  else
    rm -rf "$dir"  # a run stopped before its first checkpoint starts again
    sets=(--set run.evaluations="$evaluations")
    [ "$m" = cmaes_slerp ] || sets+=(--set strategy.warmup="$warmup")
    evojax-merge run "experiments/llm_merge_smollm2/protocol/$m.yaml" "${sets[@]}" --out "$dir"
  fi
done
