"""The coefficient archive: members as seed coefficients on segments equal the archive of weights.

Unit level: Gram matrices over any range, boundaries that change no member, merging that undoes them, and
the crossover of rows against the crossover of the materialised parents. Run level: M2N2, its ablations,
GA and MAP-Elites from the digits experiment's pre-trained seeds (no mutation), each run with both
archive forms over hundreds of generations: the same acceptances, scores and test curve, and weights equal
to float rounding; a resumed coefficient run equals an uninterrupted one, and checkpoints hold no seeds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evojax_merge.config import load_config
from evojax_merge.errors import CheckpointError
from evojax_merge.merge.crossover import CrossoverGroups, grouped_split_point_crossover
from evojax_merge.run import runner
from evojax_merge.strategies import coefficient_archive as ca
from run_helpers import archive_weights, final_runs, run_config, run_interrupted

jax.config.update("jax_enable_x64", False)


def random_seeds(n=3, num_dims=37, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, num_dims)), jnp.float32)


def materialised(archive, seeds):
    return np.stack([np.asarray(ca.materialise(archive, row, seeds, block=8)) for row in archive.coef])


def reference(archive, seeds):
    """Rows written out entry by entry from the segment starts (numpy, float64)."""
    starts, count = np.asarray(archive.starts), int(archive.count)
    segment = np.searchsorted(starts[:count], np.arange(seeds.shape[1]), side="right") - 1
    coef = np.asarray(archive.coef, np.float64)
    return np.einsum("rxi,ix->rx", coef[:, segment], np.asarray(seeds, np.float64))


@given(st.integers(0, 37), st.integers(0, 37), st.sampled_from([1, 5, 8, 37]))
@settings(max_examples=30, deadline=None)
def test_gram_range_is_the_seeds_inner_products_over_the_range(lo, hi, block):
    seeds = random_seeds()
    lo, hi = min(lo, hi), max(lo, hi)
    expected = np.asarray(seeds, np.float64)[:, lo:hi] @ np.asarray(seeds, np.float64)[:, lo:hi].T
    np.testing.assert_allclose(ca.gram_range(seeds, jnp.int32(lo), jnp.int32(hi), block=block), expected,
                               rtol=1e-5, atol=1e-5)


def archive_with_rows(seeds, groups, capacity=16, rows=4, seed=1):
    archive = ca.init(seeds, rows, groups, capacity)
    rng = np.random.default_rng(seed)
    return archive.replace(coef=jnp.asarray(rng.normal(size=archive.coef.shape), jnp.float32))


GROUPS = CrossoverGroups.from_ids([0] * 10 + [1] * 7 + [0] * 12 + [2] * 8)


@given(st.lists(st.integers(0, 37), min_size=1, max_size=8))
@settings(max_examples=25, deadline=None)
def test_boundaries_change_no_member_and_merging_undoes_them(positions):
    seeds = random_seeds()
    archive = archive_with_rows(seeds, GROUPS)
    before = materialised(archive, seeds)
    np.testing.assert_allclose(before, reference(archive, seeds), rtol=1e-5, atol=1e-5)
    cut, used = ca.insert_boundaries(archive, seeds, jnp.asarray(positions, jnp.int32))
    np.testing.assert_array_equal(used, positions)  # room for all of them: none moved
    inside = {p for p in positions if 0 < p < 37} - set(GROUPS.run_starts.tolist())
    assert int(cut.count) == len(GROUPS.run_ids) + len(inside)
    np.testing.assert_allclose(materialised(cut, seeds), before, rtol=1e-6, atol=1e-6)
    # Every segment's Gram matrix is that of its entries.
    starts = np.asarray(cut.starts)
    ends = np.append(starts[1:], 37)
    for k in range(int(cut.count)):
        x = np.asarray(seeds, np.float64)[:, starts[k]:ends[k]]
        np.testing.assert_allclose(cut.gram[k], x @ x.T, rtol=1e-5, atol=1e-5)
    merged = ca.merge_equal_segments(cut)
    assert int(merged.count) == len(GROUPS.run_ids)  # the runs of different groups never merge
    np.testing.assert_array_equal(merged.starts, archive.starts)
    np.testing.assert_allclose(merged.gram, archive.gram, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(materialised(merged, seeds), before, rtol=1e-6, atol=1e-6)


def test_a_full_segmentation_moves_the_split_to_the_segment_start_and_counts_it():
    seeds = random_seeds()
    archive = archive_with_rows(seeds, ca.whole_vector_groups(37), capacity=2)
    archive, used = ca.insert_boundary(archive, seeds, jnp.int32(20))
    assert int(used) == 20 and int(archive.count) == 2 and int(archive.overflow) == 0
    archive, used = ca.insert_boundary(archive, seeds, jnp.int32(30))
    assert int(used) == 20 and int(archive.count) == 2 and int(archive.overflow) == 1
    archive, used = ca.insert_boundary(archive, seeds, jnp.int32(5))
    assert int(used) == 0 and int(archive.overflow) == 2


@given(st.lists(st.integers(0, 37), min_size=3, max_size=3), st.lists(st.floats(0, 1), min_size=3, max_size=3),
       st.integers(0, 3), st.integers(0, 3))
@settings(max_examples=25, deadline=None)
def test_crossover_of_rows_is_the_crossover_of_their_weights(ranks, ratios, a, b):
    seeds = random_seeds()
    archive = archive_with_rows(seeds, GROUPS)
    splits = np.minimum(ranks, GROUPS.sizes)
    positions = ca.group_positions(GROUPS, jnp.asarray(splits))
    archive, positions = ca.insert_boundaries(archive, seeds, positions)
    ratios = jnp.asarray(ratios, jnp.float32)
    child = ca.crossover_row(archive, archive.coef[a], archive.coef[b], positions, ratios, GROUPS.num_groups)
    weights = materialised(archive, seeds)
    expected = grouped_split_point_crossover(jnp.asarray(splits), ratios, jnp.asarray(weights[a]),
                                             jnp.asarray(weights[b]), GROUPS)
    np.testing.assert_allclose(ca.materialise(archive, child, seeds), expected, rtol=2e-5, atol=2e-5)


def test_group_positions_are_the_flat_index_of_each_groups_split():
    # Group 0 is entries 0-9 and 17-28: its rank 12 is flat index 19; rank 22 (its size) is "everything".
    np.testing.assert_array_equal(ca.group_positions(GROUPS, jnp.asarray([12, 0, 3])), [19, 10, 32])
    np.testing.assert_array_equal(ca.group_positions(GROUPS, jnp.asarray([22, 7, 8])), [37, 37, 37])
    np.testing.assert_array_equal(ca.group_positions(GROUPS, jnp.asarray([10, 7, 0])), [17, 37, 29])


# ------------------------------------------------------------------------------------------- run level
PRETRAINED = [
    "problem.model.hidden_sizes=[16]",
    "run.evaluations=602",
    "run.log_every=100",
    "run.checkpoint_every=200",
    "run.seeds=[42, 43]",
]
METHODS = {
    "m2n2 + warm-up": ("experiments/digits/pretrained/m2n2.yaml", ["strategy.archive_size=8", "strategy.warmup=30"]),
    "m2n2 no split point": ("experiments/digits/pretrained/m2n2_no_split_point.yaml", ["strategy.archive_size=8"]),
    "ga": ("experiments/digits/pretrained/ga.yaml", ["strategy.archive_size=8"]),
    "m2n2 no crossover + warm-up": ("experiments/digits/pretrained/m2n2.yaml",
                                    ["strategy.archive_size=8", "strategy.crossover=false", "strategy.warmup=10"]),
    "map_elites": ("experiments/digits/pretrained/map_elites.yaml", ["strategy.grid_bins=4"]),
    "m2n2 split groups, 2 children": ("experiments/digits/pretrained/m2n2.yaml",
                                      ["strategy.archive_size=8", "strategy.split_groups=[Dense_0]",
                                       "strategy.children_per_step=2"]),
}


def config_of(method, *extra):
    path, overrides = METHODS[method]
    return load_config(path, PRETRAINED + overrides + list(extra))


@pytest.mark.parametrize("method", list(METHODS))
def test_the_coefficient_archive_runs_as_the_archive_of_weights(tmp_path, method):
    weights_dir, weights = run_config(config_of(method, "strategy.archive_form=weights"), tmp_path / "w")
    coef_dir, coef = run_config(config_of(method, "strategy.archive_form=coefficients"), tmp_path / "c")
    a, b = runner.read_metrics(weights_dir), runner.read_metrics(coef_dir)
    # The same children accepted: the same archive scores, best member and test curve at every log.
    for column in ("evaluations", "train_score", "test_score", "archive_filled"):
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    state_w, state_c = final_runs(weights_dir).strategy_state, final_runs(coef_dir).strategy_state
    np.testing.assert_array_equal(state_w.filled, state_c.filled)
    scores = state_w.scores if hasattr(state_w, "scores") else state_w.quality
    np.testing.assert_array_equal(scores, state_c.scores if hasattr(state_c, "scores") else state_c.quality)
    np.testing.assert_allclose(archive_weights(coef_dir), archive_weights(weights_dir), rtol=1e-4, atol=2e-6)
    # The segment count is reported, bounded by the budget's capacity, and never overflowed.
    capacity = state_c.archive.starts.shape[-1]
    assert np.all(b["segment_overflow"] == 0)
    assert 1 <= b["segments"].max() < capacity
    assert "segments" not in a
    print(f"{method}: live segments at the logs {b['segments'][:, 0].tolist()} of {capacity} slots")


def test_a_resumed_coefficient_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    config = config_of("m2n2 + warm-up", "strategy.archive_form=coefficients")
    straight_dir, straight = run_config(config, tmp_path / "straight")
    resumed_dir, first = run_interrupted(config, tmp_path / "resumed", monkeypatch)
    assert first["status"] == "interrupted"
    resumed = runner.resume(resumed_dir, progress=False)
    assert resumed["status"] == "complete"
    assert "segments" in runner.read_metrics(resumed_dir)  # the coefficient form
    assert (resumed_dir / "metrics.csv").read_text() == (straight_dir / "metrics.csv").read_text()
    np.testing.assert_array_equal(archive_weights(resumed_dir), archive_weights(straight_dir))
    # The checkpoint holds coefficients and scores, not models: nothing of the seeds' size.
    layout = (resumed_dir / "checkpoints").glob("*/evojax_merge_layout.json")
    text = next(iter(layout)).read_text()
    assert "seeds" not in text.replace("seed_norms", "")


def test_resuming_with_other_seed_models_is_refused(tmp_path, monkeypatch):
    config = config_of("ga", "strategy.archive_form=coefficients")
    run_dir, first = run_interrupted(config, tmp_path / "r", monkeypatch)
    assert first["status"] == "interrupted"
    # Other pre-trained seeds: the same config with another pre-training step count.
    text = (run_dir / "config.yaml").read_text().replace("pretrain_steps: 10", "pretrain_steps: 11")
    (run_dir / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="other seed models"):
        runner.resume(run_dir, progress=False)


def test_mutation_keeps_the_archive_of_weights_and_refuses_coefficients():
    from evojax_merge.errors import ConfigError
    from evojax_merge.strategies.m2n2 import M2N2
    from evojax_merge.strategies.map_elites import MAPElites

    template = {"w": jnp.zeros(1000)}
    assert M2N2(4, template, max_segments=100).archive_form == "weights"  # mutation on by default
    assert M2N2(4, template, mutation=False, max_segments=100).archive_form == "coefficients"
    assert M2N2(4, template, mutation=False, max_segments=100, archive_form="weights").archive_form == "weights"
    assert MAPElites(template, lambda s: s, 1, bins=4, mutation=False, max_segments=124).archive_form == "coefficients"
    # auto keeps the weights where 4 slots x 2 seeds' coefficients on every segment slot take more room.
    assert M2N2(4, template, mutation=False, max_segments=125).archive_form == "weights"
    assert M2N2(4, template, mutation=False, max_segments=124).archive_form == "coefficients"
    assert M2N2(4, template, mutation=False, max_segments=125, archive_form="coefficients").archive_form == "coefficients"
    with pytest.raises(ValueError, match="mutation"):
        M2N2(4, template, archive_form="coefficients")
    with pytest.raises(ConfigError, match="strategy.archive_form"):
        runner.build(load_config("experiments/digits/m2n2.yaml", ["strategy.archive_form=coefficients"]))
