"""The compiled evolution loop: ask -> evaluate -> tell under ``lax.scan``, vmapped over independent runs.

One run (one seed) is a :class:`RunState`; a batch of runs is the same pytree with a leading seed axis,
so ``jax.vmap`` turns 10 runs into one program whose evaluations share matrix multiplications (the
training inputs are the same for every run, so the first layer of all runs is one large GEMM).
Python only steps from one logged point to the next: there is no Python step per child.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from evojax_merge.tasks.classification import Batch


@struct.dataclass
class RunState:
    strategy_state: Any
    key: jax.Array  # raw uint32 PRNG key: checkpoints store it as plain data
    forward_passes: jax.Array  # evaluations of the training set so far (the cost unit)


@dataclasses.dataclass(frozen=True)
class Evolution:
    """Everything one run needs besides its data: the strategy and how to make and score a model.

    Args:
      strategy: an evosax-style algorithm taking per-data-point scores (e.g. :class:`M2N2`).
      strategy_params: its dynamic parameters.
      score_fn: ``(params, batch) -> (n,) scores`` (the task contract).
      init_model_fn: ``key -> params`` of one fresh seed model.
      num_seed_models: models the archive starts from.
      seed_training_fn: optional ``(models, train) -> models`` applied to the fresh seed models (leading
        axis = seed model), e.g. :func:`evojax_merge.models.pretrain.specialist_seed_models`.
      init_seed: a fixed PRNG seed for the seed models' random init (every run then starts from the same
        models); None draws them from each run's own key.
    """

    strategy: Any
    strategy_params: Any
    score_fn: Callable[[Any, Batch], jax.Array]
    init_model_fn: Callable[[jax.Array], Any]
    num_seed_models: int
    seed_training_fn: Callable[[Any, Batch], Any] | None = None
    init_seed: int | None = None

    def seed_models(self, seed_key: jax.Array, train: Batch):
        """The seed models (a pytree with a leading model axis) of the run with key ``seed_key``."""
        key_models = jax.random.split(seed_key, 3)[1] if self.init_seed is None else jax.random.PRNGKey(self.init_seed)
        models = jax.vmap(self.init_model_fn)(jax.random.split(key_models, self.num_seed_models))
        if self.seed_training_fn is not None:
            models = self.seed_training_fn(models, train)
        return models

    def init(self, seed_key: jax.Array, train: Batch) -> RunState:
        """Create and evaluate the seed models and the strategy state for one run."""
        key, _, key_strategy = jax.random.split(seed_key, 3)  # the middle key is the seed models' (seed_models)
        models = self.seed_models(seed_key, train)
        scores = jax.vmap(self.score_fn, in_axes=(0, None))(models, train)
        state = self.strategy.init(key_strategy, models, scores, self.strategy_params)
        return RunState(state, key, jnp.int32(self.num_seed_models))

    def step(self, run: RunState, train: Batch) -> RunState:
        """One generation: breed, evaluate every child on the whole training set, update the archive."""
        key, key_ask, key_tell = jax.random.split(run.key, 3)
        children, state = self.strategy.ask(key_ask, run.strategy_state, self.strategy_params)
        scores = jax.vmap(self.score_fn, in_axes=(0, None))(children, train)
        state, _ = self.strategy.tell(key_tell, children, scores, state, self.strategy_params)
        return RunState(state, key, run.forward_passes + scores.shape[0])

    def advance(self, run: RunState, train: Batch, num_steps: int) -> RunState:
        """``num_steps`` generations in one ``lax.scan``."""
        return jax.lax.scan(lambda r, _: (self.step(r, train), None), run, length=num_steps)[0]

    def report(self, run: RunState, test: Batch) -> dict[str, jax.Array]:
        """What is logged: the strategy's best model by training score, its test score, and its counters.

        Every strategy provides ``best(state) -> (params, train score)`` and ``counters(state)`` (a dict
        with ``archive_filled`` and ``rejected_nonfinite``, and ``step_size`` for evosax strategies that
        have one), so the runner does not know archive layouts.
        """
        best_model, train_score = self.strategy.best(run.strategy_state)
        return {
            "forward_passes": run.forward_passes,
            "train_accuracy": train_score,
            "test_accuracy": self.score_fn(best_model, test).mean(),
            **self.strategy.counters(run.strategy_state),
        }

    def compile_chunk(self, num_steps: int, mesh=None, donate_runs: bool = False):
        """A jitted ``(runs, train, test) -> (runs, report)`` advancing a batch of runs by ``num_steps``.

        With a ``mesh`` (see :mod:`evojax_merge.run.sharding`) the seed axis of runs and report is split
        over its devices and the data replicated; without one, everything is on the default device.
        ``donate_runs``: the new runs reuse the memory of the runs passed in, which must not be used
        again (a full CMA-ES state on digits is 3 GB: without donation both copies are alive at once).
        """

        def chunk(run, train, test):
            run = self.advance(run, train, num_steps)
            return run, self.report(run, test)

        return _jit_over_runs(jax.vmap(chunk, in_axes=(0, None, None)), mesh, donate_runs)

    def compile_init(self, mesh=None):
        """A jitted ``(seed_keys, train, test) -> (runs, report)`` for a batch of runs (``mesh``: as above)."""

        def init(seed_key, train, test):
            run = self.init(seed_key, train)
            return run, self.report(run, test)

        return _jit_over_runs(jax.vmap(init, in_axes=(0, None, None)), mesh)


def _jit_over_runs(fn, mesh, donate_runs: bool = False):
    donate = (0,) if donate_runs else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate)
    from evojax_merge.run.sharding import run_shardings

    runs, data = run_shardings(mesh)
    # Shardings are pytree prefixes: one per argument / output covers every leaf under it. The report is
    # tiny and replicated, so every process (of a multi-host job) can read all of it.
    return jax.jit(fn, in_shardings=(runs, data, data), out_shardings=(runs, data), donate_argnums=donate)


def log_schedule(forward_passes: int, num_seed_models: int, children_per_step: int, log_every: int) -> list[int]:
    """Generations between consecutive logged points, so that the run spends exactly its budget.

    Every entry is ``log_every // children_per_step`` except possibly a shorter last one; the budget
    counts the seed models' evaluations. A final partial generation is dropped rather than overspent.
    """
    total_steps = (forward_passes - num_seed_models) // children_per_step
    per_log = log_every // children_per_step
    full, rest = divmod(total_steps, per_log)
    return [per_log] * full + ([rest] if rest else [])
