"""The user's own task files: a hand-written JSONL scored with every scorer against hand-worked values,
seeded fitness / test splits, every bad field refused (one line naming the file, line and field, also
through the CLI: exit 2, nothing written), chat templates rendered as transformers renders them, old
seeds manifests keeping the meaning of their scorer names, and the README's PS command on tiny models.

The scorers run on a "successor" Llama whose greedy generation is set by hand: its layers add nothing
(zero output projections), the embeddings are one-hot, so the next token depends only on the current one,
and the output head gives the chosen successor of each token the logit ln(V - 1) and every other token 0:
the successor has probability exactly 1/2 and any other token q = 1 / (2 (V - 1)).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shlex
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from cli_helpers import assert_refused
from evojax_merge.cli import main
from evojax_merge.data.synthetic_text import CharTokenizer, TextExample
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import llama
from evojax_merge.tasks import lm
from evojax_merge.tasks.chat_template import read_chat_template
from evojax_merge.tasks.lm_suite import GivenSkill, suite_from_examples
from evojax_merge.tasks.task_file import check_scorable, read_examples, split_examples
from evojax_merge.train.lm_seeds import SeedManifest

from evolve_helpers import char_tokenizer, save_seeds

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOK = CharTokenizer()
V = TOK.vocab_size
EOS = TOK.eos_token_id
Q = 1 / (2 * (V - 1))  # the probability of any token but the successor

# The generations, by the prompt's last character: '?' -> " 42", ':' -> "Rome", '!' -> "x=7" (then EOS).
CHAINS = ["? 42", ":Rome", "!x=7"]

TASK = "\n".join([
    '{"prompt": "What is 6 times 7?", "answer": "42", "choices": ["24", "42", "4"], "metadata": {"by": "hand"}}',
    '{"prompt": "Capital of Italy:", "answer": "Rome", "choices": ["Paris", "Rome", "Lima"]}',
    "",  # blank lines are skipped
    '{"prompt": "Solve for x!", "answer": "7", "distractors": ["x=7", "y=7"]}',
    '{"prompt": "What is 5 times 8?", "answer": "40", "choices": ["40", "42", "48"]}',
]) + "\n"


def successor_model():
    """(config, params) of the Llama that continues each CHAINS string and ends it with EOS."""
    succ = np.full(V, EOS)
    for chain in CHAINS:
        ids = TOK.encode(chain)
        for a, b in zip(ids, ids[1:] + [EOS]):
            succ[a] = b
    D = V + V % 2  # one-hot embeddings; an even head size for the rotary embedding
    config = llama.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=4, num_hidden_layers=1,
                               num_attention_heads=1, num_key_value_heads=1, head_dim=D, rms_norm_eps=1e-12,
                               max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=TOK.bos_token_id,
                               eos_token_id=(EOS,), pad_token_id=TOK.pad_token_id)
    params = jax.tree.map(jnp.zeros_like, llama.init_params(config, jax.random.key(0)))
    embed = np.eye(V, D, dtype=np.float32)
    # RMSNorm turns a one-hot row into sqrt(D) times it: the head's 1/sqrt(D) makes the logit ln(V - 1).
    head = np.zeros((V, D), np.float32)
    head[succ, np.arange(V)] = math.log(V - 1) / math.sqrt(D)
    layers = dict(params["layers"], input_layernorm=jnp.ones((1, D)), post_attention_layernorm=jnp.ones((1, D)))
    return config, dict(params, embed_tokens=jnp.asarray(embed), lm_head=jnp.asarray(head), norm=jnp.ones(D),
                        layers=layers)


@pytest.fixture(scope="module")
def model():
    return successor_model()


@pytest.fixture()
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(TASK)
    return path


def _scores(model, examples, kind, pattern=None, **kw):
    config, params = model
    skill = GivenSkill("t", kind, tuple(examples), tuple(examples), 6, pattern=pattern, **kw)
    suite = suite_from_examples([skill], TOK, config, scan_layers=True)
    return np.asarray(suite.scores(params, suite.test, test=True))


# -------------------------------------------------------------------------------------------- scorers
def test_the_successor_model_generates_its_chains(model):
    config, params = model
    batch = lm.generation_batch(TOK, [TextExample("What?", "x"), TextExample("Go!", "x")], TOK.pad_token_id)
    out = np.asarray(llama.generate(params, batch["input_ids"], batch["attention_mask"], config=config,
                                    max_new_tokens=5, pad_token_id=TOK.pad_token_id))
    assert [lm.generated_text(TOK, row, (EOS,)) for row in out] == [" 42", "x=7"]


@pytest.mark.parametrize("kind, pattern, expected", [
    # generations: " 42", "Rome", "x=7", " 42"
    ("exact_match", None, [1, 1, 0, 0]),  # stripped " 42" == "42"; "x=7" != "7"
    ("regex", r"(^|\D){answer}$", [1, 1, 1, 0]),  # the answer ends the reply, not inside a longer number
    ("regex", r"^x=", [0, 0, 1, 0]),  # a pattern that does not read the answer
    ("prefix_match", None, [0, 1, 0, 0]),  # " 42" starts with a space, not with "4"
    ("answer_match", None, [0, 1, 0, 0]),  # exactly the answer's tokens, then EOS
    ("choice", None, [1, 1, 0, 0]),  # "42" beats "24"/"4"; "x=7" beats "7"; "42" beats "40"
])
def test_each_scorer_on_a_hand_written_task(model, task_file, kind, pattern, expected):
    examples = read_examples(task_file)
    check_scorable(task_file, examples, kind)
    np.testing.assert_array_equal(_scores(model, examples, kind, pattern), expected)


def test_last_number_on_the_lines_with_a_number(model, task_file):
    examples = [e for e in read_examples(task_file) if e.answer != "Rome"]
    # " 42" = 42, "x=7" ends with 7, " 42" != 40
    np.testing.assert_array_equal(_scores(model, examples, "last_number"), [1, 1, 0])


def test_answer_probability_and_log_likelihood_by_hand(model, task_file):
    examples = read_examples(task_file)
    # P(answer tokens, EOS): "42" after '?': q (the successor is ' ') * 1/2 * 1/2; "Rome" after ':': (1/2)^5;
    # "7" after '!': q * 1/2; "40" after '?': q * q ('0' is not the successor of '4') * 1/2.
    np.testing.assert_allclose(_scores(model, examples, "answer_prob"), [Q / 4, 1 / 32, Q / 2, Q * Q / 2],
                               rtol=1e-4)
    # The answer's tokens alone (no EOS), summed log-probabilities.
    half = math.log(0.5)
    np.testing.assert_allclose(_scores(model, examples, "loglik"),
                               [math.log(Q) + half, 4 * half, math.log(Q), 2 * math.log(Q)], rtol=1e-4)


def test_text_scorers_vmap_over_a_population(model, task_file):
    """A population axis reaches the host comparison in one call: each candidate scored as alone."""
    config, params = model
    mute = dict(params, lm_head=jnp.zeros_like(params["lm_head"]).at[EOS].set(10.0))  # answers nothing
    examples = read_examples(task_file)
    for kind, pattern, expected in (("exact_match", None, [1, 1, 0, 0]), ("regex", "{answer}", [1, 1, 1, 0])):
        skill = GivenSkill("t", kind, tuple(examples), tuple(examples), 6, pattern=pattern)
        suite = suite_from_examples([skill], TOK, config, scan_layers=True)
        population = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, mute)
        scores = jax.vmap(lambda p: suite.scores(p, suite.test, test=True))(population)
        np.testing.assert_array_equal(np.asarray(scores), [expected, [0, 0, 0, 0]])


def test_metadata_is_carried_and_choices_become_distractors(task_file):
    first, second, third, _ = read_examples(task_file)
    assert first.metadata == {"by": "hand"} and second.metadata is None
    assert first.choices == ("42", "24", "4") and second.distractors == ("Paris", "Lima")
    assert third.distractors == ("x=7", "y=7") and third.line == 4  # the blank line counts
    assert first == TextExample("What is 6 times 7?", "42", ("24", "4"))  # where it came from is not what it is


# --------------------------------------------------------------------------------------------- splits
def test_splits_are_seeded_disjoint_and_refuse_more_than_the_file_holds():
    examples = [TextExample(f"q{i}", str(i)) for i in range(20)]
    fitness, test = split_examples(examples, 6, 8, seed=3)
    assert (fitness, test) == split_examples(examples, 6, 8, seed=3)
    assert len(fitness) == 6 and len(test) == 8 and not set(fitness) & set(test)
    assert [examples.index(e) for e in fitness] == sorted(examples.index(e) for e in fitness)  # file order
    assert split_examples(examples, 6, 8, seed=4) != (fitness, test)
    rest = split_examples(examples, 6, None, seed=3)
    assert rest[0] == fitness and len(rest[1]) == 14 and set(test) <= set(rest[1])
    with pytest.raises(ConfigError, match="holds 20 examples: 15 fitness and 6 test"):
        split_examples(examples, 15, 6, seed=0)
    with pytest.raises(ConfigError, match="holds 20 examples: 20 fitness and at least 1 test"):
        split_examples(examples, 20, None, seed=0)


# ------------------------------------------------------------------------------------------ bad lines
BAD_LINES = [
    ('{"prompt": "a"', "line 2: not JSON"),
    ('["a", "b"]', "line 2: an example must be a JSON object"),
    ('{"answer": "b"}', "line 2: no 'prompt'"),
    ('{"prompt": "a"}', "line 2: no 'answer'"),
    ('{"prompt": "", "answer": "b"}', "line 2: 'prompt' must be a non-empty string"),
    ('{"prompt": "a", "answer": 4}', "line 2: 'answer' must be a non-empty string"),
    ('{"prompt": "a", "answer": "b", "choice": ["b"]}', "line 2: unknown field 'choice'"),
    ('{"prompt": "a", "answer": "b", "choices": "b"}', "line 2: 'choices' must be a list of non-empty strings"),
    ('{"prompt": "a", "answer": "b", "choices": ["c", "d"]}', "line 2: 'choices' must contain the answer 'b'"),
    ('{"prompt": "a", "answer": "b", "choices": ["b", "c", "c"]}', "line 2: 'choices' lists a choice twice"),
    ('{"prompt": "a", "answer": "b", "choices": ["b", "c"], "distractors": ["c"]}', "line 2: give 'choices'"),
    ('{"prompt": "a", "answer": "b", "distractors": ["b"]}', "line 2: 'distractors' must not contain the answer"),
    ('{"prompt": "a", "answer": "b", "distractors": [1]}', "line 2: 'distractors' must be a list"),
    ('{"prompt": "a", "answer": "b", "metadata": [1]}', "line 2: 'metadata' must be a JSON object"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_line_is_one_error_naming_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_examples(path)
    assert str(e.value).startswith(f"{path}, {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("kind, lines, message", [
    ("last_number", ['{"prompt": "a", "answer": "seven"}'], "line 1: 'answer' 'seven' holds no number"),
    ("choice", ['{"prompt": "a", "answer": "b"}'], "line 1: kind 'choice' needs 'choices'"),
    ("choice", ['{"prompt": "a", "answer": "b", "choices": ["b", "c"]}',
                '{"prompt": "a", "answer": "b", "choices": ["b", "c", "d"]}'], "line 2: 3 choices, the first"),
])
def test_a_line_its_scorer_cannot_score_is_refused(tmp_path, kind, lines, message):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}, {message}")):
        check_scorable(path, read_examples(path), kind)


def test_an_empty_or_unreadable_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl holds no examples"):
        read_examples(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match="latin1.jsonl cannot be read as UTF-8"):
        read_examples(tmp_path / "latin1.jsonl")


# ------------------------------------------------------------------------------------ chat templates
@pytest.fixture(scope="module")
def smollm2_template():
    from evojax_merge.models import gguf_io

    return gguf_io.gguf_chat_template(gguf_io.smollm2_gguf_path())


def _hf_folder(path, template, **special):
    """A Hugging Face tokenizer folder written by transformers, with ``template``; (folder, tokenizer)."""
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(), chat_template=template,
                                                     **special)
    tokenizer.save_pretrained(str(path))
    return path, tokenizer


PROMPT = 'What is 2 + 2? Answer "<b>4</b>" & say é'


def test_the_smollm2_template_renders_as_transformers_renders_it(tmp_path, smollm2_template):
    folder, tokenizer = _hf_folder(tmp_path, smollm2_template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    template = read_chat_template(folder)
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": PROMPT}]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.render(PROMPT, system) == expected
    assert "You are a helpful AI assistant named SmolLM" in template.render(PROMPT)  # its default system turn


SYSTEM_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
[SYS]{{ message['content'] | tojson }}[/SYS]
    {% elif message['role'] == 'user' %}
[INST] {{ message['content'] }} [/INST]
    {% else %}
{{ raise_exception('only system and user turns') }}
    {% endif %}
    {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{% generation %}{% if add_generation_prompt %}Answer:{% endif %}{% endgeneration %}"""


