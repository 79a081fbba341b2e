# Sourced by the digits scripts: on a CPU give each of the 10 seeds its own XLA host device, so the many
# small operations of a generation run on all cores in parallel (about 1.5x faster on 2 cores than one
# device; the results are the same). Sets HOST_DEVICE_ARGS for `evojax-merge run` with a new config.
# On a GPU/TPU machine set EVOJAX_MERGE_HOST_DEVICES=0 to use the accelerator instead.
host_devices="${EVOJAX_MERGE_HOST_DEVICES:-10}"
HOST_DEVICE_ARGS=()
if [ "$host_devices" != 0 ]; then
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$host_devices"
    HOST_DEVICE_ARGS=(--set "run.devices=$host_devices")
fi
