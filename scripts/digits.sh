#!/usr/bin/env bash
# The main job: M2N2 from scratch on scikit-learn's digits, 10 seeds x 50,000 forward passes.
# Extra arguments go to `evojax-merge run` (e.g. --out DIR, --set run.forward_passes=5000).
#
# On a CPU each of the 10 seeds gets its own XLA host device (run.devices=10): the many small operations
# of a generation then run on all cores in parallel, about 1.5x faster on 2 cores than one device; the
# results are the same. On a GPU/TPU machine set EVOJAX_MERGE_HOST_DEVICES=0 to use the accelerator.
source "$(dirname "$0")/env.sh"
host_devices="${EVOJAX_MERGE_HOST_DEVICES:-10}"
if [ "$host_devices" != 0 ]; then
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$host_devices"
    set -- --set "run.devices=$host_devices" "$@"
fi
exec evojax-merge run experiments/digits/m2n2.yaml "$@"
