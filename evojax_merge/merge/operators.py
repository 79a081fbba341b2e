"""Merge operators: pure functions on stacked tensors, lifted to parameter pytrees, with a registry.

Every method has one signature::

    method(models, base=None, *, key=None, **params) -> merged

where ``models`` stacks the N aligned tensors on axis 0 ([N, ...]), ``base`` is the base model's tensor
([...]) or None, ``key`` a PRNG key (used by the random sparsifiers) and ``params`` the method's
parameters: per-model ones (``weight``, ``density``, ``gamma``, ``epsilon``) are scalars or [N] arrays,
global ones (``lambda_``, ``t``) scalars; numeric parameters may be traced, so a whole population of
recipes can be vmapped. Options that change the computation (``normalize``, ``rescale``) are Python
values. :func:`merge_trees` applies a method leaf by leaf to pytrees.

The task-vector methods are one pipeline (Ilharco et al. 2023; Yadav et al. 2023; Yu et al. 2024)::

    task_vectors -> sparsify (per model) -> weight -> elect_sign (optional) -> combine -> base + lambda *

and differ only in the sparsifier and whether the sign is elected; see :data:`METHODS`.

Defaults follow mergekit where it and the papers agree; where they differ we follow the paper and offer
mergekit's behaviour as an option: DARE/DELLA rescale by the keep probability (``rescale="density"``),
``rescale="l1"`` gives mergekit's norm-preserving rescale.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from evojax_merge.merge import sparsify as sp
from evojax_merge.merge.multislerp import multislerp, slerp
from evojax_merge.merge.registry import SPECS, MethodSpec, get_spec

# ----------------------------------------------------------------------------- shared pieces


def per_model(value, n: int) -> jax.Array:
    """Broadcasts a scalar or [N] parameter to float32 [N]."""
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (n,))


def model_sum(xs: Sequence[jax.Array]) -> jax.Array:
    """Sum of per-model tensors, unrolled into N - 1 fused elementwise adds.

    The pipeline keeps the N models as a Python list rather than reducing over the axis 0 of an
    [N, ...] stack: XLA:CPU lowers a reduction over a short leading axis to a strided loop ~5x slower
    than fused elementwise adds, and a list keeps each sparsifier's selection per model without a vmap.
    """
    return functools.reduce(operator.add, xs)


def task_vectors(models: jax.Array, base: jax.Array) -> list[jax.Array]:
    """``tau_i = theta_i - theta_b`` for a stack [N, ...] and a base [...], as a list of N tensors."""
    b = base.astype(jnp.float32)
    return [models[i].astype(jnp.float32) - b for i in range(models.shape[0])]


def sparsify_each(
    taus: Sequence[jax.Array], density, key, sparsifier: Callable, **options
) -> list[jax.Array]:
    """Applies a sparsifier to every task vector with its own density and its own key.

    Args:
      taus: N task vectors.
      density: scalar or [N].
      key: PRNG key (model i uses the i-th of ``split(key, N)``) or None for deterministic sparsifiers.
      sparsifier: one of :data:`sparsify.SPARSIFIERS`.
      **options: per-model ([N]) or shared numeric options (gamma, epsilon) and string ones (rescale).

    Returns:
      N sparsified task vectors.
    """
    n = len(taus)
    density = per_model(density, n)
    keys = model_keys(key if key is not None else jax.random.key(0), n)
    static = {k: v for k, v in options.items() if isinstance(v, str)}
    numeric = {k: per_model(v, n) for k, v in options.items() if not isinstance(v, str)}
    return [
        sparsifier(tau, density[i], keys[i], **{k: v[i] for k, v in numeric.items()}, **static)
        for i, tau in enumerate(taus)
    ]


def model_keys(key: jax.Array, n: int) -> list[jax.Array]:
    """N distinct keys for the N models' masks (:func:`sparsify.derive_key` on word 0)."""
    return [sp.derive_key(key, i, word=0) for i in range(n)]


def weigh(taus: Sequence[jax.Array], weights: jax.Array) -> list[jax.Array]:
    """``w_i * tau_i`` for each model (weights [N])."""
    return [tau * weights[i] for i, tau in enumerate(taus)]


def elect_sign(weighted: Sequence[jax.Array], method: str = "sum") -> list[jax.Array]:
    """TIES sign election: which entries of each model agree with the elected sign.

    Args:
      weighted: N weighted (sparsified) task vectors.
      method: ``"sum"`` elects the sign of the sum of the entries (the paper's total mass);
        ``"count"`` the sign of the majority count. Ties (sum 0) elect +.

    Returns:
      N boolean masks: True where an entry is non-zero and has the elected sign.
    """
    signs = [jnp.sign(x) for x in weighted]
    votes = model_sum(weighted if method == "sum" else signs)
    elected = jnp.where(votes >= 0, 1.0, -1.0)
    return [s == elected for s in signs]


