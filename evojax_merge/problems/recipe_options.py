"""The ``recipe`` section of parameter-space merge problems (language models, diffusion U-Nets).

Akiba et al., "Evolutionary optimization of model merging recipes" (Nature Machine Intelligence 2025):
per-layer (-group, -family) genes of a merge method, searched from one mean genome.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RecipeOptions:
    merge_method: str = "dare_ties"
    genes: list[str] = dataclasses.field(default_factory=lambda: ["weight", "density"])
    init: float = 0.5  # every gene starts here (the paper)
    layer_group: int = 1  # consecutive layers sharing genes
    per_family: bool = False  # separate genes for attention / MLP / norms (mergekit-evolve's filters)
    embeddings_as_layers: bool = True  # input embeddings and output head get genes of their own
    allow_negative_weights: bool = False  # the paper does not force a simplex, nor negative weights
    normalize: bool | None = None  # method option; null: the method's default
    merge_seed: int = 0  # DARE / DELLA masks (the same for every candidate)

    def space(self, n_models: int, num_layers: int, families: tuple[str, ...], family_of=None,
              stacked_layers: str | None = None):
        """The genome layout of this section: ``families`` (and ``family_of``) apply with ``per_family``."""
        from evojax_merge.merge.recipe import WHOLE_LAYER, RecipeSpace

        return RecipeSpace(
            n_models=n_models, num_layers=num_layers, method=self.merge_method, genes=tuple(self.genes),
            layer_group=self.layer_group, families=families if self.per_family else WHOLE_LAYER,
            family_of=family_of if self.per_family else None, allow_negative_weights=self.allow_negative_weights,
            options=() if self.normalize is None else (("normalize", self.normalize),),
            stacked_layers=stacked_layers, embeddings_as_layers=self.embeddings_as_layers,
        )

    def mean_genomes(self, space, n: int):
        """``n`` copies of the starting genome (every gene at ``init``), (n, space.size) float32."""
        import jax.numpy as jnp

        initial = space.init(**{g: self.init for g in space.genes})
        return jnp.broadcast_to(jnp.asarray(initial, jnp.float32), (n, space.size))


def group_names(space, unit: str, outside: tuple[str, str], together: str) -> list[str]:
    """Names of a genome's groups for recipe.yaml: ``<unit> a-b`` per layer group, then the tensors outside
    the layers (``outside``: input side, output side; ``together`` when they share one group)."""
    groups = [f"{unit} {g * space.layer_group}-{min((g + 1) * space.layer_group, space.num_layers) - 1}"
              for g in range(space.n_layer_groups)]
    return groups + (list(outside) if space.embeddings_as_layers else [together])


def write_recipe(path, space, genome, models: list[str], base_model: str | None, merge_seed: int,
                 groups: list[str]) -> None:
    """A genome's decoded genes as recipe.yaml: method, models, base, layout (axes, families, groups), genes."""
    import numpy as np

    from evojax_merge.files import write_yaml
    from evojax_merge.merge.recipe import decode

    write_yaml(path, {
        "merge_method": space.method, "models": models, "base_model": base_model,
        "layout": {"axes": ["model", "group", "family"], "families": list(space.families), "groups": groups},
        "genes": {name: np.asarray(v).tolist() for name, v in decode(space, genome).items()},
        "options": dict(space.options), "merge_seed": merge_seed,
    })
