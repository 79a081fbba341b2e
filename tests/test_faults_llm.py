"""Bad seeds and tasks of the language-model problems (llm_recipe, llm_path, llm_models): every one is refused
by `evojax-merge run` with one line naming the file (and the field), exit status 2, no traceback and no run
directory left behind; input that is legal but almost surely a mistake is one warning line, and the run goes on.

The seeds are tiny random models (evolve_helpers.save_seeds) with a hand-written seeds.json and task files
(the layout lm_seeds.build_seeds writes); each case breaks one thing in a fresh copy. Most cases call the CLI
in-process (cli.main, stderr captured), a few run it as a subprocess (cli_helpers.cli) like a user would.
A task that asks for more fitness or test problems than its file holds (n_fitness / n_test) is refused, not
clipped: the number is the experiment's, and a silently smaller one would change what it measures.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import types

import numpy as np
import pytest
import yaml

from cli_helpers import assert_refused, cli
from evojax_merge.cli import main
from evojax_merge.config import load_config
from evojax_merge.data.synthetic_text import TextExample, write_jsonl
from evojax_merge.run import runner

from evolve_helpers import save_seeds

SKILLS = ("arithmetic", "list_ops")
SPLITS = ("train", "fitness", "test")
BROKEN_TENSOR = "model.layers.1.mlp.up_proj.weight"

# One generation of each problem's search: PS (CMA-ES over recipe genes), DFS (Sep-CMA-ES over a layer
# path), M2N2 over whole models.
STRATEGIES = {
    "llm_recipe": ({"name": "evosax:CMA_ES", "population_size": 2, "sigma_init": 1 / 6},
                   {"evaluations": 2, "log_every": 2, "checkpoint_every": 2, "batch_size": 2}),
    "llm_path": ({"name": "sep_cma_es", "population_size": 2, "sigma_init": 0.5},
                 {"evaluations": 2, "log_every": 2, "checkpoint_every": 2, "batch_size": 2}),
    "llm_models": ({"name": "m2n2", "archive_size": 3, "warmup": 1, "mutation_std": 0.0},
                   {"evaluations": 4, "log_every": 1, "checkpoint_every": 1}),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Seeds (base, two specialists) and a manifest whose tasks score the answer's probability (no generation)."""
    root = tmp_path_factory.mktemp("pristine")
    save_seeds(root)
    (root / "data").mkdir()
    for skill in SKILLS:
        for split in SPLITS:
            write_jsonl(root / "data" / f"{skill}_{split}.jsonl",
                        [TextExample(f"Q {skill} {split} {i}\nA:", str(i)) for i in range(4)])
    manifest = {"models": {"base": "base", "arithmetic": "specialist_a", "list_ops": "specialist_b"},
                "base_model": "base", "prompt_format": "plain",
                "tasks": {s: {"kind": "answer_prob", "max_new_tokens": 3,
                              **{split: f"data/{s}_{split}.jsonl" for split in SPLITS}} for s in SKILLS}}
    (root / "seeds.json").write_text(json.dumps(manifest, indent=1))
    return root


def _setup(tmp_path, pristine, problem="llm_recipe", break_it=None, overrides=()):
    """A copy of the seeds with ``break_it(root)`` applied and a config over it; returns (argv, root, out)."""
    root = tmp_path / "seeds"
    shutil.copytree(pristine, root)
    if break_it is not None:
        break_it(root)
    strategy, run = STRATEGIES[problem]
    config = {"name": "t",
              "problem": {"name": problem, "seeds": {"manifest": str(root / "seeds.json"),
                                                     "models": ["arithmetic", "list_ops"], "base": "base"},
                          "task": {"from_manifest": True}, "score_seeds": True},
              "strategy": strategy,
              "run": {"out_dir": str(tmp_path / "runs"), "seeds": [0], "generations_per_call": 1} | run}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "new" / "run"  # its parent does not exist either: nothing may be created
    argv = ["run", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]
    for o in overrides:
        argv += ["--set", o]
    return argv, root, out


