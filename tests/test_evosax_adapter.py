"""evosax strategies by name: config checks, scores -> minimised fitness, NaN handling, best(), budget."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evojax_merge.config import load_config
from evojax_merge.errors import ConfigError
from evojax_merge.run import runner
from evojax_merge.strategies.evosax_adapter import EvosaxStrategy, scores_to_fitness, step_size
from evojax_merge.strategies.lazy_cma_es import LazyCMA_ES
from evojax_merge.strategies.registry import build_strategy
from run_helpers import final_runs, run_config

TEMPLATE = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}  # 9 parameters
PROBLEM = types.SimpleNamespace(template=TEMPLATE)  # all a strategy sees of a problem: its candidate's shape


def strategy_config(*overrides):
    return load_config("experiments/digits/sep_cma_es.yaml", list(overrides)).strategy


def build(spec):
    """(strategy, params) of a strategy section, for the 9-parameter template."""
    strategy, params, _ = build_strategy(spec, PROBLEM)
    return strategy, params


def test_scores_become_negated_mean_and_nonfinite_rows_rank_worst():
    scores = jnp.array([[1.0, 1.0, 0.0, 0.0], [1.0, jnp.nan, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [jnp.inf, 0, 0, 0]])
    fitness, rejected = scores_to_fitness(scores)
    # Worst finite fitness is -0.25; rejected rows get one unit more.
    np.testing.assert_allclose(fitness, [-0.5, 0.75, -0.25, 0.75])
    np.testing.assert_array_equal(rejected, [False, True, False, True])
    fitness, rejected = scores_to_fitness(jnp.full((2, 3), jnp.nan))
    assert np.all(np.isfinite(fitness)) and np.all(rejected)


def test_names_build_the_right_strategies():
    cma, params = build(strategy_config("strategy.name=cma_es"))
    assert isinstance(cma.strategy, LazyCMA_ES) and float(params.std_init) == pytest.approx(0.01)
    assert cma.num_seeds == 1  # distribution-based: started at one seed candidate
    gap1, _ = build(strategy_config("strategy.name=cma_es", "strategy.evosax_options={decomposition_gap: 1}"))
    assert gap1.strategy.decomposition_gap == 1 and gap1.strategy.step_size_adaptation == "csa"
    # The digits configs: CMA-ES with evosax's CSA, and the variant with pycma's TPA.
    for config, adaptation in [("cma_es", "csa"), ("cma_es_tpa", "tpa")]:
        built, _ = build(load_config(f"experiments/digits/{config}.yaml").strategy)
        assert built.strategy.step_size_adaptation == adaptation and built.population_size == 20
    sep, _ = build(strategy_config())
    assert type(sep.strategy).__name__ == "Sep_CMA_ES" and sep.population_size == 20
    snes, params = build(strategy_config("strategy.name=evosax:SNES", "strategy.population_size=10"))
    assert type(snes.strategy).__name__ == "SNES" and snes.population_size == 10
    _, params = build(strategy_config("strategy.evosax_params={std_min: 0.001}"))
    assert float(params.std_min) == pytest.approx(0.001)
    # sigma_init is the mutation std of strategies that take a std schedule (SimpleGA).
    ga, params = build(strategy_config("strategy.name=evosax:SimpleGA", "strategy.sigma_init=0.05"))
    assert float(ga.strategy.std_schedule(0)) == pytest.approx(0.05) and ga.population_based
    # A population-based strategy starts from a whole evaluated population of seed candidates.
    assert ga.num_seeds == ga.population_size == 20
    # null population_size: Hansen's 4 + floor(3 ln n), here n = 9.
    default, _ = build(strategy_config("strategy.population_size=null"))
    assert default.population_size == 4 + int(np.floor(3 * np.log(9))) == 10


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.name=evosax:NoSuchES"], "evosax has no strategy 'NoSuchES'; known: .*Sep_CMA_ES"),
        (["strategy.name=cmaes"], "'strategy.name' must be one of"),
        (["strategy.evosax_params={std_init_typo: 1.0}"], "Params has no field 'std_init_typo'; fields: .*std_init"),
        (["strategy.evosax_params={std_min: fast}"], "'strategy.evosax_params.std_min' must be of type float"),
        (["strategy.evosax_options={gap: 3}"], "Sep_CMA_ES takes no argument 'gap'"),
        (["strategy.name=cma_es", "strategy.evosax_options={decomposition_gap: 0}"], "refused these settings.*decomposition_gap"),
        (["strategy.name=cma_es", "strategy.evosax_options={step_size_adaptation: msr}"], "refused these settings.*step_size_adaptation must be one of csa, tpa"),
        # The seed candidates an evosax strategy starts from are its own business (1, or a whole population).
        (["strategy.num_seed_models=2"], "unknown config key in 'strategy.' 'num_seed_models'"),
        # ... and a problem that gives another number of seed models is refused.
        (["problem.model.pretrained_class_groups=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]"],
         r"sep_cma_es starts from 1 seed candidate\(s\), but problem classifier gives 2"),
        (["strategy.name=evosax:PSO"], "PSO has no initial step size"),
        (["strategy.population_size=1"], "'strategy.population_size' must be >= 2"),
        (["strategy.sigma_init=0"], "'strategy.sigma_init' must be > 0"),
        (["run.log_every=510", "run.checkpoint_every=5100"], r"'run.log_every' must be a multiple of the 20 evaluations of one generation"),
    ],
)
def test_bad_evosax_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        runner.build(load_config("experiments/digits/sep_cma_es.yaml", overrides))


def test_tell_maximises_mean_score_and_keeps_nans_out_of_the_state():
    strategy, params = build(strategy_config("strategy.name=cma_es", "strategy.population_size=4"))
    seed = jax.tree.map(lambda x: jnp.full((1, *x.shape), 0.5), TEMPLATE)
    state = strategy.init(jax.random.PRNGKey(0), seed, jnp.array([[1.0, 0.0, 0.0, 0.0]]), params)
    _, seed_score = strategy.best(state)
    assert float(seed_score) == pytest.approx(0.25)  # the evaluated seed is the best so far

    children, state = strategy.ask(jax.random.PRNGKey(1), state, params)
    scores = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [jnp.nan, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    state, metrics = strategy.tell(jax.random.PRNGKey(2), children, scores, state, params)
    best, best_score = strategy.best(state)
    assert float(best_score) == pytest.approx(0.75)  # child 1: the highest mean score, not the lowest
    jax.tree.map(lambda b, c: np.testing.assert_array_equal(b, c[1]), best, children)
    assert int(strategy.counters(state)["rejected_nonfinite"]) == 1
    assert float(metrics["generation_best_score"]) == pytest.approx(0.75)
    assert float(metrics["generation_mean_score"]) == pytest.approx((0.25 + 0.75 + 0.0) / 3)  # finite rows only
    assert float(metrics["best_train_score"]) == pytest.approx(0.75) and int(metrics["rejected_nonfinite"]) == 1
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.inner))
    # The mean moved towards the better children: closer to child 1 than to child 3.
    mean = state.inner.mean
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
    child = lambda i: flat(jax.tree.map(lambda x: x[i], children))
    assert float(jnp.linalg.norm(mean - child(1))) < float(jnp.linalg.norm(mean - child(3)))

    # A generation with no finite score leaves the state as it was, except the counter.
    children, state = strategy.ask(jax.random.PRNGKey(3), state, params)
    before = state  # (ask may have re-decomposed C)
    state, _ = strategy.tell(jax.random.PRNGKey(4), children, jnp.full((4, 4), jnp.nan), state, params)
    for name in ("mean", "C", "std", "p_std", "p_c", "best_solution", "best_fitness"):
        np.testing.assert_array_equal(getattr(state.inner, name), getattr(before.inner, name))
    assert int(strategy.counters(state)["rejected_nonfinite"]) == 5


def test_an_unevaluated_mean_is_a_start_but_not_a_candidate():
    """init(..., scores=None): the search starts at a mean that is not scored (a recipe's 0.5 genome)."""
    strategy, params = build(strategy_config("strategy.name=cma_es", "strategy.population_size=4"))
    mean = jax.tree.map(lambda x: jnp.full((1, *x.shape), 0.5), TEMPLATE)
    state = strategy.init(jax.random.PRNGKey(0), mean, None, params)
    best, score = strategy.best(state)
    jax.tree.map(lambda b, m: np.testing.assert_array_equal(b, m[0]), best, mean)
    assert not np.isfinite(float(score))  # no score yet: any evaluated candidate beats it
    assert int(strategy.counters(state)["rejected_nonfinite"]) == 0
    children, state = strategy.ask(jax.random.PRNGKey(1), state, params)
    state, _ = strategy.tell(jax.random.PRNGKey(2), children, jnp.zeros((4, 4)), state, params)
    assert float(strategy.best(state)[1]) == 0.0
    ga, ga_params = build(strategy_config("strategy.name=evosax:SimpleGA"))
    with pytest.raises(ConfigError, match="starts from an evaluated population"):
        ga.init(jax.random.PRNGKey(0), mean, None, ga_params)


def test_runner_counts_every_population_member_as_an_evaluation(tmp_path):
    config = load_config(
        "experiments/digits/sep_cma_es.yaml",
        ["problem.model.hidden_sizes=[8]", "run.evaluations=130", "run.log_every=40", "run.checkpoint_every=40",
         "run.seeds=[5, 6]", "strategy.population_size=10", "strategy.sigma_init=0.1"],
    )
    run_dir, summary = run_config(config, tmp_path / "sep")
    metrics = runner.read_metrics(run_dir)
    # 1 seed evaluation, then generations of 10: (130 - 1) // 10 = 12 generations, logged every 4.
    np.testing.assert_array_equal(metrics["evaluations"][:, 0], [1, 41, 81, 121])
    assert summary["evaluations_per_seed"] == 121
    # best() is the best so far: its training score never decreases.
    assert np.all(np.diff(metrics["train_score"], axis=0) >= 0)
    assert np.all(metrics["train_score"][-1] > metrics["train_score"][0])


def test_evosax_settings_round_trip_through_the_resolved_config(tmp_path):
    config = load_config(
        "experiments/digits/cma_es.yaml",
        ["strategy.evosax_options={decomposition_gap: 7}", "strategy.evosax_params={std_min: 1}"],
    )
    experiment = runner.build(config)
    resolved = experiment.config
    assert resolved.strategy["evosax_params"] == {"std_min": 1.0}
    assert isinstance(resolved.strategy["evosax_params"]["std_min"], float)
    assert resolved.strategy["evosax_options"] == {"decomposition_gap": 7}
    assert experiment.engine.strategy.strategy.decomposition_gap == 7
    run_dir = runner.new_run_dir(resolved, tmp_path / "run")
    assert load_config(run_dir / "config.yaml") == resolved
    assert experiment.per_step == 20


def test_step_size_is_sigma_or_the_root_mean_square_of_a_per_coordinate_std():
    cma, params = build(strategy_config("strategy.name=cma_es", "strategy.sigma_init=0.03"))
    state = cma.init(jax.random.PRNGKey(0), jax.tree.map(lambda x: x[None], TEMPLATE), jnp.ones((1, 4)), params)
    assert float(cma.counters(state)["step_size"]) == pytest.approx(0.03)
    # A per-coordinate std [3, 4]: sqrt((9 + 16) / 2).
    assert float(step_size(state.inner.replace(std=jnp.array([3.0, 4.0])))) == pytest.approx(np.sqrt(12.5))
    # PSO has no step size: no column rather than a made-up one.
    pso, params = build(strategy_config("strategy.name=evosax:PSO", "strategy.sigma_init=null"))
    population = jax.tree.map(lambda x: jnp.zeros((20, *x.shape)), TEMPLATE)
    state = pso.init(jax.random.PRNGKey(0), population, jnp.ones((20, 4)), params)
    assert step_size(state.inner) is None and "step_size" not in pso.counters(state)


SMALL_SEP = ["problem.model.hidden_sizes=[8]", "run.evaluations=201", "run.log_every=40", "run.checkpoint_every=40",
             "run.seeds=[5, 6]", "strategy.population_size=10", "strategy.sigma_init=0.1"]


def test_metrics_log_the_step_size_the_strategy_state_holds(tmp_path):
    config = load_config("experiments/digits/sep_cma_es.yaml", SMALL_SEP)
    run_dir, _ = run_config(config, tmp_path / "sep")
    metrics = runner.read_metrics(run_dir)
    sigma = metrics["step_size"]
    np.testing.assert_allclose(sigma[0], [0.1, 0.1], rtol=1e-6)  # sigma_init before any generation
    assert np.all(np.isfinite(sigma)) and np.all(sigma[1:] != 0.1)  # CSA moves it every generation
    # The last row is the final state's sigma (read back from the run's last checkpoint).
    restored = final_runs(run_dir)
    np.testing.assert_allclose(sigma[-1], np.asarray(restored.strategy_state.inner.std), rtol=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    np.testing.assert_allclose(summary["final_step_size_per_seed"], sigma[-1], rtol=1e-5)
    assert (run_dir / "step_size.png").read_bytes().startswith(b"\x89PNG")
    # Strategies without a step size keep the other columns exactly.
    m2n2 = load_config("experiments/digits/m2n2.yaml", ["problem.model.hidden_sizes=[8]", "run.evaluations=42",
                                                       "run.log_every=20", "run.seeds=[1]"])
    m2n2_dir, _ = run_config(m2n2, tmp_path / "m2n2")
    header = (m2n2_dir / "metrics.csv").read_text().splitlines()[0]
    assert header == "seed,evaluations,train_score,test_score,archive_filled,rejected_nonfinite"
    assert not (m2n2_dir / "step_size.png").exists()
    assert "final_step_size_per_seed" not in json.loads((m2n2_dir / "summary.json").read_text())


def test_a_checkpoint_from_before_the_step_size_column_resumes(tmp_path, monkeypatch):
    """A run interrupted by a version that did not log step sizes resumes: those rows read NaN, the rest
    of metrics.csv equals an uninterrupted run's."""
    import signal

    config = load_config("experiments/digits/sep_cma_es.yaml", SMALL_SEP)
    straight_dir, _ = run_config(config, tmp_path / "straight")

    counters, write_metrics, writes = EvosaxStrategy.counters, runner._write_metrics, []

    def old_counters(self, state):
        return {k: v for k, v in counters(self, state).items() if k != "step_size"}

    def interrupt_after_second_chunk(*args):
        write_metrics(*args)
        writes.append(1)
        if len(writes) == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(EvosaxStrategy, "counters", old_counters)
    monkeypatch.setattr(runner, "_write_metrics", interrupt_after_second_chunk)
    old_dir, summary = run_config(config, tmp_path / "old")
    assert summary["status"] == "interrupted"
    assert "step_size" not in (old_dir / "metrics.csv").read_text()
    monkeypatch.undo()

    assert runner.resume(old_dir, progress=False)["status"] == "complete"
    resumed, straight = runner.read_metrics(old_dir), runner.read_metrics(straight_dir)
    for key in straight:
        if key != "step_size":
            np.testing.assert_array_equal(resumed[key], straight[key])
    assert np.all(np.isnan(resumed["step_size"][:3]))  # the initial row and two logged points
    np.testing.assert_array_equal(resumed["step_size"][3:], straight["step_size"][3:])
