#!/usr/bin/env bash
# The main job: M2N2 from scratch on scikit-learn's digits, 10 seeds x 50,000 forward passes.
# Extra arguments go to `evojax-merge run` (e.g. --out DIR, --set run.forward_passes=5000).
source "$(dirname "$0")/env.sh"
source scripts/host_devices.sh
exec evojax-merge run experiments/digits/m2n2.yaml "${HOST_DEVICE_ARGS[@]}" "$@"
