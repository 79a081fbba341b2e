"""Evolutionary merging of language models end to end: ``evojax-merge evolve CONFIG.yaml``.

The searches of :mod:`evojax_merge.evolve_config` (PS, DFS, PS + DFS, M2N2 and its GA and MAP-Elites
baselines) over seed models read from Hugging Face folders, scored per data point by an LM
:class:`SkillSuite`. Every candidate is built in memory and scored in the same compiled step as the
strategy's ask and tell: a generation is one call, with the population merged (or its paths gathered) and
scored in chunks of ``batch_size`` under ``lax.map``; nothing goes through files. With ``run.mesh`` the
evaluation is spread over a population x model device mesh (:func:`generation_step`).

Run directory (created before anything is computed)::

    RUN_DIR/
      config.yaml        the resolved config
      metrics.csv        one row per generation (M2N2: per step): evaluations, best training score,
                         generation best / mean, test score of the best model per skill, rejected candidates
      summary.json       final scores of the best model (train and test, per skill), speed, status
      scores.png         best training and test score against evaluations
      best_model/        PS / M2N2: Hugging Face folder; DFS: a path model (models/path_io.py)
      recipe.yaml        what produced it (PS: decoded genes; DFS: the hops; M2N2: settings)
      mergekit.yaml      PS only: the recipe in mergekit's format (evojax-merge merge reads it)
      best_genome.npy    PS / DFS: the genome
      checkpoints/       orbax checkpoints of the loop state, for --resume

PS + DFS writes the two stages into ``RUN_DIR/ps`` and ``RUN_DIR/dfs`` and a summary of both at the top.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from evojax_merge.errors import CheckpointError, ConfigError, DataError
from evojax_merge.evolve_config import EvolveConfig, SearchConfig, load_evolve_config
from evojax_merge.merge import dataflow
from evojax_merge.merge.crossover import split_point_crossover
from evojax_merge.merge.mergekit_export import to_mergekit
from evojax_merge.merge.names import FAMILIES
from evojax_merge.merge.operators import get_method, stack_trees
from evojax_merge.merge.recipe import WHOLE_LAYER, RecipeSpace, decode, merge_genome
from evojax_merge.models import hf_io, llama, path_io
from evojax_merge.run.checkpoint import RunCheckpoints
from evojax_merge.run.experiment import OPTIONAL_METRIC_KEYS, _StopOnSignal
from evojax_merge.files import write_atomic, write_csv, write_json
from evojax_merge.run.plot import plot_curves
from evojax_merge.run.population_sharding import check_population_divisible, population_map, population_model_mesh
from evojax_merge.strategies.evosax_adapter import step_size
from evojax_merge.strategies.evosax_search import EvosaxSearch
from evojax_merge.tasks.lm_suite import GivenSkill, SkillSpec, SkillSuite, build_suite, suite_from_examples
from evojax_merge.train.lm_seeds import SeedManifest

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------ seeds
@dataclasses.dataclass
class Seeds:
    """The seed models of a search (model A first), their base and model A's tokenizer."""

    names: list[str]
    configs: list[llama.LlamaConfig]
    models: list[llama.Params]
    base: llama.Params | None
    tokenizer: Any

    @property
    def config(self) -> llama.LlamaConfig:
        return self.configs[0]


def manifest_of(config: EvolveConfig) -> SeedManifest:
    """The seeds manifest ``seeds.manifest`` names; ConfigError naming the key when it cannot be read."""
    try:
        return SeedManifest.read(config.seeds.manifest)
    except DataError as e:
        raise ConfigError(f"config key 'seeds.manifest': {e}") from None


def seed_folders(config: EvolveConfig) -> tuple[list[str], str | None]:
    """The seed models' folders (model A first) and the base's (or None): ``seeds.models`` / ``seeds.base``
    as folders, or as keys of the manifest when ``seeds.manifest`` is set.

    Raises:
      ConfigError: an unreadable manifest, or a key it does not hold (naming the keys it does).
    """
    if config.seeds.manifest is None:
        return list(config.seeds.models), config.seeds.base
    manifest = manifest_of(config)
    base = None if config.seeds.base is None else manifest.folder(config.seeds.base)
    return [manifest.folder(k) for k in config.seeds.models], base


