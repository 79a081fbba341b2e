"""Property-based tests of config loading: no input makes the loader raise anything but a ConfigError.

Every path a user's text takes before a run starts is fuzzed: the config file's bytes, its YAML
structure (at the top level and at every key of a real config), the ``--set`` overrides, the options of
every built-in problem and strategy (every ``*Options`` dataclass of the package, found by scanning, so a
new one is covered without editing this file), and the strategies built from random options on a real
problem. Numbers are also checked the other way round: every notation YAML users write for a float reads
as that float.
"""

import dataclasses
import importlib
import inspect
import math
import pathlib
import pkgutil
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evojax_merge
from evojax_merge.config import Config, from_dict, load_config, read_yaml_with_overrides
from evojax_merge.errors import ConfigError, EvojaxMergeError

ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL = yaml.safe_load((ROOT / "experiments/digits/m2n2.yaml").read_text())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Strings that look like something to a YAML or number parser.
TRICKY = st.sampled_from(["1e-3", "1E+400", "-1e-400", ".inf", "-.inf", ".nan", "nan", "inf", "1_000", "0x1f",
                          "0o17", "1:30", "~", "null", "yes", "no", "on", "", " ", "-", ".", "..", "a/b", "\0",
                          "é", "1e", "e3", "+", "1.2.3", "2**64", "[", "{", "!!python/object:os.system"])
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**80)
           | st.floats() | st.text(max_size=12) | TRICKY)
KEYS = st.text(max_size=8) | st.integers(-3, 3) | st.none() | st.booleans()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)


def loads_or_config_error(fn, *args, allowed=ConfigError):
    try:
        return fn(*args)
    except allowed:
        return None


def _write(text_or_bytes) -> pathlib.Path:
    folder = pathlib.Path(tempfile.mkdtemp())
    path = folder / "config.yaml"
    (path.write_bytes if isinstance(text_or_bytes, bytes) else path.write_text)(text_or_bytes)
    return path


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_file_content_loads_or_is_a_config_error(content):
    loads_or_config_error(load_config, _write(content))


@FUZZ
@given(VALUES)
def test_any_yaml_structure_loads_or_is_a_config_error(data):
    loads_or_config_error(load_config, _write(yaml.safe_dump(data)))


def _paths(node, prefix=()):
    """Every key path of a nested mapping (the sections and the leaves)."""
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


REAL_PATHS = sorted(_paths(REAL))


@FUZZ
@given(st.sampled_from(REAL_PATHS), VALUES)
def test_any_value_at_any_key_of_a_real_config_loads_or_is_a_config_error(path, value):
    data = yaml.safe_load(yaml.safe_dump(REAL))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    config = loads_or_config_error(load_config, _write(yaml.safe_dump(data)))
    if config is not None:
        assert isinstance(config, Config)


@FUZZ
@given(st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    [".".join(p) for p in REAL_PATHS] + ["run", "a..b", ".x", "problem.model.hidden_sizes.x"]),
    st.text(max_size=20) | TRICKY), max_size=4))
def test_any_override_loads_or_is_a_config_error(overrides):
    loads_or_config_error(load_config, ROOT / "experiments/digits/m2n2.yaml", overrides)


def _options_classes():
    found = {}
    for info in pkgutil.walk_packages(evojax_merge.__path__, "evojax_merge."):
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if name.endswith("Options") and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{name}"] = obj
    return found


OPTIONS = _options_classes()


def test_the_scan_finds_the_options_of_every_built_in():
    names = {key.rsplit(".", 1)[1] for key in OPTIONS}
    assert {"ClassifierOptions", "LLMRecipeOptions", "LLMPathOptions", "LLMModelsOptions", "M2N2Options",
            "MAPElitesOptions", "EvosaxOptions"} <= names


def _options_data(cls):
    """Random values for a random subset of the class's fields (and sometimes an unknown key)."""
    names = [f.name for f in dataclasses.fields(cls)] + ["not_an_option"]
    return st.dictionaries(st.sampled_from(names), VALUES, max_size=4)


@FUZZ
@given(st.sampled_from(sorted(OPTIONS)).flatmap(lambda key: st.tuples(st.just(key), _options_data(OPTIONS[key]))))
def test_any_options_of_any_built_in_read_or_are_a_config_error(case):
    key, data = case

    def read():
        options = from_dict(OPTIONS[key], data, "section.")
        if hasattr(options, "validate"):
            options.validate()

    loads_or_config_error(read)


@pytest.fixture(scope="module")
def digits_problem():
    from evojax_merge.problems.registry import build_problem

    problem, _ = build_problem({"name": "classifier", "model": {"hidden_sizes": [8]}})
    return problem


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["m2n2", "map_elites", "cma_es", "sep_cma_es", "evosax:SimpleES", "evosax:Nope", "nope",
                        "evojax_merge.nope:X", "math:pi"]),
       st.dictionaries(st.sampled_from(["archive_size", "alpha", "mutation_std", "children_per_step", "warmup",
                                        "grid_bins", "descriptor_groups", "population_size", "sigma_init",
                                        "evosax_params", "evosax_options", "num_seed_models", "bogus"]),
                       VALUES, max_size=3))
def test_any_strategy_section_builds_or_is_a_clear_error(digits_problem, name, options):
    from evojax_merge.strategies.registry import build_strategy

    # A user path that does not import is reported as such (an EvojaxMergeError naming the section).
    loads_or_config_error(build_strategy, {"name": name, **options}, digits_problem, allowed=EvojaxMergeError)


@given(st.floats(allow_nan=False, allow_infinity=False, width=64),
       st.sampled_from(["{:e}", "{:E}", "{!r}", "{:.17g}", "{:+.6e}"]))
@settings(max_examples=200, deadline=None)
def test_every_float_notation_reads_as_that_float(number, notation):
    text = notation.format(number)
    data = read_yaml_with_overrides(None, [f"strategy.sigma_init={text}"])
    from evojax_merge.strategies.evosax_adapter import EvosaxOptions

    read = from_dict(EvosaxOptions, {"sigma_init": data["strategy"]["sigma_init"]}).sigma_init
    assert read == float(text)


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", ".001", "+1e-3", "0.1e-2", "1e-03"])
def test_the_notations_users_write_are_floats(text):
    config = load_config(ROOT / "experiments/digits/sep_cma_es.yaml", [f"strategy.sigma_init={text}"])
    assert config.strategy["sigma_init"] in (text, 0.001)  # kept as written until the strategy's options read it
    from evojax_merge.strategies.evosax_adapter import EvosaxOptions

    assert math.isclose(from_dict(EvosaxOptions, {"sigma_init": config.strategy["sigma_init"]}).sigma_init, 1e-3)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400"])
def test_non_finite_numbers_are_refused_naming_the_key(value):
    from evojax_merge.strategies.evosax_adapter import EvosaxOptions

    with pytest.raises(ConfigError, match="sigma_init.*finite"):
        from_dict(EvosaxOptions, {"sigma_init": yaml.safe_load(value)}, "strategy.")


def test_yaml_errors_are_one_line_with_the_position(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  evaluations: [1, 2\n  seeds: {\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value) and "line " in str(error.value)
