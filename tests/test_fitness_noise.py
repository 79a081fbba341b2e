"""The fitness-noise study's statistics (experiments/llm_merge_smollm2/fitness_noise.py) on hand-worked cases."""

import importlib.util
import pathlib

import numpy as np
import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "llm_merge_smollm2" / "fitness_noise.py"
spec = importlib.util.spec_from_file_location("fitness_noise_under_test", PATH)
noise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(noise)


def test_ties_share_the_mean_of_their_ranks():
    np.testing.assert_array_equal(noise.average_ranks(np.array([3.0, 1.0, 1.0, 2.0])), [3.0, 0.5, 0.5, 2.0])


def test_spearman_of_hand_worked_cases():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert noise.spearman(x, x**3) == pytest.approx(1.0)
    assert noise.spearman(x, -x) == pytest.approx(-1.0)
    # Ranks [0 1 2 3] against [1 0 3 2]: Pearson = 1 - 6 * 4 / (4 * 15) = 0.6.
    assert noise.spearman(x, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)
    assert np.isnan(noise.spearman(x, np.ones(4)))


def test_a_fitness_that_orders_candidates_as_the_truth_has_correlation_one_and_no_regret():
    # Three candidates, two tasks of 100 problems: candidate k solves the first 30 k problems of each task,
    # so every random subset ranks them as the truth does... except a subset may tie two of them.
    scores = np.zeros((3, 200))
    for k in range(3):
        scores[k, :30 * (k + 1)] = scores[k, 100:100 + 30 * (k + 1)] = 1.0
    truth = np.array([0.1, 0.2, 0.3])
    rows = noise.noise_table({"exact": scores}, truth, [100, 100], draws=50, seed=0)
    assert [r["problems_per_task"] for r in rows] == [10, 25, 50, 100]
    full = rows[-1]  # all 100 problems per task: the exact ordering
    assert full["spearman_mean"] == pytest.approx(1.0) and full["regret_points"] == pytest.approx(0.0)
    # Reversed fitness picks the worst candidate every time: regret = 30 - 10 = 20 points.
    rows = noise.noise_table({"exact": scores[::-1]}, truth, [100, 100], draws=20, seed=0)
    assert rows[-1]["spearman_mean"] == pytest.approx(-1.0) and rows[-1]["regret_points"] == pytest.approx(20.0)


def test_sizes_larger_than_a_task_are_left_out():
    rows = noise.noise_table({"s": np.eye(3, 40)}, np.array([0.0, 1.0, 2.0]), [20, 20], draws=5, seed=0)
    assert [r["problems_per_task"] for r in rows] == [10]
