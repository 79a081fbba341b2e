"""Seeds of a language-model search whose vocabularies differ, put in one output vocabulary before the search.

``problem.seeds.tokenizer`` has the meaning of a merge recipe's ``tokenizer_source`` / ``tokenizer``
section (:mod:`evojax_merge.models.vocabulary`): ``base``, a model, ``union``, or a mapping with ``source``,
``tokens`` and ``pad_to_multiple_of``. The input embeddings (and output head, when untied) of every model
the search reads are remapped once, when the seeds load; from then on the search sees models of one
vocabulary, and the output tokenizer (written to a folder the exports copy from) is the one its tasks use.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from evojax_merge.errors import ConfigError
from evojax_merge.merge.checkpoint import Checkpoint
from evojax_merge.models import llama
from evojax_merge.models.vocabulary import TokenizerSpec, VocabularyPlan, parse_tokenizer_spec, plan_vocabulary

KEY = "problem.seeds.tokenizer"
# Parameter of the Llama pytree -> Hugging Face tensor name, for the tensors whose rows are tokens.
VOCABULARY_PARAMS = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


@dataclasses.dataclass
class SeedVocabulary:
    """Every model's remapped vocabulary tensors and the output tokenizer (its files in ``folder``)."""

    spec: TokenizerSpec
    plan: VocabularyPlan
    tensors: dict[str, dict[str, np.ndarray]]  # model folder -> parameter name -> (size, hidden) rows
    folder: Path

    def apply(self, folder: str, config: llama.LlamaConfig, params: llama.Params
              ) -> tuple[llama.Params, llama.LlamaConfig]:
        """One model's parameters and config in the output vocabulary (``folder``: a model of the plan)."""
        params = dict(params)
        for name, rows in self.tensors[folder].items():
            params[name] = jnp.asarray(rows, dtype=params[name].dtype)
        return params, self.config(config)

    def config(self, config: llama.LlamaConfig) -> llama.LlamaConfig:
        """A model's config in the output vocabulary."""
        return dataclasses.replace(config, vocab_size=self.plan.size)


def seed_vocabulary(option: Any, folders: dict[str, str], configs: dict[str, llama.LlamaConfig],
                    base: str | None, reference: str, resolve: Callable[[Any, str], str]) -> SeedVocabulary | None:
    """The output vocabulary of a search's models, or None when ``option`` is not set or maps nothing.

    Args:
      option: the ``problem.seeds.tokenizer`` value: None, a string or a mapping.
      folders: label -> folder of every model the search reads (seeds, base, DFS's first model).
      configs: folder -> its config (the embedding rows, tied or not).
      base: the base folder (its rows win where several models have a token), or None.
      reference: the folder whose vocabulary ``base`` means (the base, else model A).
      resolve: a model named in the option (a folder, or a seeds-manifest key) -> its folder.

    Raises:
      ConfigError: a malformed option (naming ``problem.seeds.tokenizer``), a token entry that does not resolve.
    """
    section = option if isinstance(option, dict) else None
    source = option if isinstance(option, str) else None
    spec = parse_tokenizer_spec(source, section, f"config key '{KEY}'", resolve)
    if spec is None:
        return None
    unique = list(dict.fromkeys(folders.values()))
    try:
        plan = plan_vocabulary(spec, {f: configs[f].vocab_size for f in unique}, base, reference)
    except ConfigError as e:
        raise ConfigError(f"config key '{KEY}': {e}") from None
    if plan.is_identity:
        return None
    tied = configs[reference].tie_word_embeddings
    tensors: dict[str, dict[str, np.ndarray]] = {f: {} for f in unique}
    for name, hf_name in VOCABULARY_PARAMS.items():
        if name == "lm_head" and tied:
            continue
        checkpoints = {f: Checkpoint(f) for f in unique}
        try:
            aligned = plan.align({f: c.read(hf_name) for f, c in checkpoints.items()})
        finally:
            for c in checkpoints.values():
                c.close()
        for f in unique:
            tensors[f][name] = aligned[f]
    # The output tokenizer's files: the tasks read it, and the exports copy it next to the merged model.
    folder = Path(tempfile.mkdtemp(prefix="evojax-merge-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the run's exports have copied it by then
    plan.write(folder)
    if (plan.folder / "generation_config.json").is_file():  # the exports take the generation settings from here
        shutil.copyfile(plan.folder / "generation_config.json", folder / "generation_config.json")
    return SeedVocabulary(spec, plan, tensors, folder)
