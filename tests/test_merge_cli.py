"""The merge command end to end on tiny Hugging Face Llama checkpoints made here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch
import transformers

from evojax_merge.merge.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("merge_kernel_cache_in_tmp")


def _config(**overrides):
    kw = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def _save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, two fine-tunes (one sharded) and a model with a different MLP width."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config())
    _save(base, root / "base")
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    out = {"root": root, "base": root / "base"}
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i + 1)
        tuned = transformers.LlamaForCausalLM(_config())
        with torch.no_grad():
            for p_tuned, p_base in zip(tuned.parameters(), base.parameters()):
                p_tuned.copy_(p_base + 0.02 * torch.randn_like(p_base))
        kw = {"max_shard_size": "20KB"} if name == "a" else {}
        _save(tuned, root / name, **kw)
        out[name] = root / name
    assert (root / "a" / "model.safetensors.index.json").exists()  # really sharded
    torch.manual_seed(9)
    _save(transformers.LlamaForCausalLM(_config(intermediate_size=48)), root / "wide")
    out["wide"] = root / "wide"
    return out


def _state(path):
    from safetensors.numpy import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _recipe(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _no_leftovers(parent: Path, out_name: str):
    assert not (parent / out_name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out_name}.")]


def _ties_numpy(base, tuned, weights, density):
    taus = []
    for t, w in zip(tuned, weights):
        tau = (t - base).astype(np.float64)
        k = int(density * tau.size)
        thr = np.sort(np.abs(tau).ravel())[::-1][k - 1]
        taus.append(np.where(np.abs(tau) >= thr, tau, 0.0) * w)
    taus = np.stack(taus)
    elected = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == elected
    w = np.asarray(weights).reshape((-1,) + (1,) * base.ndim)
    num = np.where(agree, taus, 0).sum(0)
    den = np.where(agree, w, 0).sum(0)
    den[den == 0] = 1
    return base + num / den


def test_ties_merge_loads_and_runs_in_transformers(models, tmp_path):
    recipe = _recipe(tmp_path, f"""
models:
  - model: {models['base']}
  - model: {models['a']}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.3, density: 0.5}}
merge_method: ties
base_model: {models['base']}
parameters:
  normalize: true
dtype: float32
""")
    out = tmp_path / "merged"
    assert main([str(recipe), "--out", str(out), "--max-shard-size", "10KB"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    for f in ["config.json", "README.md", "tokenizer_config.json", "merge_recipe.yaml"]:
        assert (out / f).exists(), f
    assert "ties" in (out / "README.md").read_text()
    merged = _state(out)
    base, a, b = _state(models["base"]), _state(models["a"]), _state(models["b"])
    assert set(merged) == set(base)
    for name in ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]:
        want = _ties_numpy(base[name], [a[name], b[name]], [0.7, 0.3], 0.5)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()


def test_slerp_slices_with_gradient_and_filters(models, tmp_path):
    recipe = _recipe(tmp_path, f"""
slices:
  - sources:
      - model: {models['a']}
        layer_range: [0, 2]
      - model: {models['b']}
        layer_range: [0, 2]
merge_method: slerp
base_model: {models['a']}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - filter: mlp
      value: [1, 0]
    - value: 0.5
""")
    out = tmp_path / "slerped"
    assert main([str(recipe), "--out", str(out)]) == 0
    merged, a, b = _state(out), _state(models["a"]), _state(models["b"])
    # Gradient [0, 1] over two layers: layer 0 attention is A, layer 1 attention is B; MLP reversed.
    q = "model.layers.{}.self_attn.q_proj.weight"
    np.testing.assert_allclose(merged[q.format(0)], a[q.format(0)], atol=1e-6)
    np.testing.assert_allclose(merged[q.format(1)], b[q.format(1)], atol=1e-6)
    m = "model.layers.{}.mlp.up_proj.weight"
    np.testing.assert_allclose(merged[m.format(0)], b[m.format(0)], atol=1e-6)
    np.testing.assert_allclose(merged[m.format(1)], a[m.format(1)], atol=1e-6)
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[5, 6]])).logits).all()


def test_passthrough_layer_stacking(models, tmp_path):
    recipe = _recipe(tmp_path, f"""
