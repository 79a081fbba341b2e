"""Separate split points per parameter group and relative scores: M2N2's diffusion-experiment options.

The grouped crossover is checked against the plain split-point crossover run on every group's sub-vector
on its own; relative scores against fitness sharing and attraction worked out by hand; both options
through short M2N2 / MAP-Elites runs and the config; and the strategies without them against the formula
they used before the options existed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.errors import ConfigError
from evojax_merge.merge.crossover import (CrossoverGroups, crossover_groups, grouped_split_point_crossover,
                                          split_point_crossover)
from evojax_merge.strategies.archive import random_seed_merge
from evojax_merge.strategies.archive import gaussian_mutation, offspring
from evojax_merge.strategies.m2n2 import (M2N2, Params, attraction, relative_to_worst, resource_weights,
                                          sample_proportional)
from evojax_merge.strategies.map_elites import MAPElites, group_mean_descriptor

# jax.tree order of a dict is sorted keys: attn/k (4), attn/q (2 x 3), mlp (5), z_attn (2) -> 17 entries.
TEMPLATE = {"attn": {"q": jnp.zeros((2, 3)), "k": jnp.zeros(4)}, "mlp": jnp.zeros(5), "z_attn": jnp.zeros(2)}


def vectors(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)


def per_group_crossover(splits, ratios, a, b, ids):
    """The plain split-point crossover on every group's sub-vector on its own, scattered back."""
    child = np.zeros_like(a)
    for g in range(len(splits)):
        mask = ids == g
        child[mask] = split_point_crossover(jnp.int32(splits[g]), jnp.float32(ratios[g]), a[mask], b[mask])
    return child


def grouped(splits, ratios, a, b, groups):
    return np.asarray(grouped_split_point_crossover(jnp.asarray(splits, jnp.int32), jnp.asarray(ratios, jnp.float32),
                                                    jnp.asarray(a), jnp.asarray(b), groups))


# --- crossover_groups ---------------------------------------------------------------------------------

def test_groups_of_a_dict_pytree():
    groups = crossover_groups(TEMPLATE, ["attn"])
    assert groups.names == ("attn", "rest")
    np.testing.assert_array_equal(groups.sizes, [12, 5])
    # attn/k, attn/q (one run of 10), mlp (rest), z_attn (its path contains "attn").
    np.testing.assert_array_equal(groups.ids, [0] * 10 + [1] * 5 + [0] * 2)
    np.testing.assert_array_equal(groups.rank, list(range(10)) + list(range(5)) + [10, 11])
    assert groups.ids.dtype == groups.rank.dtype == np.int32
    np.testing.assert_array_equal(groups.run_lengths, [10, 5, 2])


def test_a_leaf_goes_to_the_first_pattern_that_matches():
    groups = crossover_groups(TEMPLATE, [r"\['q'\]", "attn", "mlp"])  # every leaf matched: no "rest"
    assert groups.names == (r"\['q'\]", "attn", "mlp")
    np.testing.assert_array_equal(groups.sizes, [6, 6, 5])
    np.testing.assert_array_equal(groups.ids, [1] * 4 + [0] * 6 + [2] * 5 + [1] * 2)
    np.testing.assert_array_equal(groups.rank, [0, 1, 2, 3] + list(range(6)) + list(range(5)) + [4, 5])


def test_shape_dtype_structs_are_templates_too():
    structs = jax.eval_shape(lambda: TEMPLATE)
    np.testing.assert_array_equal(crossover_groups(structs, ["mlp"]).ids, crossover_groups(TEMPLATE, ["mlp"]).ids)


@pytest.mark.parametrize("patterns, words", [
    (["("], "not a regular expression"),
    (["mlp", "nothing_here"], "matches no parameter"),
    (["attn", "q"], "earlier pattern"),  # every "q" leaf is already attn's
])
def test_bad_patterns_are_config_errors_naming_the_key(patterns, words):
    with pytest.raises(ConfigError) as error:
        crossover_groups(TEMPLATE, patterns)
    message = str(error.value)
    assert "strategy.split_groups" in message and repr(patterns[-1]) in message and words in message
    assert "\n" not in message


