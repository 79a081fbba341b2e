#!/usr/bin/env bash
# Both panels of the M2N2 paper's Fig. 2 from whichever digits run directories exist:
# runs/digits/fig2.png and the markdown tables runs/digits/fig2.md. Argument: output folder (runs/digits).
# A method with no run directory there is taken from experiments/digits/results/ when it has one: the
# committed metrics of earlier runs (config.yaml, metrics.csv and summary.json per run, no checkpoints).
source "$(dirname "$0")/../../scripts/env.sh"
out="${1:-runs/digits}"
committed=experiments/digits/results
run_or_committed() {  # the run directory of method $1, or its committed results
    if [ ! -e "$out/$1" ] && [ -e "$committed/$1" ]; then echo "$committed/$1"; else echo "$out/$1"; fi
}
scratch=() pretrained=()
for method in m2n2 m2n2_no_crossover ga ga_no_crossover map_elites cma_es cma_es_tpa sep_cma_es; do
    scratch+=("$(run_or_committed "$method")")
done
for method in m2n2 m2n2_no_attraction m2n2_no_split_point map_elites ga; do
    pretrained+=("$(run_or_committed "pretrained/$method")")
done
evojax-merge plot --skip-missing --out "$out/fig2.png" --table "$out/fig2.md" \
    --panel "From scratch (mean +- 1 SE over seeds)" "${scratch[@]}" \
    --panel "From pre-trained seeds (mean +- 1 SE over seeds)" "${pretrained[@]}" "$(run_or_committed pretrained/slerp_line.json)"