def load_seeds(config: EvolveConfig, need_base: bool, same_depth: bool = True) -> Seeds:
    """Reads the seed folders (and the base when ``need_base``), checking their architectures agree.

    Raises:
      ConfigError: different architectures (naming the folder and field), a method needing a base without one.
      DataError: a missing or malformed folder.
    """
    dtype = DTYPES[config.seeds.dtype]
    names, base_folder = seed_folders(config)
    loaded = [hf_io.load_hf_folder(n, dtype) for n in names]
    base = None
    if need_base:
        if base_folder is None:
            raise ConfigError(f"config key 'seeds.base' is needed by merge method {config.ps.merge_method!r}")
        base_config, base = hf_io.load_hf_folder(base_folder, dtype)
        llama.check_same_architecture([loaded[0][0], base_config], [names[0], base_folder])
    llama.check_same_architecture([c for c, _ in loaded], names, same_depth=same_depth)
    return Seeds(names, [c for c, _ in loaded], [p for _, p in loaded], base, hf_io.load_tokenizer(names[0]))


def suite_for(config: EvolveConfig, model_config: llama.LlamaConfig, tokenizer) -> SkillSuite:
    """The task: the manifest's fitness (training problems) and test splits when ``task.from_manifest``,
    else data generated from ``task.skills``."""
    task = config.task
    if task.from_manifest:
        manifest = manifest_of(config)
        try:
            fitness = manifest.tasks("fitness", task.n_fitness)
            test = manifest.tasks(task.test_split, task.n_test)
        except DataError as e:
            raise ConfigError(f"config keys 'task.n_fitness' / 'task.test_split' / 'task.n_test': {e}") from None
        skills = [GivenSkill(f.name, f.kind, f.examples, t.examples, f.max_new_tokens, task.fitness_kind)
                  for f, t in zip(fitness, test)]
        return suite_from_examples(skills, tokenizer, model_config, prompt_format=manifest.prompt_format,
                                   scan_layers=task.scan_layers)
    skills = [SkillSpec(s.skill, s.kind, s.n_train, s.n_test, s.data_seed, task.fitness_kind) for s in task.skills]
    return build_suite(skills, tokenizer, model_config, prompt_format=config.task.prompt_format,
                       max_new_tokens=config.task.max_new_tokens, scan_layers=config.task.scan_layers)


# ------------------------------------------------------------------------------ genome searches
@dataclasses.dataclass(frozen=True)
class GenomeProblem:
    """A search over flat genomes: how a genome becomes a model (traced) and the model's task."""

    size: int
    initial: jax.Array  # (size,) mean of the first search distribution
    # (genome, data) -> model parameters (traced). The seed weights travel as the argument ``data``
    # rather than in a closure: a jitted closure would bake them into the program as constants.
    realise: Callable[[jax.Array, Any], llama.Params]
    data: Any
    suite: SkillSuite  # built for the realised models' config

    def model(self, genome) -> llama.Params:
        """The model of one genome, compiled (host use: saving the best)."""
        return jax.jit(self.realise)(jnp.asarray(genome), self.data)


def recipe_space(config: EvolveConfig, seeds: Seeds) -> RecipeSpace:
    """The PS genome layout a config describes, over the Llama layer-stacked pytree."""
    ps = config.ps
    options = () if ps.normalize is None else (("normalize", ps.normalize),)
    return RecipeSpace(
        n_models=len(seeds.models),
        num_layers=seeds.config.num_hidden_layers,
        method=ps.merge_method,
        genes=tuple(ps.genes),
        layer_group=ps.layer_group,
        families=FAMILIES if ps.per_family else WHOLE_LAYER,
        allow_negative_weights=ps.allow_negative_weights,
        options=options,
        stacked_layers="layers",
        embeddings_as_layers=ps.embeddings_as_layers,
    )


def ps_problem(config: EvolveConfig, seeds: Seeds, suite: SkillSuite) -> tuple[GenomeProblem, RecipeSpace]:
    space = recipe_space(config, seeds)
    merge_seed = config.ps.merge_seed

    def realise(genome, data):
        return merge_genome(space, genome, data["models"], data["base"], jax.random.key(merge_seed))

    initial = space.init(**{g: config.ps.init for g in space.genes})
    data = {"models": stack_trees(*seeds.models), "base": seeds.base}
    return GenomeProblem(space.size, initial, realise, data, suite), space


def dfs_space(config: EvolveConfig, pool_configs: list[llama.LlamaConfig]) -> dataflow.DataFlowSpace:
    layers = tuple(c.num_hidden_layers for c in pool_configs)
    max_hops = config.dfs.max_hops or 2 * layers[0]
    return dataflow.DataFlowSpace(layers, config.dfs.repeats, max_hops, config.dfs.indicator_on,
                                  config.dfs.indicator_off, config.dfs.scale_step)


