"""Configs: defaults are the paper's, and bad values are rejected with a message naming the key."""

from pathlib import Path

import pytest

from evojax_merge.config import ExperimentConfig, dump_config, load_config
from evojax_merge.errors import ConfigError


def test_experiment_configs_load(tmp_path):
    for name in ["m2n2", "m2n2_no_crossover", "ga", "ga_no_crossover"]:
        config = load_config(f"experiments/digits/{name}.yaml")
        assert config.run.forward_passes == 50_000 and config.run.seeds == list(range(42, 52))
    ga = load_config("experiments/digits/ga.yaml")
    assert ga.strategy.alpha == 0 and not ga.strategy.matchmaker and ga.strategy.crossover


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
RUN_CONFIGS = sorted(p for folder in ("digits", "fashion_mnist") for p in (EXPERIMENTS / folder).rglob("*.yaml"))
EVOLVE_CONFIGS = sorted(p for folder in ("llm_merge", "llm_merge_smollm2") for p in (EXPERIMENTS / folder).glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_run_config_and_committed_result_config_loads(path):
    """The configs the READMEs tell users to run, and the resolved config.yaml of every committed result
    (which reproduces that run), stay valid as the config schema changes."""
    config = load_config(path)
    assert config.run.forward_passes > 0 and config.run.seeds


@pytest.mark.parametrize("path", EVOLVE_CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_evolve_config_loads(path):
    from evojax_merge.evolve_config import load_evolve_config

    assert load_evolve_config(path).seeds


def test_resolved_config_round_trips(tmp_path):
    config = load_config("experiments/digits/m2n2.yaml", ["strategy.alpha=0.5", "run.seeds=[1, 2]"])
    (tmp_path / "c.yaml").write_text(dump_config(config))
    again = load_config(tmp_path / "c.yaml")
    assert again == config and again.strategy.alpha == 0.5 and again.run.seeds == [1, 2]
    assert load_config(None) == ExperimentConfig()


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.archve_size=3", "unknown config key in 'strategy.' 'archve_size'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("strategy.archive_size=big", "'strategy.archive_size' must be of type int"),
        ("strategy.archive_size=2.5", "'strategy.archive_size' must be of type int"),
        ("strategy.crossover=1", "'strategy.crossover' must be of type bool"),
        ("strategy.alpha=-1", "'strategy.alpha' must be >= 0"),
        ("strategy.archive_size=1", "'strategy.archive_size' must be >= 2"),
        ("strategy.num_seed_models=30", "'strategy.num_seed_models' must be between 1"),
        ("strategy.name=cmaes", "'strategy.name' must be one of"),
        ("run.seeds=[]", "'run.seeds' must list at least one seed"),
        ("run.seeds=[1, 1]", "must not repeat"),
        ("run.seeds=3", "'run.seeds' must be a list"),
        ("run.forward_passes=2", "'run.forward_passes' must exceed"),
        ("run.checkpoint_every=750", "'run.checkpoint_every' must be a positive multiple"),
        ("model.hidden_sizes=[0]", "'model.hidden_sizes' must all be positive"),
        ("strategy=3", "section 'strategy.' must be a mapping"),
    ],
)
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".'", r"\.'")):
        load_config("experiments/digits/m2n2.yaml", [override])


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_a_config_of_the_other_command_is_named_as_such(tmp_path):
    """experiments/ holds digits runs and LLM merges side by side: the wrong command says which is right."""
    from evojax_merge.evolve_config import load_evolve_config

    with pytest.raises(ConfigError, match=r"is for 'evojax-merge evolve', not 'evojax-merge run' \(its keys m2n2, "
                                          r"search, seeds, task are evolve sections\)"):
        load_config("experiments/llm_merge/m2n2.yaml")
    with pytest.raises(ConfigError, match=r"is for 'evojax-merge run', not 'evojax-merge evolve' \(its keys data, "
                                          r"model, strategy are run sections\)"):
        load_evolve_config("experiments/digits/m2n2.yaml")
    with pytest.raises(ConfigError, match=r"these --set overrides are for 'evojax-merge evolve'.*: run 'evojax-merge evolve'$"):
        load_config(None, ["search=ps"])
    # A key that belongs to neither is an unknown key, as before.
    (tmp_path / "typo.yaml").write_text("name: x\nsearch: ps\nstrategy: {name: m2n2}\n")
    with pytest.raises(ConfigError, match="unknown config key 'search'"):
        load_config(tmp_path / "typo.yaml")
