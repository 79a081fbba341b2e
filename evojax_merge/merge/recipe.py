"""Recipes: the genome of an evolutionary parameter-space merge and its decoding into merged weights.

A genome is a flat float vector (what evosax strategies and M2N2 search over). It holds, for every model,
every group of ``layer_group`` consecutive layers (plus one group for the tensors outside the layers:
embeddings, final norm, head) and every tensor family (attention / MLP / embeddings / norms), one value per
gene of the merge method (``weight``, ``density``, ``t``, ...). This is the parameter-space search of
Akiba et al., "Evolutionary Optimization of Model Merging Recipes" (Nature Machine Intelligence, 2025),
where per-layer TIES/DARE weights and densities are evolved.

Genes decode like mergekit parameters: densities and ``t`` are clamped to [0, 1], weights may be
negative unless ``allow_negative_weights=False`` (then clamped at 0).

:func:`merge_genome` maps one genome to a merged pytree; it is pure, so :func:`merge_population` vmaps
it over a population, in chunks of ``batch_size`` genomes via ``lax.map`` so that the merge's
intermediates (task vectors, masks) exist for at most ``batch_size`` genomes at once. Its result still
holds P merged models; when a score per genome is all that is needed (the evolutionary loop),
:func:`evaluate_population` merges and scores inside each chunk, so at most ``batch_size`` merged models
exist at any time and only the scores are returned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from evojax_merge.errors import ConfigError
from evojax_merge.merge.names import FAMILIES, tensor_family, tensor_layer
from evojax_merge.merge.operators import get_method
from evojax_merge.merge.sparsify import derive_key

# Gene ranges (lower, upper) applied at decode time; None means unbounded.
GENE_BOUNDS = {
    "weight": (None, None),
    "density": (0.0, 1.0),
    "t": (0.0, 1.0),
    "gamma": (0.0, 1.0),
    "epsilon": (0.0, 1.0),
    "lambda_": (None, None),
}


@dataclasses.dataclass(frozen=True)
class RecipeSpace:
    """Static description of a genome's layout.

    Attributes:
      n_models: number of models merged (not counting the base).
      num_layers: decoder layers of the architecture.
      method: merge method name (see :data:`operators.METHODS`).
      genes: evolved parameters, e.g. ("weight", "density") or ("t",). Genes the method takes per
        model (weight, density, gamma, epsilon) are read per model; global ones (t, lambda_) from
        model 0's slot.
      layer_group: consecutive layers sharing genes (1 = per layer; num_layers = one group).
      families: tensor families with their own genes.
      allow_negative_weights: else weights are clamped at 0.
      options: fixed method options, e.g. (("normalize", True), ("rescale", "density")).
      family_of: maps a tensor path to its family name for models whose parameter names
        :func:`tensor_family` does not know (default: :func:`tensor_family`).
    """

    n_models: int
    num_layers: int
    method: str = "ties"
    genes: tuple[str, ...] = ("weight", "density")
    layer_group: int = 1
    families: tuple[str, ...] = FAMILIES
    allow_negative_weights: bool = True
    options: tuple[tuple[str, Any], ...] = ()
    family_of: Callable[[str], str] | None = None

    def __post_init__(self):
        get_method(self.method)
        unknown = [g for g in self.genes if g not in GENE_BOUNDS]
        if unknown:
            raise ConfigError(f"unknown genes {unknown}; known: {sorted(GENE_BOUNDS)}")
        if self.layer_group < 1 or self.num_layers < 0:
            raise ConfigError("layer_group must be >= 1 and num_layers >= 0")

    @property
    def n_groups(self) -> int:
        """Layer groups plus one group for the tensors outside the layers."""
        return math.ceil(self.num_layers / self.layer_group) + 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(models, groups, families, genes)."""
        return (self.n_models, self.n_groups, len(self.families), len(self.genes))

    @property
    def size(self) -> int:
        """Length of the flat genome."""
        return math.prod(self.shape)

    def slot(self, path: str) -> tuple[int, int]:
        """(group, family) indices of a tensor, from its name."""
        layer = tensor_layer(path)
        family = (self.family_of or tensor_family)(path)
        if family not in self.families:
            raise ConfigError(f"tensor {path!r} is in family {family!r}, not in {self.families}")
        if layer is None:
            group = self.n_groups - 1
        else:
            if layer >= self.num_layers:
                raise ConfigError(f"tensor {path!r} is in layer {layer} >= num_layers {self.num_layers}")
            group = layer // self.layer_group
        return group, self.families.index(family)

    def init(self, **values: float) -> jax.Array:
        """A genome with every gene set to a constant (e.g. ``init(weight=0.5, density=0.7)``)."""
        per_gene = jnp.asarray([values.get(g, 0.0) for g in self.genes], jnp.float32)
        return jnp.broadcast_to(per_gene, self.shape).reshape(-1)


