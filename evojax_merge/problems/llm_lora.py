"""A search over LoRA specialists of one base: a genome of one scale per adapter per layer group.

A candidate ``s`` (adapters x groups) is the model ``W + sum_k s[k, g(W)] * scale_k * B_k @ A_k`` for every
weight ``W`` an adapter targets (``g(W)``: the group of W's layer; a group of ``layer_group`` consecutive
layers, and one more for targets outside the layers, e.g. ``lm_head``). LoraHub (Huang et al., "LoraHub:
Efficient Cross-Task Generalization via Dynamic LoRA Composition", 2023, https://arxiv.org/abs/2307.13269)
searches one scale per adapter; a scale per layer group is the per-layer granularity of Evolutionary Model
Merge's parameter-space search (Akiba et al. 2025, https://arxiv.org/abs/2403.13187).

What the compiled step reads is the base model and the low-rank factors, not a model per adapter: the
factors of every adapter are stacked (ranks padded with zeros, which add nothing) and the candidate's
update of a weight is one matrix product over the adapters' concatenated ranks, made inside the jitted
score. A search over K adapters of a base of P parameters thus holds P + (the factors) weights, where
``llm_recipe`` over the same specialists merged into full models holds (K + 1) P.

Seeds: ``seeds.base`` is the base folder, ``seeds.models`` the adapters (adapter folders, or
``BASE+ADAPTER`` naming the same base). The search starts from one genome, every scale at ``lora.init``
(null: 1 / number of adapters), which is not itself scored. The best genome is exported as a Hugging
Face folder (``best/model``), the genome (``best/genome.npy``), its scales as a table (``best/scales.csv``:
a row per group, a column per adapter) and as a mergekit recipe (``best/mergekit.yaml``: task arithmetic
over the adapted models, which ``evojax-merge merge`` turns into the same model).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import check, options
from evojax_merge.errors import ConfigError
from evojax_merge.files import write_csv, write_yaml
from evojax_merge.merge.names import tensor_layer
from evojax_merge.models import hf_io, llama, lora
from evojax_merge.merge.model_card import search_card
from evojax_merge.models.tokenizer_identity import check_same_tokenizer
from evojax_merge.problems.llm import (LanguageModelOptions, LanguageModelProblem, Seeds, build_task_suite,
                                      load_model, seed_folders, task_skills)


@dataclasses.dataclass
class LoraScaleOptions:
    layer_group: int = 1  # consecutive layers sharing a scale
    init: float | None = None  # every scale starts here; null: 1 / number of adapters


@dataclasses.dataclass
class LLMLoraOptions(LanguageModelOptions):
    lora: LoraScaleOptions = dataclasses.field(default_factory=LoraScaleOptions)

    def validate(self):
        super().validate()
        check(self.lora.layer_group >= 1, "problem.lora.layer_group", "must be >= 1")
        check(self.lora.init is None or math.isfinite(self.lora.init), "problem.lora.init", "must be finite")
        check(self.seeds.base is not None, "problem.seeds.base", "llm_lora needs the base model the adapters apply to")


@dataclasses.dataclass(frozen=True)
class ScaleSpace:
    """The genome layout: ``(n_adapters, n_groups)`` scales, flattened."""

    n_adapters: int
    num_layers: int
    layer_group: int
    outside_group: bool  # a group for targets outside the decoder layers (lm_head)

    @property
    def n_layer_groups(self) -> int:
        return math.ceil(self.num_layers / self.layer_group)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_adapters, self.n_layer_groups + int(self.outside_group)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def group_names(self) -> list[str]:
        groups = [f"layers {g * self.layer_group}-{min((g + 1) * self.layer_group, self.num_layers) - 1}"
                  for g in range(self.n_layer_groups)]
        return groups + (["outside the layers"] if self.outside_group else [])


def stack_factors(adapters: list[lora.LoraAdapter], config: llama.LlamaConfig) -> dict:
    """The adapters' factors as the pytree the compiled step reads, each adapter's scale folded into its B.

    ``{"layers": {key: (a [L, K*R, in], b [L, out, K*R])}, key: (a [K*R, in], b [out, K*R])}`` for every
    parameter some adapter targets (keys of :mod:`evojax_merge.models.llama`): adapter k owns ranks
    ``k*R .. k*R + R - 1``, R being the largest rank of that parameter; smaller ranks and untargeted layers
    are zero-padded (zero rows add nothing to B @ A). Laid out so that a candidate's update of a layer is
    one matrix product ``b[l] @ (s * a[l])`` over contiguous ranks, with no transposed copies.
    """
    shapes = config.param_shapes
    L, K = config.num_hidden_layers, len(adapters)
    out: dict = {"layers": {}}
    targets = [(key, name, True) for key, name in hf_io.LAYER_TENSORS.items()]
    targets += [(key, name, False) for key, name in hf_io.TOP_TENSORS.items() if key in shapes]
    for key, name, stacked in targets:
        names = [name.format(i=i) for i in range(L)] if stacked else [name]
        found = [[ad.factors.get(n) for ad in adapters] for n in names]
        rank = max((f.a.shape[0] for row in found for f in row if f is not None), default=0)
        if not rank:
            continue
        w_out, w_in = (shapes["layers"][key][1:] if stacked else shapes[key])
        a = np.zeros((len(names), K * rank, w_in), np.float32)
        b = np.zeros((len(names), w_out, K * rank), np.float32)
        for i, row in enumerate(found):
            for k, f in enumerate(row):
                if f is not None:
                    r = f.a.shape[0]
                    a[i, k * rank:k * rank + r], b[i, :, k * rank:k * rank + r] = f.a, f.scale * f.b
        if stacked:
            out["layers"][key] = (jnp.asarray(a), jnp.asarray(b))
        else:
            out[key] = (jnp.asarray(a[0]), jnp.asarray(b[0]))
    return out


def scaled_model(space: ScaleSpace, genome: jax.Array, base: llama.Params, factors: dict) -> llama.Params:
    """``base + sum_k s[k, group] * B_k @ A_k`` for every targeted parameter (float32 update, stored in the
    base's dtype); the genome is ``space.shape`` flattened."""
    scales = jnp.asarray(genome, jnp.float32).reshape(space.shape)
    layer_scales = scales[:, jnp.arange(space.num_layers) // space.layer_group].T  # [L, K]

    def update(w, a, b, s):  # w [..., out, in], a [..., K*R, in], b [..., out, K*R], s [..., K]
        rows = jnp.repeat(s, a.shape[-2] // space.n_adapters, axis=-1)[..., None]  # [..., K*R, 1]
        delta = jnp.matmul(b, rows * a)  # "...or,...ri->...oi": one product per layer over the adapters' ranks
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    model = dict(base, layers=dict(base["layers"]))
    for key, (a, b) in factors["layers"].items():
        model["layers"][key] = update(base["layers"][key], a, b, layer_scales)
    for key, value in factors.items():
        if key != "layers":
            model[key] = update(base[key], *value, scales[:, -1])
    return model


def adapter_references(opts: LLMLoraOptions) -> tuple[str, list[str], list[str]]:
    """(base folder, adapter folders, config labels) of the seeds section.

    Raises:
      ConfigError: an entry that is not an adapter, or names another base than ``seeds.base``.
    """
    names, base = seed_folders(opts.seeds)
    adapters, labels = [], []
    for i, name in enumerate(names):
        label = f"problem.seeds.models[{i}]"
        named_base, adapter = lora.split_reference(name)
        if adapter is None:
            adapter = name
            if not pathlib.Path(name).is_dir():
                raise ConfigError(f"config key '{label}': adapter folder {name} does not exist")
            if not lora.is_adapter_folder(name):
                raise ConfigError(f"config key '{label}': {name} is not a LoRA adapter folder (no adapter_config.json; "
                                  "llm_lora searches over adapters of problem.seeds.base)")
        elif pathlib.Path(named_base).resolve() != pathlib.Path(base).resolve():
            raise ConfigError(f"config key '{label}': {name} applies the adapter to {named_base}, but "
                              f"problem.seeds.base is {base}")
        adapters.append(adapter)
        labels.append(label)
    return base, adapters, labels


class LLMLoraProblem(LanguageModelProblem):
    num_given_seeds = 1  # the starting genome
    evaluate_seeds = False  # a starting point, not a candidate

    def __init__(self, opts: LLMLoraOptions):
        self.options = opts
        self.skills = task_skills(opts.task, opts.seeds)  # the task files, checked before the models load
        base, adapter_folders, labels = adapter_references(opts)
        config = hf_io.read_config(base)
        adapters = [lora.read_adapter(f) for f in adapter_folders]
        for adapter in adapters:
            adapter.check_against(hf_io.hf_shapes(config), base)
        _check_saved_base_weights(adapters, base)
        check_same_tokenizer({"problem.seeds.base": base} | {
            label: lora.tokenizer_folder(f"{base}+{folder}") for label, folder in zip(labels, adapter_folders)})
        tokenizer = hf_io.load_tokenizer(base)
        config, base_params = load_model(base, opts.seeds)
        self.adapter_names = adapter_folders
        self.seeds = Seeds([base], [config], [base_params], None, None, tokenizer, pathlib.Path(base))
        self.suite = build_task_suite(opts.task, opts.seeds, config, tokenizer, self.skills)
        outside = any(tensor_layer(name) is None for ad in adapters for name in ad.factors)
        self.space = ScaleSpace(len(adapters), config.num_hidden_layers, opts.lora.layer_group, outside)
        self.models = {"base": base_params, "factors": stack_factors(adapters, config)}
        self.template = jax.ShapeDtypeStruct((self.space.size,), jnp.float32)

    def seed_candidates(self, key, n, fitness_data):
        del key, fitness_data
        init = self.options.lora.init
        init = 1.0 / self.space.n_adapters if init is None else init
        return jnp.full((n, self.space.size), init, jnp.float32)

    def model_of(self, genome, models):
        return scaled_model(self.space, genome, models["base"], models["factors"])

    def export(self, genome, out_dir: pathlib.Path, fitness_data) -> dict:
        genome = np.asarray(genome, np.float32)
        np.save(out_dir / "genome.npy", genome)
        merged = jax.jit(self.model_of)(jnp.asarray(genome), fitness_data["models"])
        scales = genome.reshape(self.space.shape)
        write_csv(out_dir / "scales.csv", ["group", *self.adapter_names],
                  [[group, *map(float, scales[:, g])] for g, group in enumerate(self.space.group_names())])
        recipe = self.mergekit_recipe(genome)
        write_yaml(out_dir / "mergekit.yaml", recipe)
        base = self.seeds.names[0]
        # The adapters are named by their folders (an adapter has no config.json of its own).
        card = search_card("lora", {m["model"]: {} for m in recipe["models"]}, base, hf_io.read_config_dict(base),
                           "LoRA adapter scales (llm_lora)", recipe)
        hf_io.save_hf_folder(out_dir / "model", self.seeds.config, merged, like=base,
                             tokenizer_folder=self.seeds.tokenizer_folder, card=card)
        return {"model": str(out_dir / "model"), "genome_size": self.space.size}

    def mergekit_recipe(self, genome) -> dict:
        """Task arithmetic over the adapted models with the genome's scales as per-layer weights: the same
        model (the adapted model minus the base is the adapter's update). A weight list of one value per
        layer is read back exactly (mergekit interpolates a list over the layers); ``lm_head`` takes the
        group outside the layers."""
        scales = np.asarray(genome, np.float32).reshape(self.space.shape)
        base = str(pathlib.Path(self.seeds.names[0]).resolve())
        models = []
        for k, adapter in enumerate(self.adapter_names):
            per_layer = [float(scales[k, layer // self.space.layer_group]) for layer in range(self.space.num_layers)]
            weight = ([{"filter": "lm_head", "value": float(scales[k, -1])}, {"value": per_layer}]
                      if self.space.outside_group else per_layer)
            models.append({"model": f"{base}+{pathlib.Path(adapter).resolve()}", "parameters": {"weight": weight}})
        return {"merge_method": "task_arithmetic", "base_model": base, "models": models,
                "dtype": self.options.seeds.dtype}

    def baselines(self, test_data) -> dict:
        """Test scores of the base and of each adapter applied alone at its own scale (one compilation; one
        adapted model in memory at a time)."""
        if not self.options.score_seeds:
            return {}
        scores = jax.jit(lambda g, models, batches: self.suite.scores(self.model_of(g, models), batches, test=True))
        genomes = {self.seeds.names[0]: np.zeros(self.space.shape, np.float32)}
        for k, name in enumerate(self.adapter_names):
            genomes[name] = np.eye(self.space.n_adapters, dtype=np.float32)[k][:, None].repeat(self.space.shape[1], 1)
        return {"seeds_test": {name: self.suite.accuracies(scores(g.reshape(-1), test_data["models"], self.suite.test),
                                                           self.suite.test)
                               for name, g in genomes.items()}}


def _check_saved_base_weights(adapters: list[lora.LoraAdapter], base: str) -> None:
    """The base weights adapters saved copies of are the base's (read one tensor at a time)."""
    from evojax_merge.merge.checkpoint import Checkpoint

    names = sorted({name for ad in adapters for name in ad.saved_base_weights})
    if not names:
        return
    checkpoint = Checkpoint(base)
    try:
        for name in names:
            weight = checkpoint.read(name)
            for adapter in adapters:
                adapter.check_saved_base_weight(name, weight, base)
    finally:
        checkpoint.close()


def llm_lora(**spec):
    """The problem of config section ``problem: {name: llm_lora, seeds: {base, models}, task: ..., lora: ...}``."""
    opts = options(LLMLoraOptions, spec, "problem")
    opts.validate()
    return LLMLoraProblem(opts), dataclasses.asdict(opts)
