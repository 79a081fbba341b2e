#!/usr/bin/env bash
# Both panels of the M2N2 paper's Fig. 2 on digits: run_from_scratch.sh, then run_pretrained.sh
# (each skips finished methods and resumes interrupted ones). Argument: output folder (runs/digits).
set -euo pipefail
here="$(dirname "$0")"
bash "$here/run_from_scratch.sh" "$@"
bash "$here/run_pretrained.sh" "$@"