def decode(space: RecipeSpace, genome: jax.Array) -> dict[str, jax.Array]:
    """Flat genome -> ``{gene: [models, groups, families]}``, clamped like mergekit parameters.

    Args:
      space: the genome layout.
      genome: float [space.size].

    Returns:
      A dict of clamped gene arrays.
    """
    genes = jnp.asarray(genome, jnp.float32).reshape(space.shape)
    out = {}
    for i, name in enumerate(space.genes):
        lo, hi = GENE_BOUNDS[name]
        if name == "weight" and not space.allow_negative_weights:
            lo = 0.0
        value = genes[..., i]
        if lo is not None or hi is not None:
            value = jnp.clip(value, lo, hi)
        out[name] = value
    return out


def merge_genome(
    space: RecipeSpace, genome: jax.Array, models: Any, base: Any = None, key=None
) -> Any:
    """Merges aligned parameter pytrees with the per-layer, per-family genes of one genome.

    Args:
      space: the genome layout (static).
      genome: float [space.size].
      models: pytree whose leaves stack the N models on axis 0 ([N, ...]).
      base: pytree of base tensors, or None for methods without a base.
      key: PRNG key for random methods; leaf i uses ``sparsify.derive_key(key, i)``.

    Returns:
      The merged pytree.
    """
    method = get_method(space.method)
    if method.needs_base and base is None:
        raise ConfigError(f"merge method {space.method!r} needs a base model")
    genes = decode(space, genome)
    options = dict(space.options)
    key = jax.random.key(0) if key is None else key
    flat, treedef = jax.tree_util.tree_flatten_with_path(models)
    base_leaves = [None] * len(flat) if base is None else jax.tree_util.tree_leaves(base)
    out = []
    for i, ((path, leaf), b) in enumerate(zip(flat, base_leaves)):
        group, family = space.slot(jax.tree_util.keystr(path))
        params = dict(options)
        for name, value in genes.items():
            per_leaf = value[:, group, family]  # [N]
            params[name] = per_leaf if name in method.per_model else per_leaf[0]
        out.append(method.fn(leaf, b, key=derive_key(key, i), **params))
    return jax.tree_util.tree_unflatten(treedef, out)


def merge_population(
    space: RecipeSpace,
    genomes: jax.Array,
    models: Any,
    base: Any = None,
    key=None,
    batch_size: int | None = None,
) -> Any:
    """Merges a population of genomes: leaves of the result are [P, ...].

    Args:
      space: the genome layout.
      genomes: float [P, space.size].
      models, base, key: as :func:`merge_genome` (shared by the population).
      batch_size: genomes merged at once (vmapped); chunks run one after another under ``lax.map``.
        None merges the whole population in one vmap.

    Returns:
      The merged pytrees stacked on axis 0. For large models prefer :func:`evaluate_population`.
    """

    def one(genome):
        return merge_genome(space, genome, models, base, key)

    if batch_size is None:
        return jax.vmap(one)(genomes)
    return jax.lax.map(one, genomes, batch_size=batch_size)


def evaluate_population(
    space: RecipeSpace,
    genomes: jax.Array,
    models: Any,
    score: Callable[[Any], Any],
    base: Any = None,
    key=None,
    batch_size: int = 1,
) -> Any:
    """Merges and scores each genome, holding at most ``batch_size`` merged models at a time.

    Args:
      space: the genome layout.
      genomes: float [P, space.size].
      models, base, key: as :func:`merge_genome`.
      score: ``merged_pytree -> pytree of arrays`` (e.g. per-datapoint scores), traced.
      batch_size: genomes merged and scored together.

    Returns:
      ``score`` outputs stacked on axis 0 ([P, ...]).
    """

    def one(genome):
        return score(merge_genome(space, genome, models, base, key))

    return jax.lax.map(one, genomes, batch_size=batch_size)
