#!/usr/bin/env bash
# Fig. 2 (left) of the M2N2 paper: every method from scratch on digits, 10 seeds x 50,000 forward passes.
# Writes runs/digits/<method>/ for each config below that exists (CMA-ES and Sep-CMA-ES come from their
# own configs), then the figure of both panels and the tables (experiments/digits/figure.sh).
# Re-running skips finished methods and resumes interrupted ones. Argument: output folder (runs/digits).
# Devices as scripts/host_devices.sh picks them: the GPU/TPU when JAX sees one, else 10 XLA host devices
# on the CPU (one per seed; EVOJAX_MERGE_HOST_DEVICES=0 or =N overrides), also for resumed methods.
source "$(dirname "$0")/../../scripts/env.sh"
source scripts/host_devices.sh
source experiments/digits/run_methods.sh
out="${1:-runs/digits}"
# Full CMA-ES on the 19,210 raw weights needs ~6 GB and ~75 min per seed on an idle 2-core CPU (13 lazy
# eigendecompositions of the 19,210^2 covariance, ~4.7 min each): 10 seeds vmapped would need ~60 GB. It
# runs only with WITH_FULL_CMA_ES=1 (cma_es.yaml, evosax's CSA step size) or WITH_FULL_CMA_ES_TPA=1
# (cma_es_tpa.yaml, pycma's TPA, which stalls here), one seed at a time (runs/digits/<method>/seed-N;
# the figure joins them over the passes every seed has reached). Sep-CMA-ES always runs.
methods="m2n2 m2n2_no_crossover ga ga_no_crossover map_elites sep_cma_es"
full_cma_es=()
[ "${WITH_FULL_CMA_ES:-0}" = 1 ] && full_cma_es+=(cma_es)
[ "${WITH_FULL_CMA_ES_TPA:-0}" = 1 ] && full_cma_es+=(cma_es_tpa)
for method in "${full_cma_es[@]}"; do
    for seed in 42 43 44 45 46 47 48 49 50 51; do
        run_method "experiments/digits/$method.yaml" "$out/$method/seed-$seed" --set "run.seeds=[$seed]" --set run.devices=null
    done
done
for method in $methods; do
    config="experiments/digits/$method.yaml"
    if [ -f "$config" ]; then
        run_method "$config" "$out/$method"
    else
        echo "$config does not exist: skipped"
    fi
done
bash experiments/digits/figure.sh "$out"
