#!/usr/bin/env bash
# Fig. 2 (left) of the M2N2 paper without the baselines of the follow-up issue: M2N2, M2N2 without
# crossover, GA and GA without crossover, from scratch on digits, 10 seeds x 50,000 forward passes each.
# Writes runs/digits/<method>/ and runs/digits/from_scratch.png, and prints the results table.
source "$(dirname "$0")/../../scripts/env.sh"
source scripts/host_devices.sh
out="${1:-runs/digits}"
for method in m2n2 m2n2_no_crossover ga ga_no_crossover; do
    if [ -f "$out/$method/summary.json" ] && grep -q '"status": "complete"' "$out/$method/summary.json"; then
        continue  # already done
    elif [ -d "$out/$method/checkpoints" ]; then
        evojax-merge run --resume "$out/$method"
    else
        evojax-merge run "experiments/digits/$method.yaml" --out "$out/$method" "${HOST_DEVICE_ARGS[@]}"
    fi
done
evojax-merge plot "$out"/{m2n2,m2n2_no_crossover,ga,ga_no_crossover} --out "$out/from_scratch.png" \
    --title "From scratch on digits (mean +- 1 SE over seeds)"