def dfs_problem(config: EvolveConfig, space: dataflow.DataFlowSpace, pool: llama.Params,
                suite: SkillSuite) -> GenomeProblem:
    def realise(genome, pool):
        return dataflow.path_params(pool, space.decode(genome))

    return GenomeProblem(space.size, space.init(), realise, pool, suite)


def evaluation_mesh(config: EvolveConfig):
    """The population x model mesh of ``run.mesh`` (None: one device)."""
    return None if config.run.mesh is None else population_model_mesh(*config.run.mesh)


def generation_step(ask, tell, evaluate, mesh, donate_state: bool = False):
    """``step(state, key, batches, data) -> tell's output``: ask, evaluate the candidates, tell.

    ``donate_state``: the compiled step may reuse the input state's buffers for the new state (the
    caller must not use the old state afterwards). An M2N2 archive of whole models is the largest
    thing in memory (15 x 135M float32 parameters = 8 GB); without donation a step holds two.

    ``ask(key, state) -> (candidates, state)``; ``tell(key, candidates, scores, state)``;
    ``evaluate(candidates, batches, data) -> scores``. Without a mesh the three are one program. With a
    mesh they are three: fused, the mesh's sharding would propagate from the candidates into the
    strategy's own arithmetic, where CMA-ES's eigendecomposition then picks another (equally valid) basis
    of a degenerate eigenspace and the same key samples other candidates. Kept apart, the strategy runs
    unpartitioned on one device, the scores come back to it, and a meshed run follows the single-device one.
    """

    def fused(state, key, batches, data):
        key_ask, key_tell = jax.random.split(key)
        candidates, state = ask(key_ask, state)
        return tell(key_tell, candidates, evaluate(candidates, batches, data), state)

    if mesh is None:
        return jax.jit(fused, donate_argnums=0 if donate_state else ())
    ask_jit, tell_jit = jax.jit(ask), jax.jit(tell)

    def step(state, key, batches, data):
        key_ask, key_tell = jax.random.split(key)
        candidates, state = ask_jit(key_ask, state)
        scores = evaluate(candidates, batches, data)
        scores = jax.device_put(scores, jax.tree.leaves(candidates)[0].sharding)
        return tell_jit(key_tell, candidates, scores, state)

    return step


GENOME_METRICS = ("generation", "evaluations", "best_train", "generation_best", "generation_mean",
                  "rejected_nonfinite", "step_size")


def run_genome_search(stage_dir: pathlib.Path, problem: GenomeProblem, search_config: SearchConfig,
                      config: EvolveConfig, resume: bool, progress: bool, title: str) -> dict:
    """The CMA-ES-style loop of PS and DFS; returns the stage summary (with ``best_genome``)."""
    search = EvosaxSearch(search_config.strategy, problem.size, search_config.population, search_config.sigma)
    params = search.default_params
    suite = problem.suite
    batch_size = min(search_config.batch_size, search.population_size)

    def evaluate(genomes, batches, data):
        return jax.lax.map(lambda g: suite.scores(problem.realise(g, data), batches), genomes,
                           batch_size=batch_size)

    mesh = evaluation_mesh(config)
    if mesh is not None:
        check_population_divisible(search.population_size, mesh)
        # Candidates over the population groups, the seed weights cut over the model axis.
        on_mesh = population_map(lambda g, data, batches: suite.scores(problem.realise(g, data), batches),
                                 mesh, batch_size=batch_size, models_leading_axes=0)
        evaluate = lambda genomes, batches, data: on_mesh(genomes, data, batches)  # noqa: E731
    step = generation_step(lambda key, state: search.ask(key, state, params),
                           lambda key, genomes, scores, state: search.tell(key, genomes, scores, state, params),
                           evaluate, mesh)

    scores_of = jax.jit(lambda genome, batches, data: suite.scores(problem.realise(genome, data), batches, test=True))
    test_scores = lambda genome, batches: scores_of(genome, batches, problem.data)  # noqa: E731
    key = jax.random.key(config.run.seed)
    key, key_init = jax.random.split(key)
    state = search.init(key_init, problem.initial, params, num_points=sum(suite.sizes(suite.train)))
    generations = search_config.generations

    def initial_row(history, state):
        # Row 0 is the initial mean: the starting point's test score is the baseline of the curve.
        for k in ("best_train", "generation_best", "generation_mean"):
            history[k][0] = np.nan
        history["step_size"][0] = _step_size(state)

    def step_row(history, g, state, key):
        state, metrics = step(state, key, suite.train, problem.data)
        history["generation"][g] = g
        history["evaluations"][g] = g * search.population_size
        history["best_train"][g] = float(metrics["best_train_score"])
        history["generation_best"][g] = float(metrics["generation_best_score"])
        history["generation_mean"][g] = float(metrics["generation_mean_score"])
        history["rejected_nonfinite"][g] = int(state.num_rejected_nonfinite)
        history["step_size"][g] = _step_size(state)
        return state, search.population_size

    loop = _run_loop(stage_dir, config, suite, state, key, _history(generations + 1, GENOME_METRICS, suite),
                     generations, initial_row, step_row, lambda s: test_scores(search.best(s)[0], suite.test),
                     resume, progress, title)
    state, history, last = loop.state, loop.history, loop.last
    best_genome, best_score = search.best(state)
    best_genome = np.asarray(best_genome)
    np.save(stage_dir / "best_genome.npy", best_genome)
    final_test = test_scores(jnp.asarray(best_genome), suite.test)
    final_train = np.asarray(state.best_point_scores)  # the best candidate's scores when it was found
    _plot(stage_dir, history, last, title)
    summary = {
        "status": loop.status,
        "strategy": search.name,
        "population": search.population_size,
        "genome_size": problem.size,
        "generations": last,
        "evaluations": int(history["evaluations"][last]),
        "best_train_score_search": float(best_score),
        "best_train": suite.accuracies(final_train, suite.train),
        "best_test": suite.accuracies(final_test, suite.test),
        "initial_test": {name: float(history[f"test_{name}"][0]) for name in (*suite.names, "all")},
        "rejected_nonfinite_candidates": int(state.num_rejected_nonfinite),
        "final_step_size": float(history["step_size"][last]),
        **loop.speed(),
    }
    return summary | {"best_genome": best_genome}


