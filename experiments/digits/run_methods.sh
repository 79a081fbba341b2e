# Sourced by the digits panel scripts: run_method CONFIG RUN_DIR runs one method, 10 seeds, in RUN_DIR,
# skipping it when finished and resuming it when interrupted (so a panel script can simply be re-run).
# Expects scripts/env.sh and scripts/host_devices.sh to have been sourced (HOST_DEVICE_ARGS).
run_method() {
    local config="$1" run_dir="$2"; shift 2  # further arguments: --set overrides for a fresh run
    if [ -f "$run_dir/summary.json" ] && grep -q '"status": "complete"' "$run_dir/summary.json"; then
        echo "$run_dir: complete, skipped"
    elif [ -d "$run_dir/checkpoints" ]; then
        nice -n 10 evojax-merge run --resume "$run_dir"
    else
        nice -n 10 evojax-merge run "$config" --out "$run_dir" "${HOST_DEVICE_ARGS[@]}" "$@"
    fi
}