def _refused_in_process(capsys, tmp_path, argv, mentions):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    return assert_refused(types.SimpleNamespace(returncode=code, stderr=err), *mentions,
                          absent=[tmp_path / "new", tmp_path / "runs"])


# ------------------------------------------------------------------------------- ways to break the seeds
def _manifest(edit):
    def apply(root):
        data = json.loads((root / "seeds.json").read_text())
        edit(data)
        (root / "seeds.json").write_text(json.dumps(data))
    return apply


def _task(field, value=None, skill="arithmetic"):
    """Set (or with value None, drop) one field of a manifest task."""
    def edit(data):
        if value is None:
            data["tasks"][skill].pop(field)
        else:
            data["tasks"][skill][field] = value
    return _manifest(edit)


def _write(relative, text):
    return lambda root: (root / relative).write_text(text)


def _delete(relative):
    def apply(root):
        path = root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return apply


def _config_json(edit, folder="specialist_b"):
    def apply(root):
        path = root / folder / "config.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return apply


def _truncated(root, folder="specialist_b"):
    path = root / folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbled(root, folder="specialist_b"):
    path = root / folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header right after its 8-byte length
    path.write_bytes(bytes(data))


def _poisoned(value, folder="specialist_b"):
    def apply(root):
        from safetensors.numpy import load_file, save_file

        path = root / folder / "model.safetensors"
        tensors = load_file(str(path))
        tensors[BROKEN_TENSOR][0, 0] = value
        save_file(tensors, str(path), metadata={"format": "pt"})
    return apply


def _other_tokenizer(root, folder="specialist_b"):
    """Two token ids swapped: the same shapes, different meanings."""
    path = root / folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    path.write_text(json.dumps(data))


EXAMPLE = '{"prompt": "Q 1\\nA:", "answer": "1"}\n'
FITNESS = "data/arithmetic_fitness.jsonl"

