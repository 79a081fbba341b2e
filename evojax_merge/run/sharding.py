"""Lay a batch of independent runs over a device mesh: the seed axis is split, the data is replicated.

Runs never communicate, so the only layout that matters is which device holds which runs: a 1-D mesh
with axis ``"runs"``, ``NamedSharding(mesh, P("runs"))`` on every leaf of the run state (leading seed
axis) and a replicated copy of the training and test data on every device. XLA then compiles the vmapped
loop once per device for its share of the seeds, with no cross-device traffic inside a chunk. The same
mesh spans the devices of several processes after :func:`initialize_distributed` (multi-host).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evojax_merge.errors import ConfigError

RUNS = "runs"


def runs_mesh(num_devices: int | None) -> Mesh | None:
    """A 1-D mesh over the first ``num_devices`` devices (all processes'), or None for the default device."""
    available = jax.device_count()
    if jax.process_count() > 1 and num_devices != available:
        # Every process must hold a share of the seeds, or it would have nothing to compute or checkpoint.
        raise ConfigError(
            f"config key 'run.devices' must be the number of devices of all processes ({available}) "
            f"in a multi-process run, got {num_devices}"
        )
    if num_devices is None:
        return None
    if num_devices > available:
        raise ConfigError(
            f"config key 'run.devices' asks for {num_devices} devices but JAX sees {available} "
            f"({jax.devices()[0].platform}); on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N"
        )
    return Mesh(np.array(jax.devices()[:num_devices]), (RUNS,))


def check_divisible(num_runs: int, num_devices: int | None):
    """The seed axis is checked, not padded: a padded run would cost a device's share of compute for nothing."""
    if num_devices is not None and num_runs % num_devices:
        raise ConfigError(
            f"config key 'run.seeds' lists {num_runs} seeds, which run.devices={num_devices} does not divide; "
            f"use a multiple of {num_devices} seeds"
        )


def run_shardings(mesh: Mesh | None):
    """(sharding of run-state leaves, sharding of data), or (None, None) without a mesh."""
    if mesh is None:
        return None, None
    return NamedSharding(mesh, P(RUNS)), NamedSharding(mesh, P())


def place(tree, sharding):
    """Put every leaf of ``tree`` under ``sharding`` (a no-op without a mesh).

    Built with ``make_array_from_callback`` so that it also works when the mesh spans several processes:
    every process holds the same host value and hands over only the slices its own devices need.
    """
    if sharding is None:
        return tree

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def initialize_distributed():
    """Join a multi-process JAX job before any computation (``evojax-merge run --distributed``).

    The coordinator, process count and id come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` when set; otherwise ``jax.distributed.initialize`` detects them itself (TPU pod
    slices, SLURM, Open MPI). They are not config keys because they describe a launch, not an
    experiment: the same config.yaml reproduces the run on any number of hosts.
    """
    import os

    env = os.environ
    kwargs = {}
    try:
        if env.get("JAX_COORDINATOR_ADDRESS"):
            kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    except ValueError as e:
        raise ConfigError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers: {e}") from e
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot join the distributed job ({kwargs or 'auto-detected'}): {e}") from e


def is_writer() -> bool:
    """Only process 0 writes the run directory's files (every process computes the same values)."""
    return jax.process_index() == 0


def agree(flag: bool) -> bool:
    """Process 0's value of ``flag`` on every process, so all stop at the same logged point."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
