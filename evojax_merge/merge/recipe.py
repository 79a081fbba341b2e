"""Recipes: the genome of an evolutionary parameter-space merge and its decoding into merged weights.

A genome is a flat float vector (what evosax strategies and M2N2 search over). It holds, for every model,
every group of ``layer_group`` consecutive layers (plus one group for the tensors outside the layers:
embeddings, final norm, head) and every tensor family (attention / MLP / embeddings / norms), one value per
gene of the merge method (``weight``, ``density``, ``t``, ...). This is the parameter-space search of
Akiba et al., "Evolutionary Optimization of Model Merging Recipes" (Nature Machine Intelligence, 2025),
where per-layer TIES/DARE weights and densities are evolved.

Genes decode like mergekit parameters: densities and ``t`` are clamped to [0, 1], weights may be
negative unless ``allow_negative_weights=False`` (then clamped at 0).

Two layouts of the parameters are understood: one tensor per layer with the layer index in its name
(Hugging Face names, ``model.layers.3.mlp.up_proj.weight``), and layer-stacked pytrees (the JAX Llama of
:mod:`evojax_merge.models.llama`, whose ``layers`` subtree holds every layer on a leading axis): with
``stacked_layers="layers"`` the method is vmapped over that axis, so every layer still gets its own genes
and its own TIES threshold / DARE mask, exactly as if the layers were separate tensors. The paper counts
the embeddings as layers: ``embeddings_as_layers=True`` gives the input embeddings and the output side
(final norm, head) a group each instead of one shared group outside the layers.

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

# The family of every tensor when genes are per layer only (``per_family=False`` in configs).
WHOLE_LAYER = ("layer",)
# Names of input-embedding tensors (the rest of the tensors outside the layers is the output side).
_INPUT_EMBEDDING = ("embed", "wte", "wpe", "tok_embeddings")

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
        model 0's slot. A genome of global genes only has one model slot (SLERP over L layers: L genes,
        not N x L of which only model 0's would be read).
      layer_group: consecutive layers sharing genes (1 = per layer; num_layers = one group).
      families: tensor families with their own genes.
      allow_negative_weights: else weights are clamped at 0.
      options: fixed method options, e.g. (("normalize", True), ("rescale", "density")).
      family_of: maps a tensor path to its family name for models whose parameter names
        :func:`tensor_family` does not know (default: :func:`tensor_family`; with ``families ==
        WHOLE_LAYER`` every tensor is in the one family).
      stacked_layers: name of the subtree whose leaves stack the layers on axis 0 (``"layers"`` for
        :mod:`evojax_merge.models.llama`), or None when layers are separate tensors.
      embeddings_as_layers: input embeddings and output side (final norm, head) get a group each.
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
    stacked_layers: str | None = None
    embeddings_as_layers: bool = False

    def __post_init__(self):
        get_method(self.method)
        unknown = [g for g in self.genes if g not in GENE_BOUNDS]
        if unknown:
            raise ConfigError(f"unknown genes {unknown}; known: {sorted(GENE_BOUNDS)}")
        if self.layer_group < 1 or self.num_layers < 0:
            raise ConfigError("layer_group must be >= 1 and num_layers >= 0")

    @property
    def n_layer_groups(self) -> int:
        """Groups of consecutive decoder layers."""
        return math.ceil(self.num_layers / self.layer_group)

    @property
    def n_groups(self) -> int:
        """Layer groups plus the group(s) of the tensors outside the layers (one, or input + output)."""
        return self.n_layer_groups + (2 if self.embeddings_as_layers else 1)

    def outside_group(self, path: str) -> int:
        """Group of a tensor outside the decoder layers: the input embeddings come first."""
        if self.embeddings_as_layers and not any(n in path.lower() for n in _INPUT_EMBEDDING):
            return self.n_layer_groups + 1
        return self.n_layer_groups

    def family(self, path: str) -> int:
        """Family index of a tensor, from its name."""
        if self.families == WHOLE_LAYER and self.family_of is None:
            return 0
        family = (self.family_of or tensor_family)(path)
        if family not in self.families:
            raise ConfigError(f"tensor {path!r} is in family {family!r}, not in {self.families}")
        return self.families.index(family)

    def is_stacked(self, path: str) -> bool:
        """The tensor stacks the layers on axis 0 (it sits under ``stacked_layers``)."""
        return self.stacked_layers is not None and f"[{self.stacked_layers!r}]" in path

    def layer_groups(self, num_layers: int) -> jax.Array:
        """Group of each layer 0..num_layers-1 of a stacked tensor."""
        if num_layers != self.num_layers:
            raise ConfigError(f"a stacked tensor holds {num_layers} layers, the genome {self.num_layers}")
        return jnp.arange(num_layers) // self.layer_group

    @property
    def gene_models(self) -> int:
        """Model slots of the genome: one per model when a gene is read per model, else one."""
        per_model = get_method(self.method).per_model
        return self.n_models if any(g in per_model for g in self.genes) else 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(model slots, groups, families, genes)."""
        return (self.gene_models, self.n_groups, len(self.families), len(self.genes))

    @property
    def size(self) -> int:
        """Length of the flat genome."""
        return math.prod(self.shape)

    def slot(self, path: str) -> tuple[int, int]:
        """(group, family) indices of a tensor, from its name."""
        layer = tensor_layer(path)
        family = self.family(path)
        if layer is None:
            group = self.outside_group(path)
        else:
            if layer >= self.num_layers:
                raise ConfigError(f"tensor {path!r} is in layer {layer} >= num_layers {self.num_layers}")
            group = layer // self.layer_group
        return group, family

    def init(self, **values: float) -> jax.Array:
        """A genome with every gene set to a constant (e.g. ``init(weight=0.5, density=0.7)``)."""
        per_gene = jnp.asarray([values.get(g, 0.0) for g in self.genes], jnp.float32)
        return jnp.broadcast_to(per_gene, self.shape).reshape(-1)


