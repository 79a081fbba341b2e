"""`evojax-merge merge RECIPE.yaml --out DIR` on bad input, in real subprocesses: every case exits with status
2, prints one line naming the file (and the key, tensor or folder), and leaves nothing at ``--out`` nor next
to it (no ``.NAME.partial-*`` folder, no parent folders made for it). Also: the merged model's modes follow
the umask, the model card names the real base model, and a merge killed with SIGKILL leaves no model behind
and is simply run again.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_helpers import ROOT, assert_refused, cli, cli_command, env, start
from test_merge_cli import _config, _save, _state

TOKENIZER = {"version": "1.0", "added_tokens": [],
             "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(64)}, "unk_token": "t0"}}


def _write_tokenizer(folder: Path, vocab_edit=None):
    spec = json.loads(json.dumps(TOKENIZER))
    if vocab_edit:
        vocab_edit(spec["model"]["vocab"])
    (folder / "tokenizer.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, two fine-tunes (``a`` sharded) and a model with a wider MLP, each with the same tokenizer."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("models")
    out = {"root": root}
    for i, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(i)
        _save(transformers.LlamaForCausalLM(_config()), root / name,
              **({"max_shard_size": "20KB"} if name == "a" else {}))
        out[name] = root / name
    torch.manual_seed(9)
    out["wide"] = _save(transformers.LlamaForCausalLM(_config(intermediate_size=48)), root / "wide")
    for name in ["base", "a", "b", "wide"]:
        _write_tokenizer(out[name])
    assert (root / "a" / "model.safetensors.index.json").exists()
    return out


def merge(cache, *args):
    return cli("merge", *map(str, args), EVOJAX_MERGE_JAX_CACHE=cache)


def write_recipe(folder: Path, text: str, name="recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def ties(models, other=None, extra=""):
    other = other or models["b"]
    return (f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
            f"  - {{model: {models['a']}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
            f"  - {{model: {other}, parameters: {{weight: 0.5, density: 0.5}}}}\n{extra}")


def leftovers(out: Path):
    """``out`` and the hidden ``.NAME.*`` folders of a merge into it."""
    found = [out] if out.exists() or out.is_symlink() else []
    if out.parent.is_dir():
        found += [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return found


# ------------------------------------------------------------------------------------------- recipes
ties_text = ("merge_method: ties\nbase_model: {base}\nmodels:\n"
             "  - {{model: {a}, parameters: {{weight: 0.5, density: DENSITY}}}}\n"
             "  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}\n")
# name -> (recipe text, with {base} {a} {b} {file} {tmp} filled in; what the error line names besides the file)
RECIPES = {
    "not_yaml": ("merge_method: [unclosed\n", ["not valid YAML", "line 2"]),
    "empty": ("", ["is empty"]),
    "only_a_comment": ("# nothing here\n", ["is empty"]),
    "not_a_mapping": ("- {a}\n- {b}\n", ["must be a YAML mapping"]),
    "scalar": ("ties\n", ["must be a YAML mapping"]),
    "unknown_top_key": ("merge_method: linear\nmodels: [{a}, {b}]\nmodles: 3\n", ["unknown keys", "modles"]),
    "unknown_model_key": ("merge_method: linear\nmodels: [{{model: {a}, paramters: {{weight: 1}}}}, {b}]\n",
                          ["models[0]", "paramters"]),
    "unknown_source_key": ("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_rang: [0, 2]}}]\n",
                           ["slices[0].sources[0]", "layer_rang"]),
    "unknown_slice_key": ("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
                          "    paramters: {{scale: 1}}\n", ["slices[0]", "paramters"]),
    "unknown_parameter": ("merge_method: linear\nmodels: [{a}, {b}]\nparameters: {{wieght: 0.5}}\n",
                          ["unknown parameter", "wieght"]),
    "parameter_of_another_method": ("merge_method: linear\n"
                                    "models: [{{model: {a}, parameters: {{density: 0.5}}}}, {b}]\n",
                                    ["models[0].parameters", "does not use 'density'"]),
    "unknown_filter_key": ("merge_method: linear\nmodels: [{a}, {b}]\n"
                           "parameters:\n  weight: [{{filtr: mlp, value: 1}}]\n",
                           ["parameters.weight[0]", "filtr"]),
    "unknown_method": ("merge_method: average\nmodels: [{a}, {b}]\n", ["unknown merge_method 'average'"]),
    "method_not_a_string": ("merge_method: [ties]\nmodels: [{a}, {b}]\n", ["unknown merge_method"]),
    "no_method": ("models: [{a}, {b}]\n", ["missing merge_method"]),
    "models_and_slices": ("merge_method: linear\nmodels: [{a}]\nslices: []\n", ["exactly one of"]),
    "models_not_a_list": ("merge_method: linear\nmodels: {a}\n", ["models: expected a non-empty list"]),
    "model_path_not_a_string": ("merge_method: linear\nmodels: [{{model: 3}}, {b}]\n",
                                ["models[0].model", "expected a model folder path"]),
    "parameters_not_a_mapping": ("merge_method: linear\nmodels: [{a}, {b}]\nparameters: [1, 2]\n",
                                 ["parameters must be a mapping"]),
    "weight_a_word": ("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: half}}}}, {b}]\n",
                      ["models[0].parameters.weight", "expected a number", "half"]),
    "normalize_not_a_bool": ("merge_method: linear\nmodels: [{a}, {b}]\nparameters: {{normalize: 'yes'}}\n",
                             ["parameters.normalize", "true or false"]),
    "layer_range_a_string": ("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: 0-2}}]\n",
                             ["slices[0].sources[0].layer_range"]),
    "seed_a_float": ("merge_method: linear\nmodels: [{a}, {b}]\nrandom_seed: 1.5\n", ["random_seed"]),
    "dtype_a_number": ("merge_method: linear\nmodels: [{a}, {b}]\ndtype: 16\n", ["dtype 16 not supported"]),
    "dtype_unknown": ("merge_method: linear\nmodels: [{a}, {b}]\ndtype: float8\n", ["dtype 'float8' not supported"]),
    "density_above_1": (ties_text.replace("DENSITY", "1.5"), ["models[0].parameters.density", "must be in [0, 1]"]),
    "density_negative": (ties_text.replace("DENSITY", "-1e-2"), ["models[0].parameters.density", "-0.01"]),
    "density_gradient_above_1": (ties_text.replace("DENSITY", "[0.5, 1.2]"), ["density must be in [0, 1]"]),
    "density_filtered_above_1": (ties_text.replace("DENSITY", "[{{filter: mlp, value: 2}}, {{value: 0.5}}]"),
                                 ["parameters.density[0]", "must be in [0, 1]"]),
    "t_above_1": ("merge_method: slerp\nbase_model: {a}\nmodels: [{a}, {b}]\nparameters: {{t: 1.2}}\n",
                  ["parameters.t", "must be in [0, 1]"]),
    "weight_not_finite": ("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: .inf}}}}, {b}]\n",
                          ["models[0].parameters.weight", "not finite"]),
    "negative_multislerp_weight": ("merge_method: multislerp\nmodels:\n"
                                   "  - {{model: {a}, parameters: {{weight: -0.5}}}}\n"
                                   "  - {{model: {b}, parameters: {{weight: 1.5}}}}\n",
                                   ["models[0].parameters.weight", "cannot be negative"]),
    "weights_sum_to_zero": ("merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
                            "  - {{model: {b}, parameters: {{weight: -1}}}}\n", ["sum to 0", "normalize"]),
    "model_missing": ("merge_method: linear\nmodels: [{a}, {tmp}/not_there]\n",
                      ["models[1].model", "not_there", "does not exist"]),
    "model_relative_missing": ("merge_method: linear\nmodels: [{a}, ./not_there]\n", ["models[1].model", "not_there"]),
    "model_is_a_file": ("merge_method: linear\nmodels: [{a}, {file}]\n", ["models[1].model", "is not a folder"]),
    "base_missing": ("merge_method: ties\nbase_model: {tmp}/no_base\nmodels: [{a}, {b}]\n", ["base_model", "no_base"]),
    "tokenizer_source_missing": ("merge_method: linear\nmodels: [{a}, {b}]\ntokenizer_source: {tmp}/no_tok\n",
                                 ["tokenizer_source", "no_tok"]),
    "needs_base": ("merge_method: ties\nmodels: [{a}, {b}]\n", ["'ties' needs a base_model"]),
    "too_few_models": ("merge_method: slerp\nbase_model: {a}\nmodels: [{a}]\n", ["slerp merges at least 2"]),
    "layer_range_past_the_model": ("merge_method: passthrough\n"
                                   "slices:\n  - sources: [{{model: {a}, layer_range: [0, 5]}}]\n",
                                   ["slices[0].sources[0].layer_range", "past the 2 layers", "{a}"]),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipe_is_refused(models, jax_cache, tmp_path, case):
    text, mentions = RECIPES[case]
    (tmp_path / "a_file").write_text("x")
    fill = dict(base=models["base"], a=models["a"], b=models["b"], file=tmp_path / "a_file", tmp=tmp_path)
    recipe = write_recipe(tmp_path, text.format(**fill))
    out = tmp_path / "made" / "out"
    result = merge(jax_cache, recipe, "--out", out)
    assert_refused(result, recipe, *[m.format(**fill) for m in mentions], absent=[tmp_path / "made"])


def test_recipe_file_missing_directory_or_binary(jax_cache, tmp_path):
    out = tmp_path / "out"
    missing = assert_refused(merge(jax_cache, tmp_path / "nope.yaml", "--out", out), tmp_path / "nope.yaml",
                             "cannot read recipe", absent=[out])
    assert "No such file" in missing
    assert_refused(merge(jax_cache, tmp_path, "--out", out), tmp_path, "Is a directory", absent=[out])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00merge")
    assert_refused(merge(jax_cache, binary, "--out", out), binary, "not UTF-8", absent=[out])
    assert leftovers(out) == []


def test_recipe_file_unreadable(models, jax_cache, tmp_path):
    recipe = write_recipe(tmp_path, ties(models))
    recipe.chmod(0)
    try:
        recipe.read_text()
    except PermissionError:
        pass
    else:
        pytest.skip("running as root: mode 000 does not stop reading (the directory case covers unreadable)")
    assert_refused(merge(jax_cache, recipe, "--out", tmp_path / "out"), recipe, "Permission denied",
                   absent=[tmp_path / "out"])


def test_numbers_written_1e_minus_3_are_floats(models, jax_cache, tmp_path):
    from evojax_merge.merge.config import parse_recipe

    plain = parse_recipe(write_recipe(tmp_path, ties(models, extra="parameters: {lambda: 1.0}\n"), "plain.yaml"))
    sci_text = (ties(models, extra="parameters: {lambda: 1e0}\n").replace("density: 0.5", "density: 5e-1")
                .replace("weight: 0.5", "weight: 5E-1"))
    sci_path = write_recipe(tmp_path, sci_text, "sci.yaml")
    sci = parse_recipe(sci_path)
    assert sci.parameters == plain.parameters == {"lambda_": 1.0}
    assert [s.parameters for s in sci.slices[0].sources] == [s.parameters for s in plain.slices[0].sources]
    assert all(isinstance(v, float) for s in sci.slices[0].sources for v in s.parameters.values())
    result = merge(jax_cache, sci_path, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------- model folders
def _copy(models, tmp_path, name="b", to="broken"):
    return Path(shutil.copytree(models[name], tmp_path / to))


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))


def _poison(value):
    def make(models, tmp_path):
        from safetensors.numpy import load_file, save_file

        folder = _copy(models, tmp_path)
        state = load_file(folder / "model.safetensors")
        state["model.layers.1.mlp.up_proj.weight"][3, 4] = value
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder, [folder / "model.safetensors", "model.layers.1.mlp.up_proj.weight", "non-finite"]
    return make


def _no_config(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "config.json").unlink()
    return folder, [folder, "no config.json"]


def _config_not_json(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "config.json").write_text('{"model_type": ')
    return folder, [folder / "config.json", "not valid JSON"]


def _config_not_object(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    return folder, [folder / "config.json", "not a model config"]


def _no_model_type(models, tmp_path):
    folder = _copy(models, tmp_path)
    _edit_config(folder, model_type=None, architectures=None)
    return folder, [folder / "config.json", "unsupported architecture", "model_type"]


def _quantized(models, tmp_path):
    folder = _copy(models, tmp_path)
    _edit_config(folder, quantization_config={"quant_method": "gptq", "bits": 4})
    return folder, [folder / "config.json", "unsupported architecture", "gptq"]


def _other_model_type(models, tmp_path):
    folder = _copy(models, tmp_path)
    _edit_config(folder, model_type="mistral", architectures=["MistralForCausalLM"])
    return folder, [folder / "config.json", "different architectures", "model_type", "mistral"]


def _other_heads(models, tmp_path):
    folder = _copy(models, tmp_path)
    _edit_config(folder, num_attention_heads=8, num_key_value_heads=4)
    return folder, [folder / "config.json", "different architectures", "num_attention_heads"]


def _other_shapes(models, tmp_path):
    return models["wide"], [models["wide"], "model.layers.0.mlp.down_proj.weight", "has shape"]


def _no_weights(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "model.safetensors").unlink()
    return folder, [folder, "no safetensors weights"]


def _only_bin_weights(models, tmp_path):
    folder = _copy(models, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not used")
    return folder, [folder, "pytorch_model.bin", "convert"]


def _truncated(models, tmp_path):
    folder = _copy(models, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder, [folder / "model.safetensors", "truncated"]


def _garbled_header(models, tmp_path):
    folder = _copy(models, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:20] = b"#garbage####"
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder, [folder / "model.safetensors", "header is not valid JSON"]


def _huge_header_length(models, tmp_path):
    folder = _copy(models, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder, [folder / "model.safetensors", "header length"]


def _missing_shard(models, tmp_path):
    folder = _copy(models, tmp_path, "a")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    return folder, [shard, "model.safetensors.index.json", "missing"]


def _tokenizer_differs(models, tmp_path):
    folder = _copy(models, tmp_path)
    _write_tokenizer(folder, lambda vocab: vocab.update(zz=vocab.pop("t5")))
    return folder, [folder, models["base"], "tokenizers", "differ"]


MODEL_FOLDERS = {
    "no_config": _no_config,
    "config_not_json": _config_not_json,
    "config_not_an_object": _config_not_object,
    "unsupported_architecture_no_model_type": _no_model_type,
    "unsupported_architecture_quantized": _quantized,
    "different_model_type": _other_model_type,
    "different_heads_same_shapes": _other_heads,
    "different_shapes": _other_shapes,
    "no_weights": _no_weights,
    "only_bin_weights": _only_bin_weights,
    "truncated_safetensors": _truncated,
    "garbled_safetensors_header": _garbled_header,
    "header_length_past_the_file": _huge_header_length,
    "shard_of_the_index_missing": _missing_shard,
    "nan_in_a_tensor": _poison(np.nan),
    "inf_in_a_tensor": _poison(np.inf),
    "minus_inf_in_a_tensor": _poison(-np.inf),
    "tokenizer_differs": _tokenizer_differs,
}


@pytest.mark.parametrize("case", sorted(MODEL_FOLDERS))
def test_bad_model_folder_is_refused(models, jax_cache, tmp_path, case):
    broken, mentions = MODEL_FOLDERS[case](models, tmp_path)
    before = sorted((p.name, p.stat().st_size) for p in broken.iterdir())
    recipe = write_recipe(tmp_path, ties(models, broken))
    out = tmp_path / "made" / "for" / "out"  # the parents made for it go too
    assert_refused(merge(jax_cache, recipe, "--out", out), *mentions, absent=[tmp_path / "made"])
    assert sorted((p.name, p.stat().st_size) for p in broken.iterdir()) == before  # inputs untouched


# ---------------------------------------------------------------------------------------- output path
def _under_a_file(models, tmp_path):
    (tmp_path / "a_file").write_text("x")
    return [tmp_path / "a_file" / "out"], [tmp_path / "a_file", "is a file"]


def _deep_under_a_file(models, tmp_path):
    (tmp_path / "a_file").write_text("x")
    return [tmp_path / "a_file" / "x" / "y" / "out"], [tmp_path / "a_file", "is a file"]


def _out_is_a_file(models, tmp_path):
    (tmp_path / "out").write_text("keep")
    return [tmp_path / "out", "--overwrite"], [tmp_path / "out", "is a file"]


def _unwritable_proc(models, tmp_path):  # unwritable even for root
    return [Path("/proc/evojax-merge-test") / "out"], ["/proc", "cannot create --out"]


def _unwritable_sys(models, tmp_path):
    return [Path("/sys/evojax-merge-test-out")], ["/sys", "cannot create --out"]


def _same_as_input(models, tmp_path):
    return [models["a"], "--overwrite"], [models["a"], "would overwrite an input"]


def _inside_input(models, tmp_path):
    return [models["a"] / "merged"], [models["a"] / "merged", "inside the input model folder"]


def _symlink_to_input(models, tmp_path):
    (tmp_path / "link").symlink_to(models["b"], target_is_directory=True)
    return [tmp_path / "link", "--overwrite"], [tmp_path / "link", models["b"], "would overwrite an input"]


def _contains_inputs(models, tmp_path):
    return [models["root"], "--overwrite"], [models["root"], "contains the input model folder"]


def _exists(models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    return [tmp_path / "out"], [tmp_path / "out", "already exists", "--overwrite"]


def _exists_not_a_model(models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    return [tmp_path / "out", "--overwrite"], [tmp_path / "out", "not a model folder"]


OUTPUTS = {
    "under_a_file": _under_a_file,
    "deep_under_a_file": _deep_under_a_file,
    "out_is_a_file": _out_is_a_file,
    "unwritable_proc": _unwritable_proc,
    "unwritable_sys": _unwritable_sys,
    "same_as_an_input": _same_as_input,
    "inside_an_input": _inside_input,
    "symlink_to_an_input": _symlink_to_input,
    "contains_the_inputs": _contains_inputs,
    "exists_without_overwrite": _exists,
    "exists_and_is_not_a_model": _exists_not_a_model,
}


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_bad_output_path_is_refused(models, jax_cache, tmp_path, case):
    args, mentions = OUTPUTS[case](models, tmp_path)
    out = Path(args[0])
    if case == "unwritable_sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    recipe = write_recipe(tmp_path, ties(models))
    inputs = {name: _snapshot(models[name]) for name in ("base", "a", "b")}
    was = out.exists()
    content = _snapshot(out) if out.is_dir() else None
    assert_refused(merge(jax_cache, recipe, "--out", *args), *mentions)
    assert {name: _snapshot(models[name]) for name in inputs} == inputs  # no input touched
    if was:  # what was there is still there, unchanged
        assert (_snapshot(out) if out.is_dir() else None) == content
        assert [p for p in leftovers(out) if p != out] == []
    elif out.parent.exists():
        assert leftovers(out) == []


def test_read_only_folder(models, jax_cache, tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            pass
        else:
            probe.rmdir()
            pytest.skip("running as root: mode 0555 does not stop writes (the /proc and /sys cases cover it)")
        recipe = write_recipe(tmp_path, ties(models))
        assert_refused(merge(jax_cache, recipe, "--out", folder / "sub" / "out"), folder, "not writable",
                       absent=[folder / "sub"])
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_output_is_checked_before_the_models_are_read(models, jax_cache, tmp_path):
    broken, _ = _poison(np.nan)(models, tmp_path)
    (tmp_path / "a_file").write_text("x")
    recipe = write_recipe(tmp_path, ties(models, broken))
    line = assert_refused(merge(jax_cache, recipe, "--out", tmp_path / "a_file" / "out"), tmp_path / "a_file")
    assert "non-finite" not in line


# --------------------------------------------------------------------------------- modes, model card
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_merged_folder_and_files_follow_the_umask(models, jax_cache, tmp_path, umask):
    recipe = write_recipe(tmp_path, ties(models))
    out = tmp_path / "new" / "merged"
    python, _, _, *args = cli_command("merge", str(recipe), "--out", str(out))  # [python, -m, module, ...]
    with_umask = (f"import os, runpy, sys; os.umask({umask:#o}); sys.argv = ['evojax-merge', *sys.argv[1:]];"
                  " runpy.run_module('evojax_merge.cli', run_name='__main__')")
    result = subprocess.run([python, "-c", with_umask, *args], capture_output=True, text=True, cwd=ROOT,
                            env=env(EVOJAX_MERGE_JAX_CACHE=jax_cache), timeout=600)
    assert result.returncode == 0, result.stderr
    for folder in (out, out.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
    files = sorted(out.iterdir())
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "README.md", "tokenizer.json",
                                       "merge_recipe.yaml"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    card = (out / "README.md").read_text()
    assert "http" not in card  # no placeholder link
    assert yaml.safe_load(card.split("---")[1])["base_model"] == ["base"]


def test_model_card_names_the_real_base_model(models, tmp_path):
    from evojax_merge.merge.config import parse_recipe
    from evojax_merge.merge.model_card import model_card

    recipe = parse_recipe(write_recipe(tmp_path, ties(models)))
    configs = {str(models["base"]): {"_name_or_path": "HuggingFaceTB/SmolLM2-135M"},
               str(models["a"]): {"_name_or_path": "/home/someone/checkpoints/a"}}  # a local path: not a name
    card = model_card(recipe, "my-merge", configs)
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"library_name": "transformers", "tags": ["merge", "evojax-merge"],
                    "base_model": ["HuggingFaceTB/SmolLM2-135M"]}
    assert "http" not in card
    assert f"a (`{models['a']}`)" in card and "# my-merge" in card
    # Without _name_or_path: the folder's name; names YAML would misread are quoted.
    odd = tmp_path / "x: [y]"
    shutil.copytree(models["base"], odd)
    recipe = parse_recipe(write_recipe(tmp_path, ties(models).replace(f"base_model: {models['base']}",
                                                                      f"base_model: '{odd}'")))
    assert yaml.safe_load(model_card(recipe, "m", {}).split("---\n")[1])["base_model"] == ["x: [y]"]


# ------------------------------------------------------------------------------------------- SIGKILL
@pytest.fixture(scope="module")
def larger_models(tmp_path_factory):
    """Three 16-layer models (~50 MB each): a merge takes long enough on the CPU to be killed mid-way."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("larger")
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(i)
        config = _config(hidden_size=256, intermediate_size=688, num_hidden_layers=16, vocab_size=4096)
        out[name] = _save(transformers.LlamaForCausalLM(config), root / name)
    return out


