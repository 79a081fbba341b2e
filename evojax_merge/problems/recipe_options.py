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
