"""Data-flow-space merging of language models (Evolutionary Model Merge's DFS): a genome of a layer path.

A candidate is a flat genome of slot indicators and an M x M scaling matrix
(:class:`~evojax_merge.merge.dataflow.DataFlowSpace`); it becomes an ordinary Llama pytree with
``max_hops`` layers (:func:`~evojax_merge.merge.dataflow.path_params`) inside the compiled step. The search
starts from model A's own path (the mean genome, not scored).

PS + DFS is a pipeline of two runs: ``first_model`` puts a Hugging Face folder, e.g. the PS run's
``best/model``, at the head of the pool as model A.

The best path is exported as a path model (``best/model``, which :func:`~evojax_merge.merge.path_io.load_path_model`
and ``llama.generate`` run), as a plain Hugging Face folder with one decoder layer per hop (``best/hf_model``,
the hop scales folded into the weights: :func:`unrolled_path`; with config.json keeping model A's other fields,
generation_config.json, the tokenizer files and a model card), its hops (``best/recipe.yaml``) and the genome
(``best/genome.npy``).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import check, options
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.files import write_yaml
from evojax_merge.merge import dataflow, path_io
from evojax_merge.merge.model_card import search_card
from evojax_merge.models import hf_io, llama
from evojax_merge.problems.llm import (LanguageModelProblem, LanguageModelOptions, build_task_suite, load_model,
                                      load_seeds, task_skills)


@dataclasses.dataclass
class PathOptions:
    repeats: int = 3  # r: the pool's layer sequence is repeated r times in the indicator array
    max_hops: int | None = None  # fixed maximum path length; null: 2 x model A's layers
    indicator_on: float = 1.0  # initial indicator of A's middle layers (first repetition)
    indicator_off: float = -1.0  # initial indicator of every other slot
    # How far a search step of 1 moves a scale W[i, j] (the indicators move by 1): the search's sigma
    # suits the indicators, and a real model needs far finer scale steps (SmolLM2: noise of 0.1 on the
    # scales already breaks it, 0.01 does not).
    scale_step: float = 1.0


@dataclasses.dataclass
class LLMPathOptions(LanguageModelOptions):
    path: PathOptions = dataclasses.field(default_factory=PathOptions)
    # A Hugging Face folder put first in the pool as model A (PS + DFS: the PS run's best/model); null: none.
    first_model: str | None = None

    def validate(self):
        super().validate()
        p = self.path
        check(p.repeats >= 1, "problem.path.repeats", "must be >= 1")
        check(p.max_hops is None or p.max_hops >= 2, "problem.path.max_hops", "must be >= 2 (or null)")
        check(p.indicator_on > 0, "problem.path.indicator_on", "must be > 0")
        check(p.indicator_off <= 0, "problem.path.indicator_off", "must be <= 0")
        check(p.scale_step > 0, "problem.path.scale_step", "must be > 0")


class LLMPathProblem(LanguageModelProblem):
    num_given_seeds = 1  # the mean genome: model A's own path
    evaluate_seeds = False
    model_leading_axes = 0  # the pool is one stacked model

    def __init__(self, opts: LLMPathOptions):
        self.options = opts
        self.skills = task_skills(opts.task, opts.seeds)  # the task files, checked before the models load
        first = () if opts.first_model is None else (opts.first_model,)
        self.seeds = load_seeds(opts.seeds, need_base=False, same_depth=False, check_base=opts.score_seeds,
                                extra=first)
        names, configs, models = list(self.seeds.names), list(self.seeds.configs), list(self.seeds.models)
        if first:
            config, model = load_model(opts.first_model, opts.seeds, self.seeds.vocabulary)
            names, configs, models = [opts.first_model] + names, [config] + configs, [model] + models
        if len(models) < 2:
            raise ConfigError("config key 'problem.seeds.models': a data-flow search needs at least two models in its pool")
        llama.check_same_architecture(configs, names, same_depth=False)
        self.pool_names, self.pool_configs = names, configs
        p = opts.path
        layers = tuple(c.num_hidden_layers for c in configs)
        self.space = dataflow.DataFlowSpace(layers, p.repeats, p.max_hops or 2 * layers[0], p.indicator_on,
                                            p.indicator_off, p.scale_step)
        self.models = dataflow.make_pool(models)
        self.path_config = dataflow.path_config(configs[0], self.space.max_hops)
        self.suite = build_task_suite(opts.task, opts.seeds, self.path_config, self.seeds.tokenizer, self.skills)
        self.template = jax.ShapeDtypeStruct((self.space.size,), jnp.float32)

    def seed_candidates(self, key, n, fitness_data):
        del key, fitness_data
        return jnp.broadcast_to(jnp.asarray(self.space.init(), jnp.float32), (n, self.space.size))

    def model_of(self, genome, pool):
        return dataflow.path_params(pool, self.space.decode(genome))

    def export(self, genome, out_dir: pathlib.Path, fitness_data) -> dict:
        genome = np.asarray(genome)
        np.save(out_dir / "genome.npy", genome)
        space, names = self.space, self.pool_names
        path = space.decode(jnp.asarray(genome))
        layers, scales = dataflow.active_hops(path)
        hops = [{"layer": l, "model": names[space.source(l)[0]], "model_layer": space.source(l)[1], "scale": s}
                for l, s in zip(layers, scales)]
        path_io.save_path_model(out_dir / "model", self.pool_configs[0], space, fitness_data["models"], path, names,
                                self.seeds.tokenizer)
        recipe = {"pool": names, "layers_per_model": list(space.layers_per_model), "repeats": space.repeats,
                  "max_hops": space.max_hops, "hops": hops}
        write_yaml(out_dir / "recipe.yaml", recipe)
        config, params = unrolled_path(self.pool_configs[0], fitness_data["models"], layers, scales)
        card = search_card("dfs", {n: hf_io.read_config_dict(n) for n in names}, None, None, "data-flow path (DFS)",
                           recipe)
        hf_io.save_hf_folder(out_dir / "hf_model", config, params, like=names[0],
                             tokenizer_folder=self.seeds.tokenizer_folder, card=card)
        return {"model": str(out_dir / "model"), "hf_model": str(out_dir / "hf_model"), "path_length": len(layers),
                "genome_size": space.size}


def unrolled_path(config_a: llama.LlamaConfig, pool: llama.Params, layers: list[int], scales: list[float]
                  ) -> tuple[llama.LlamaConfig, llama.Params]:
    """A plain Llama (one decoder layer per hop, no hop scales) that computes what the path computes.

    A hop multiplies its input by ``s``; a plain Llama cannot. But every layer reads the residual stream
    only through an RMSNorm, which ignores the stream's scale, and adds to it through ``o_proj`` and
    ``down_proj``, which are linear. So the stream can be carried divided by ``C_h``, the product of the
    scales up to hop ``h``: hop ``h``'s ``o_proj`` and ``down_proj`` are divided by ``C_h``, and its two
    norms (and the final norm, by the last ``C``) take the sign of ``C_h``, since RMSNorm(-x) = -RMSNorm(x).
    The one difference is RMSNorm's epsilon, which acts as ``eps / C_h**2`` (negligible while the
    stream's mean square is far above ``eps``).

    Args:
      config_a: model A's config; pool: :func:`dataflow.make_pool` of the models.
      layers, scales: the active hops (:func:`dataflow.active_hops`).

    Raises:
      DataError: a zero scale product (the path then discards the stream, which no plain model can express).
    """
    cumulative = np.cumprod(np.asarray(scales, np.float64))
    if not np.all(np.abs(cumulative) > 0):
        raise DataError("a data-flow path whose hop scales multiply to 0 cannot be written as a plain model")
    index = jnp.asarray(layers, jnp.int32)
    stacked = jax.tree.map(lambda x: x[index], pool["layers"])
    inverse = jnp.asarray(1.0 / cumulative, jnp.float32)[:, None, None]
    sign = jnp.asarray(np.sign(cumulative), jnp.float32)[:, None]
    stacked = stacked | {
        "o_proj": (stacked["o_proj"] * inverse).astype(stacked["o_proj"].dtype),
        "down_proj": (stacked["down_proj"] * inverse).astype(stacked["down_proj"].dtype),
        "input_layernorm": (stacked["input_layernorm"] * sign).astype(stacked["input_layernorm"].dtype),
        "post_attention_layernorm": (stacked["post_attention_layernorm"] * sign
                                     ).astype(stacked["post_attention_layernorm"].dtype),
    }
    params = {k: v for k, v in pool.items() if k != "layers"} | {"layers": stacked}
    params["norm"] = (pool["norm"] * float(np.sign(cumulative[-1]))).astype(pool["norm"].dtype)
    return dataflow.path_config(config_a, len(layers)), params


def llm_path(**spec):
    """The problem of config section ``problem: {name: llm_path, seeds: ..., task: ..., path: ...}``."""
    opts = options(LLMPathOptions, spec, "problem")
    opts.validate()
    return LLMPathProblem(opts), dataclasses.asdict(opts)