# ------------------------------------------------------------------------------------------- M2N2
M2N2_METRICS = ("step", "evaluations", "best_train", "children_accepted", "archive_filled", "rejected_nonfinite")


def warmup_child(key: jax.Array, seeds_flat: jax.Array) -> jax.Array:
    """A random merge of two distinct seeds: split-point SLERP with a uniform split and mixing ratio.

    M2N2's LLM experiment starts from the seeds and a warm-up of random merges of them; the crossover
    is the search's own, with parents drawn uniformly instead of by fitness and attraction.
    """
    n, dims = seeds_flat.shape
    key_pair, key_split, key_ratio = jax.random.split(key, 3)
    pair = jax.random.choice(key_pair, n, (2,), replace=False)
    split = jax.random.randint(key_split, (), 0, dims + 1)
    ratio = jax.random.uniform(key_ratio)
    return split_point_crossover(split, ratio, seeds_flat[pair[0]], seeds_flat[pair[1]])


def run_m2n2(stage_dir: pathlib.Path, config: EvolveConfig, seeds: Seeds, suite: SkillSuite, resume: bool,
             progress: bool) -> dict:
    """M2N2 (or the GA baseline) over the seeds' flattened parameters, no mutation, with a warm-up."""
    from evojax_merge.strategies.m2n2 import M2N2, Params

    m = config.m2n2
    n_seeds = len(seeds.models)
    if m.archive == "map_elites":
        from evojax_merge.strategies import map_elites

        # One descriptor axis per skill: the child's accuracy on that skill's training problems.
        sizes = suite.sizes(suite.train)
        membership = np.repeat(np.eye(len(sizes), dtype=bool), sizes, axis=1)  # (skills, points)
        strategy = map_elites.MAPElites(seeds.models[0], map_elites.group_mean_descriptor(membership), len(sizes),
                                        bins=m.bins, num_children=m.children_per_step, crossover=m.crossover,
                                        split_point=m.split_point, mutation=False)
        params = map_elites.Params(mutation_std=0.0)
    else:
        if n_seeds > m.archive_size:
            raise ConfigError(f"{n_seeds} seeds do not fit m2n2.archive_size {m.archive_size}")
        strategy = M2N2(m.archive_size, seeds.models[0], num_children=m.children_per_step, crossover=m.crossover,
                        split_point=m.split_point, matchmaker=m.matchmaker, mutation=False)
        params = Params(alpha=m.alpha, mutation_std=0.0)
    budget = m.evaluations - n_seeds
    warmup = min(m.warmup, max(budget, 0))
    steps = warmup + max(budget - warmup, 0) // m.children_per_step
    if steps < 1:
        raise ConfigError(f"m2n2.evaluations ({m.evaluations}) leaves no evaluation after the {n_seeds} seeds")
    population = stack_trees(*seeds.models)
    seeds_flat = jax.vmap(strategy.ravel)(population)
    score_all = jax.vmap(suite.scores, in_axes=(0, None))

    # Seed weights are arguments, not closure constants (which XLA would fold into the program).
    @jax.jit
    def init(key, batches, population):
        return strategy.init(key, population, score_all(population, batches), params)

    @partial(jax.jit, donate_argnums=0)  # the old archive's memory holds the new one
    def warm_step(state, key, batches, seeds_flat):
        # One child: tell() inserts a leading child axis of any length one child after another.
        key_child, key_tell = jax.random.split(key)
        child = jax.tree.map(lambda x: x[None], strategy.unravel(warmup_child(key_child, seeds_flat)))
        return strategy.tell(key_tell, child, score_all(child, batches), state, params)

    def score_children(children, batches, seeds_flat):
        del seeds_flat  # the same signature as warm_step
        return score_all(children, batches)

    mesh = evaluation_mesh(config)
    if mesh is not None:
        # Children are whole models: split over the population groups (replicated over the model axis).
        # The seeds and the warm-up children (one at a time) are scored on one device.
        check_population_divisible(m.children_per_step, mesh)
        on_mesh = population_map(lambda child, _, batches: suite.scores(child, batches), mesh,
                                 batch_size=m.children_per_step)
        score_children = lambda children, batches, _: on_mesh(children, None, batches)  # noqa: E731
    step = generation_step(lambda key, state: strategy.ask(key, state, params),
                           lambda key, children, scores, state: strategy.tell(key, children, scores, state, params),
                           score_children, mesh, donate_state=True)

    scores_of_best = jax.jit(lambda state, batches, test: suite.scores(strategy.best(state)[0], batches, test=test),
                             static_argnames="test")

    def best_member_scores(state):
        if m.archive == "map_elites":  # a grid keeps only each elite's mean: score the best one again
            return np.asarray(scores_of_best(state, suite.train, test=False))
        return _best_member_scores(state)

    key = jax.random.key(config.run.seed)
    key, key_init = jax.random.split(key)
    if resume and _has_checkpoint(stage_dir):
        # The restore needs only the state's shapes: no seed scoring, and no second archive of whole
        # models next to the restored one (the largest thing in memory: 8 GB for 15 SmolLM2 models).
        state = jax.eval_shape(init, key_init, suite.train, population)
    else:
        state = init(key_init, suite.train, population)

    def initial_row(history, state):
        _m2n2_row(history, 0, n_seeds, state, strategy, {"children_accepted": 0})

    def step_row(history, i, state, key):
        in_warmup = i <= warmup
        state, metrics = (warm_step if in_warmup else step)(state, key, suite.train, seeds_flat)
        evaluations = n_seeds + min(i, warmup) + max(i - warmup, 0) * m.children_per_step
        _m2n2_row(history, i, evaluations, state, strategy, metrics)
        return state, 1 if in_warmup else m.children_per_step

    loop = _run_loop(stage_dir, config, suite, state, key, _history(steps + 1, M2N2_METRICS, suite), steps,
                     initial_row, step_row, lambda s: scores_of_best(s, suite.test, test=True), resume, progress,
                     config.name)
    state, history, i = loop.state, loop.history, loop.last
    best, best_score = strategy.best(state)
    _plot(stage_dir, history, i, config.name)
    summary = {
        "status": loop.status,
        "strategy": "ga" if (m.archive == "m2n2" and m.alpha == 0 and not m.matchmaker) else m.archive,
        "archive_size": strategy.num_cells if m.archive == "map_elites" else m.archive_size,
        "steps": i,
        "evaluations": int(history["evaluations"][i]),
        "best_train_score_search": float(best_score),
        "best_train": suite.accuracies(best_member_scores(state), suite.train),
        "best_test": suite.accuracies(scores_of_best(state, suite.test, test=True), suite.test),
        "archive_filled": int(np.sum(np.asarray(state.filled))),
        "rejected_nonfinite_candidates": int(state.num_rejected_nonfinite),
        **loop.speed(),
    }
    return summary | {"best_params": best}