def decode(space: RecipeSpace, genome: jax.Array) -> dict[str, jax.Array]:
    """Flat genome -> ``{gene: [model slots, groups, families]}``, clamped like mergekit parameters.

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
        name = jax.tree_util.keystr(path)
        if space.is_stacked(name):
            out.append(_merge_stacked(space, method, genes, options, name, leaf, b, derive_key(key, i)))
            continue
        group, family = space.slot(name)
        params = dict(options)
        for gene, value in genes.items():
            per_leaf = value[:, group, family]  # [N]
            params[gene] = per_leaf if gene in method.per_model else per_leaf[0]
        out.append(method.fn(leaf, b, key=derive_key(key, i), **params))
    return jax.tree_util.tree_unflatten(treedef, out)


def _merge_stacked(space, method, genes, options, name, leaf, base, key):
    """One layer-stacked tensor ([N, L, ...] models, [L, ...] base): the method vmapped over layers.

    Layer l gets the genes of its group and the key ``derive_key(key, l)``, so each layer is merged
    exactly as a separate tensor would be (its own TIES threshold, its own DARE mask).
    """
    groups = space.layer_groups(leaf.shape[1])
    family = space.family(name)
    per_layer = {}
    for gene, value in genes.items():
        values = value[:, groups, family]  # [N, L]
        per_layer[gene] = values.T if gene in method.per_model else values[0]  # [L, N] or [L]
    layer_keys = jax.vmap(lambda l: jax.random.key_data(derive_key(key, l)))(jnp.arange(leaf.shape[1]))
    impl = jax.random.key_impl(key)

    def one_layer(models_l, base_l, key_l, params_l):
        return method.fn(models_l, base_l, key=jax.random.wrap_key_data(key_l, impl=impl), **options, **params_l)

    return jax.vmap(one_layer, in_axes=(1, None if base is None else 0, 0, 0))(leaf, base, layer_keys, per_layer)


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
