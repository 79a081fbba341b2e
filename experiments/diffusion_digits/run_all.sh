#!/usr/bin/env bash
# The diffusion-merging experiment end to end: seeds (resumable), the three searches, the comparison.
#   bash experiments/diffusion_digits/run_all.sh
# An interrupted search resumes with `evojax-merge run --resume runs/<its run directory>`.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
python experiments/diffusion_digits/make_seeds.py --out runs/diffusion_seeds
for config in m2n2 cma_es m2n2_one_split; do
  evojax-merge run "experiments/diffusion_digits/$config.yaml" --out "runs/diffusion_$config"
done
python experiments/diffusion_digits/compare.py runs/diffusion_m2n2 runs/diffusion_cma_es runs/diffusion_m2n2_one_split \
  --out experiments/diffusion_digits/results