def _has_checkpoint(stage_dir: pathlib.Path) -> bool:
    if not (stage_dir / "checkpoints").is_dir():
        return False
    checkpoints = RunCheckpoints(stage_dir / "checkpoints")
    try:
        return checkpoints.resumable_step() is not None
    finally:
        checkpoints.close()


def _best_member_scores(state) -> np.ndarray:
    """Per-point training scores of the archive member with the best mean (what ``best`` returns)."""
    mean = np.where(np.asarray(state.filled), np.asarray(state.scores).mean(axis=1), -np.inf)
    return np.asarray(state.scores)[int(np.argmax(mean))]


def _m2n2_row(history, i, evaluations, state, strategy, metrics):
    history["step"][i] = i
    history["evaluations"][i] = evaluations
    history["best_train"][i] = float(strategy.best(state)[1])
    history["children_accepted"][i] = int(metrics["children_accepted"])
    history["archive_filled"][i] = int(np.sum(np.asarray(state.filled)))
    history["rejected_nonfinite"][i] = int(state.num_rejected_nonfinite)


# ------------------------------------------------------------------------------------ the stages
def run_evolve(config: EvolveConfig, run_dir: pathlib.Path, resume: bool = False, progress: bool = True) -> dict:
    """Runs (or resumes) the search of ``config`` in ``run_dir``; returns the summary also saved there."""
    run_dir = pathlib.Path(run_dir)
    search = config.search
    started = time.perf_counter()
    if search == "m2n2":
        seeds = load_seeds(config, need_base=False)
        suite = suite_for(config, seeds.config, seeds.tokenizer)
        summary = run_m2n2(run_dir, config, seeds, suite, resume, progress)
        best = summary.pop("best_params")
        if config.run.save_model:
            hf_io.save_hf_folder(run_dir / "best_model", seeds.config, best, seeds.tokenizer)
        _write_recipe(run_dir / "recipe.yaml", {"search": "m2n2", "seeds": seeds.names,
                                                "m2n2": dataclasses.asdict(config.m2n2),
                                                "best_train_score": summary["best_train_score_search"]})
    elif search == "ps":
        summary = _ps_stage(config, run_dir, resume, progress)
    elif search == "dfs":
        summary = _dfs_stage(config, run_dir, resume, progress, extra=None)
    else:  # ps_dfs
        (run_dir / "ps").mkdir(exist_ok=True)
        (run_dir / "dfs").mkdir(exist_ok=True)
        ps_summary_path = run_dir / "ps" / "summary.json"
        if resume and ps_summary_path.is_file() and _read_json(ps_summary_path).get("status") == "complete":
            ps_summary = _read_json(ps_summary_path)
        else:
            ps_summary = _ps_stage(config, run_dir / "ps", resume, progress)
            write_json(ps_summary_path, ps_summary)
        if ps_summary["status"] != "complete":
            summary = {"status": ps_summary["status"], "ps": ps_summary}
        else:
            seeds = load_seeds(config, need_base=get_method(config.ps.merge_method).needs_base)
            problem, _ = ps_problem(config, seeds, suite_for(config, seeds.config, seeds.tokenizer))
            ps_model = problem.model(np.load(run_dir / "ps" / "best_genome.npy"))
            dfs_summary = _dfs_stage(config, run_dir / "dfs", resume, progress,
                                     extra=(str(run_dir / "ps" / "best_model"), seeds.config, ps_model))
            write_json(run_dir / "dfs" / "summary.json", dfs_summary)
            summary = {"status": dfs_summary["status"], "ps": ps_summary, "dfs": dfs_summary,
                       "best_test": dfs_summary["best_test"], "best_train": dfs_summary["best_train"]}
    if config.run.score_seeds:
        summary["seeds_test"] = score_seeds(config)
    summary = {"name": config.name, "search": search, **summary,
               "wall_seconds_total_this_session": round(time.perf_counter() - started, 2)}
    write_json(run_dir / "summary.json", summary)
    return summary