def test_a_template_with_a_system_turn_bos_token_and_json_renders_as_transformers_renders_it(tmp_path):
    folder, tokenizer = _hf_folder(tmp_path, SYSTEM_TEMPLATE, bos_token="<s>", eos_token="</s>")
    template = read_chat_template(folder)
    messages = [{"role": "system", "content": "Use <tags> & é"}, {"role": "user", "content": PROMPT}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.render(PROMPT, "Use <tags> & é") == expected
    assert expected.startswith("<s>") and '"Use <tags> & é"' in expected  # tojson keeps the text


def test_a_template_read_from_tokenizer_config_and_the_errors(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "{{ eos_token }}{{ messages[0]['content'] }}"}],
         "eos_token": {"content": "</s>"}}))
    assert read_chat_template(tmp_path).render("hi") == "</s>hi"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ConfigError, match=f"model folder {tmp_path} has none"):
        read_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(DataError, match="chat_template.jinja is not a valid Jinja template"):
        read_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system turns') }}")
    with pytest.raises(DataError, match="fails to render a prompt: no system turns"):
        read_chat_template(tmp_path).render("hi")


def test_a_skill_is_prompted_through_the_chat_template(model, tmp_path, task_file):
    config, _ = model
    folder, tokenizer = _hf_folder(tmp_path / "tok", SYSTEM_TEMPLATE, bos_token="<s>", eos_token="</s>")
    examples = read_examples(task_file)[:1]
    skill = GivenSkill("t", "exact_match", tuple(examples), tuple(examples), 4, system="Be brief.")
    suite = suite_from_examples([skill], TOK, config, prompt_format="chat_template",
                                chat_template=read_chat_template(folder))
    row = np.asarray(suite.test[0]["input_ids"][0])
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": examples[0].prompt}],
                                             tokenize=False, add_generation_prompt=True)
    assert TOK.decode(row) == expected


