"""Lay a batch of independent runs over a device mesh: the seed axis is split, the data is replicated.

Runs never communicate, so the only layout that matters is which device holds which runs: a 1-D mesh
with axis ``"runs"``, ``NamedSharding(mesh, P("runs"))`` on every leaf of the run state (leading seed
axis) and a replicated copy of the training and test data on every device. XLA then compiles the vmapped
loop once per device for its share of the seeds, with no cross-device traffic inside a chunk.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evojax_merge.errors import ConfigError

RUNS = "runs"


def runs_mesh(num_devices: int | None) -> Mesh | None:
    """A 1-D mesh over the first ``num_devices`` devices (all processes'), or None for the default device."""
    if num_devices is None:
        return None
    available = jax.device_count()
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
    """Put every leaf of ``tree`` under ``sharding`` (a no-op without a mesh)."""
    if sharding is None:
        return tree
    return jax.device_put(tree, sharding)
