"""Configuration of the LLM merge searches (``evojax-merge evolve CONFIG.yaml``): typed dataclasses.

Same rules as :mod:`evojax_merge.config` (whose readers it reuses): unknown keys, wrong types and
impossible values raise :class:`~evojax_merge.errors.ConfigError` naming the key; the resolved config is
written into the run directory. ``search`` picks the method:

- ``ps``: parameter-space recipe search (per-layer TIES/DARE genes, CMA-ES), section ``ps``;
- ``dfs``: data-flow (layer path) search, section ``dfs``;
- ``ps_dfs``: ``ps``, then ``dfs`` with the PS result added to the pool as model A;
- ``m2n2``: M2N2 over the flattened parameters (GA: ``alpha: 0, matchmaker: false``), section ``m2n2``.

The CMA-ES-over-SLERP baseline is ``ps`` with ``merge_method: slerp, genes: [t]``.

Seeds and tasks come either from a seeds manifest (``seeds.manifest``: the ``seeds.json`` that
:func:`evojax_merge.train.lm_seeds.build_seeds` writes; ``seeds.models`` / ``seeds.base`` are then its
model keys, and ``task.from_manifest: true`` scores on its ``fitness`` and ``test`` splits with its scorer
kinds and generation lengths), or from explicit folders and task data generated from ``task.skills``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from evojax_merge.config import ExperimentConfig, _check, from_dict, read_yaml_with_overrides, refuse_other_command
from evojax_merge.tasks.kinds import KINDS, NONNEGATIVE_KINDS

SEARCHES = ("ps", "dfs", "ps_dfs", "m2n2")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class SeedsConfig:
    # A seeds.json (lm_seeds.build_seeds); null: ``models`` and ``base`` are Hugging Face folders.
    manifest: str | None = None
    # Fine-tuned models (manifest keys or folders); the first is model A (tokenizer; embeddings and head for DFS).
    models: list[str] = dataclasses.field(default_factory=lambda: ["runs/llm_seeds/specialist_a",
                                                                   "runs/llm_seeds/specialist_b"])
    # Base model of task-vector methods (TIES, DARE, ...): a manifest key or a folder; null: none.
    base: str | None = "runs/llm_seeds/base"
    dtype: str = "float32"

    def validate(self):
        _check(len(self.models) >= 1, "seeds.models", "must list at least one model")
        _check(len(set(self.models)) == len(self.models), "seeds.models", "must not repeat a model")
        _check(self.dtype in DTYPES, "seeds.dtype", f"must be one of {DTYPES}")


@dataclasses.dataclass
class SkillConfig:
    skill: str = "arithmetic"  # evojax_merge.data.synthetic_text.SKILLS
    kind: str = "exact_match"  # exact_match | prefix_match | answer_match | loglik | answer_prob | choice
    n_train: int = 64
    n_test: int = 128
    data_seed: int = 0


@dataclasses.dataclass
class TaskConfig:
    # true: the seeds manifest's skills, their fitness split (training problems) and test split, scorer
    # kinds, generation lengths and prompt format; ``skills``, ``prompt_format`` and ``max_new_tokens``
    # below then do not apply.
    from_manifest: bool = False
    n_fitness: int | None = None  # from_manifest: the first n of each skill's fitness split; null: all
    n_test: int | None = None  # from_manifest: the first n of each skill's test split; null: all
    # from_manifest: the held-out split the best model is reported on; a bigger one can be added to the
    # seeds later (train.lm_seeds.add_heldout_split, make_seeds.py --add-split) without retraining them.
    test_split: str = "test"
    # The score searched on, for every skill (null: each skill's own kind). ``answer_prob``: the
    # probability of the reference answer and its EOS, a smooth exact match that needs one forward pass
    # instead of a generation; the test split is still scored by each skill's own kind.
    fitness_kind: str | None = None
    # Otherwise: data generated per skill (evojax_merge.data.synthetic_text).
    skills: list[SkillConfig] = dataclasses.field(default_factory=lambda: [
        SkillConfig("arithmetic", "exact_match"), SkillConfig("list_ops", "prefix_match")])
    prompt_format: str = "plain"  # plain | chatml (instruct models)
    max_new_tokens: int = 12
    scan_layers: bool = True  # generation scans the layers: compiles ~2.5x faster, decodes ~1.4x slower

    def validate(self):
        _check(len(self.skills) >= 1, "task.skills", "must list at least one skill")
        for i, s in enumerate(self.skills):
            _check(s.n_train >= 1 and s.n_test >= 1, f"task.skills[{i}]", "needs n_train >= 1 and n_test >= 1")
        _check(self.max_new_tokens >= 1, "task.max_new_tokens", "must be >= 1")
        _check(self.n_fitness is None or self.n_fitness >= 1, "task.n_fitness", "must be >= 1 (or null)")
        _check(self.n_test is None or self.n_test >= 1, "task.n_test", "must be >= 1 (or null)")
        _check(self.test_split not in ("train", "fitness"), "task.test_split",
               "must be a held-out split, not the seeds' training data or the search's fitness problems")
        _check(self.fitness_kind is None or self.fitness_kind in KINDS, "task.fitness_kind",
               f"must be one of {KINDS} (or null)")


@dataclasses.dataclass
class SearchConfig:
    strategy: str = "CMA_ES"  # any distribution-based evosax strategy by name
    population: int | None = None  # null: 4 + floor(3 ln n), n = genome length (the paper)
    sigma: float = 1 / 6
    generations: int = 50
    batch_size: int = 4  # candidates merged and scored at once (vmapped); bounds memory

    def validate(self, where: str):
        _check(self.population is None or self.population >= 2, f"{where}.population", "must be >= 2 (or null)")
        _check(self.sigma > 0, f"{where}.sigma", "must be > 0")
        _check(self.generations >= 1, f"{where}.generations", "must be >= 1")
        _check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")


@dataclasses.dataclass
class DFSSearchConfig(SearchConfig):
    # The DFS genome holds an M x M scaling matrix: a diagonal covariance scales to it, and indicators
    # need steps of about their initial distance from 0 to switch slots on and off.
    strategy: str = "Sep_CMA_ES"
    sigma: float = 0.5


@dataclasses.dataclass
class PSConfig:
    merge_method: str = "dare_ties"
    genes: list[str] = dataclasses.field(default_factory=lambda: ["weight", "density"])
    init: float = 0.5  # every gene starts here (the paper)
    layer_group: int = 1  # consecutive layers sharing genes
    per_family: bool = False  # separate genes for attention / MLP / norms (mergekit-evolve's filters)
    embeddings_as_layers: bool = True  # input embeddings and output head get genes of their own
    allow_negative_weights: bool = False  # the paper does not force a simplex, nor negative weights
    normalize: bool | None = None  # method option; null: the method's default
    merge_seed: int = 0  # DARE / DELLA masks (the same for every candidate)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)

    def validate(self):
        _check(len(self.genes) >= 1, "ps.genes", "must list at least one gene")
        _check(self.layer_group >= 1, "ps.layer_group", "must be >= 1")
        self.search.validate("ps.search")


@dataclasses.dataclass
class DFSConfig:
    repeats: int = 3  # r: the pool's layer sequence is repeated r times in the indicator array
    max_hops: int | None = None  # fixed maximum path length; null: 2 x model A's layers
    indicator_on: float = 1.0  # initial indicator of A's middle layers (first repetition)
    indicator_off: float = -1.0  # initial indicator of every other slot
    # How far a search step of 1 moves a scale W[i, j] (the indicators move by 1): the search's sigma
    # suits the indicators, and a real model needs far finer scale steps (SmolLM2: noise of 0.1 on the
    # scales already breaks it, 0.01 does not).
    scale_step: float = 1.0
    search: DFSSearchConfig = dataclasses.field(default_factory=DFSSearchConfig)

    def validate(self):
        _check(self.repeats >= 1, "dfs.repeats", "must be >= 1")
        _check(self.max_hops is None or self.max_hops >= 2, "dfs.max_hops", "must be >= 2 (or null)")
        _check(self.indicator_on > 0, "dfs.indicator_on", "must be > 0")
        _check(self.indicator_off <= 0, "dfs.indicator_off", "must be <= 0")
        _check(self.scale_step > 0, "dfs.scale_step", "must be > 0")
        self.search.validate("dfs.search")


@dataclasses.dataclass
class M2N2Config:
    archive_size: int = 15
    alpha: float = 1.0  # 0 with matchmaker off: the GA baseline
    matchmaker: bool = True
    crossover: bool = True
    split_point: bool = True
    warmup: int = 50  # random merges of the seeds evaluated before M2N2 proper (counted in the budget)
    evaluations: int = 1000  # budget: evaluations of the training set, seeds and warm-up included
    children_per_step: int = 1
    # "m2n2" (also the GA, with alpha 0 and no matchmaker) or "map_elites": a bins x bins grid over the
    # accuracy on each skill (one axis per skill), quality = mean training score; archive_size, alpha and
    # matchmaker are M2N2's and unused by it.
    archive: str = "m2n2"
    bins: int = 10

    def validate(self):
        _check(self.archive in ("m2n2", "map_elites"), "m2n2.archive", "must be 'm2n2' or 'map_elites'")
        _check(self.bins >= 1, "m2n2.bins", "must be >= 1")
        _check(self.archive_size >= 2, "m2n2.archive_size", "must be >= 2")
        _check(self.alpha >= 0, "m2n2.alpha", "must be >= 0")
        _check(self.warmup >= 0, "m2n2.warmup", "must be >= 0")
        _check(self.children_per_step >= 1, "m2n2.children_per_step", "must be >= 1")
        _check(self.evaluations >= 1, "m2n2.evaluations", "must be >= 1")


@dataclasses.dataclass
class EvolveRunConfig:
    seed: int = 0
    log_every: int = 1  # generations between test evaluations of the best model (M2N2: steps)
    checkpoint_every: int = 10  # generations (M2N2: steps) between checkpoints; 0 = never
    out_dir: str = "runs"
    save_model: bool = True  # write the best model (HF folder or path model) into the run directory
    score_seeds: bool = True  # also score every seed model on the test problems (summary.json "seeds_test")
    # [G, M]: score candidates over a population x model device mesh (G groups of M devices; see
    # run/population_sharding.py). null: one device, no mesh.
    mesh: list[int] | None = None

    def validate(self):
        _check(self.log_every >= 1, "run.log_every", "must be >= 1")
        _check(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")
        _check(self.mesh is None or (len(self.mesh) == 2 and all(isinstance(n, int) and n >= 1 for n in self.mesh)),
               "run.mesh", "must be null or [population_groups, model_devices], two integers >= 1")


@dataclasses.dataclass
class EvolveConfig:
    name: str = "ps-llm"
    search: str = "ps"
    seeds: SeedsConfig = dataclasses.field(default_factory=SeedsConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    ps: PSConfig = dataclasses.field(default_factory=PSConfig)
    dfs: DFSConfig = dataclasses.field(default_factory=DFSConfig)
    m2n2: M2N2Config = dataclasses.field(default_factory=M2N2Config)
    run: EvolveRunConfig = dataclasses.field(default_factory=EvolveRunConfig)

    def validate(self) -> "EvolveConfig":
        _check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        _check(self.search in SEARCHES, "search", f"must be one of {SEARCHES}")
        self.seeds.validate()
        self.task.validate()
        self.ps.validate()
        self.dfs.validate()
        self.m2n2.validate()
        self.run.validate()
        _check(not self.task.from_manifest or self.seeds.manifest is not None, "task.from_manifest",
               "needs seeds.manifest (the seeds.json whose fitness and test splits it reads)")
        if self.search == "m2n2":
            # Competition divides by the archive's total score per point: it needs scores >= 0.
            _check(self.task.fitness_kind in (None, *NONNEGATIVE_KINDS), "task.fitness_kind",
                   "cannot be 'loglik' (negative scores) with search m2n2: its competition needs scores >= 0; "
                   f"use one of {NONNEGATIVE_KINDS}")
            if not self.task.from_manifest and self.task.fitness_kind is None:
                kinds = [s.kind for s in self.task.skills]
                _check("loglik" not in kinds, "task.skills", "cannot use kind 'loglik' (negative scores) with "
                       f"search m2n2: its competition needs scores >= 0; use one of {NONNEGATIVE_KINDS}")
        if self.search in ("dfs", "ps_dfs", "m2n2"):
            _check(len(self.seeds.models) >= 2 or self.search == "ps_dfs", "seeds.models",
                   f"must list at least two models for search {self.search!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_evolve_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> EvolveConfig:
    """Read an evolve YAML config, apply ``section.key=value`` overrides, validate."""
    data = read_yaml_with_overrides(path, overrides)
    refuse_other_command(data, path, EvolveConfig, "evolve", ExperimentConfig, "run")
    return from_dict(EvolveConfig, data).validate()
