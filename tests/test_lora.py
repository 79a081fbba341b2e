"""LoRA adapters (PEFT folders) wherever a model folder is: merge recipes, seeds of searches, and the llm_lora
genome space over many adapters of one base. PEFT's own ``merge_and_unload`` is the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from evojax_merge.cli import main as cli_main
from evojax_merge.errors import DataError
from evojax_merge.models import hf_io, lora
from evojax_merge.problems.llm import SeedsOptions, load_model

from evolve_helpers import TINY, char_tokenizer, save_seeds

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("merge_kernel_cache_in_tmp")


def make_adapter(base: Path, out: Path, seed: int, *, r: int = 4, alpha: float = 8.0, targets=TARGETS, **config):
    """A PEFT LoRA adapter of the model in ``base`` with random non-zero factors (PEFT starts B at zero, which
    would make every update vanish), saved to ``out``; returns PEFT's ``merge_and_unload`` weights."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                         lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    wrapped.save_pretrained(str(out))
    merged = wrapped.merge_and_unload()
    return {k: v.detach().numpy().copy() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama base (evolve_helpers' char-tokenizer model) and adapters of it made by PEFT, with the
    weights PEFT's merge_and_unload gives for each."""
    root = tmp_path_factory.mktemp("lora")
    folders = save_seeds(root)
    base = Path(folders["base"])
    adapters, merged = {}, {}
    specs = {
        "plain": dict(r=4, alpha=8.0),
        "rslora": dict(r=4, alpha=6.0, use_rslora=True),
        "pattern": dict(r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3}, alpha_pattern={"v_proj": 5.0}),
        "head": dict(r=2, alpha=4.0, targets=["lm_head", "up_proj"]),
    }
    for i, (name, spec) in enumerate(specs.items()):
        adapters[name] = root / f"adapter_{name}"
        merged[name] = make_adapter(base, adapters[name], seed=10 + i, **spec)
    return {"root": root, "base": base, "adapters": adapters, "merged": merged, "folders": folders}


def _close(ours: dict, reference: dict, atol=1e-5):
    for name, want in reference.items():
        np.testing.assert_allclose(ours[name], want, atol=atol, rtol=0, err_msg=name)


# ------------------------------------------------------------------------------------ reading adapters
def test_factors_and_scales_are_read_as_peft_configured_them(tiny):
    plain = lora.read_adapter(tiny["adapters"]["plain"])
    assert len(plain.factors) == TINY.num_hidden_layers * len(TARGETS)
    q0 = plain.factors["model.layers.0.self_attn.q_proj.weight"]
    assert q0.a.shape == (4, TINY.hidden_size) and q0.scale == 8.0 / 4
    assert lora.read_adapter(tiny["adapters"]["rslora"]).factors["model.layers.1.mlp.up_proj.weight"].scale == 6.0 / 2
    pattern = lora.read_adapter(tiny["adapters"]["pattern"]).factors
    assert sorted({n.split(".")[-2] for n in pattern}) == ["down_proj", "q_proj", "v_proj"]
    assert pattern["model.layers.1.self_attn.q_proj.weight"].a.shape[0] == 2  # rank_pattern, full name
    assert pattern["model.layers.0.self_attn.q_proj.weight"].scale == 8.0 / 4  # the pattern is layer 1's only
    assert pattern["model.layers.0.mlp.down_proj.weight"].scale == 8.0 / 3  # rank_pattern by suffix
    assert pattern["model.layers.0.self_attn.v_proj.weight"].scale == 5.0 / 4  # alpha_pattern


@pytest.mark.parametrize("name", ["plain", "rslora", "pattern"])
def test_seed_loader_equals_peft_merge_and_unload(tiny, name):
    """A seed named BASE+ADAPTER, or by its adapter folder alone, loads as PEFT's merged model."""
    opts = SeedsOptions(models=["x"])
    reference = tiny["merged"][name]
    for ref in (f"{tiny['base']}+{tiny['adapters'][name]}", str(tiny["adapters"][name])):
        config, params = load_model(ref, opts)
        _close(hf_io.tensors_from_params(config, params), reference)
    # ... and it is not the base: the update matters at this tolerance
    base = hf_io.read_tensors(tiny["base"])
    assert max(np.abs(base[n] - reference[n]).max() for n in base) > 1e-2


def test_load_seeds_takes_adapted_seeds_and_checks_their_tokenizers(tiny, tmp_path):
    """The seeds of llm_recipe / llm_path / llm_models: BASE+ADAPTER and adapter folders beside plain folders;
    an adapter whose tokenizer gives the ids other meanings is refused like any seed."""
    from evojax_merge.problems.llm import load_seeds

    base, adapters = str(tiny["base"]), tiny["adapters"]
    opts = SeedsOptions(models=[f"{base}+{adapters['plain']}", str(adapters["rslora"])], base=base)
    seeds = load_seeds(opts, need_base=True)
    for params, name in zip(seeds.models, ["plain", "rslora"]):
        _close(hf_io.tensors_from_params(seeds.config, params), tiny["merged"][name])
    _close(hf_io.tensors_from_params(seeds.config, seeds.base), hf_io.read_tensors(base), atol=0)
    other = tmp_path / "other_tokenizer"
    shutil.copytree(adapters["plain"], other)
    tok = char_tokenizer()
    tok.add_special_tokens(["<extra>"])
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(DataError, match="tokenizers of .* differ"):
        load_seeds(SeedsOptions(models=[str(adapters["plain"]), str(other)], base=base), need_base=False)


def _merge(tmp_path, recipe: dict, capsys=None) -> tuple[int, Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code = cli_main(["merge", str(path), "--out", str(out)])
    return code, out


@pytest.mark.parametrize("name", ["plain", "rslora", "pattern"])
def test_merge_recipe_applies_an_adapter_as_peft_does(tiny, tmp_path, name):
    """``model: BASE+ADAPTER`` in a passthrough recipe is the adapted model (PEFT's merge_and_unload to 1e-5),
    with the base's config and tokenizer."""
    code, out = _merge(tmp_path, {"merge_method": "passthrough",
                                  "models": [{"model": f"{tiny['base']}+{tiny['adapters'][name]}"}]})
    assert code == 0
    _close(hf_io.read_tensors(out), tiny["merged"][name])
    assert hf_io.read_config(out) == hf_io.read_config(tiny["base"])
    assert (out / "tokenizer.json").read_bytes() == (tiny["base"] / "tokenizer.json").read_bytes()


def test_task_arithmetic_over_two_adapters_of_one_base(tiny, tmp_path):
    """Relative paths (to the recipe) on both sides of '+', an adapter folder alone, and per-model weights:
    base + 0.7 (merged_plain - base) - 0.4 (merged_rslora - base)."""
    root = tiny["root"]
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "base+adapter_plain", "parameters": {"weight": 0.7}},
                         {"model": str(tiny["adapters"]["rslora"]), "parameters": {"weight": -0.4}}]}
    (root / "ta.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert cli_main(["merge", str(root / "ta.yaml"), "--out", str(out)]) == 0
    base = hf_io.read_tensors(tiny["base"])
    plain, rs = tiny["merged"]["plain"], tiny["merged"]["rslora"]
    want = {n: base[n] + 0.7 * (plain[n] - base[n]) - 0.4 * (rs[n] - base[n]) for n in base}
    _close(hf_io.read_tensors(out), want)


def test_the_adapters_tokenizer_is_copied_when_it_has_one(tiny, tmp_path):
    adapter = tmp_path / "with_tokenizer"
    shutil.copytree(tiny["adapters"]["plain"], adapter)
    tok = char_tokenizer()
    tok.add_special_tokens(["<extra>"])  # same ids as the base's, plus one: refused as a different tokenizer
    tok.save(str(adapter / "tokenizer.json"))
    code, _ = _merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(tiny["base"]),
                                "models": [{"model": f"{tiny['base']}+{adapter}"}]})
    assert code == 2
    tok = char_tokenizer()
    tok.enable_padding(pad_id=0, pad_token="<pad>")  # the same ids (accepted), another file than the base's
    tok.save(str(adapter / "tokenizer.json"))
    assert (adapter / "tokenizer.json").read_bytes() != (tiny["base"] / "tokenizer.json").read_bytes()
    code, out = _merge(tmp_path, {"merge_method": "passthrough", "models": [{"model": f"{tiny['base']}+{adapter}"}]})
    assert code == 0 and (out / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------ bad adapters
def _edit_config(**changes):
    def apply(folder: Path):
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
    return apply


def _rename_tensors(old: str, new: str):
    """Renames the tensors whose names start with ``old``."""
    def apply(folder: Path):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
        tensors = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return apply


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_ADAPTERS = {
    "missing-config": (lambda f: (f / "adapter_config.json").unlink(), ["adapter_config.json", "no "]),
    "dora": (_edit_config(use_dora=True), ["adapter_config.json", "use_dora"]),
    "bias": (_edit_config(bias="all"), ["adapter_config.json", "bias"]),
    "modules-to-save": (_edit_config(modules_to_save=["lm_head"]), ["adapter_config.json", "modules_to_save"]),
    "not-lora": (_edit_config(peft_type="IA3"), ["adapter_config.json", "IA3"]),
    "unknown-target": (_rename_tensors(Q0, "base_model.model.model.layers.0.self_attn.qq_proj"),
                       ["adapter_model.safetensors", "qq_proj"]),
    "embedding-target": (_rename_tensors(f"{Q0}.lora_A.weight", "base_model.model.model.embed_tokens"
                                         ".lora_embedding_A"), ["adapter_model.safetensors", "embedding"]),
    "rank-disagrees": (_edit_config(r=5), ["adapter_model.safetensors", "rank 5"]),
    "bin-weights": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
                    ["adapter_model.bin", "safe_serialization"]),
    "base-missing": (_edit_config(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M"),
                     ["adapter_config.json", "base_model_name_or_path", "BASE_FOLDER+ADAPTER_FOLDER"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_in_one_line_with_exit_2(tiny, tmp_path, capsys, case):
    """Each broken adapter, named alone (its base from its config), is refused by ``merge`` before anything is
    written: one line naming the file and the key, exit status 2; the seed loader refuses it too."""
    break_it, mentions = BAD_ADAPTERS[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapters"]["plain"], adapter)
    break_it(adapter)
    capsys.readouterr()
    code, out = _merge(tmp_path, {"merge_method": "passthrough", "models": [{"model": str(adapter)}]})
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for m in mentions:
        assert m in err, (m, err)
    with pytest.raises(DataError):
        load_model(str(adapter), SeedsOptions(models=["x"]))


def test_an_adapter_of_another_model_size_is_refused(tiny, tmp_path, capsys):
    other = save_seeds(tmp_path / "wide", config=TINY.__class__(**{**TINY.__dict__, "intermediate_size": 64}))
    capsys.readouterr()
    code, out = _merge(tmp_path, {"merge_method": "passthrough",
                                  "models": [{"model": f"{other['base']}+{tiny['adapters']['plain']}"}]})
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "adapter_model.safetensors" in err and "[32, 48]" in err and "[32, 64]" in err, err


def test_a_missing_adapter_folder_is_named_with_its_recipe_key(tiny, tmp_path, capsys):
    capsys.readouterr()
    code, out = _merge(tmp_path, {"merge_method": "passthrough", "models": [f"{tiny['base']}+{tmp_path}/nope"]})
    err = capsys.readouterr().err
    assert code == 2 and "models[0].model" in err and "adapter folder" in err and "nope" in err, err


# ------------------------------------------------------------------------------------ llm_lora genome space
TASK = {"skills": [{"skill": "arithmetic", "kind": "answer_prob", "n_train": 4, "n_test": 4}], "max_new_tokens": 3}


def _problem(tiny, adapters, **lora_options):
    from evojax_merge.problems.llm_lora import llm_lora

    problem, _ = llm_lora(seeds={"base": str(tiny["base"]), "models": [str(tiny["adapters"][a]) for a in adapters]},
                          task=TASK, score_seeds=False, lora=lora_options)
    return problem


def _model_tensors(problem, genome):
    fitness, _ = problem.data()
    model = jax.jit(problem.model_of)(jnp.asarray(genome, jnp.float32), fitness["models"])
    return hf_io.tensors_from_params(problem.seeds.config, model)


def test_one_adapter_at_scale_one_is_the_adapted_model(tiny):
    problem = _problem(tiny, ["plain", "pattern", "head"])
    assert problem.space.shape == (3, TINY.num_hidden_layers + 1)  # lm_head: a group outside the layers
    for k, name in enumerate(["plain", "pattern", "head"]):
        genome = np.zeros(problem.space.shape)
        genome[k] = 1.0
        _close(_model_tensors(problem, genome.reshape(-1)), tiny["merged"][name])


def test_scales_are_a_per_group_linear_combination_of_the_updates(tiny):
    """Hand-set scales, two layers per group: every weight is base + sum_k s[k, group] (adapted_k - base)."""
    problem = _problem(tiny, ["plain", "rslora", "head"], layer_group=2)
    assert problem.space.shape == (3, 3) and problem.space.group_names() == ["layers 0-1", "layers 2-2",
                                                                              "outside the layers"]
    scales = np.array([[0.5, -1.0, 0.0], [2.0, 0.25, 0.0], [0.3, 0.6, -0.7]])
    ours = _model_tensors(problem, scales.reshape(-1))
    base = hf_io.read_tensors(tiny["base"])

    def group(name):
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        return 2 if layer is None else int(layer) // 2

    want = {n: base[n] + sum(scales[k, group(n)] * (tiny["merged"][a][n] - base[n])
                             for k, a in enumerate(["plain", "rslora", "head"])) for n in base}
    _close(ours, want, atol=2e-5)


def test_seeds_that_are_not_adapters_of_the_base_are_refused(tiny):
    from evojax_merge.errors import ConfigError
    from evojax_merge.problems.llm_lora import llm_lora

    with pytest.raises(ConfigError, match=r"problem.seeds.models\[1\].*not a LoRA adapter folder"):
        llm_lora(seeds={"base": str(tiny["base"]), "models": [str(tiny["adapters"]["plain"]),
                                                              tiny["folders"]["specialist_a"]]}, task=TASK)
    other = f"{tiny['folders']['specialist_a']}+{tiny['adapters']['plain']}"
    with pytest.raises(ConfigError, match=r"problem.seeds.models\[0\].*problem.seeds.base is"):
        llm_lora(seeds={"base": str(tiny["base"]), "models": [other]}, task=TASK)
    with pytest.raises(ConfigError, match=r"problem.seeds.models\[0\].*nope does not exist"):
        llm_lora(seeds={"base": str(tiny["base"]), "models": [str(tiny["root"] / "nope")]}, task=TASK)
    with pytest.raises(ConfigError, match="problem.seeds.base"):
        llm_lora(seeds={"models": [str(tiny["adapters"]["plain"])]}, task=TASK)


@pytest.mark.slow  # ~30 s on 2 CPU cores: compiles the search step and the baselines
def test_a_cma_es_search_over_adapters_runs_and_exports_a_model_merge_reproduces(tiny, tmp_path):
    """A few CMA-ES evaluations through the runner; the exported mergekit recipe, run by ``merge``, gives the
    exported model, and scales.csv holds the genome."""
    import csv

    from evojax_merge.config import load_config
    from run_helpers import run_config

    config = {"name": "lora", "problem": {"name": "llm_lora", "task": TASK, "score_seeds": True,
                                          "seeds": {"base": str(tiny["base"]),
                                                    "models": [str(tiny["adapters"][a]) for a in ("plain", "head")]}},
              "strategy": {"name": "evosax:CMA_ES", "population_size": 2, "sigma_init": 0.3},
              "run": {"out_dir": str(tmp_path / "runs"), "seeds": [0], "evaluations": 4, "log_every": 2,
                      "checkpoint_every": 4, "batch_size": 1}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    run_dir, summary = run_config(load_config(tmp_path / "lora.yaml"), tmp_path / "run")
    best = next(p for p in Path(run_dir).rglob("genome.npy")).parent
    genome = np.load(best / "genome.npy")
    assert genome.shape == (2 * (TINY.num_hidden_layers + 1),) and not np.allclose(genome, 0.5)
    rows = list(csv.reader((best / "scales.csv").open()))
    assert rows[0][1:] == [str(tiny["adapters"]["plain"]), str(tiny["adapters"]["head"])]
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], float).T.reshape(-1), genome, rtol=1e-6)
    assert set(summary["baselines"]["seeds_test"]) == {str(tiny["base"]), *(str(tiny["adapters"][a]) for a in ("plain", "head"))}
    assert cli_main(["merge", str(best / "mergekit.yaml"), "--out", str(tmp_path / "again")]) == 0
    _close(hf_io.read_tensors(tmp_path / "again"), hf_io.read_tensors(best / "model"))
