"""The diffusion problems through the real runner, under every strategy family, on a tiny seed folder: M2N2 as
the paper ran it (split points for attention and the rest, relative scores, no mutation), the GA, MAP-Elites
on the specialists' class groups, and the recipe problem under CMA-ES and Sep-CMA-ES; per-class test groups,
the exported U-Net and sample grid, the baselines, and a resumed run equal to an uninterrupted one.

Slow tier (tests/conftest.py): every run compiles a U-Net sampler inside the search loop.
"""

import json
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from cli_helpers import final_export_results
from evojax_merge.cli import main
from evojax_merge.models.pytree_file import load_pytree
from evojax_merge.problems.diffusion import diffusion_models
from evojax_merge.run import runner
from evojax_merge.train.diffusion_seeds import DiffusionSeedOptions, build_diffusion_seeds, unet_of

# As in test_diffusion.py: a one-level U-Net of 16 channels, specialists of digits 0-4 and of 5-6.
SEED_OPTIONS = dict(channels=[16], attention_levels=[0], num_heads=2, embed_dim=16, class_groups=[[0, 1, 2, 3, 4], [5, 6]],
                    base_steps=20, specialist_steps=20, batch_size=16, judge_hidden=16, judge_steps=20)
SPECIALISTS = {"digits_0_to_4": [0, 1, 2, 3, 4], "digits_5_6": [5, 6]}
CLASSES = [0, 5]
SAMPLING = {"steps": 2, "classes": CLASSES, "fitness_per_class": 1, "test_per_class": 2, "grid_columns": 2}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusion") / "seeds"
    return folder, build_diffusion_seeds(DiffusionSeedOptions(**SEED_OPTIONS), folder, log=lambda line: None)


def config(folder, problem, strategy, evaluations, log_every):
    return {"name": f"{problem}-{strategy['name']}".replace(":", "-"),
            "problem": {"name": problem, "seeds": {"manifest": str(folder / "seeds.json")}, "sampling": SAMPLING},
            "strategy": strategy,
            "run": {"evaluations": evaluations, "seeds": [0], "log_every": log_every, "checkpoint_every": log_every}}


