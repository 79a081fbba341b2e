"""The M2N2 archive: steady-state replacement, ties, empty slots, non-finite scores, ablation switches."""

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.strategies.m2n2 import M2N2, Params


def strategy(archive_size=3, **kw):
    return M2N2(archive_size, {"w": jnp.zeros((2,))}, **kw)


def make_state(m, rows, scores, filled=None):
    population = {"w": jnp.asarray(rows, jnp.float32)}
    state = m.init(jax.random.PRNGKey(0), population, jnp.asarray(scores, jnp.float32), m.default_params)
    if filled is not None:
        state = state.replace(filled=jnp.asarray(filled))
    return state


def tell_one(m, state, child_row, child_scores):
    children = {"w": jnp.asarray([child_row], jnp.float32)}
    return m.tell(jax.random.PRNGKey(1), children, jnp.asarray([child_scores], jnp.float32), state, Params())


def test_init_fills_first_slots_and_leaves_others_empty():
    m = strategy(archive_size=4)
    state = make_state(m, [[1, 2], [3, 4]], [[1, 0], [0, 1]])
    assert state.archive.shape == (4, 2)
    np.testing.assert_array_equal(state.filled, [True, True, False, False])
    np.testing.assert_array_equal(state.archive[:2], [[1, 2], [3, 4]])


def test_weakest_member_is_replaced():
    m = strategy()
    s = [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]]
    state = make_state(m, [[0, 0], [1, 1], [2, 2]], s)
    # With the child [1,1,1,1]: z = [3,2,3,2], f = [5/6, 2/3, 5/6], child 5/3 -> slot 1 is dropped.
    new, metrics = tell_one(m, state, [9, 9], [1, 1, 1, 1])
    assert int(metrics["children_accepted"]) == 1
    np.testing.assert_array_equal(new.archive, [[0, 0], [9, 9], [2, 2]])
    np.testing.assert_array_equal(new.scores[1], [1, 1, 1, 1])


def test_tie_keeps_the_child():
    m = strategy(archive_size=2)
    state = make_state(m, [[0, 0], [1, 1]], [[1, 0], [0, 1]])
    # Child [1, 0]: z = [2, 1], f = [1/2, 1], child 1/2 ties with slot 0, the weakest.
    new, metrics = tell_one(m, state, [5, 5], [1, 0])
    assert int(metrics["children_accepted"]) == 1
    np.testing.assert_array_equal(new.archive, [[5, 5], [1, 1]])


def test_weaker_child_is_discarded():
    m = strategy(archive_size=2)
    state = make_state(m, [[0, 0], [1, 1]], [[1, 1], [1, 0]])
    new, metrics = tell_one(m, state, [5, 5], [0, 0])
    assert int(metrics["children_accepted"]) == 0
    np.testing.assert_array_equal(new.archive, state.archive)
    np.testing.assert_array_equal(new.scores, state.scores)


def test_empty_slot_is_filled_before_anyone_is_dropped():
    m = strategy(archive_size=3)
    state = make_state(m, [[0, 0], [1, 1]], [[1, 1], [1, 0]])
    new, metrics = tell_one(m, state, [5, 5], [0, 0])  # a child that scores nothing still takes the empty slot
    assert int(metrics["children_accepted"]) == 1
    np.testing.assert_array_equal(new.filled, [True, True, True])
    np.testing.assert_array_equal(new.archive[2], [5, 5])


def test_non_finite_scores_never_enter_the_archive():
    m = strategy(archive_size=3)
    state = make_state(m, [[0, 0], [1, 1]], [[1, 1], [1, 0]])
    new, metrics = tell_one(m, state, [5, 5], [1, np.nan])
    assert int(metrics["children_accepted"]) == 0
    assert int(new.num_rejected_nonfinite) == 1
    np.testing.assert_array_equal(new.filled, [True, True, False])
    assert np.all(np.isfinite(new.scores))


def test_parents_come_only_from_filled_slots():
    # Without crossover or mutation a child is a copy of parent A: it must be one of the filled rows.
    m = strategy(archive_size=5, crossover=False, mutation=False)
    state = make_state(m, [[1, 1], [2, 2]], [[1, 0, 1], [0, 1, 1]])
    keys = jax.random.split(jax.random.PRNGKey(3), 300)
    children, _ = jax.vmap(lambda k: m.ask(k, state, Params()))(keys)
    rows = {tuple(r) for r in np.asarray(children["w"]).reshape(-1, 2)}
    assert rows == {(1.0, 1.0), (2.0, 2.0)}


def test_matchmaker_guard_when_parent_a_dominates():
    # Model 0 is right everywhere model 1 is: nobody attracts, B falls back to fitness; no NaN.
    m = strategy(archive_size=2, mutation=False)
    state = make_state(m, [[1.0, 0.0], [0.0, 1.0]], [[1, 1], [1, 0]])
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    children, _ = jax.vmap(lambda k: m.ask(k, state, Params()))(keys)
    assert np.all(np.isfinite(children["w"]))


def test_mutation_std():
    m = M2N2(2, {"w": jnp.zeros((20000,))}, crossover=False)
    state = m.init(jax.random.PRNGKey(0), {"w": jnp.zeros((1, 20000))}, jnp.ones((1, 3)), Params())
    child, _ = m.ask(jax.random.PRNGKey(1), state, Params(mutation_std=0.01))
    assert abs(float(jnp.std(child["w"])) - 0.01) < 0.0005
    assert abs(float(jnp.mean(child["w"]))) < 0.0005


def test_several_children_per_step_are_inserted_in_turn():
    m = strategy(archive_size=2, num_children=2)
    state = make_state(m, [[0, 0], [1, 1]], [[1, 1, 0], [1, 0, 0]])
    children = {"w": jnp.asarray([[5, 5], [6, 6]], jnp.float32)}
    scores = jnp.asarray([[1, 1, 1], [1, 1, 1]], jnp.float32)
    new, metrics = m.tell(jax.random.PRNGKey(0), children, scores, state, Params())
    # Child 1: z = [3, 2, 1], f = [5/6, 1/3], child 11/6 -> replaces slot 1. Child 2 is then scored
    # against the updated archive: z = [3, 3, 2], f = [2/3, 7/6], child 7/6 -> replaces slot 0.
    assert int(metrics["children_accepted"]) == 2
    assert {tuple(r) for r in np.asarray(new.archive)} == {(5.0, 5.0), (6.0, 6.0)}