slices:
  - sources: [{{model: {models['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {models['b']}, layer_range: [1, 2]}}]
merge_method: passthrough
dtype: bfloat16
""")
    out = tmp_path / "stacked"
    assert main([str(recipe), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    b = _state(models["b"])
    got = model.state_dict()["model.layers.2.mlp.gate_proj.weight"].numpy()
    want = b["model.layers.1.mlp.gate_proj.weight"]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)  # bfloat16 round trip
    assert torch.isfinite(model(torch.tensor([[1, 2]])).logits).all()


BAD = {
    "shape": ("ties", "wide", "'model.layers.0.mlp.down_proj.weight' has shape"),
    "no_base": ("ties_no_base", "a", "needs a base_model"),
    "density": ("ties_density", "a", "density must be in [0, 1]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_exit_2_and_leave_nothing(models, tmp_path, capsys, case):
    method, other, message = BAD[case]
    base_line = "" if method == "ties_no_base" else f"base_model: {models['base']}"
    density = 1.5 if method == "ties_density" else 0.5
    recipe = _recipe(tmp_path, f"""
models:
  - model: {models['a']}
    parameters: {{weight: 0.5, density: {density}}}
  - model: {models[other]}
    parameters: {{weight: 0.5, density: 0.5}}
merge_method: ties
{base_line}
""")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    _no_leftovers(tmp_path, "out")


def test_missing_tensor_is_named(models, tmp_path, capsys):
    import shutil
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(models["b"], broken)
    state = load_file(broken / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path, f"""
models: [{{model: {models['a']}}}, {{model: {broken}}}]
merge_method: linear
""")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.norm.weight" in err and "missing" in err
    _no_leftovers(tmp_path, "out")


def test_unreadable_file_subprocess_exit_2(models, tmp_path):
    import shutil

    broken = tmp_path / "corrupt"
    shutil.copytree(models["b"], broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    recipe = _recipe(tmp_path, f"""
models: [{{model: {models['a']}}}, {{model: {broken}}}]
merge_method: linear
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "evojax_merge.merge.cli", str(recipe), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(broken / "model.safetensors") in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_leftovers(tmp_path, "out")


def test_existing_output_is_not_clobbered(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    recipe = _recipe(tmp_path, f"""
models: [{{model: {models['a']}}}, {{model: {models['b']}}}]
merge_method: linear
""")
    assert main([str(recipe), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").exists()


def test_failure_while_streaming_removes_the_partial_output(models, tmp_path, capsys, monkeypatch):
    from evojax_merge.errors import DataError
    from evojax_merge.merge import checkpoint

    calls = {"n": 0}
    original = checkpoint.Checkpoint.read

    def flaky(self, name, pool=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise DataError(f"cannot read tensor {name!r} (disk on fire)")
        return original(self, name, pool)

    monkeypatch.setattr(checkpoint.Checkpoint, "read", flaky)
    recipe = _recipe(tmp_path, f"""
merge_method: dare_ties
base_model: {models['base']}
models:
  - {{model: {models['a']}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {models['b']}, parameters: {{weight: 0.5, density: 0.5}}}}
""")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "disk on fire" in capsys.readouterr().err
    _no_leftovers(tmp_path, "out")


def _to_bf16(src: Path, dst: Path):
    import shutil

    import ml_dtypes
    from safetensors.numpy import save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in _state(src).items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_dare_is_reproducible_slices_match_models_and_bf16_inputs(models, tmp_path):
    body = """
merge_method: dare_ties
base_model: {base}
{seed}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.4}}}}
  - {{model: {b}, parameters: {{weight: 0.4, density: 0.4}}}}
"""
    outs = []
    for i, seed in enumerate(["random_seed: 7", "random_seed: 7", "random_seed: 8"]):
        recipe = _recipe(tmp_path, body.format(base=models["base"], a=models["a"], b=models["b"], seed=seed),
                         f"r{i}.yaml")
        assert main([str(recipe), "--out", str(tmp_path / f"o{i}")]) == 0
        outs.append(_state(tmp_path / f"o{i}"))
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(outs[0][name], outs[1][name])
    assert not np.array_equal(outs[0][name], outs[2][name])

    # The same TIES merge written with slices gives the same tensors.
    slices = _recipe(tmp_path, f"""
merge_method: ties
base_model: {models['base']}
slices:
  - sources:
      - {{model: {models['base']}, layer_range: [0, 2]}}
      - {{model: {models['a']}, layer_range: [0, 2], parameters: {{weight: 0.5, density: 0.5}}}}
      - {{model: {models['b']}, layer_range: [0, 2], parameters: {{weight: 0.5, density: 0.5}}}}
""", "slices.yaml")
    whole = _recipe(tmp_path, f"""
merge_method: ties
base_model: {models['base']}
models:
  - {{model: {models['a']}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {models['b']}, parameters: {{weight: 0.5, density: 0.5}}}}
""", "whole.yaml")
    assert main([str(slices), "--out", str(tmp_path / "sliced")]) == 0
    assert main([str(whole), "--out", str(tmp_path / "whole")]) == 0
    sliced, merged = _state(tmp_path / "sliced"), _state(tmp_path / "whole")
    assert set(sliced) == set(merged)
    for k in merged:
        np.testing.assert_array_equal(sliced[k], merged[k], err_msg=k)

    # bfloat16 checkpoints in, bfloat16 out, loadable.
    bf = {k: _to_bf16(models[k], tmp_path / f"bf16_{k}") for k in ("base", "a", "b")}
    recipe = _recipe(tmp_path, f"""
merge_method: ties
base_model: {bf['base']}
models:
  - {{model: {bf['a']}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {bf['b']}, parameters: {{weight: 0.5, density: 0.5}}}}
""", "bf16.yaml")
    assert main([str(recipe), "--out", str(tmp_path / "bf16_out")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16_out" / "model.safetensors"), "np") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16_out")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits.float()).all()


def test_missing_recipe_and_model_folder(models, tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read recipe" in capsys.readouterr().err
    recipe = _recipe(tmp_path, f"""
models: [{{model: {models['a']}}}, {{model: {tmp_path / 'not_there'}}}]
merge_method: linear
""")
    assert main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert f"model folder {tmp_path / 'not_there'} does not exist" in capsys.readouterr().err
    _no_leftovers(tmp_path, "out")