# (id, problem, how the seeds are broken, --set overrides, what the error line must name)
CASES = [
    # --- the seeds manifest
    ("manifest-missing", "llm_recipe", _delete("seeds.json"), [], ["seeds.json", "problem.seeds.manifest"]),
    ("manifest-not-json", "llm_recipe", _write("seeds.json", "{models: "), [], ["seeds.json", "not valid JSON"]),
    ("manifest-not-a-mapping", "llm_recipe", _write("seeds.json", "[1, 2]"), [],
     ["seeds.json", "not a seeds manifest"]),
    ("manifest-models-a-list", "llm_recipe", _manifest(lambda d: d.update(models=["specialist_a"])), [],
     ["seeds.json", "'models'"]),
    ("manifest-folder-not-a-string", "llm_recipe", _manifest(lambda d: d["models"].update(list_ops=3)), [],
     ["seeds.json", "models.list_ops", "got 3"]),
    ("manifest-folder-missing", "llm_recipe", _delete("specialist_b"), [], ["specialist_b", "does not exist"]),
    ("base-missing-for-dare-ties", "llm_recipe", None, ["problem.seeds.base=null"], ["problem.seeds.base"]),
    ("unknown-model-key", "llm_recipe", None, ["problem.seeds.models=[arithmetic, nope]"],
     ["'nope'", "seeds.json", "known"]),
    ("unknown-base-key", "llm_recipe", None, ["problem.seeds.base=nope"], ["'nope'", "seeds.json"]),
    # --- the task files and the manifest's tasks
    ("task-file-missing", "llm_recipe", _delete(FITNESS), [],
     ["seeds.json", "tasks.arithmetic.fitness", "arithmetic_fitness.jsonl", "does not exist"]),
    ("task-line-not-json", "llm_recipe", _write(FITNESS, EXAMPLE + "{prompt: 1}\n"), [],
     ["arithmetic_fitness.jsonl", "line 2", "not JSON"]),
    ("task-line-not-an-object", "llm_recipe", _write(FITNESS, '["Q", "1"]\n'), [],
     ["arithmetic_fitness.jsonl", "line 1", "JSON object"]),
    ("task-line-without-prompt", "llm_recipe", _write(FITNESS, EXAMPLE + '{"answer": "1"}\n'), [],
     ["arithmetic_fitness.jsonl", "line 2", "'prompt'"]),
    ("task-line-without-answer", "llm_recipe", _write(FITNESS, '{"prompt": "Q"}\n'), [],
     ["arithmetic_fitness.jsonl", "line 1", "'answer'"]),
    ("task-answer-not-a-string", "llm_recipe", _write(FITNESS, '{"prompt": "Q", "answer": 4}\n'), [],
     ["arithmetic_fitness.jsonl", "line 1", "'answer' must be a non-empty string"]),
    ("task-distractors-not-a-list", "llm_recipe",
     _write(FITNESS, '{"prompt": "Q", "answer": "4", "distractors": "5"}\n'), [],
     ["arithmetic_fitness.jsonl", "'distractors'"]),
    ("task-fitness-file-empty", "llm_recipe", _write(FITNESS, ""), [], ["arithmetic_fitness.jsonl", "no examples"]),
    ("task-test-file-blank", "llm_recipe", _write("data/list_ops_test.jsonl", "\n\n"), [],
     ["list_ops_test.jsonl", "no examples"]),
    ("task-without-max-new-tokens", "llm_recipe", _task("max_new_tokens"), [],
     ["seeds.json", "tasks.arithmetic", "'max_new_tokens'"]),
    ("max-new-tokens-negative", "llm_recipe", _task("max_new_tokens", -3), [],
     ["seeds.json", "tasks.arithmetic.max_new_tokens", "got -3"]),
    ("max-new-tokens-zero", "llm_recipe", _task("max_new_tokens", 0), [],
     ["seeds.json", "tasks.arithmetic.max_new_tokens", "got 0"]),
    ("max-new-tokens-a-string", "llm_recipe", _task("max_new_tokens", "3"), [],
     ["seeds.json", "tasks.arithmetic.max_new_tokens", "got '3'"]),
    ("max-new-tokens-a-bool", "llm_recipe", _task("max_new_tokens", True), [],
     ["seeds.json", "tasks.arithmetic.max_new_tokens", "got True"]),
    ("unknown-scorer-kind", "llm_recipe", _task("kind", "bleu"), [], ["seeds.json", "tasks.arithmetic.kind", "'bleu'"]),
    ("task-without-kind", "llm_recipe", _task("kind"), [], ["seeds.json", "tasks.arithmetic", "'kind'"]),
    ("task-not-a-mapping", "llm_recipe", _manifest(lambda d: d["tasks"].update(arithmetic=["x.jsonl"])), [],
     ["seeds.json", "tasks.arithmetic must be a mapping"]),
    ("task-without-fitness-split", "llm_recipe", _task("fitness"), [],
     ["seeds.json", "'arithmetic'", "no split 'fitness'"]),
    ("task-split-not-a-file-name", "llm_recipe", _task("fitness", 3), [], ["seeds.json", "tasks.arithmetic.fitness"]),
    ("no-tasks", "llm_recipe", _manifest(lambda d: d.update(tasks={})), [], ["seeds.json", "no task"]),
    ("unknown-prompt-format", "llm_recipe", _manifest(lambda d: d.update(prompt_format="alpaca")), [],
     ["seeds.json", "prompt_format", "'alpaca'"]),
    ("n-fitness-beyond-the-file", "llm_recipe", None, ["problem.task.n_fitness=99"],
     ["problem.task.n_fitness", "arithmetic_fitness.jsonl", "99"]),
    ("n-test-beyond-the-file", "llm_recipe", None, ["problem.task.n_test=5"],
     ["problem.task.n_test", "arithmetic_test.jsonl"]),
    ("test-split-missing", "llm_recipe", None, ["problem.task.test_split=heldout"],
     ["problem.task.test_split", "seeds.json", "'heldout'"]),
    ("choice-without-distractors", "llm_recipe", _task("kind", "choice"), [],
     ["skill 'arithmetic'", "arithmetic_fitness.jsonl", "choices"]),
    ("loglik-task-for-m2n2", "llm_models", _task("kind", "loglik"), [],
     ["problem.task.fitness_kind", "seeds.json", "'arithmetic'", "loglik"]),
    # --- the seed model folders
    ("no-config-json", "llm_recipe", _delete("specialist_b/config.json"), [], ["specialist_b", "no config.json"]),
    ("config-not-json", "llm_recipe", _write("specialist_b/config.json", "{"), [],
     ["specialist_b/config.json", "not valid JSON"]),
    ("config-not-a-mapping", "llm_recipe", _write("specialist_b/config.json", "[]"), [],
     ["specialist_b/config.json", "mapping"]),
    ("config-size-a-string", "llm_recipe", _config_json(lambda d: d.update(hidden_size="big")), [],
     ["specialist_b/config.json", "hidden_size", "'big'"]),
    ("config-zero-heads", "llm_recipe", _config_json(lambda d: d.update(num_attention_heads=0)), [],
     ["specialist_b/config.json", "num_attention_heads"]),
    ("config-without-a-field", "llm_recipe", _config_json(lambda d: d.pop("vocab_size")), [],
     ["specialist_b/config.json", "'vocab_size'"]),
    ("config-unsupported-architecture", "llm_recipe", _config_json(lambda d: d.update(model_type="gpt2")), [],
     ["specialist_b/config.json", "gpt2"]),
    ("different-architectures", "llm_recipe", _config_json(lambda d: d.update(num_hidden_layers=4)), [],
     ["different architectures", "specialist_b", "num_hidden_layers=4"]),
    ("base-of-another-architecture", "llm_models", _config_json(lambda d: d.update(intermediate_size=64), "base"), [],
     ["different architectures", "base", "intermediate_size=64"]),
    ("safetensors-truncated", "llm_recipe", _truncated, [], ["specialist_b/model.safetensors", "truncated or corrupt"]),
    ("safetensors-header-garbled", "llm_recipe", _garbled, [], ["specialist_b/model.safetensors", "not a readable"]),
    ("weights-nan", "llm_recipe", _poisoned(np.nan), [], ["specialist_b/model.safetensors", BROKEN_TENSOR, "1 NaN"]),
    ("weights-inf", "llm_recipe", _poisoned(np.inf), [], ["specialist_b/model.safetensors", BROKEN_TENSOR, "infinite"]),
    ("weights-minus-inf", "llm_recipe", _poisoned(-np.inf), [],
     ["specialist_b/model.safetensors", BROKEN_TENSOR, "infinite"]),
    ("base-weights-nan", "llm_recipe", _poisoned(np.nan, "base"), [], ["base/model.safetensors", BROKEN_TENSOR]),
    ("tokenizers-differ", "llm_recipe", _other_tokenizer, [], ["specialist_a", "specialist_b", "tokenizers"]),
    ("tokenizer-unreadable", "llm_recipe", _write("specialist_a/tokenizer.json", "{"), [],
     ["specialist_a/tokenizer.json", "not a readable tokenizer"]),
    ("no-tokenizer-for-model-a", "llm_recipe", _delete("specialist_a/tokenizer.json"), [],
     ["specialist_a", "no usable tokenizer"]),
    # --- the same loading under the other problems: DFS and whole models
    ("dfs-weights-nan", "llm_path", _poisoned(np.nan), [], ["specialist_b/model.safetensors", BROKEN_TENSOR]),
    ("dfs-tokenizers-differ", "llm_path", _other_tokenizer, [], ["specialist_b", "tokenizers"]),
    ("dfs-task-line-not-json", "llm_path", _write(FITNESS, "nope\n"), [], ["arithmetic_fitness.jsonl", "line 1"]),
    ("dfs-first-model-broken", "llm_path", _poisoned(np.inf, "base"),
     ["problem.first_model=SEEDS/base", "problem.score_seeds=false"], ["base/model.safetensors", BROKEN_TENSOR]),
    ("m2n2-safetensors-truncated", "llm_models", _truncated, [], ["specialist_b/model.safetensors"]),
    ("m2n2-tokenizers-differ", "llm_models", _other_tokenizer, [], ["specialist_b", "tokenizers"]),
    ("m2n2-max-new-tokens-zero", "llm_models", _task("max_new_tokens", 0, "list_ops"), [],
     ["seeds.json", "tasks.list_ops.max_new_tokens"]),
    # A base the search does not read is still checked before the run (the baselines score it at the end).
    ("m2n2-base-weights-inf", "llm_models", _poisoned(np.inf, "base"), [], ["base/model.safetensors", BROKEN_TENSOR]),
    ("m2n2-base-folder-missing", "llm_models", _delete("base"), [], ["base", "does not exist"]),
]