def combine(
    weighted: Sequence[jax.Array], weights: jax.Array, agree=None, normalize: bool = False
) -> jax.Array:
    """Sums weighted task vectors, optionally only where they agree, optionally normalised.

    With ``agree`` and ``normalize`` this is the TIES disjoint mean: each entry divided by the total
    weight of the models that kept it with the elected sign.

    Args:
      weighted: N weighted task vectors.
      weights: [N] weights.
      agree: optional N boolean masks from :func:`elect_sign`.
      normalize: divide by the (agreeing) weight sum; a zero divisor counts as 1.

    Returns:
      The combined task vector.
    """
    if agree is None:
        mixed = model_sum(weighted)
        divisor = jnp.sum(weights)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    else:
        mixed = model_sum([jnp.where(a, x, 0.0) for a, x in zip(agree, weighted)])
        divisor = model_sum([jnp.where(a, weights[i], 0.0) for i, a in enumerate(agree)])
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    return mixed / divisor if normalize else mixed


def task_vector_merge(
    models: jax.Array,
    base: jax.Array,
    *,
    key=None,
    weight=1.0,
    density=1.0,
    lambda_=1.0,
    sparsifier: Callable | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    **sparsify_options,
) -> jax.Array:
    """The generic pipeline behind every task-vector method.

    Args:
      models: [N, ...] fine-tuned tensors.
      base: [...] base tensor.
      key: PRNG key for random sparsifiers.
      weight: per-model weight w_i (scalar or [N]); negative values are allowed.
      density: per-model density for the sparsifier.
      lambda_: global scale of the combined task vector.
      sparsifier: None (dense) or a function of :mod:`sparsify`.
      consensus: None, ``"sum"`` or ``"count"`` (TIES sign election).
      normalize: divide by the (agreeing) weight sum.
      **sparsify_options: passed to the sparsifier (gamma, epsilon, rescale).

    Returns:
      ``base + lambda_ * combine(...)`` in the base tensor's dtype.
    """
    if base is None:
        raise ValueError("this merge method needs a base model")
    taus = task_vectors(models, base)
    if sparsifier is not None:
        taus = sparsify_each(taus, density, key, sparsifier, **sparsify_options)
    weights = per_model(weight, len(taus))
    weighted = weigh(taus, weights)
    agree = elect_sign(weighted, consensus) if consensus else None
    mixed = combine(weighted, weights, agree, normalize)
    return (base.astype(jnp.float32) + jnp.asarray(lambda_, jnp.float32) * mixed).astype(base.dtype)


# ----------------------------------------------------------------------------- methods


def linear(models: jax.Array, base=None, *, key=None, weight=1.0, normalize=True) -> jax.Array:
    """Weighted average of the models (model soup; Wortsman et al., ICML 2022).

    Args:
      models: [N, ...]; base, key: unused.
      weight: scalar or [N].
      normalize: divide by the sum of weights (a ~0 sum counts as 1).

    Returns:
      ``sum_i w_i theta_i`` (divided by ``sum_i w_i`` when normalize).
    """
    del base, key
    weights = per_model(weight, models.shape[0])
    weighted = weigh([models[i].astype(jnp.float32) for i in range(models.shape[0])], weights)
    return combine(weighted, weights, None, normalize).astype(models.dtype)


def model_stock(models: jax.Array, base=None, *, key=None, filter_wise=False) -> jax.Array:
    """Model Stock (Jang et al., 2024): interpolate the fine-tunes' mean towards the base.

    ``t = N cos / (1 + (N - 1) cos)`` with cos the mean pairwise cosine of the task vectors (over the
    whole tensor, or per row when ``filter_wise``); result ``t * mean_i theta_i + (1 - t) * theta_b``.

    Args:
      models: [N, ...] with N >= 2 fine-tuned tensors.
      base: [...] base tensor (required).
      key: unused.
      filter_wise: one angle per row instead of one per tensor.

    Returns:
      The merged tensor.
    """
    del key
    if base is None:
        raise ValueError("model_stock needs a base model")
    n = models.shape[0]
    if n < 2:
        raise ValueError("model_stock needs at least two fine-tuned models besides the base")
    taus = jnp.stack(task_vectors(models, base))
    # rows: [N, R, K]; one row per tensor, or per output row (a vector is a single row).
    by_row = filter_wise and taus.ndim >= 3
    rows = taus.reshape(n, taus.shape[1], -1) if by_row else taus.reshape(n, 1, -1)
    norms = jnp.linalg.norm(rows, axis=-1)  # [N, R]
    gram = jnp.einsum("irk,jrk->ijr", rows, rows)  # [N, N, R]
    cos = jnp.clip(gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-6), -1.0, 1.0)
    iu = jnp.triu_indices(n, k=1)
    mean_cos = jnp.mean(cos[iu[0], iu[1]], axis=0)  # [R]
    t = n * mean_cos / (1.0 + (n - 1) * mean_cos)
    t = t.reshape((-1,) + (1,) * (taus.ndim - 2)) if by_row else t[0]
    mean = model_sum([models[i].astype(jnp.float32) for i in range(n)]) / n
    return (t * mean + (1.0 - t) * base.astype(jnp.float32)).astype(base.dtype)