def score_seeds(config: EvolveConfig) -> dict[str, dict[str, float]]:
    """Test scores of every seed model (and the base), per skill: the baselines a merge must beat."""
    seeds = load_seeds(config, need_base=False, same_depth=False)
    names, models = list(seeds.names), list(seeds.models)
    base_folder = seed_folders(config)[1]
    if base_folder is not None:
        names.append(base_folder)
        models.append(hf_io.load_hf_folder(base_folder, DTYPES[config.seeds.dtype])[1])
    out, compiled = {}, {}
    for name, model, model_config in zip(names, models, seeds.configs + [seeds.config]):
        if model_config not in compiled:  # one compilation per architecture, not per model
            suite = suite_for(config, model_config, seeds.tokenizer)
            compiled[model_config] = suite, jax.jit(partial(suite.scores, test=True))
        suite, scores = compiled[model_config]
        out[name] = suite.accuracies(scores(model, suite.test), suite.test)
    return out


def _ps_stage(config: EvolveConfig, stage_dir: pathlib.Path, resume: bool, progress: bool) -> dict:
    needs_base = get_method(config.ps.merge_method).needs_base
    seeds = load_seeds(config, need_base=needs_base)
    suite = suite_for(config, seeds.config, seeds.tokenizer)
    problem, space = ps_problem(config, seeds, suite)
    summary = run_genome_search(stage_dir, problem, config.ps.search, config, resume, progress,
                                f"{config.name} (PS)")
    base_folder = seed_folders(config)[1]
    genome = summary.pop("best_genome")
    if config.run.save_model:
        merged = problem.model(genome)
        hf_io.save_hf_folder(stage_dir / "best_model", seeds.config, merged, seeds.tokenizer)
    genes = {name: np.asarray(v).tolist() for name, v in decode(space, genome).items()}
    _write_recipe(stage_dir / "recipe.yaml", {
        "search": "ps", "merge_method": space.method, "models": seeds.names, "base_model": base_folder,
        "layout": {"axes": ["model", "group", "family"], "families": list(space.families),
                   "groups": [f"layers {g * space.layer_group}-"
                              f"{min((g + 1) * space.layer_group, space.num_layers) - 1}"
                              for g in range(space.n_layer_groups)]
                   + (["input embeddings", "final norm + head"] if space.embeddings_as_layers
                      else ["embeddings, final norm, head"])},
        "genes": genes, "options": dict(space.options), "merge_seed": config.ps.merge_seed,
    })
    mergekit = to_mergekit(space, genome, [str(pathlib.Path(n).resolve()) for n in seeds.names],
                           None if base_folder is None else str(pathlib.Path(base_folder).resolve()),
                           dtype=config.seeds.dtype, random_seed=config.ps.merge_seed)
    _write_recipe(stage_dir / "mergekit.yaml", mergekit)
    return summary


