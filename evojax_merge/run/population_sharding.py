"""Score a population of candidate models over a 2-D device mesh: population axis x model axis.

Fitness evaluation of merged LLMs has two kinds of parallelism. Candidates are independent, so the
population axis splits them over device groups with no communication. A model too large for one device
is split over the model axis: every weight matrix is cut into ``model``-many slices (Megatron-style:
the output rows of the q/k/v, gate and up projections, the input columns of the o and down projections,
the vocabulary rows of the embeddings), and XLA's SPMD partitioner inserts the collectives the matmuls
need. A mesh of shape (P, 1) is pure population parallelism; (1, M) is one candidate at a time on M
devices; a GPU node or TPU slice is usually (devices / M, M) with M the smallest count that holds a model.

:func:`population_map` runs a per-candidate function under ``jax.shard_map`` that is *manual* over the
population axis (each group of devices loops over its own share of the candidates) and automatic over
the model axis (GSPMD partitions the model inside each group). Single-device evaluation is the same
function without a mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evojax_merge.errors import ConfigError

POPULATION, MODEL = "population", "model"

# Which axis of a (stacked) Llama weight the model axis cuts; counted from the end so that the same
# rule covers one layer (out, in), the stacked layers (L, out, in) and a stack of source models.
_LLAMA_SPLIT_AXIS = {
    "q_proj": -2, "k_proj": -2, "v_proj": -2, "gate_proj": -2, "up_proj": -2,  # output rows
    "o_proj": -1, "down_proj": -1,  # input columns: each device's partial sums are all-reduced
    "embed_tokens": -2, "lm_head": -2,  # vocabulary rows
}


def population_model_mesh(population_devices: int, model_devices: int = 1) -> Mesh:
    """A (population, model) mesh over the first ``population_devices * model_devices`` devices.

    The model axis is the inner (fastest-varying) one, so on a multi-host job a model's slices share a host
    (and its fast interconnect) whenever ``model_devices`` divides the devices per host.
    """
    if population_devices < 1 or model_devices < 1:
        raise ConfigError(f"population and model device counts must be >= 1, got {population_devices} x {model_devices}")
    needed, available = population_devices * model_devices, jax.device_count()
    if needed > available:
        raise ConfigError(
            f"a {population_devices} x {model_devices} population x model mesh needs {needed} devices but JAX "
            f"sees {available}; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N"
        )
    devices = np.array(jax.devices()[:needed]).reshape(population_devices, model_devices)
    return Mesh(devices, (POPULATION, MODEL))


def model_partition_spec(path: tuple, leaf: Any, model_devices: int, leading_axes: int = 0) -> P:
    """PartitionSpec cutting one parameter leaf over the model axis (replicated when it cannot be cut).

    Llama leaves are recognised by name (see ``_LLAMA_SPLIT_AXIS``); any other leaf of rank >= 2 (e.g. an
    MLP kernel) is cut along its largest axis that ``model_devices`` divides. Vectors (norms, biases, and
    the stacked per-layer norms, by name) are replicated: they are small and every slice needs them whole. ``leading_axes`` leading axes (a stack of
    source models, a population) are never cut here.
    """
    shape = leaf.shape
    spec = [None] * len(shape)
    if model_devices == 1 or len(shape) - leading_axes < 2:
        return P(*spec)
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any("norm" in n for n in names):
        return P(*spec)  # Llama's per-layer norms are (L, D): stacked vectors, replicated like vectors
    name = next((n for n in reversed(names) if n in _LLAMA_SPLIT_AXIS), None)
    if name is not None:
        axis = len(shape) + _LLAMA_SPLIT_AXIS[name]
        candidates = [axis] if shape[axis] % model_devices == 0 else []
    else:
        candidates = sorted((a for a in range(leading_axes, len(shape)) if shape[a] % model_devices == 0),
                            key=lambda a: -shape[a])
    if candidates:
        spec[candidates[0]] = MODEL
    return P(*spec)


def model_shardings(tree: Any, mesh: Mesh, leading_axes: int = 0) -> Any:
    """NamedShardings (one per leaf of ``tree``) that split weights over ``mesh``'s model axis.

    ``leading_axes``: axes in front of every leaf's own shape (1 for source models stacked on axis 0).
    """
    model_devices = mesh.shape[MODEL]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, model_partition_spec(path, leaf, model_devices, leading_axes)), tree
    )


def check_population_divisible(population_size: int, mesh: Mesh | None):
    """Candidates are not padded: a padded candidate costs a whole evaluation for nothing."""
    if mesh is not None and population_size % mesh.shape[POPULATION]:
        raise ConfigError(
            f"a population of {population_size} candidates cannot be split evenly over "
            f"{mesh.shape[POPULATION]} population device groups; use a multiple of {mesh.shape[POPULATION]}"
        )


def population_map(
    per_candidate: Callable[[Any, Any, Any], Any],
    mesh: Mesh | None,
    batch_size: int = 1,
    models_leading_axes: int = 1,
) -> Callable[[Any, Any, Any], Any]:
    """Compile ``(candidates, models, data) -> outputs`` applying ``per_candidate(candidate, models, data)``.

    ``candidates`` is a pytree with a leading population axis (genomes, or stacked models); ``models`` the
    weights every candidate reads (e.g. the source models of a merge, stacked on a leading axis), laid out
    by :func:`model_shardings` (weight matrices cut over the model axis; ``models_leading_axes`` stacking
    axes in front of each weight, 1 for stacked source models, 0 for one model); ``data`` is replicated (token
    ids, labels, keys). Without a mesh, candidates run ``batch_size`` at a time (``lax.map``) on the
    default device. With a mesh, each population group gets ``population / groups`` consecutive
    candidates and loops over them the same way. Outputs have the leading population axis, in order.
    """

    def local(candidates, models, data):
        return jax.lax.map(lambda c: per_candidate(c, models, data), candidates, batch_size=batch_size)

    if mesh is None:
        return jax.jit(local)

    compiled = jax.jit(jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(POPULATION), P(), P()),
        out_specs=P(POPULATION),
        axis_names={POPULATION},  # manual over candidates; the model axis stays automatic (GSPMD)
    ))

    def run(candidates, models, data):
        check_population_divisible(jax.tree.leaves(candidates)[0].shape[0], mesh)
        candidates = jax.device_put(candidates, NamedSharding(mesh, P(POPULATION)))
        models = jax.device_put(models, model_shardings(models, mesh, models_leading_axes))
        data = jax.device_put(data, NamedSharding(mesh, P()))
        return compiled(candidates, models, data)

    return run
