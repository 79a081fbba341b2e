"""MAP-Elites: cell assignment, elite replacement, non-finite children, descriptors, a run through the runner."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.config import load_config
from evojax_merge.errors import ConfigError
from evojax_merge.run import runner
from evojax_merge.strategies.map_elites import MAPElites, Params, group_mean_descriptor
from run_helpers import run_config

# Four data points: axis 0 is the mean score on points {0, 1}, axis 1 on points {2, 3}.
MEMBERSHIP = [[True, True, False, False], [False, False, True, True]]


def strategy(bins=10, **kw):
    return MAPElites({"w": jnp.zeros((2,))}, group_mean_descriptor(MEMBERSHIP), num_axes=2, bins=bins, **kw)


def empty_state(m):
    no_models = {"w": jnp.zeros((0, 2), jnp.float32)}
    return m.init(jax.random.PRNGKey(0), no_models, jnp.zeros((0, 4), jnp.float32), m.default_params)


def tell_one(m, state, child_row, child_scores):
    children = {"w": jnp.asarray([child_row], jnp.float32)}
    return m.tell(jax.random.PRNGKey(1), children, jnp.asarray([child_scores], jnp.float32), state, Params())


@pytest.mark.parametrize(
    "descriptor, cell",
    [
        ([0.0, 0.0], (0, 0)),
        ([1.0, 1.0], (9, 9)),  # the upper edge belongs to the last bin
        ([1.0, 0.0], (9, 0)),
        ([0.1, 0.5], (1, 5)),  # on a boundary: the upper bin
        ([0.7, 0.3], (7, 3)),  # 0.7 is 0.69999999 in float32 and 0.3 is 0.30000001: still bins 7 and 3
        ([0.0999, 0.95], (0, 9)),
        ([0.6999, 0.2999], (6, 2)),  # just below a boundary stays below
        ([-0.5, 1.5], (0, 9)),  # outside [0, 1]: the edge cells
    ],
)
def test_cell_assignment(descriptor, cell):
    m = strategy()
    assert int(m.cell_index(jnp.asarray(descriptor, jnp.float32))) == cell[0] * 10 + cell[1]


def test_cell_assignment_of_exact_fractions():
    # k/n for every k of n = 7 and n = 10 with 10 bins: bin floor(10 k / n), computed in integers.
    m = MAPElites({"w": jnp.zeros(1)}, lambda s: s, num_axes=1, bins=10)
    for n in (7, 10, 720, 717):
        k = np.arange(n + 1)
        fractions = jnp.asarray(k, jnp.float32) / n
        cells = jax.vmap(lambda d: m.cell_index(d[None]))(fractions)
        np.testing.assert_array_equal(cells, np.minimum(10 * k // n, 9))


def test_descriptor_is_the_mean_score_per_group():
    descriptor = group_mean_descriptor([[True, True, True, False], [False, True, False, True]])
    np.testing.assert_allclose(descriptor(jnp.asarray([1.0, 0.0, 1.0, 1.0])), [2 / 3, 1 / 2])
    with pytest.raises(ValueError, match=r"groups \[1\] have no data points"):
        group_mean_descriptor([[True, False], [False, False]])


def test_child_fills_an_empty_cell_then_better_replaces_and_worse_does_not():
    m = strategy()
    state = empty_state(m)
    assert int(state.filled.sum()) == 0
    # Scores [1, 0 | 1, 1]: descriptor (0.5, 1.0) -> cell (5, 9); quality 0.75.
    state, metrics = tell_one(m, state, [1, 1], [1, 0, 1, 1])
    cell = 5 * 10 + 9
    assert int(metrics["children_accepted"]) == 1 and int(metrics["archive_filled"]) == 1
    np.testing.assert_array_equal(state.archive[cell], [1, 1])
    assert float(state.quality[cell]) == 0.75
    # Same cell (0.5, 1.0) is only reachable with quality 0.75: equal quality does not replace.
    same, metrics = tell_one(m, state, [2, 2], [0, 1, 1, 1])
    assert int(metrics["children_accepted"]) == 0
    np.testing.assert_array_equal(same.archive[cell], [1, 1])
    # A 2-bin grid puts (0.5, 1.0) and (1.0, 1.0) in one cell: better replaces, worse does not.
    m2 = strategy(bins=2)
    state = empty_state(m2)
    state, _ = tell_one(m2, state, [1, 1], [1, 0, 1, 1])  # quality 0.75, cell (1, 1) = 3
    better, metrics = tell_one(m2, state, [3, 3], [1, 1, 1, 1])  # quality 1.0, cell (1, 1)
    assert int(metrics["children_accepted"]) == 1
    np.testing.assert_array_equal(better.archive[3], [3, 3])
    assert float(better.quality[3]) == 1.0
    worse, metrics = tell_one(m2, better, [4, 4], [0, 1, 1, 1])  # quality 0.75, cell (1, 1)
    assert int(metrics["children_accepted"]) == 0
    np.testing.assert_array_equal(worse.archive, better.archive)
    # A child in another cell leaves this one alone.
    other, metrics = tell_one(m2, worse, [5, 5], [0, 0, 0, 0])  # cell (0, 0)
    assert int(metrics["children_accepted"]) == 1 and int(other.filled.sum()) == 2
    np.testing.assert_array_equal(other.archive[3], [3, 3])


def test_non_finite_child_is_rejected_and_counted():
    m = strategy(bins=2)
    state, _ = tell_one(m, empty_state(m), [1, 1], [0, 0, 0, 0])  # cell (0, 0), quality 0
    for bad in ([np.nan, 1, 1, 1], [1, 1, np.inf, 1], [-np.inf, 0, 0, 0]):
        state_after, metrics = tell_one(m, state, [7, 7], bad)
        assert int(metrics["children_accepted"]) == 0
        np.testing.assert_array_equal(state_after.archive, state.archive)
        np.testing.assert_array_equal(state_after.filled, state.filled)
        assert int(m.counters(state_after)["rejected_nonfinite"]) == int(m.counters(state)["rejected_nonfinite"]) + 1
        state = state_after
    assert int(m.counters(state)["rejected_nonfinite"]) == 3
    assert int(m.counters(state)["archive_filled"]) == 1


def test_init_inserts_seeds_and_best_is_the_highest_quality_elite():
    m = strategy()
    population = {"w": jnp.asarray([[1, 1], [2, 2], [3, 3]], jnp.float32)}
    scores = jnp.asarray([[1, 0, 0, 0], [1, 1, 1, 0], [np.nan, 1, 1, 1]], jnp.float32)
    state = m.init(jax.random.PRNGKey(0), population, scores, m.default_params)
    assert int(m.counters(state)["archive_filled"]) == 2 and int(m.counters(state)["rejected_nonfinite"]) == 1
    best, quality = m.best(state)
    np.testing.assert_array_equal(best["w"], [2, 2])
    assert float(quality) == 0.75


def test_parents_come_from_occupied_cells_only():
    # Crossover and mutation off: every child is a copy of parent A, so it must be one of the elites.
    state = empty_state(strategy())
    for row, scores in [([1, 1], [1, 0, 0, 0]), ([2, 2], [1, 1, 1, 1]), ([3, 3], [0, 0, 0, 1])]:
        state, _ = tell_one(strategy(), state, row, scores)
    copies = strategy(crossover=False, mutation=False, num_children=64, archive_form="weights")
    children, _ = copies.ask(jax.random.PRNGKey(5), state, Params())
    rows = {tuple(r) for r in np.asarray(children["w"]).tolist()}
    assert rows == {(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)}  # all three drawn, nothing from the 97 empty cells


def test_short_run_through_the_runner(tmp_path):
    config = load_config(
        "experiments/digits/map_elites.yaml",
        ["problem.model.hidden_sizes=[16]", "run.evaluations=302", "run.log_every=100", "run.checkpoint_every=100",
         "run.seeds=[3, 4]"],
    )
    run_dir, summary = run_config(config, tmp_path / "run")
    assert summary["status"] == "complete" and summary["evaluations_per_seed"] == 302
    metrics = runner.read_metrics(run_dir)
    np.testing.assert_array_equal(metrics["evaluations"][:, 0], [2, 102, 202, 302])
    filled = metrics["archive_filled"]
    assert np.all(filled[0] <= 2) and np.all(np.diff(filled, axis=0) >= 0) and np.all(filled[-1] > 2)
    assert np.all(np.diff(metrics["train_score"], axis=0) >= 0)  # elites only improve
    assert np.all(filled <= 100)


def test_descriptor_classes_must_exist_in_the_data():
    config = load_config("experiments/digits/map_elites.yaml", ["strategy.descriptor_groups=[[1, 3], [12]]"])
    with pytest.raises(ConfigError, match=r"descriptor_groups\[1\]"):
        runner.build(config)


def test_descriptor_groups_default_to_odd_and_even_digits():
    config = load_config("experiments/digits/map_elites.yaml", ["strategy.descriptor_groups=null", "run.seeds=[1]"])
    resolved = runner.build(config).config.strategy
    assert resolved["descriptor_groups"] == [[1, 3, 5, 7, 9], [0, 2, 4, 6, 8]] and resolved["grid_bins"] == 10
    for groups in ("[]", "[[1, 1]]", "[[-1]]"):
        with pytest.raises(ConfigError, match=r"strategy.descriptor_groups"):
            runner.build(load_config("experiments/digits/map_elites.yaml", [f"strategy.descriptor_groups={groups}"]))
    # MAP-Elites needs a problem with descriptor groups.
    from evojax_merge.strategies.registry import build_strategy

    with pytest.raises(ConfigError, match="map_elites needs a problem with descriptor groups"):
        build_strategy({"name": "map_elites"}, types.SimpleNamespace(template={"w": jnp.zeros(2)}))
