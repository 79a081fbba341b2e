# Sourced by the digits scripts (after scripts/env.sh): picks the devices from the machine.
# - JAX sees a GPU/TPU: run on it as JAX would (no forced host devices, no run.devices override).
# - JAX sees only the CPU (or the probe fails): give each of the 10 seeds its own XLA host device, so
#   the many small operations of a generation run on all cores in parallel (about 1.5x faster on 2
#   cores than one device; the results are the same): exports JAX_PLATFORMS=cpu and XLA_FLAGS
#   --xla_force_host_platform_device_count=10, and sets HOST_DEVICE_ARGS=(--set run.devices=10) for
#   `evojax-merge run` with a new config.
# EVOJAX_MERGE_HOST_DEVICES overrides the probe: 0 = never force host devices; N = force N (on the CPU).
# A resumed run cannot take --set: its config.yaml defines run.devices. A script that resumes sets
# resume_dir=RUN_DIR before sourcing this; then HOST_DEVICE_ARGS stays empty and, where host devices
# are forced, their count is RUN_DIR/config.yaml's run.devices (none when it is null).
# The probe imports JAX once (about 2 s); it inherits the caller's JAX_PLATFORMS, if any.
jax_backend() {  # JAX's default backend (cpu, gpu, tpu, ...); cpu when the probe fails or hangs
    local timeout=() backend
    command -v timeout >/dev/null && timeout=(timeout 120)
    backend="$(XLA_PYTHON_CLIENT_PREALLOCATE=false "${timeout[@]}" python -c \
        'import jax; print(jax.default_backend())' 2>/dev/null)" || backend=cpu
    echo "${backend:-cpu}"
}
if [ -n "${EVOJAX_MERGE_HOST_DEVICES:-}" ]; then
    host_devices="$EVOJAX_MERGE_HOST_DEVICES"
elif [ "$(jax_backend)" = cpu ]; then
    host_devices=10
else
    host_devices=0
fi
HOST_DEVICE_ARGS=()
if [ -n "${resume_dir:-}" ]; then
    if [ "$host_devices" != 0 ]; then  # the run's own count; 0 if null or unreadable (the CLI then says why)
        host_devices="$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["run"].get("devices") or 0)' \
            "$resume_dir/config.yaml" 2>/dev/null)" || host_devices=0
    fi
elif [ "$host_devices" != 0 ]; then
    HOST_DEVICE_ARGS=(--set "run.devices=$host_devices")
fi
if [ "$host_devices" != 0 ]; then
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$host_devices"
fi