# ---------------------------------------------------------------------------------- seeds manifests
def test_an_old_manifests_exact_match_still_means_the_last_number(tmp_path):
    data = {"models": {"a": "a"}, "tasks": {"arithmetic": {"kind": "exact_match", "max_new_tokens": 6},
                                            "list_ops": {"kind": "answer_match", "max_new_tokens": 24}}}
    (tmp_path / "seeds.json").write_text(json.dumps(data))
    assert SeedManifest.read(tmp_path).data["tasks"]["arithmetic"]["kind"] == "last_number"
    (tmp_path / "seeds.json").write_text(json.dumps(data | {"format_version": 2}))
    assert SeedManifest.read(tmp_path).data["tasks"]["arithmetic"]["kind"] == "exact_match"
    assert SeedManifest.read(tmp_path).data["tasks"]["list_ops"]["kind"] == "answer_match"
    (tmp_path / "seeds.json").write_text(json.dumps(data | {"format_version": 7}))
    with pytest.raises(DataError, match="format_version must be 1 or 2, got 7"):
        SeedManifest.read(tmp_path)


# ---------------------------------------------------------------------------- runs: the CLI, README
README = (ROOT / "README.md").read_text()
README_RUNS = {search: re.search(rf"^evojax-merge run examples/own_task/{search}\.yaml .*$", README, re.M)
               for search in ("ps", "dfs", "m2n2")}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A generation or two of each search on the tiny models.