def passthrough(models: jax.Array, base=None, *, key=None, scale=1.0) -> jax.Array:
    """Copies the tensor of the single source model, optionally scaled (the basis of layer stacking).

    Args:
      models: [1, ...]; base, key: unused.
      scale: multiplier.

    Returns:
      ``scale * models[0]``.
    """
    del base, key
    if models.shape[0] != 1:
        raise ValueError(f"passthrough takes exactly one model per tensor, got {models.shape[0]}")
    return (models[0].astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(models.dtype)


def _task_method(sparsifier=None, consensus=None, normalize=False, **defaults):
    """Builds a named task-vector method from the shared pipeline (an option is a keyword)."""

    def method(models, base=None, *, key=None, normalize=normalize, **params):
        return task_vector_merge(
            models,
            base,
            key=key,
            sparsifier=sparsifier,
            consensus=consensus,
            normalize=normalize,
            **{**defaults, **params},
        )

    return method


@dataclasses.dataclass(frozen=True)
class MergeMethod(MethodSpec):
    """A registry entry: a :class:`registry.MethodSpec` with its operator ``fn``."""

    fn: Callable | None = None


_OPERATORS: dict[str, Callable] = {
    "linear": linear,
    "slerp": slerp,
    "multislerp": multislerp,
    "passthrough": passthrough,
    "model_stock": model_stock,
    "task_arithmetic": _task_method(),
    "ties": _task_method(sp.magnitude, "sum", normalize=True),
    "dare_linear": _task_method(sp.random_drop),
    "dare_ties": _task_method(sp.random_drop, "sum"),
    "breadcrumbs": _task_method(sp.magnitude_outliers),
    "breadcrumbs_ties": _task_method(sp.magnitude_outliers, "sum"),
    "della": _task_method(sp.della_magprune, "sum", normalize=True),
    "della_linear": _task_method(sp.della_magprune),
}
METHODS: dict[str, MergeMethod] = {
    name: MergeMethod(**dataclasses.asdict(SPECS[name]), fn=fn) for name, fn in _OPERATORS.items()
}


def get_method(name: str) -> MergeMethod:
    """Looks a method up by its mergekit name.

    Raises:
      ConfigError: unknown name (the message lists the known ones).
    """
    return METHODS[get_spec(name).name]


def merge_tensors(name: str, models, base=None, *, key=None, **params) -> jax.Array:
    """Merges one stack of tensors with a method given by name (see :data:`METHODS`)."""
    return get_method(name).fn(models, base, key=key, **params)


def merge_trees(
    name: str,
    models: Any,
    base: Any = None,
    *,
    key=None,
    leaf_params: Callable[[str, Any], Mapping[str, Any]] | None = None,
    **params,
) -> Any:
    """Applies a method leaf by leaf to aligned parameter pytrees.

    Args:
      name: method name.
      models: a pytree whose leaves are stacked [N, ...] (e.g. ``jax.tree.map(lambda *x: jnp.stack(x),
        *trees)``).
      base: a pytree of the same structure with unstacked leaves, or None.
      key: PRNG key; each leaf gets ``sparsify.derive_key(key, leaf_index)`` so masks differ.
      leaf_params: optional ``(path_string, leaf) -> params`` overriding ``params`` per leaf (per-layer
        recipes).
      **params: method parameters shared by all leaves.

    Returns:
      The merged pytree (unstacked leaves).
    """
    fn = get_method(name).fn
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(models)
    base_leaves = (
        [None] * len(paths_leaves) if base is None else jax.tree_util.tree_leaves(base)
    )
    if key is None:
        key = jax.random.key(0)
    out = []
    for i, ((path, leaf), b) in enumerate(zip(paths_leaves, base_leaves)):
        p = dict(params)
        if leaf_params is not None:
            p.update(leaf_params(jax.tree_util.keystr(path), leaf))
        out.append(fn(leaf, b, key=sp.derive_key(key, i), **p))
    return jax.tree_util.tree_unflatten(treedef, out)


def stack_trees(*trees) -> Any:
    """Stacks aligned pytrees leaf by leaf on a new axis 0 (the ``models`` argument of the operators)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

