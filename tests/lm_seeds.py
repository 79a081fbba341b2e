"""Tiny LLM-merging seeds for tests: a base and two specialists with the CPU experiment's layout, in
seconds. They are trained only a few steps (no skill to speak of), but they are real outputs of
:func:`evojax_merge.train.lm_seeds.build_seeds`: same architecture, a shared ancestor, Hugging Face
folders, data splits and seeds.json.

Use in a test module::

    from lm_seeds import tiny_lm_seeds  # noqa: F401  (a session-scoped pytest fixture)

    def test_x(tiny_lm_seeds):
        manifest, root = tiny_lm_seeds
        config, params = hf_io.load_hf_folder(root / manifest["models"]["arithmetic"])
"""

from __future__ import annotations

import json
import pathlib

import pytest

from evojax_merge.train.lm_finetune import FinetuneConfig
from evojax_merge.train.lm_seeds import SeedRecipe, build_seeds

TINY_RECIPE = SeedRecipe(
    n_train=64, n_fitness=8, n_test=8, n_monitor=0,
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    base=FinetuneConfig(steps=8, batch_size=4, learning_rate=3e-3, warmup_steps=2, eval_every=8),
    specialist=FinetuneConfig(steps=4, batch_size=4, learning_rate=3e-3, warmup_steps=1, eval_every=4),
)


def build_tiny_seeds(out_dir) -> tuple[dict, pathlib.Path]:
    """Builds (or reuses, if already built there) the tiny seeds; returns (manifest, folder)."""
    out = pathlib.Path(out_dir)
    if (out / "seeds.json").is_file():
        return json.loads((out / "seeds.json").read_text()), out
    return build_seeds(out, TINY_RECIPE, progress=False, score_test=False), out


@pytest.fixture(scope="session")
def tiny_lm_seeds(tmp_path_factory):
    return build_tiny_seeds(tmp_path_factory.mktemp("tiny_lm_seeds"))
