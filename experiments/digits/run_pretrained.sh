#!/usr/bin/env bash
# Fig. 2 (right) of the M2N2 paper: every method from the two pre-trained specialist seeds on digits,
# 10 seeds x 10,000 forward passes, plus the brute-force SLERP line between the two seeds. Writes
# runs/digits/pretrained/<method>/ and slerp_line.json, then the figure of both panels and the tables
# (experiments/digits/figure.sh). Re-running skips finished methods and resumes interrupted ones.
# Argument: output folder of both panels (runs/digits).
# Devices as scripts/host_devices.sh picks them: the GPU/TPU when JAX sees one, else 10 XLA host devices
# on the CPU (one per seed; EVOJAX_MERGE_HOST_DEVICES=0 or =N overrides), also for resumed methods.
source "$(dirname "$0")/../../scripts/env.sh"
source scripts/host_devices.sh
source experiments/digits/run_methods.sh
out="${1:-runs/digits}/pretrained"
mkdir -p "$out"
if [ ! -f "$out/slerp_line.json" ]; then
    nice -n 10 evojax-merge slerp-line experiments/digits/pretrained/m2n2.yaml --out "$out/slerp_line.json"
fi
for method in m2n2 m2n2_no_attraction m2n2_no_split_point map_elites ga; do
    run_method "experiments/digits/pretrained/$method.yaml" "$out/$method"
done
bash experiments/digits/figure.sh "${1:-runs/digits}"
