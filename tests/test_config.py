"""Configs: defaults are the paper's, and bad values are rejected with a message naming the key.

One schema for every experiment (``name``, ``problem``, ``strategy``, ``run``): ``load_config`` checks the
schema and the run section; ``build`` checks the options of the problem and the strategy and how the run
fits them, before a run directory is created or anything is computed.
"""

from pathlib import Path

import numpy as np
import pytest
import yaml

from evojax_merge.config import Config, RunConfig, load_config
from evojax_merge.errors import ConfigError
from evojax_merge.run.runner import build, new_run_dir

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
RUN_CONFIGS = sorted(p for folder in ("digits", "fashion_mnist") for p in (EXPERIMENTS / folder).rglob("*.yaml"))
LLM_FILES = sorted(p for folder in ("llm_merge", "llm_merge_smollm2") for p in (EXPERIMENTS / folder).glob("*.yaml"))
PIPELINES = [p for p in LLM_FILES if "pipeline" in (yaml.safe_load(p.read_text()) or {})]
LLM_CONFIGS = [p for p in LLM_FILES if p not in PIPELINES]


def test_experiment_configs_load(tmp_path):
    for name in ["m2n2", "m2n2_no_crossover", "ga", "ga_no_crossover"]:
        config = load_config(f"experiments/digits/{name}.yaml")
        assert config.run.evaluations == 50_000 and config.run.seeds == list(range(42, 52))
    ga = load_config("experiments/digits/ga.yaml")
    assert ga.strategy["alpha"] == 0 and not ga.strategy["matchmaker"] and ga.strategy["crossover"]
    # The paper's defaults: what a section leaves out is resolved to them.
    resolved = build(load_config("experiments/digits/m2n2.yaml", ["run.seeds=[1]"])).config
    assert resolved.problem["model"]["hidden_sizes"] == [256] and resolved.problem["model"]["init_std"] == 0.01
    assert resolved.strategy["archive_size"] == 20 and resolved.strategy["mutation_std"] == 0.01
    assert RunConfig().evaluations == 50_000 and RunConfig().seeds == list(range(42, 52))


PRETRAINED_CONFIGS = sorted((EXPERIMENTS / "digits" / "pretrained").glob("*.yaml")) + sorted(
    (EXPERIMENTS / "digits" / "results" / "pretrained").glob("*/config.yaml"))
FASHION_CONFIGS = sorted((EXPERIMENTS / "fashion_mnist").rglob("*.yaml"))


def test_configs_run_what_their_names_say():
    """The pre-trained experiments start from the paper's two specialists (digits 0-4 and 5-9, the same
    pair in every run); the Fashion-MNIST ones read Fashion-MNIST, pixels scaled to [0, 1]."""
    assert len(PRETRAINED_CONFIGS) == 10 and len(FASHION_CONFIGS) == 4
    for path in PRETRAINED_CONFIGS:
        model = load_config(path).problem.get("model", {})
        assert model.get("pretrained_class_groups") == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], path
        assert model.get("init_seed") == 42 and model.get("pretrain_steps", 10) == 10, path
    for path in FASHION_CONFIGS:
        data = load_config(path).problem["data"]
        assert data["name"] == "fashion_mnist_debian" and data["scale"] == pytest.approx(1 / 255), path


def stand_in_for_missing_data(monkeypatch):
    """Datasets this machine lacks (Fashion-MNIST from a Debian package) are replaced by a small random one
    of 784 features and 10 classes, so that the configs of those experiments are checked all the same."""
    from evojax_merge.data import Dataset, Split, load_dataset
    from evojax_merge.errors import DataError
    from evojax_merge.problems import classifier

    def load_or_stand_in(name, path=None):
        try:
            return load_dataset(name, path)
        except DataError:
            rng = np.random.default_rng(0)
            split = lambda n: Split(rng.random((n, 784), np.float32), np.arange(n, dtype=np.int32) % 10)  # noqa: E731
            return Dataset(name, split(50), split(20), 10, "stand-in")

    monkeypatch.setattr(classifier, "load_dataset", load_or_stand_in)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_run_config_and_committed_result_config_loads(path, monkeypatch):
    """The configs the READMEs tell users to run, and the resolved config.yaml of every committed result
    (which reproduces that run), stay valid as the config schema changes: the file loads, and its problem
    and strategy options and its budget pass every check a run makes before it starts."""
    config = load_config(path)
    assert config.run.evaluations > 0 and config.run.seeds
    stand_in_for_missing_data(monkeypatch)
    experiment = build(config)
    assert experiment.schedule and sum(experiment.schedule) > 0