def _dfs_stage(config: EvolveConfig, stage_dir: pathlib.Path, resume: bool, progress: bool, extra) -> dict:
    seeds = load_seeds(config, need_base=False, same_depth=False)
    names, configs, models = list(seeds.names), list(seeds.configs), list(seeds.models)
    if extra is not None:  # PS + DFS: the PS merge joins the pool as model A
        name, extra_config, extra_model = extra
        names, configs, models = [name] + names, [extra_config] + configs, [extra_model] + models
    if len(models) < 2:
        raise ConfigError("a data-flow search needs at least two models in its pool")
    llama.check_same_architecture(configs, names, same_depth=False)
    space = dfs_space(config, configs)
    pool = dataflow.make_pool(models)
    model_config = dataflow.path_config(configs[0], space.max_hops)
    suite = suite_for(config, model_config, seeds.tokenizer)
    problem = dfs_problem(config, space, pool, suite)
    summary = run_genome_search(stage_dir, problem, config.dfs.search, config, resume, progress,
                                f"{config.name} (DFS)")
    genome = summary.pop("best_genome")
    path = space.decode(jnp.asarray(genome))
    layers, scales = dataflow.active_hops(path)
    hops = [{"layer": l, "model": names[space.source(l)[0]], "model_layer": space.source(l)[1], "scale": s}
            for l, s in zip(layers, scales)]
    summary["path_length"] = len(layers)
    if config.run.save_model:
        path_io.save_path_model(stage_dir / "best_model", configs[0], space, pool, path, names, seeds.tokenizer)
    _write_recipe(stage_dir / "recipe.yaml", {
        "search": "dfs", "pool": names, "layers_per_model": list(space.layers_per_model),
        "repeats": space.repeats, "max_hops": space.max_hops, "hops": hops,
    })
    return summary


# ------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class LoopResult:
    state: Any
    history: dict[str, np.ndarray]
    status: str  # "complete" or "interrupted"
    last: int  # last history row written
    candidates: int  # candidates evaluated in this session
    seconds: float  # wall time of this session's steps

    def speed(self) -> dict:
        return {"wall_seconds_this_session": round(self.seconds, 2),
                "candidates_per_second": round(self.candidates / self.seconds, 3) if self.seconds > 0 else None}


