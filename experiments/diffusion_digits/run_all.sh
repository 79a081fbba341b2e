#!/usr/bin/env bash
# The diffusion-merging experiment end to end: seeds (resumable), the three searches, the comparison.
#   bash experiments/diffusion_digits/run_all.sh
# An interrupted search resumes with `evojax-merge run --resume runs/<its run directory>`.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
python experiments/diffusion_digits/make_seeds.py --out runs/diffusion_seeds
for config in m2n2 m2n2_one_split cma_es m2n2_recipe; do
  evojax-merge run "experiments/diffusion_digits/$config.yaml" --out "runs/diffusion_$config"
done
python experiments/diffusion_digits/compare.py runs/diffusion_m2n2 runs/diffusion_m2n2_one_split runs/diffusion_cma_es \
  runs/diffusion_m2n2_recipe --out experiments/diffusion_digits/results
evojax-merge plot runs/diffusion_m2n2 runs/diffusion_m2n2_one_split runs/diffusion_cma_es runs/diffusion_m2n2_recipe \
  --out experiments/diffusion_digits/results/test_score.png --title "Digit generators, test samples"