@pytest.mark.parametrize("problem, break_it, overrides, mentions",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_seeds_and_tasks_are_one_line_and_leave_nothing(tmp_path, pristine, capsys, problem, break_it,
                                                            overrides, mentions):
    overrides = [o.replace("SEEDS", str(tmp_path / "seeds")) for o in overrides]
    argv, _, _ = _setup(tmp_path, pristine, problem, break_it, overrides)
    _refused_in_process(capsys, tmp_path, argv, mentions)


# ------------------------------------------------------------------------------------------ the real CLI
@pytest.mark.slow
@pytest.mark.parametrize("problem, break_it, mentions", [
    pytest.param("llm_recipe", _garbled, ["specialist_b/model.safetensors"], id="ps-safetensors-garbled"),
    pytest.param("llm_recipe", _write("seeds.json", "{"), ["seeds.json", "not valid JSON"], id="ps-manifest-not-json"),
    pytest.param("llm_models", _poisoned(np.nan), ["specialist_b/model.safetensors", BROKEN_TENSOR],
                 id="m2n2-weights-nan"),
    pytest.param("llm_path", _write(FITNESS, '{"prompt": "Q"}\n'), ["arithmetic_fitness.jsonl", "'answer'"],
                 id="dfs-line-without-answer"),
])
def test_the_command_exits_2_with_one_line(tmp_path, pristine, problem, break_it, mentions):
    argv, _, _ = _setup(tmp_path, pristine, problem, break_it)
    assert_refused(cli(*argv), *mentions, absent=[tmp_path / "new", tmp_path / "runs"])


# -------------------------------------------------------------------------------------------- warnings
def _warnings(text):
    return [line for line in text.splitlines() if line.startswith("evojax-merge: warning:")]


@pytest.mark.slow
def test_a_model_listed_twice_is_a_warning_and_the_run_goes_on(tmp_path, pristine):
    argv, root, out = _setup(tmp_path, pristine, "llm_recipe",
                             _manifest(lambda d: d["models"].update(list_ops="specialist_a")))
    result = cli(*argv)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "evojax-merge: error" not in result.stderr
    (line,) = _warnings(result.stderr)
    assert "problem.seeds.models[0] (arithmetic)" in line and "problem.seeds.models[1] (list_ops)" in line
    assert str(root / "specialist_a") in line
    assert (out / "summary.json").is_file()


def test_test_problems_among_the_fitness_problems_are_a_warning(tmp_path, pristine, capsys):
    _, root, _ = _setup(tmp_path, pristine, "llm_recipe", _task("test", "data/arithmetic_fitness.jsonl"))
    runner.build(load_config(tmp_path / "c.yaml"))
    (line,) = _warnings(capsys.readouterr().err)
    assert "4 of the 4 test problems of skill 'arithmetic' are also fitness problems" in line
    assert str(root / FITNESS) in line


def test_nonfinite_weights_can_be_allowed_on_purpose(tmp_path, pristine, capsys):
    """problem.seeds.allow_nonfinite: a search may be run on broken seeds, e.g. to watch it reject them."""
    _setup(tmp_path, pristine, "llm_path", _poisoned(np.nan))
    experiment = runner.build(load_config(tmp_path / "c.yaml", ["problem.seeds.allow_nonfinite=true"]))
    assert np.isnan(np.asarray(experiment.problem.seeds.models[1]["layers"]["up_proj"][1])).sum() == 1
    assert not _warnings(capsys.readouterr().err)