def _run_loop(stage_dir, config: EvolveConfig, suite: SkillSuite, state, key, history, total: int,
              initial_row, step_row, scores_of_best, resume: bool, progress: bool, title: str) -> LoopResult:
    """Rows 1..total of a search: each ``step_row(history, row, state, key) -> (state, candidates)`` is one
    compiled step; the best model's test score every ``run.log_every`` rows; metrics.csv rewritten every row;
    checkpoints every ``run.checkpoint_every`` rows, at the end and on Ctrl-C / SIGTERM (then it stops).

    ``resume`` restores state, key and history from the latest checkpoint in ``stage_dir/checkpoints``;
    otherwise ``initial_row(history, state)`` fills row 0 and the starting point is tested.
    """
    checkpoints = RunCheckpoints(stage_dir / "checkpoints")
    first = 0
    try:
        if resume and checkpoints.resumable_step() is not None:
            # Columns added after a checkpoint was written (step_size) restore as empty.
            absent = checkpoints.absent_entries("history", [k for k in OPTIONAL_METRIC_KEYS if k in history])
            like = {"state": state, "key": jax.random.key_data(key), "row": np.int32(0),
                    "history": {k: v for k, v in history.items() if k not in absent}}
            _, restored = checkpoints.restore(like)
            state = restored["state"]
            history = {k: np.full_like(v, np.nan) if k in absent else np.asarray(restored["history"][k])
                       for k, v in history.items()}  # keep the column order
            key, first = jax.random.wrap_key_data(restored["key"]), int(restored["row"])
        else:
            initial_row(history, state)
            _log_test(history, 0, scores_of_best(state), suite)

        def save(row):
            checkpoints.save(row, {"state": state, "key": jax.random.key_data(key), "history": history,
                                   "row": np.int32(row)})

        status, started, candidates, last = "complete", time.perf_counter(), 0, first
        bar = _bar(progress, total, first, title)
        with _StopOnSignal() as stop:
            for row in range(first + 1, total + 1):
                last = row
                key, key_step = jax.random.split(key)
                state, evaluated = step_row(history, row, state, key_step)
                candidates += evaluated
                if row % config.run.log_every == 0 or row == total:
                    _log_test(history, row, scores_of_best(state), suite)
                _write_metrics(stage_dir, history, row, suite)
                bar.update(1)
                bar.set_postfix(train=f"{history['best_train'][row]:.3f}")
                if stop.requested:
                    status = "interrupted"
                    save(row)
                    break
                every = config.run.checkpoint_every
                if every and (row % every == 0 or row == total):
                    save(row)
        bar.close()
    finally:
        checkpoints.close()
    return LoopResult(state, history, status, last, candidates, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------- helpers
def _step_size(state) -> float:
    """The search distribution's step size (sigma) of a genome search state, NaN if it has none."""
    size = step_size(state.es_state)
    return np.nan if size is None else float(size)


def _history(rows: int, keys, suite: SkillSuite) -> dict[str, np.ndarray]:
    history = {k: np.zeros(rows, np.float64) for k in keys}
    for name in (*suite.names, "all"):
        history[f"test_{name}"] = np.full(rows, np.nan)
    return history


def _log_test(history, row, scores, suite: SkillSuite):
    for name, value in suite.accuracies(np.asarray(scores), suite.test).items():
        history[f"test_{name}"][row] = value


def _write_metrics(stage_dir: pathlib.Path, history, last: int, suite: SkillSuite):
    keys = list(history)
    rows = [[_cell(history[k][i]) for k in keys] for i in range(last + 1)]
    write_csv(stage_dir / "metrics.csv", keys, rows)


def _cell(value):
    value = float(value)
    if math.isnan(value):
        return ""
    # 6 significant digits (a small step size keeps its digits; 6 decimals would round 4.8e-7 to 0).
    return int(value) if value.is_integer() else float(f"{value:.6g}")


def _plot(stage_dir, history, last, title):
    x = history["evaluations"][: last + 1]
    curves = [{"label": "test (best so far)", "forward_passes": x, "values": history["test_all"][: last + 1, None]}]
    train = history["best_train"][: last + 1]
    if np.any(np.isfinite(train)):
        curves.insert(0, {"label": "train (best so far)", "forward_passes": x, "values": train[:, None]})
    finite = [c for c in curves if np.all(np.isfinite(c["values"][-1]))]
    for c in finite:  # NaN rows (generations without a test evaluation) are left out of the line
        keep = np.isfinite(c["values"][:, 0])
        c["forward_passes"], c["values"] = c["forward_passes"][keep], c["values"][keep]
    plot_curves(finite, stage_dir / "scores.png", title=title, ylabel="score (%)")


def _write_recipe(path: pathlib.Path, recipe: dict):
    write_atomic(path, yaml.safe_dump(recipe, sort_keys=False))


def _read_json(path):
    import json

    return json.loads(pathlib.Path(path).read_text())


def _bar(enabled, total, initial, name):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="gen", disable=not enabled, dynamic_ncols=True)


def resume_evolve(run_dir: str | pathlib.Path, progress: bool = True) -> dict:
    """Continues the search in ``run_dir`` from its latest checkpoint, with the config saved there."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    return run_evolve(load_evolve_config(run_dir / "config.yaml"), run_dir, resume=True, progress=progress)
