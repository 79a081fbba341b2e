"""What archive-based strategies over parameter pytrees share (M2N2, MAP-Elites).

The archive is a fixed number of slots, each holding one model, filled or empty. Parents are chosen one
child per PRNG key (``_choose``, the subclass's selection), children are bred by M2N2's split-point SLERP
crossover (and optional Gaussian mutation) and inserted one after another (``_insert``); the subclass
defines those two and where a slot's mean training score lives.

Two forms of the archive, chosen by ``archive_form``:

- ``"weights"``: every slot is a flat parameter vector (a ravelled pytree, as in evosax).
- ``"coefficients"``: every slot is the seed models combined with coefficients that are constant on
  segments of the flat vector (:mod:`~evojax_merge.strategies.coefficient_archive`): the archive costs
  the seeds, not its size, and a child is materialised only to be scored. Exact without mutation, where
  every child is arithmetic on the seeds.
- ``"auto"`` (default): coefficients without mutation when all slots' coefficients (K segments x n seeds
  each) take less room than one member's weights (language models: always; a 19k-parameter classifier
  over a run of 10,000 evaluations keeps its weights), else weights.

A warm-up (``warmup`` children, M2N2's language-model setting) breeds the first children as random merges
of two distinct seed models instead: a split-point SLERP of the pair with a uniform split point and mixing
ratio, parents drawn uniformly rather than by fitness. The seeds are kept in the state when a warm-up or
the coefficient form needs them (``seeds``); checkpoints leave them out (:meth:`ArchiveStrategy.checkpoint_view`)
and a resumed run takes them from the problem again (:meth:`ArchiveStrategy.reattach`).

With ``split_groups`` (:class:`~evojax_merge.merge.crossover.CrossoverGroups`) every crossover, the
warm-up's included, draws one split point and one mixing ratio per group of parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp

from evojax_merge.merge.crossover import CrossoverGroups, grouped_split_point_crossover, split_point_crossover
from evojax_merge.strategies import coefficient_archive as coefficients

ARCHIVE_FORMS = ("auto", "coefficients", "weights")
# Segment slots of a coefficient archive built without a budget (the runner sizes them from its budget).
DEFAULT_MAX_SEGMENTS = 4096


class ArchiveStrategy:
    """Base of evosax-style strategies whose state has ``archive``, ``filled``, ``num_rejected_nonfinite``,
    ``seeds``, ``seed_norms`` and ``pending``.

    Args:
      solution: a parameter pytree of the evolved model (shapes and dtypes only are used).
      num_children: children bred per ``ask`` and inserted one after another in ``tell``.
      warmup: children bred as random merges of two seeds before the strategy proper (rounded up to whole
        steps of ``num_children``); 0: none.
      num_seeds: seed models to start from when the problem makes them (a problem with given seed
        models, e.g. fine-tuned language models, hands all of them over).
      split_groups: groups of parameters crossed over with separate split points and mixing ratios
        (:func:`~evojax_merge.merge.crossover.crossover_groups`); None: one split point over all of them.
      crossover: breed by crossover (False: the child is a copy of parent A, then mutated).
      split_point: draw a split point (False: one global SLERP with the mixing ratio).
      mutation: add N(0, mutation_std^2) noise (on from scratch, off for pre-trained seeds).
      archive_form: "auto", "coefficients" or "weights" (see the module docstring).
      max_segments: segment slots of the coefficient form; None: what a run of ``evaluations`` children
        can need (:func:`~evojax_merge.strategies.coefficient_archive.capacity_for`), or
        ``DEFAULT_MAX_SEGMENTS`` without a budget.
      evaluations: the run's budget (children bred at most).
      num_slots: archive slots (what ``"auto"`` weighs the coefficients of against one model).
    """

    needs_seed_scores = True  # the seeds are the archive's first members: the engine scores them

    def __init__(self, solution, num_children: int, warmup: int = 0, num_seeds: int = 2,
                 split_groups: CrossoverGroups | None = None, *, crossover: bool = True, split_point: bool = True,
                 mutation: bool = True, archive_form: str = "auto", max_segments: int | None = None,
                 num_slots: int = 1, evaluations: int | None = None):
        if num_children < 1:
            raise ValueError(f"num_children must be at least 1, got {num_children}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if archive_form not in ARCHIVE_FORMS:
            raise ValueError(f"archive_form must be one of {ARCHIVE_FORMS}, got {archive_form!r}")
        if archive_form == "coefficients" and mutation:
            raise ValueError("archive_form 'coefficients' needs mutation off: a mutated child is not a "
                             "combination of the seeds")
        self.solution = solution
        self.num_children = num_children
        self.warmup = warmup
        self.num_seeds = num_seeds  # seed models the archive starts from, when a problem makes them from a key
        self.warmup_steps = -(-warmup // num_children)
        self.crossover = crossover
        self.split_point = split_point
        self.mutation = mutation
        template = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), solution)
        flat, self._unravel = jax.flatten_util.ravel_pytree(template)
        self.num_dims = flat.size
        self.dtype = flat.dtype
        if split_groups is not None and split_groups.num_dims != self.num_dims:
            raise ValueError(f"split_groups cover {split_groups.num_dims} parameters, the solution has {self.num_dims}")
        self.split_groups = split_groups
        # The coefficient form treats "no groups" as one group over the whole vector.
        self.groups = split_groups or coefficients.whole_vector_groups(self.num_dims)
        if max_segments is None:
            max_segments = (DEFAULT_MAX_SEGMENTS if evaluations is None
                            else coefficients.capacity_for(self.groups, evaluations))
        self.max_segments = max(max_segments, len(self.groups.run_ids) + 1)
        # auto: coefficients where they are exact (no mutation) and all slots' coefficients (K segments x n
        # seeds each) take less room than one member's weights. Every step touches all of them (merging
        # equal segments), so a small model with a long run keeps its weights and its speed.
        smaller = num_slots * self.max_segments * max(num_seeds, 2) < self.num_dims
        self.compact = archive_form == "coefficients" or (archive_form == "auto" and not mutation and smaller)

    @property
    def archive_form(self) -> str:
        return "coefficients" if self.compact else "weights"

    def ravel(self, tree) -> jax.Array:
        """Flat vector of one parameter pytree (the layout of a weights archive's rows)."""
        return jax.flatten_util.ravel_pytree(tree)[0]

    def unravel(self, flat: jax.Array):
        """Parameter pytree of one flat vector."""
        return self._unravel(flat)

    # ------------------------------------------------------------------------------------ archive rows
    def _empty_archive(self, flat_seeds: jax.Array, num_rows: int):
        if self.compact:
            return coefficients.init(flat_seeds, num_rows, self.groups, self.max_segments)
        return jnp.zeros((num_rows, self.num_dims), self.dtype)

    def _archive_of_seeds(self, flat_seeds: jax.Array, num_rows: int):
        """An archive whose first rows are the seed models and the others empty."""
        if self.compact:
            archive = self._empty_archive(flat_seeds, num_rows)
            return archive.replace(coef=archive.coef.at[:flat_seeds.shape[0]].set(coefficients.seed_rows(archive)))
        # One concatenation: updating rows of a zero archive made XLA hold a second copy of it.
        pad = jnp.zeros((num_rows - flat_seeds.shape[0], self.num_dims), self.dtype)
        return jnp.concatenate([flat_seeds.astype(self.dtype), pad])

    def _seed_rows(self, archive, flat_seeds: jax.Array) -> jax.Array:
        """The rows that are the seed models themselves."""
        return coefficients.seed_rows(archive) if self.compact else flat_seeds

    def _put(self, archive, slot: jax.Array, row: jax.Array, accept: jax.Array):
        """``archive`` with ``row`` in ``slot`` where ``accept`` (a dynamic update, in place inside scan)."""
        if self.compact:
            return archive.replace(coef=archive.coef.at[slot].set(jnp.where(accept, row, archive.coef[slot])))
        return archive.at[slot].set(jnp.where(accept, row, archive[slot]))

    def _initial_state_fields(self, flat_seeds: jax.Array) -> dict:
        """The fields every archive state has besides the subclass's scores: seeds kept for a warm-up or
        the coefficient form, their squared norms (to recognise them when a run resumes), and the
        coefficient form's rows of the children between ``ask`` and ``tell``."""
        keep = self.compact or self.warmup > 0
        n = flat_seeds.shape[0]
        return {"seeds": flat_seeds if keep else None,
                "seed_norms": squared_norms(flat_seeds) if keep else None,
                "pending": jnp.zeros((self.num_children, self.max_segments, n), jnp.float32) if self.compact else None}

    def member(self, state, index: jax.Array):
        """Parameter pytree of archive slot ``index``."""
        if self.compact:
            return self._unravel(coefficients.materialise(state.archive, state.archive.coef[index], state.seeds))
        return self._unravel(state.archive[index])

    def slot_train_scores(self, state) -> jax.Array:
        """Mean training score of every slot, -inf for empty ones."""
        raise NotImplementedError

    def best(self, state):
        """(parameter pytree, mean training score) of the slot with the best mean training score."""
        train_score = self.slot_train_scores(state)
        index = jnp.argmax(train_score)
        return self.member(state, index), train_score[index]

    def counters(self, state) -> dict[str, jax.Array]:
        """Run-level counts every strategy reports: occupied archive slots, children rejected for NaN/inf
        scores; the coefficient form adds its live segments and the splits that found no free slot."""
        out = {"archive_filled": jnp.sum(state.filled), "rejected_nonfinite": state.num_rejected_nonfinite}
        if self.compact:
            out |= {"segments": state.archive.count, "segment_overflow": state.archive.overflow}
        return out

    # ------------------------------------------------------------------------------ checkpoint, resume
    def checkpoint_view(self, state):
        """What a checkpoint keeps: everything but the seeds, which the problem gives again on resume."""
        return state.replace(seeds=None)

    def reattach(self, state, population):
        """``(state, same)``: a restored state with the seed models ``population`` put back, and whether
        they are the ones the run started from (same squared norms, to float rounding)."""
        if state.seed_norms is None:
            return state, jnp.bool_(True)
        flat = jax.vmap(self.ravel)(population)
        norms = squared_norms(flat)
        same = (norms.shape == state.seed_norms.shape) and jnp.allclose(norms, state.seed_norms, rtol=1e-5, atol=0.0)
        return state.replace(seeds=flat), same

    # ----------------------------------------------------------------------------------- ask and tell
    @property
    def num_split_draws(self) -> int:
        """Uniform draws a crossover takes: a split point and a mixing ratio per group."""
        return 2 * self.groups.num_groups

    def ask(self, key: jax.Array, state, params):
        """Breed ``num_children`` children; returns (children pytree with a leading child axis, state)."""
        keys = jax.random.split(key, self.num_children)
        if self.compact:
            return self._ask_coefficients(keys, state, params)

        def breed():
            return jax.vmap(self._breed_weights, in_axes=(0, None, None))(keys, state, params)

        if self.warmup:
            def warm():
                merge = functools.partial(random_seed_merge, split_groups=self.split_groups)
                return jax.vmap(merge, in_axes=(0, None))(keys, state.seeds)

            children = jax.lax.cond(state.generation_counter < self.warmup_steps, warm, breed)
        else:
            children = breed()
        return jax.vmap(self._unravel)(children), state

    def _breed_weights(self, key: jax.Array, state, params) -> jax.Array:
        index_a, index_b, u_split_and_ratio, key_mutation = self._choose(key, state, params)
        return offspring(
            key_mutation, u_split_and_ratio, state.archive[index_a], state.archive[index_b],
            crossover=self.crossover, split_point=self.split_point,
            mutation_std=params.mutation_std if self.mutation else None, split_groups=self.split_groups,
        )

    def _ask_coefficients(self, keys: jax.Array, state, params):
        archive = coefficients.merge_equal_segments(state.archive)

        def breed(key):
            index_a, index_b, u_split_and_ratio, _ = self._choose(key, state, params)
            splits, ratios = draw_splits(u_split_and_ratio, self.groups.sizes, self.split_point)
            return index_a, index_b, splits, ratios, jnp.bool_(False)

        def warm(key):
            pair, splits, ratios = warmup_draws(key, state.seeds.shape[0], self.num_dims, self.split_groups)
            return pair[0], pair[1], splits, ratios, jnp.bool_(True)

        if self.warmup:
            draws = jax.lax.cond(state.generation_counter < self.warmup_steps,
                                 lambda: jax.vmap(warm)(keys), lambda: jax.vmap(breed)(keys))
        else:
            draws = jax.vmap(breed)(keys)
        index_a, index_b, splits, ratios, from_seeds = draws
        positions = jax.vmap(lambda s: coefficients.group_positions(self.groups, s))(splits)
        if self.crossover or self.warmup:
            archive, positions = coefficients.insert_boundaries(archive, state.seeds, positions)
        seeds_as_rows = coefficients.seed_rows(archive)

        def parent(index, seed):
            return jnp.where(seed, seeds_as_rows[jnp.minimum(index, seeds_as_rows.shape[0] - 1)],
                             archive.coef[index])

        row_a = jax.vmap(parent)(index_a, from_seeds)
        if self.crossover or self.warmup:  # the warm-up's random merges cross over even without crossover
            row_b = jax.vmap(parent)(index_b, from_seeds)
            cross = lambda a, b, p, r: coefficients.crossover_row(archive, a, b, p, r, self.groups.num_groups)
            crossed = jax.vmap(cross)(row_a, row_b, positions, ratios)
            rows = crossed if self.crossover else jnp.where(from_seeds[:, None, None], crossed, row_a)
        else:
            rows = row_a
        children = jax.vmap(lambda row: self._unravel(coefficients.materialise(archive, row, state.seeds)))(rows)
        return children, state.replace(archive=archive, pending=rows)

    def tell(self, key: jax.Array, children, scores: jax.Array, state, params):
        """Insert the evaluated children one after another; returns (state, metrics).

        The coefficient form inserts the rows its last ``ask`` bred (``children`` are their weights).
        """
        del key
        rows = state.pending if self.compact else jax.vmap(self.ravel)(children)
        state, accepted = self._insert_each(rows, scores, state, params)
        state = state.replace(generation_counter=state.generation_counter + 1)
        train_score = self.slot_train_scores(state)
        metrics = {
            "children_accepted": jnp.sum(accepted),
            "best_index": jnp.argmax(train_score),
            "best_train_score": jnp.max(train_score),
            "archive_filled": jnp.sum(state.filled),
        }
        return state, metrics

    def _insert_each(self, rows: jax.Array, scores: jax.Array, state, params):
        """``_insert`` every (row, scores) pair in order; returns (state, (n,) accepted)."""
        if rows.shape[0] == 1:  # no scan for the paper's one child per step
            state, accepted = self._insert(rows[0], scores[0], state, params)
            return state, accepted[None]

        def insert(state, row_and_scores):
            return self._insert(*row_and_scores, state, params)

        return jax.lax.scan(insert, state, (rows, scores))

    def _choose(self, key: jax.Array, state, params):
        """(index_a, index_b, 2 G uniform draws for the split points and mixing ratios, mutation key)."""
        raise NotImplementedError

    def _insert(self, row: jax.Array, child_scores: jax.Array, state, params):
        """(state, accepted) after offering one evaluated child (an archive row) to the archive."""
        raise NotImplementedError


def squared_norms(flat_models: jax.Array) -> jax.Array:
    """(n,) squared norms of flat models, in float32: what identifies a run's seed models on resume."""
    return jnp.sum(jnp.square(flat_models.astype(jnp.float32)), axis=1)


def warmup_draws(key: jax.Array, num_seeds: int, num_dims: int, split_groups: CrossoverGroups | None = None):
    """The draws of a random merge of two distinct seeds: (pair (2,), splits (G,), ratios (G,)).

    M2N2's language-model experiment starts from the seeds and a warm-up of random merges of them; the
    crossover is the search's own, with parents drawn uniformly instead of by fitness and attraction.
    With groups, one uniform split (over 0..size, both ends included) and one mixing ratio per group;
    without, one of each over the whole vector (G = 1).
    """
    key_pair, key_split, key_ratio = jax.random.split(key, 3)
    pair = jax.random.choice(key_pair, num_seeds, (2,), replace=False)
    if split_groups is None:
        return pair, jax.random.randint(key_split, (), 0, num_dims + 1)[None], jax.random.uniform(key_ratio)[None]
    sizes = jnp.asarray(split_groups.sizes)
    return pair, jax.random.randint(key_split, sizes.shape, 0, sizes + 1), jax.random.uniform(key_ratio, sizes.shape)


def random_seed_merge(key: jax.Array, seeds_flat: jax.Array,
                      split_groups: CrossoverGroups | None = None) -> jax.Array:
    """A random merge of two distinct seeds (flat (n, num_dims), n >= 2): split-point SLERP with the
    uniform split and mixing ratio of :func:`warmup_draws`; returns the (num_dims,) child."""
    pair, splits, ratios = warmup_draws(key, seeds_flat.shape[0], seeds_flat.shape[1], split_groups)
    if split_groups is None:
        return split_point_crossover(splits[0], ratios[0], seeds_flat[pair[0]], seeds_flat[pair[1]])
    return grouped_split_point_crossover(splits, ratios, seeds_flat[pair[0]], seeds_flat[pair[1]], split_groups)


def offspring(key_mutation, u_split_and_ratio, parent_a, parent_b, *, crossover: bool, split_point: bool, mutation_std,
              split_groups: CrossoverGroups | None = None):
    """One child of two flat parent vectors: split-point SLERP crossover, then optional Gaussian mutation.

    Args:
      key_mutation: PRNG key of the mutation noise.
      u_split_and_ratio: two U(0, 1) draws: the split point (uniform over 0..num_dims, both ends included)
        and the mixing ratio. With G ``split_groups``: 2 G draws, G split points (group g's uniform over
        0..sizes[g]) then G mixing ratios.
      parent_a, parent_b: (num_dims,) flat parameter vectors.
      crossover: False returns (a mutated copy of) parent A.
      split_point: False uses one global SLERP with the mixing ratio (split at num_dims; with groups,
        one SLERP per group with its ratio).
      mutation_std: std of the Gaussian added to every entry, or None for no mutation.
      split_groups: groups crossed over each with its own split point and ratio; None: one group.
    Returns:
      The (num_dims,) child.
    """
    if crossover:
        sizes = [parent_a.shape[0]] if split_groups is None else split_groups.sizes
        splits, ratios = draw_splits(u_split_and_ratio, sizes, split_point)
        if split_groups is None:
            child = split_point_crossover(splits[0], ratios[0], parent_a, parent_b)
        else:
            child = grouped_split_point_crossover(splits, ratios, parent_a, parent_b, split_groups)
    else:
        child = parent_a
    if mutation_std is not None:
        child = gaussian_mutation(key_mutation, child, mutation_std)
    return child


def draw_splits(u_split_and_ratio: jax.Array, sizes, split_point: bool) -> tuple[jax.Array, jax.Array]:
    """(G,) split points and (G,) mixing ratios of 2 G U(0, 1) draws (G split draws, then G ratios).

    Group g's split point is uniform over 0..sizes[g], both ends included (the split is the first entry of
    the group that takes the second mixing ratio); without ``split_point`` it is sizes[g] (one SLERP).
    """
    u_splits, ratios = jnp.split(u_split_and_ratio, 2)
    sizes = jnp.asarray(sizes, jnp.int32)
    if split_point:
        return jnp.minimum(jnp.floor(u_splits * (sizes + 1)), sizes).astype(jnp.int32), ratios
    return sizes, ratios


def gaussian_mutation(key: jax.Array, params: jax.Array, std) -> jax.Array:
    """Add N(0, std^2) to every entry of a flat parameter vector."""
    return params + (std * jax.random.normal(key, params.shape)).astype(params.dtype)