@pytest.mark.parametrize("path", LLM_CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_language_model_config_loads(path):
    """The LLM merges are configs of the same schema (their problems need seed models on disk to build)."""
    config = load_config(path)
    assert config.run.evaluations > 0 and config.run.seeds
    assert config.problem["name"].startswith("llm_") and config.strategy["name"]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_pipeline_loads_with_its_stages(path):
    from evojax_merge.run.pipeline import load_pipeline

    pipeline = load_pipeline(path)
    assert [s.name for s in pipeline.pipeline] == ["ps", "dfs"]
    for stage in pipeline.pipeline:
        # Each stage is an ordinary config (its {STAGE} references filled in with some run directory).
        overrides = [s.replace("{ps}", "runs/ps") for s in stage.set]
        assert load_config(path.parent / stage.config, overrides).run.seeds


def test_resolved_config_round_trips(tmp_path):
    config = load_config("experiments/digits/m2n2.yaml", ["strategy.alpha=0.5", "run.seeds=[1, 2]"])
    resolved = build(config).config
    # The run directory's config.yaml is the resolved config: every default filled in.
    run_dir = new_run_dir(resolved, tmp_path / "run")
    again = load_config(run_dir / "config.yaml")
    assert again == resolved and again.strategy["alpha"] == 0.5 and again.run.seeds == [1, 2]
    assert resolved.strategy["split_point"] is True and resolved.problem["data"] == {"name": "digits", "path": None,
                                                                                       "scale": 1.0}
    assert build(again).config == resolved  # resolving twice changes nothing
    # A config that names only what differs from the defaults gets the default problem and strategy.
    assert load_config(None, ["name=x"]) == Config(name="x")


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.archve_size=3", "unknown config key in 'strategy.' 'archve_size'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("problem.colour=red", "unknown config key in 'problem.' 'colour'"),
        ("problem.model.hidden_size=[3]", "unknown config key in 'problem.model.' 'hidden_size'"),
        ("strategy.archive_size=big", "'strategy.archive_size' must be of type int"),
        ("strategy.archive_size=2.5", "'strategy.archive_size' must be of type int"),
        ("strategy.crossover=1", "'strategy.crossover' must be of type bool"),
        ("strategy.alpha=-1", "'strategy.alpha' must be >= 0"),
        ("strategy.archive_size=1", "'strategy.archive_size' must be >= 2"),
        ("strategy.num_seed_models=30", "'strategy.num_seed_models' must be at most archive_size"),
        ("strategy.num_seed_models=0", "'strategy.num_seed_models' must be >= 1"),
        ("strategy.name=cmaes", "'strategy.name' must be one of"),
        ("strategy.name=", "'strategy.name' must name a built-in"),
        ("problem.name=mlp", "'problem.name' must be one of"),
        ("run.seeds=[]", "'run.seeds' must list at least one seed"),
        ("run.seeds=[1, 1]", "must not repeat"),
        ("run.seeds=3", "'run.seeds' must be a list"),
        ("run.evaluations=2", "'run.evaluations' must leave at least one generation \\(1\\) after the 2 seed"),
        ("run.evaluations=0", "'run.evaluations' must be >= 1"),
        ("run.checkpoint_every=750", "'run.checkpoint_every' must be a positive multiple"),
        ("strategy.children_per_step=3", "'run.log_every' must be a multiple of the 3 evaluations of one generation"),
        ("problem.model.hidden_sizes=[0]", "'problem.model.hidden_sizes' must all be positive"),
        ("problem.data.scale=big", "'problem.data.scale' must be of type float"),
        ("strategy=3", "'strategy' must be a mapping"),
        ("problem=3", "'problem' must be a mapping"),
    ],
)
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".'", r"\.'")):
        build(load_config("experiments/digits/m2n2.yaml", [override]))


def test_unreadable_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    for text in ("", "# only a comment\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"empty.yaml is empty: it needs at least 'problem' and 'strategy'"):
            load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="the config is empty"):
        load_config(None)


def test_a_float_written_without_a_decimal_point_is_a_float(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as the string '1e-3'; a config means the number."""
    text = (EXPERIMENTS / "digits" / "sep_cma_es.yaml").read_text().replace("sigma_init: 0.01", "sigma_init: 1e-3")
    assert "sigma_init: 1e-3" in text and yaml.safe_load(text)["strategy"]["sigma_init"] == "1e-3"
    (tmp_path / "c.yaml").write_text(text)
    for config in (load_config(tmp_path / "c.yaml"), load_config("experiments/digits/sep_cma_es.yaml",
                                                                 ["strategy.sigma_init=1e-3"])):
        experiment = build(config)
        sigma = experiment.config.strategy["sigma_init"]
        assert sigma == 1e-3 and isinstance(sigma, float)
        assert float(experiment.engine.strategy_params.std_init) == pytest.approx(1e-3)
    # A string that is not a number is still refused.
    with pytest.raises(ConfigError, match="'strategy.sigma_init' must be of type float"):
        build(load_config("experiments/digits/sep_cma_es.yaml", ["strategy.sigma_init=small"]))


def test_configs_of_every_kind_share_one_schema(tmp_path):
    """experiments/ holds digits runs and LLM merges side by side: one schema and one command (`evolve` is
    an alias of `run`) read both; a file in the layout of the old separate schemas names its first unknown
    key and the known ones."""
    digits, llm = load_config("experiments/digits/m2n2.yaml"), load_config("experiments/llm_merge/m2n2.yaml")
    assert type(digits) is type(llm) is Config
    assert (digits.problem["name"], llm.problem["name"]) == ("classifier", "llm_models")
    old_run = "name: x\ndata: {name: digits}\nmodel: {hidden_sizes: [16]}\nstrategy: {name: m2n2}\n"
    old_evolve = "name: x\nsearch: ps\ntask: {n_fitness: 10}\nseeds: [0]\n"
    for text, key in [(old_run, "data"), (old_evolve, "search")]:
        (tmp_path / "old.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"unknown config key '{key}'; known keys: name, problem, strategy, run"):
            load_config(tmp_path / "old.yaml")
    with pytest.raises(ConfigError, match="unknown config key 'search'"):
        load_config(None, ["search=ps"])
    # A pipeline is not a run config: the command reads it with load_pipeline.
    with pytest.raises(ConfigError, match="unknown config key 'pipeline'"):
        load_config("experiments/llm_merge/ps_dfs.yaml")