# --- grouped_split_point_crossover --------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_grouped_equals_the_crossover_of_every_group_on_its_own(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 3, 40)  # groups interleaved entry by entry
    groups = CrossoverGroups.from_ids(ids)
    sizes = groups.sizes
    # Every group at one end of its range or inside it, each group in turn at each.
    ends = [lambda n: 0, lambda n: n, lambda n: rng.integers(0, n + 1)]
    splits = [ends[(g + seed) % 3](sizes[g]) for g in range(3)]
    ratios = rng.uniform(size=3)
    a, b = vectors(40, seed)
    np.testing.assert_allclose(grouped(splits, ratios, a, b, groups), per_group_crossover(splits, ratios, a, b, ids),
                               rtol=2e-5, atol=2e-6)


def test_grouped_on_leaf_groups_equals_the_crossover_of_every_group_on_its_own():
    groups = crossover_groups(TEMPLATE, ["attn"])
    a, b = vectors(17, 1)
    for splits in ([0, 0], [12, 5], [7, 2], [11, 0]):
        np.testing.assert_allclose(grouped(splits, [0.3, 0.8], a, b, groups),
                                   per_group_crossover(splits, [0.3, 0.8], a, b, groups.ids), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("split", [0, 1, 9, 17])
@pytest.mark.parametrize("w", [0.0, 0.4, 1.0])
def test_one_group_is_the_plain_crossover(split, w):
    groups = crossover_groups(TEMPLATE, ["."])
    assert groups.names == (".",) and groups.num_groups == 1
    a, b = vectors(17, split)
    plain = split_point_crossover(jnp.int32(split), jnp.float32(w), jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(grouped([split], [w], a, b, groups), plain, rtol=1e-6, atol=1e-7)


def test_ends_of_the_split_range():
    # Ratio 0: entries before the split are parent A's, those after parent B's. Group 0 split at its end
    # is all A, group 1 split at 0 is all B.
    groups = crossover_groups(TEMPLATE, ["attn"])
    a, b = vectors(17, 2)
    ids = groups.ids
    child = grouped([12, 0], [0.0, 0.0], a, b, groups)
    np.testing.assert_allclose(child[ids == 0], a[ids == 0], atol=1e-6)
    np.testing.assert_allclose(child[ids == 1], b[ids == 1], atol=1e-6)
    child = grouped([0, 5], [0.0, 0.0], a, b, groups)
    np.testing.assert_allclose(child[ids == 0], b[ids == 0], atol=1e-6)
    np.testing.assert_allclose(child[ids == 1], a[ids == 1], atol=1e-6)


def test_each_group_has_its_own_angle():
    # Group 0 of the parents is parallel (linear fallback), group 1 orthogonal (spherical).
    groups = CrossoverGroups.from_ids([0, 0, 1, 1])
    a = np.array([1, 2, 1, 0], np.float32)
    b = np.array([2, 4, 0, 1], np.float32)
    child = grouped([2, 2], [0.5, 0.5], a, b, groups)
    np.testing.assert_allclose(child, [1.5, 3, np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def test_keeps_the_parents_dtype_and_compiles():
    groups = crossover_groups(TEMPLATE, ["attn"])
    a, b = (jnp.asarray(v, jnp.bfloat16) for v in vectors(17))
    cross = jax.jit(lambda s, r: grouped_split_point_crossover(s, r, a, b, groups))
    child = cross(jnp.array([3, 2]), jnp.array([0.2, 0.7]))
    assert child.dtype == jnp.bfloat16 and child.shape == (17,)


def test_offspring_draws_one_split_and_ratio_per_group():
    groups = crossover_groups(TEMPLATE, ["attn"])
    a, b = (jnp.asarray(v) for v in vectors(17, 3))
    u = jnp.array([0.5, 0.9999999, 0.25, 0.75], jnp.float32)  # splits floor(0.5 * 13) = 6 and 5 (the end)
    child = offspring(None, u, a, b, crossover=True, split_point=True, mutation_std=None, split_groups=groups)
    np.testing.assert_array_equal(child, grouped([6, 5], [0.25, 0.75], a, b, groups))
    global_slerp = offspring(None, u, a, b, crossover=True, split_point=False, mutation_std=None, split_groups=groups)
    np.testing.assert_array_equal(global_slerp, grouped([12, 5], [0.25, 0.75], a, b, groups))


def test_warmup_merge_with_groups_draws_one_split_and_ratio_per_group():
    groups = crossover_groups(TEMPLATE, ["attn"])
    seeds = jnp.asarray(np.stack(vectors(17, 4)))
    key = jax.random.PRNGKey(5)
    key_pair, key_split, key_ratio = jax.random.split(key, 3)
    pair = jax.random.choice(key_pair, 2, (2,), replace=False)
    splits = jax.random.randint(key_split, (2,), 0, jnp.array([13, 6]))
    ratios = jax.random.uniform(key_ratio, (2,))
    expected = grouped_split_point_crossover(splits, ratios, seeds[pair[0]], seeds[pair[1]], groups)
    np.testing.assert_array_equal(random_seed_merge(key, seeds, groups), expected)


# --- relative scores ----------------------------------------------------------------------------------

# Three archive members and an empty slot (whose zeros must not count as the worst score).
S = jnp.array([[0.7, 0.7, 0.7], [0.9, 0.5, 0.7], [0.5, 0.7, 0.9], [0.0, 0.0, 0.0]], jnp.float32)
FILLED = jnp.array([True, True, True, False])


def test_relative_resource_weights_and_attraction_by_hand():
    relative = relative_to_worst(S, FILLED)
    # Worst per point [0.5, 0.5, 0.7]: rows [.2 .2 0], [.4 0 0], [0 .2 .2].
    np.testing.assert_allclose(relative[:3], [[0.2, 0.2, 0], [0.4, 0, 0], [0, 0.2, 0.2]], atol=1e-6)
    w = resource_weights(relative, FILLED, 1.0)
    # z = [.6, .4, .2], c = [.4, .2, .2].
    np.testing.assert_allclose(w, [2 / 3, 1 / 2, 1], rtol=1e-5)
    np.testing.assert_allclose((relative @ w)[:3], [0.2 * 2 / 3 + 0.1, 0.4 * 2 / 3, 0.1 + 0.2], rtol=1e-5)
    # Parent A = slot 0: slot 1 adds .2 on point 0, slot 2 .2 on point 2.
    np.testing.assert_allclose(attraction(relative, relative[0], w)[:3], [0, 0.2 * 2 / 3, 0.2], rtol=1e-5, atol=1e-7)


def test_relative_to_worst_with_nobody_counted_subtracts_nothing():
    np.testing.assert_array_equal(relative_to_worst(S, jnp.zeros(4, bool)), S)


def make_m2n2(archive_size=4, **kw):
    return M2N2(archive_size, {"w": jnp.zeros((2,))}, **kw)


def archive_state(m, scores, filled):
    rows = jnp.arange(2 * len(scores), dtype=jnp.float32).reshape(-1, 2)
    state = m.init(jax.random.PRNGKey(0), {"w": rows}, jnp.asarray(scores, jnp.float32), m.default_params)
    return state.replace(filled=jnp.asarray(filled))


def test_relative_scores_choose_the_member_to_replace():
    # With the child [.8 .6 .9] the worst per point is [.5 .5 .7]: relative fitness (as above with the
    # child counted: z = [.9 .5 .4], c = [.4 .2 .2]) is f = [.1689, .1778, .18], child .2733 -> slot 0
    # goes. On raw scores f = [.610, .616, .604]: slot 2 would go.
    child_scores = jnp.array([[0.8, 0.6, 0.9]], jnp.float32)
    children = {"w": jnp.array([[9.0, 9.0]])}
    for relative, dropped in ((True, 0), (False, 2)):
        m = make_m2n2(archive_size=3, relative_scores=relative)
        state = archive_state(m, S[:3], FILLED[:3])
        new, metrics = m.tell(jax.random.PRNGKey(1), children, child_scores, state, Params())
        assert int(metrics["children_accepted"]) == 1
        np.testing.assert_array_equal(new.archive[dropped], [9, 9])
        np.testing.assert_array_equal(new.scores[dropped], child_scores[0])  # the archive keeps raw scores
    # Best and slot scores stay raw means.
    np.testing.assert_allclose(m.slot_train_scores(new), np.asarray(new.scores).mean(axis=1), rtol=1e-6)


def breed_reference(m, key, scores, state):
    """M2N2's breeding written out: selection and attraction on ``scores``, then crossover and mutation."""
    p = m.archive_size
    key_choices, key_mutation = jax.random.split(jax.random.split(key, 1)[0])
    u = jax.random.uniform(key_choices, (2 * p + 2,))
    weights = resource_weights(scores, state.filled, 1.0)
    fitness = jnp.where(state.filled, scores @ weights, 0.0)
    a = sample_proportional(u[:p], fitness, state.filled)
    appeal = jnp.where(state.filled, attraction(scores, scores[a], weights), 0.0)
    appeal = jnp.where(jnp.sum(appeal) > 0, appeal, fitness)
    b = sample_proportional(u[p:2 * p], appeal, state.filled)
    num_dims = state.archive.shape[1]
    split = jnp.minimum(jnp.floor(u[2 * p] * (num_dims + 1)), num_dims).astype(jnp.int32)
    child = split_point_crossover(split, u[2 * p + 1], state.archive[a], state.archive[b])
    return gaussian_mutation(key_mutation, child, 0.01)


def test_breeding_selects_on_relative_scores():
    m = make_m2n2(relative_scores=True)
    state = archive_state(m, S, FILLED)
    relative = jnp.asarray(np.asarray(S) - np.array([0.5, 0.5, 0.7], np.float32))
    differs = 0
    for i in range(24):
        key = jax.random.PRNGKey(i)
        child = np.asarray(m.ask(key, state, Params())[0]["w"][0])
        np.testing.assert_allclose(child, breed_reference(m, key, relative, state), rtol=1e-6, atol=1e-6)
        differs += not np.allclose(child, breed_reference(m, key, S, state), rtol=1e-6, atol=1e-6)
    assert differs > 0  # the raw scores would have bred other children


def test_without_the_options_children_are_the_old_formula():
    m = make_m2n2()
    state = archive_state(m, S, FILLED)
    for i in range(8):
        key = jax.random.PRNGKey(i)
        np.testing.assert_array_equal(m.ask(key, state, Params())[0]["w"][0], breed_reference(m, key, S, state))


def test_warmup_without_groups_is_the_old_formula():
    seeds = jnp.asarray(np.stack(vectors(17, 6)))
    key = jax.random.PRNGKey(9)
    key_pair, key_split, key_ratio = jax.random.split(key, 3)
    pair = jax.random.choice(key_pair, 2, (2,), replace=False)
    expected = split_point_crossover(jax.random.randint(key_split, (), 0, 18), jax.random.uniform(key_ratio),
                                     seeds[pair[0]], seeds[pair[1]])
    np.testing.assert_array_equal(random_seed_merge(key, seeds), expected)


# --- short runs ---------------------------------------------------------------------------------------

TARGET = jnp.linspace(-1.0, 1.0, 17)


def similarity(tree):
    """Six per-point scores in (0, 1], like a normalised similarity: never 0, so raw scores barely compete."""
    flat = jax.flatten_util.ravel_pytree(tree)[0]
    return 1.0 / (1.0 + (flat[::3] - TARGET[::3]) ** 2)


def run_steps(strategy, steps=12, num_seeds=3):
    params = strategy.default_params
    keys = jax.random.split(jax.random.PRNGKey(7), num_seeds)
    seeds = jax.vmap(lambda k: jax.tree.map(lambda x: jax.random.normal(k, x.shape), TEMPLATE))(keys)
    state = strategy.init(jax.random.PRNGKey(0), seeds, jax.vmap(similarity)(seeds), params)

    @jax.jit
    def step(key, state):
        children, state = strategy.ask(key, state, params)
        return strategy.tell(key, children, jax.vmap(similarity)(children), state, params)

    accepted = 0
    for i in range(steps):
        state, metrics = step(jax.random.PRNGKey(100 + i), state)
        accepted += int(metrics["children_accepted"])
    return state, accepted


@pytest.mark.parametrize("warmup", [0, 2])
def test_m2n2_runs_with_split_groups_and_relative_scores(warmup):
    groups = crossover_groups(TEMPLATE, ["attn"])
    m = M2N2(5, TEMPLATE, num_children=2, split_groups=groups, relative_scores=True, warmup=warmup, num_seeds=3)
    state, accepted = run_steps(m)
    assert accepted > 0 and int(jnp.sum(state.filled)) == 5
    assert np.all(np.isfinite(state.archive))
    # The archive keeps the raw scores of its members; the best is by raw mean.
    rescored = jax.vmap(lambda row: similarity(m.unravel(row)))(state.archive)
    np.testing.assert_allclose(state.scores, rescored, rtol=1e-5)
    _, score = m.best(state)
    np.testing.assert_allclose(score, np.max(np.asarray(rescored).mean(axis=1)), rtol=1e-5)


@pytest.mark.parametrize("archive_form", ["weights", "coefficients"])
def test_m2n2_breeds_with_one_split_and_ratio_per_group(archive_form):
    # The uniforms of a child: P for parent A, P for parent B, then G splits and G ratios. The coefficient
    # archive breeds the same child from the seeds (to float rounding).
    groups = crossover_groups(TEMPLATE, ["attn"])
    m = M2N2(4, TEMPLATE, split_groups=groups, mutation=False, matchmaker=False, archive_form=archive_form)
    state, _ = run_steps(m, steps=3)
    key = jax.random.PRNGKey(3)
    child_tree, _ = m.ask(key, state, Params(alpha=0.0))
    u = jax.random.uniform(jax.random.split(jax.random.split(key, 1)[0])[0], (12,))
    fitness = jnp.where(state.filled, state.scores.sum(axis=1), 0.0)  # alpha 0: summed scores
    a = sample_proportional(u[:4], fitness, state.filled)
    b = sample_proportional(u[4:8], fitness, state.filled)
    splits = jnp.minimum(jnp.floor(u[8:10] * jnp.array([13.0, 6.0])), jnp.array([12.0, 5.0]))
    parent = lambda i: m.ravel(m.member(state, i))
    expected = grouped(np.asarray(splits), u[10:], parent(a), parent(b), groups)
    np.testing.assert_allclose(m.ravel(jax.tree.map(lambda x: x[0], child_tree)), expected, rtol=1e-6, atol=1e-6)


def test_map_elites_runs_with_split_groups():
    groups = crossover_groups(TEMPLATE, ["attn", "mlp"])
    descriptor = group_mean_descriptor([[True] * 3 + [False] * 3, [False] * 3 + [True] * 3])
    me = MAPElites(TEMPLATE, descriptor, num_axes=2, bins=4, split_groups=groups, warmup=1, num_seeds=3)
    state, accepted = run_steps(me)
    assert accepted > 0 and np.all(np.isfinite(state.archive))


def test_groups_must_cover_the_solution():
    with pytest.raises(ValueError, match="cover 4 parameters"):
        M2N2(3, TEMPLATE, split_groups=CrossoverGroups.from_ids([0, 0, 1, 1]))


# --- config -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_problem():
    from evojax_merge.problems.registry import build_problem

    return build_problem({"name": "classifier"})[0]


def test_config_accepts_split_groups_and_relative_scores(digits_problem):
    from evojax_merge.strategies.registry import build_strategy

    spec = {"name": "m2n2", "split_groups": ["Dense_0"], "relative_scores": True}
    strategy, _, resolved = build_strategy(spec, digits_problem)
    assert strategy.relative_scores and strategy.split_groups.names == ("Dense_0", "rest")
    dense_0 = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(digits_problem.template["Dense_0"]))
    np.testing.assert_array_equal(strategy.split_groups.sizes, [dense_0, strategy.num_dims - dense_0])
    assert resolved["split_groups"] == ["Dense_0"] and resolved["relative_scores"] is True

    strategy, _, resolved = build_strategy({"name": "map_elites", "split_groups": ["Dense_0"]}, digits_problem)
    assert strategy.split_groups.names == ("Dense_0", "rest")

    default, _, resolved = build_strategy({"name": "m2n2"}, digits_problem)
    assert default.split_groups is None and not default.relative_scores
    assert resolved["split_groups"] is None and resolved["relative_scores"] is False


@pytest.mark.parametrize("name", ["m2n2", "map_elites"])
@pytest.mark.parametrize("value, words", [
    (["Dense_7"], "matches no parameter"),
    (["("], "not a regular expression"),
    ([], "at least one pattern"),
    ([""], "empty pattern"),
    ("Dense_0", "must be a list"),
    ([3], "must be of type str"),
])
def test_bad_split_groups_are_config_errors(digits_problem, name, value, words):
    from evojax_merge.strategies.registry import build_strategy

    with pytest.raises(ConfigError, match="strategy.split_groups") as error:
        build_strategy({"name": name, "split_groups": value}, digits_problem)
    assert words in str(error.value)


def test_relative_scores_must_be_a_bool(digits_problem):
    from evojax_merge.strategies.registry import build_strategy

    with pytest.raises(ConfigError, match="strategy.relative_scores"):
        build_strategy({"name": "m2n2", "relative_scores": "yes"}, digits_problem)