def write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run(tmp_path, name, cfg):
    out = tmp_path / name
    assert main(["run", write(tmp_path / f"{name}.yaml", cfg), "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def check_run(run_dir, summary, manifest):
    """What every diffusion run leaves: per-class test groups, the best U-Net and its samples, the baselines."""
    assert summary["status"] == "complete"
    groups = summary["final_test_score_per_group_mean"]
    assert set(groups) == {f"class_{c}" for c in CLASSES}
    metrics = runner.read_metrics(run_dir)
    assert {f"test_class_{c}" for c in CLASSES} <= set(metrics)
    # Equal-sized groups: the test score is the mean of the per-class scores, at every logged point.
    np.testing.assert_allclose(metrics["test_score"], np.mean([metrics[f"test_class_{c}"] for c in CLASSES], axis=0),
                               rtol=1e-5, atol=1e-6)
    assert np.all((metrics["test_score"] >= 0) & (metrics["test_score"] <= 1))

    best = summary["best"]["0"]
    assert best["unet"] == str(run_dir / "best" / "unet.npz") and best["samples"] == str(run_dir / "best" / "samples.png")
    unet = unet_of(manifest)
    params = load_pytree(best["unet"], jax.eval_shape(unet.init_params, jax.random.PRNGKey(0)))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    png = pathlib.Path(best["samples"]).read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image

    image = matplotlib.image.imread(best["samples"])
    assert image.ndim == 3 and image.shape[0] > 20 and image.shape[1] > 20
    # The exported candidate is the one whose test score was logged last; its score is the mean over classes.
    assert best["test_score"] == pytest.approx(summary["final_test_score_per_seed"][0], abs=1e-5)
    assert set(best["per_class_score"]) == {str(c) for c in CLASSES}
    assert best["test_score"] == pytest.approx(np.mean(list(best["per_class_score"].values())), abs=1e-6)
    assert np.isfinite(best["frechet_distance"]) and best["frechet_distance"] >= -1e-6

    baselines = summary["baselines"]["models_test"]
    assert set(baselines) == {*SPECIALISTS, "base", "average merge", "ties merge"}
    for name, report in baselines.items():
        assert set(report["per_class_score"]) == {str(c) for c in CLASSES}, name
        assert 0 <= report["test_score"] <= 1 and np.isfinite(report["frechet_distance"]), name
        for c in CLASSES:
            assert report["per_class_accuracy"][str(c)] in (0.0, 0.5, 1.0), name  # 2 test samples per class
    return metrics


def interrupt_after_first_log(monkeypatch):
    writes, original = [], runner._write_metrics

    def interrupting(*args):
        original(*args)
        writes.append(1)
        if len(writes) == 1:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would: a checkpoint at this logged point

    monkeypatch.setattr(runner, "_write_metrics", interrupting)
    return lambda: monkeypatch.setattr(runner, "_write_metrics", original)


def test_m2n2_as_the_paper_ran_it_and_its_resume(seeds, tmp_path, monkeypatch):
    folder, manifest = seeds
    strategy = {"name": "m2n2", "archive_size": 4, "split_groups": ["attn"], "relative_scores": True,
                "mutation_std": 0}
    cfg = config(folder, "diffusion_models", strategy, evaluations=6, log_every=2)  # 2 seeds + 4 children
    straight, summary = run(tmp_path, "straight", cfg)
    metrics = check_run(straight, summary, manifest)
    assert metrics["evaluations"][:, 0].tolist() == [2, 4, 6]
    resolved = yaml.safe_load((straight / "config.yaml").read_text())
    assert resolved["strategy"]["split_groups"] == ["attn"] and resolved["strategy"]["relative_scores"] is True

    # The baselines are what their names say: a seed's report, and the plain average of the two seeds.
    problem, _ = diffusion_models(seeds={"manifest": str(folder / "seeds.json")}, sampling=SAMPLING)
    _, test = problem.data()
    template = jax.eval_shape(problem.unet.init_params, jax.random.PRNGKey(0))
    specialists = [load_pytree(folder / f"{name}.npz", template) for name in SPECIALISTS]
    average = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2, *specialists)
    average = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), average)
    baselines = summary["baselines"]["models_test"]
    assert problem.report(average, test, "avg")["test_score"] == pytest.approx(
        baselines["average merge"]["test_score"], abs=1e-6)
    assert problem.report(specialists[1], test, "s")["per_class_score"] == pytest.approx(
        baselines["digits_5_6"]["per_class_score"], abs=1e-6)

    restore = interrupt_after_first_log(monkeypatch)
    resumed = tmp_path / "resumed"
    assert main(["run", write(tmp_path / "resumed.yaml", cfg), "--out", str(resumed), "--no-progress"]) == 130
    assert json.loads((resumed / "summary.json").read_text())["status"] == "interrupted"
    assert not (resumed / "best").exists()
    restore()
    assert main(["run", "--resume", str(resumed), "--no-progress"]) == 0
    assert (resumed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    assert final_export_results(resumed) == final_export_results(straight)


def test_the_ga_runs_on_whole_unets(seeds, tmp_path):
    folder, manifest = seeds
    strategy = {"name": "m2n2", "archive_size": 4, "alpha": 0, "matchmaker": False, "mutation_std": 0}
    run_dir, summary = run(tmp_path, "ga", config(folder, "diffusion_models", strategy, evaluations=4, log_every=1))
    metrics = check_run(run_dir, summary, manifest)
    assert metrics["evaluations"][:, 0].tolist() == [2, 3, 4]
    # An elitist archive: the best training score never falls.
    assert np.all(np.diff(metrics["train_score"][:, 0]) >= 0)


def test_map_elites_describes_by_the_specialists_class_groups(seeds, tmp_path):
    folder, manifest = seeds
    strategy = {"name": "map_elites", "grid_bins": 2, "mutation_std": 0}
    run_dir, summary = run(tmp_path, "me", config(folder, "diffusion_models", strategy, evaluations=4, log_every=2))
    check_run(run_dir, summary, manifest)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["strategy"]["descriptor_groups"] == list(SPECIALISTS.values())


# CMA-ES on the problem's default recipe (TIES weight and density per block); Sep-CMA-ES on task-arithmetic
# weights with separate genes for attention and the rest (recipe.per_family, the paper's two U-Net groups).
RECIPES = {"cma_es": (None, ["weight", "density"], ["layer"], "ties"),
           "sep_cma_es": ({"merge_method": "task_arithmetic", "genes": ["weight"], "per_family": True}, ["weight"],
                          ["attention", "rest"], "task_arithmetic")}


@pytest.mark.parametrize("strategy", sorted(RECIPES))
def test_the_recipe_problem_under_cma_es(seeds, tmp_path, strategy):
    folder, manifest = seeds
    recipe, genes, families, method = RECIPES[strategy]
    spec = {"name": strategy, "population_size": 4, "sigma_init": 0.1}
    cfg = config(folder, "diffusion_recipe", spec, evaluations=8, log_every=4)
    if recipe is not None:
        cfg["problem"]["recipe"] = recipe
    run_dir, summary = run(tmp_path, strategy, cfg)
    metrics = check_run(run_dir, summary, manifest)
    assert metrics["evaluations"][:, 0].tolist() == [0, 4, 8]  # the mean genome is a start, not a candidate
    # 2 models x (3 blocks + input embeddings + head) x families x genes.
    size = 2 * 5 * len(families) * len(genes)
    genome = np.load(run_dir / "best" / "genome.npy")
    assert genome.shape == (size,) and summary["best"]["0"]["genome_size"] == size
    written = yaml.safe_load((run_dir / "best" / "recipe.yaml").read_text())
    assert written["merge_method"] == method and written["models"] == list(SPECIALISTS) and written["base_model"] == "base"
    assert written["layout"]["groups"] == ["blocks 0-0", "blocks 1-1", "blocks 2-2", "input embeddings", "head"]
    assert written["layout"]["families"] == families and sorted(written["genes"]) == sorted(genes)
    for gene in genes:
        assert np.asarray(written["genes"][gene]).shape == (2, 5, len(families))


def test_m2n2_over_recipe_genomes_scores_the_mean_genome_as_its_first_member(seeds, tmp_path):
    """The recipe problem calls its mean genome a starting point (not scored for CMA-ES); an archive needs
    scored members, so the engine scores it for M2N2 and counts it: the first logged point is 1 evaluation and
    its training score is the mean genome's own (the fixed TIES merge, recomputed here)."""
    folder, manifest = seeds
    strategy = {"name": "m2n2", "archive_size": 4, "mutation_std": 0.05, "relative_scores": True}
    run_dir, summary = run(tmp_path, "m2n2_recipe", config(folder, "diffusion_recipe", strategy, evaluations=3,
                                                          log_every=1))
    metrics = check_run(run_dir, summary, manifest)
    assert metrics["evaluations"][:, 0].tolist() == [1, 2, 3]
    from evojax_merge.problems.diffusion import diffusion_recipe

    problem, _ = diffusion_recipe(seeds={"manifest": str(folder / "seeds.json")}, sampling=SAMPLING)
    fitness, _ = problem.data()
    mean_genome = problem.seed_candidates(jax.random.PRNGKey(0), 1, fitness)[0]
    expected = float(jnp.mean(jax.jit(problem.score)(mean_genome, fitness)))
    assert metrics["train_score"][0, 0] == pytest.approx(expected, abs=1e-5)
