#!/usr/bin/env bash
# Both panels of the M2N2 paper's Fig. 2 from whichever digits run directories exist:
# runs/digits/fig2.png and the markdown tables runs/digits/fig2.md. Argument: output folder (runs/digits).
source "$(dirname "$0")/../../scripts/env.sh"
out="${1:-runs/digits}"
scratch=() pretrained=()
for method in m2n2 m2n2_no_crossover ga ga_no_crossover map_elites cma_es sep_cma_es; do
    scratch+=("$out/$method")
done
for method in m2n2 m2n2_no_attraction m2n2_no_split_point map_elites ga; do
    pretrained+=("$out/pretrained/$method")
done
evojax-merge plot --skip-missing --out "$out/fig2.png" --table "$out/fig2.md" \
    --panel "From scratch (mean +- 1 SE over seeds)" "${scratch[@]}" \
    --panel "From pre-trained seeds (mean +- 1 SE over seeds)" "${pretrained[@]}" "$out/pretrained/slerp_line.json"