TINY_BUDGETS = {
    "ps": ["run.evaluations=4", "run.log_every=2", "run.checkpoint_every=2", "strategy.population_size=2"],
    "dfs": ["run.evaluations=2", "run.log_every=2", "run.checkpoint_every=2", "strategy.population_size=2"],
    "m2n2": ["run.evaluations=4", "run.log_every=1", "run.checkpoint_every=1", "strategy.archive_size=3",
             "strategy.warmup=1"],
}


def _task_file(search="ps", **changes) -> str:
    """An override of the task file entry of the README's config of ``search`` (2 new tokens: a fast test),
    with ``changes``."""
    config = yaml.safe_load((ROOT / "examples" / "own_task" / f"{search}.yaml").read_text())
    return "problem.task.files=" + json.dumps([config["problem"]["task"]["files"][0] | {"max_new_tokens": 2} | changes])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny random models (and a base) with a chat template in their tokenizer_config.json."""
    root = tmp_path_factory.mktemp("own_task")
    out = save_seeds(root)
    for folder in out.values():
        (pathlib.Path(folder) / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "</s>"}))
    return out


def _readme_argv(folders, out, extra=(), search="ps"):
    """The README's command of ``search``, on the tiny models, with the test's budget and output folder."""
    assert README_RUNS[search] is not None, f"the README shows the {search} command"
    argv = shlex.split(README_RUNS[search].group(0))[1:]
    argv = [a.replace("models/model_a", folders["specialist_a"]).replace("models/model_b", folders["specialist_b"])
            for a in argv]
    for o in [*TINY_BUDGETS[search], _task_file(search), *extra]:
        argv += ["--set", o]
    return argv + ["--out", str(out), "--no-progress"]


@pytest.mark.slow  # about 50 s each on a 2-core CPU: generation compiled for each prompt width
@pytest.mark.parametrize("search", ["ps", "dfs", "m2n2"])
def test_the_readmes_commands_run_on_a_hand_written_task(tmp_path, folders, monkeypatch, search):
    monkeypatch.chdir(ROOT)  # the README's paths are the repository's
    out = tmp_path / search
    assert main(_readme_argv(folders, out, search=search)) == 0
    summary = json.loads((out / "summary.json").read_text())
    test_scores = summary["final_test_score_per_group_mean"]
    assert list(test_scores) == ["arithmetic"] and 0 <= test_scores["arithmetic"] <= 1
    config = yaml.safe_load((out / "config.yaml").read_text())
    task = config["problem"]["task"]
    assert task["files"][0]["path"] == "examples/own_task/task.jsonl" and task["skills"] == []


@pytest.mark.parametrize("sets, mentions", [
    ([_task_file(kind="regex")], ["problem.task.files[0].pattern", "is needed by kind 'regex'"]),
    ([_task_file(kind="regex", pattern="(")], ["problem.task.files[0].pattern", "is not a regular expression"]),
    ([_task_file(kind="bleu")], ["problem.task.files[0].kind", "must be one of"]),
    ([_task_file(n_fitness=24)], ["problem.task.files[0]", "examples/own_task/task.jsonl", "holds 24 examples"]),
    ([_task_file(n_fitness=20, n_test=5)], ["problem.task.files[0]", "20 fitness and 5 test"]),
    (["problem.task.from_manifest=true"], ["problem.task", "files and from_manifest"]),
    ([_task_file(path="nowhere.jsonl")], ["problem.task.files[0].path", "nowhere.jsonl"]),
    ([_task_file(kind="choice")], ["examples/own_task/task.jsonl, line 1", "needs 'choices'"]),
    ([_task_file(colour="red")], ["unknown config key", "colour"]),
    ([_task_file(system="Hi"), "problem.task.prompt_format=plain"],
     ["problem.task.files[0].system", "needs a chat prompt format"]),
])
def test_a_bad_task_through_the_cli_is_refused_and_leaves_nothing(tmp_path, folders, monkeypatch, capsys,
                                                                  sets, mentions):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "new" / "run"
    capsys.readouterr()
    code = main(_readme_argv(folders, out, sets))
    assert_refused(types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err), *mentions,
                   absent=[tmp_path / "new"])


def test_a_bad_line_through_the_cli_is_refused_and_leaves_nothing(tmp_path, folders, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TASK.replace('"answer": "Rome"', '"answer": ["Rome"]'))
    capsys.readouterr()
    code = main(_readme_argv(folders, tmp_path / "new" / "run", [_task_file(path=str(bad))]))
    assert_refused(types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err),
                   f"{bad}, line 2: 'answer' must be a non-empty string", absent=[tmp_path / "new"])


def test_a_folder_without_a_chat_template_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    plain = save_seeds(tmp_path / "plain")  # no tokenizer_config.json
    capsys.readouterr()
    code = main(_readme_argv(plain, tmp_path / "new" / "run"))
    assert_refused(types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err),
                   f"model folder {plain['specialist_a']} has none", absent=[tmp_path / "new"])


def test_the_example_configs_are_valid_and_read_one_task_file():
    from evojax_merge.config import load_config, options
    from evojax_merge.problems.llm_models import LLMModelsOptions
    from evojax_merge.problems.llm_path import LLMPathOptions
    from evojax_merge.problems.llm_recipe import LLMRecipeOptions

    classes = {"llm_recipe": LLMRecipeOptions, "llm_path": LLMPathOptions, "llm_models": LLMModelsOptions}
    for search in ("ps", "dfs", "m2n2"):
        config = load_config(ROOT / "examples" / "own_task" / f"{search}.yaml")
        opts = options(classes[config.problem["name"]], config.problem, "problem")
        opts.validate()
        assert [f.path for f in opts.task.files] == ["examples/own_task/task.jsonl"] and opts.task.skills == []
        assert len(read_examples(ROOT / opts.task.files[0].path)) == 24


def test_a_manifest_runs_resolved_config_with_the_former_default_skills_still_loads():
    from evojax_merge.config import from_dict
    from evojax_merge.problems.llm import TaskOptions

    former = [{"skill": "arithmetic", "kind": "exact_match", "n_train": 64, "n_test": 128, "data_seed": 0},
              {"skill": "list_ops", "kind": "prefix_match", "n_train": 64, "n_test": 128, "data_seed": 0}]
    task = from_dict(TaskOptions, {"from_manifest": True, "skills": former}, "problem.task.")
    task.validate()
    assert task.skills == []
    task = from_dict(TaskOptions, {"from_manifest": True, "skills": former[:1]}, "problem.task.")
    with pytest.raises(ConfigError, match="names from_manifest and skills"):
        task.validate()
    default = from_dict(TaskOptions, {}, "problem.task.")
    default.validate()
    assert [(s.skill, s.kind) for s in default.skills] == [("arithmetic", "last_number"), ("list_ops", "prefix_match")]


def test_whole_model_search_refuses_a_loglik_task_file_naming_it(tmp_path):
    from evojax_merge.problems.llm_models import llm_models

    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) + "\n" for i in range(6)))
    with pytest.raises(ConfigError) as e:
        llm_models(seeds={"models": [str(tmp_path / "a"), str(tmp_path / "b")]},
                   task={"files": [{"path": str(path), "kind": "loglik", "n_fitness": 3}]})
    assert str(path) in str(e.value) and "loglik" in str(e.value) and "None" not in str(e.value)
