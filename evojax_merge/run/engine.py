"""The compiled loop of every problem and strategy: ask -> score -> tell, vmapped over independent runs.

One run (one seed) is a :class:`RunState`; a batch of runs is the same pytree with a leading seed axis,
so ``jax.vmap`` turns 10 runs into one program whose evaluations share matrix multiplications (the
fitness data is the same for every run, so the first layer of all runs' candidates is one large GEMM).
Generations are compiled in chunks: a ``lax.scan`` of many generations when scoring is cheap (digits),
one generation per call when it is not (language models): ``generations_per_call``, a setting of the
same code path. Python only steps from one call to the next: there is no Python step per candidate.

Candidates are scored all at once (``vmap``) or ``batch_size`` at a time (``lax.map``, which bounds the
memory of whole-model candidates). With a population x model mesh (:mod:`~evojax_merge.run.population_sharding`)
the strategy's ``ask`` and ``tell`` run unpartitioned on one device and only the scoring is spread: fused,
the mesh's sharding would propagate into the strategy's arithmetic. Meshes of any shape give the same
run bit for bit (1 x 1 equals 2 x 2); the unmeshed program is compiled differently and rounds differently
(about 1e-8), which a full CMA-ES can turn into other samples within a few generations: its covariance
starts as the identity, and its eigendecomposition picks one of many equally valid bases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class RunState:
    strategy_state: Any
    key: jax.Array  # raw uint32 PRNG key: checkpoints store it as plain data
    evaluations: jax.Array  # candidates scored on the fitness split so far (the cost unit)


@dataclasses.dataclass(frozen=True)
class Engine:
    """A problem and a strategy, and how to score candidates.

    Args:
      problem: the Problem contract (:mod:`evojax_merge.problems.base`).
      strategy: the strategy contract (:mod:`evojax_merge.strategies.registry`).
      strategy_params: its dynamic parameters.
      num_seeds: seed candidates a run starts from.
      batch_size: candidates scored at once (``lax.map``); None scores a whole generation under ``vmap``.
    """

    problem: Any
    strategy: Any
    strategy_params: Any
    num_seeds: int
    batch_size: int | None = None

    @property
    def scores_seeds(self) -> bool:
        """Whether the seed candidates are scored: when they are candidates, or when the strategy starts from
        their scores (an archive's first members), even if the problem calls them a starting point only."""
        return bool(self.problem.evaluate_seeds or getattr(self.strategy, "needs_seed_scores", False))

    @property
    def seed_cost(self) -> int:
        """Evaluations the start costs: the seed candidates if they are scored."""
        return self.num_seeds if self.scores_seeds else 0

    def evaluate(self, candidates, fitness_data) -> jax.Array:
        """(n, points) scores of candidates with a leading axis n."""
        if self.batch_size is None:
            return jax.vmap(self.problem.score, in_axes=(0, None))(candidates, fitness_data)
        return jax.lax.map(lambda c: self.problem.score(c, fitness_data), candidates, batch_size=self.batch_size)

    def init(self, seed_key: jax.Array, fitness_data) -> RunState:
        """Make (and score) the seed candidates and the strategy state of one run."""
        key, key_seeds, key_strategy = jax.random.split(seed_key, 3)
        seeds = self.problem.seed_candidates(key_seeds, self.num_seeds, fitness_data)
        scores = self.evaluate(seeds, fitness_data) if self.scores_seeds else None
        state = self.strategy.init(key_strategy, seeds, scores, self.strategy_params)
        return RunState(state, key, jnp.int32(self.seed_cost))

    def step(self, run: RunState, fitness_data) -> RunState:
        """One generation: ask, score every candidate on the whole fitness split, tell."""
        key, key_ask, key_tell = jax.random.split(run.key, 3)
        candidates, state = self.strategy.ask(key_ask, run.strategy_state, self.strategy_params)
        scores = self.evaluate(candidates, fitness_data)
        state, _ = self.strategy.tell(key_tell, candidates, scores, state, self.strategy_params)
        return RunState(state, key, run.evaluations + scores.shape[0])

    def advance(self, run: RunState, fitness_data, num_steps: int) -> RunState:
        """``num_steps`` generations in one ``lax.scan``."""
        return jax.lax.scan(lambda r, _: (self.step(r, fitness_data), None), run, length=num_steps)[0]

    def checkpoint_view(self, runs: RunState) -> RunState:
        """What a checkpoint keeps of ``runs``: the strategy may leave out what the problem gives again (an
        archive's copy of the seed models), see :meth:`reattach`."""
        view = getattr(self.strategy, "checkpoint_view", None)
        return runs if view is None else runs.replace(strategy_state=view(runs.strategy_state))

    def reattach(self, run: RunState, seed_key: jax.Array, fitness_data) -> tuple[RunState, jax.Array]:
        """``(run, same)``: one restored run with what :meth:`checkpoint_view` left out put back (the seed
        candidates of ``seed_key``, made as :meth:`init` made them) and whether they are those the run
        started from."""
        reattach = getattr(self.strategy, "reattach", None)
        if reattach is None:
            return run, jnp.bool_(True)
        _, key_seeds, _ = jax.random.split(seed_key, 3)
        seeds = self.problem.seed_candidates(key_seeds, self.num_seeds, fitness_data)
        state, same = reattach(run.strategy_state, seeds)
        return run.replace(strategy_state=state), same

    def report(self, run: RunState, test_data) -> dict[str, jax.Array]:
        """What is logged: the best candidate's training score and test scores, and the strategy's counters.

        Every strategy answers ``best(state) -> (candidate, training score)`` and ``counters(state)``, so
        the engine knows neither archive layouts nor search distributions.
        """
        best, train_score = self.strategy.best(run.strategy_state)
        scores = self.problem.test_score(best, test_data)
        report = {"evaluations": run.evaluations, "train_score": jnp.asarray(train_score, jnp.float32),
                  "test_score": scores.mean()}
        start = 0
        for name, size in self.problem.test_groups():
            report[f"test_{name}"] = scores[start:start + size].mean()
            start += size
        return report | dict(self.strategy.counters(run.strategy_state))

    def candidates_per_step(self, fitness_data) -> int:
        """Candidates one generation scores (the leading axis of ``ask``), from shapes alone."""
        state = jax.eval_shape(self.init, jax.random.PRNGKey(0), fitness_data)
        candidates, _ = jax.eval_shape(lambda s: self.strategy.ask(jax.random.PRNGKey(0), s, self.strategy_params),
                                       state.strategy_state)
        return int(jax.tree.leaves(candidates)[0].shape[0])

    # -------------------------------------------------------------------------------- compiled calls
    def compile_chunk(self, num_steps: int, mesh=None, donate_runs: bool = False, report: bool = True):
        """A jitted ``(runs, fitness, test) -> (runs, report)`` advancing a batch of runs by ``num_steps``.

        ``report=False``: the report is None (a call inside a logged interval: the test split, often far
        larger than one generation's work, is scored only at logged points).

        With a runs ``mesh`` (:mod:`evojax_merge.run.sharding`) the seed axis of runs and report is split
        over its devices and the data replicated; without one, everything is on the default device.
        ``donate_runs``: the new runs reuse the memory of the runs passed in, which must not be used
        again (a full CMA-ES state on digits is 3 GB: without donation both copies are alive at once).
        """

        def chunk(run, fitness, test):
            run = self.advance(run, fitness, num_steps)
            return run, self.report(run, test) if report else None

        return _jit_over_runs(jax.vmap(chunk, in_axes=(0, None, None)), mesh, donate_runs)

    def compile_init(self, mesh=None):
        """A jitted ``(seed_keys, fitness, test) -> (runs, report)`` for a batch of runs."""

        def init(seed_key, fitness, test):
            run = self.init(seed_key, fitness)
            return run, self.report(run, test)

        return _jit_over_runs(jax.vmap(init, in_axes=(0, None, None)), mesh)

    def population_mesh_step(self, mesh, report: bool = True):
        """``(runs, fitness, test) -> (runs, report)`` of one generation of one run (seed axis of 1) whose
        candidates are scored over a population x model ``mesh`` (see the module docstring); ``report``:
        as for :meth:`compile_chunk`."""
        from evojax_merge.run.population_sharding import population_map

        batch = self.batch_size or 1
        score = population_map(lambda c, models, batches: self.problem.score(c, {**batches, "models": models}),
                               mesh, batch_size=batch, models_leading_axes=getattr(self.problem, "model_leading_axes", 1))
        params = self.strategy_params
        ask = jax.jit(lambda key, state: self.strategy.ask(key, state, params))
        tell = jax.jit(lambda key, c, scores, state: self.strategy.tell(key, c, scores, state, params)[0])
        split = jax.jit(lambda key: jax.random.split(key, 3))
        report_of = jax.jit(self.report)

        def step(runs, fitness, test):
            run = jax.tree.map(lambda x: x[0], runs)
            key, key_ask, key_tell = split(run.key)
            candidates, state = ask(key_ask, run.strategy_state)
            others = {k: v for k, v in fitness.items() if k != "models"}
            scores = score(candidates, fitness["models"], others)
            scores = jax.device_put(scores, jax.tree.leaves(candidates)[0].sharding)
            state = tell(key_tell, candidates, scores, state)
            run = RunState(state, key, run.evaluations + scores.shape[0])
            return jax.tree.map(lambda x: x[None], (run, report_of(run, test) if report else None))

        return step


def _jit_over_runs(fn, mesh, donate_runs: bool = False):
    donate = (0,) if donate_runs else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate)
    from evojax_merge.run.sharding import run_shardings

    runs, data = run_shardings(mesh)
    # Shardings are pytree prefixes: one per argument / output covers every leaf under it. The report is
    # tiny and replicated, so every process (of a multi-host job) can read all of it.
    return jax.jit(fn, in_shardings=(runs, data, data), out_shardings=(runs, data), donate_argnums=donate)


def log_schedule(evaluations: int, seed_cost: int, per_step: int, log_every: int) -> list[int]:
    """Generations between consecutive logged points, so that the run spends exactly its budget.

    Every entry is ``log_every // per_step`` except possibly a shorter last one; the budget counts the
    seed candidates' evaluations. A final partial generation is dropped rather than overspent.
    """
    total_steps = (evaluations - seed_cost) // per_step
    per_log = log_every // per_step
    full, rest = divmod(total_steps, per_log)
    return [per_log] * full + ([rest] if rest else [])


def calls(num_steps: int, generations_per_call: int | None) -> list[int]:
    """The compiled calls one logged interval of ``num_steps`` generations is cut into."""
    if generations_per_call is None or generations_per_call >= num_steps:
        return [num_steps]
    full, rest = divmod(num_steps, generations_per_call)
    return [generations_per_call] * full + ([rest] if rest else [])


def shapes_of(tree):
    """``jax.ShapeDtypeStruct`` of every leaf (what tracing needs, without holding the arrays)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
