#!/usr/bin/env bash
# Fig. 2 (left) of the M2N2 paper: every method from scratch on digits, 10 seeds x 50,000 forward passes.
# Writes runs/digits/<method>/ for each config below that exists (CMA-ES and Sep-CMA-ES come from their
# own configs), then the figure of both panels and the tables (experiments/digits/figure.sh).
# Re-running skips finished methods and resumes interrupted ones. Argument: output folder (runs/digits).
source "$(dirname "$0")/../../scripts/env.sh"
source scripts/host_devices.sh
source experiments/digits/run_methods.sh
out="${1:-runs/digits}"
for method in m2n2 m2n2_no_crossover ga ga_no_crossover map_elites cma_es sep_cma_es; do
    config="experiments/digits/$method.yaml"
    if [ -f "$config" ]; then
        run_method "$config" "$out/$method"
    else
        echo "$config does not exist: skipped"
    fi
done
bash experiments/digits/figure.sh "$out"