def test_sigkill_mid_merge_leaves_no_model_and_a_rerun_gives_the_same_bytes(larger_models, jax_cache, tmp_path):
    recipe = write_recipe(tmp_path, ties(larger_models))
    shards = ["--max-shard-size", "10MB"]  # six shards: the second one opens well before the end
    reference = tmp_path / "reference" / "merged"
    result = merge(jax_cache, recipe, "--out", reference, *shards)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "run" / "merged"
    process = start("merge", str(recipe), "--out", str(out), *shards, EVOJAX_MERGE_JAX_CACHE=jax_cache)
    deadline = time.monotonic() + 300
    while not list(out.parent.glob(".merged.partial-*/model-00002-of-*.safetensors")):
        if process.poll() is not None:
            pytest.fail(f"the merge ended before it could be killed: {process.communicate()[1]}")
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not out.exists()  # nothing at --out looks like a model
    stale = leftovers(out)
    assert len(stale) == 1 and stale[0].name.startswith(".merged.partial-")

    live = out.parent / f".merged.partial-{os.getpid()}-0123abcd"  # a merge still running (this process)
    live.mkdir()
    result = merge(jax_cache, recipe, "--out", out, *shards)
    assert result.returncode == 0, result.stderr
    assert sorted(leftovers(out)) == sorted([out, live])  # the dead merge's folder is gone, the live one kept
    live.rmdir()
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and len([n for n in names if n.endswith(".safetensors")]) == 6
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    merged, base = _state(out), _state(larger_models["base"])
    assert set(merged) == set(base)
