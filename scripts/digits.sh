#!/usr/bin/env bash
# The main job: M2N2 from scratch on scikit-learn's digits, 10 seeds x 50,000 forward passes.
# Extra arguments go to `evojax-merge run` (e.g. --out DIR, --set run.evaluations=5000, --no-progress).
# Devices come from the machine (scripts/host_devices.sh): a GPU/TPU when JAX sees one, else 10 XLA
# host devices on the CPU, one per seed; EVOJAX_MERGE_HOST_DEVICES=0 or =N overrides.
# An interrupted run (Ctrl-C) resumes with `bash scripts/digits.sh --resume RUN_DIR [--no-progress]`
# (the command the CLI prints, from EVOJAX_MERGE_RESUME_WITH): the run's config.yaml defines it (no
# config, no --set), and on a CPU the script forces as many host devices as its run.devices asks for.
# Paths are relative to the repository root: the script runs there.
source "$(dirname "$0")/env.sh"
export EVOJAX_MERGE_RESUME_WITH="bash scripts/digits.sh"
resuming=0 resume_dir="" previous=""
for arg in "$@"; do
    if [ "$previous" = --resume ]; then resume_dir="$arg"; fi
    case "$arg" in
        --resume) resuming=1 ;;
        --resume=*) resuming=1 resume_dir="${arg#--resume=}" ;;
    esac
    previous="$arg"
done
source scripts/host_devices.sh
if [ "$resuming" = 1 ]; then
    exec evojax-merge run "$@"
fi
exec evojax-merge run experiments/digits/m2n2.yaml "${HOST_DEVICE_ARGS[@]}" "$@"
