"""LoRA adapters (PEFT folders): reading the low-rank factors and naming the model an adapter applies to.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), https://arxiv.org/abs/2106.09685;
rank-stabilised scaling: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"
(2023), https://arxiv.org/abs/2312.03732.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Each targeted
``nn.Linear`` with weight ``W`` (out x in) gets two factors, ``A`` (r x in) and ``B`` (out x r), and the
adapted weight is ``W + scale * B @ A`` with ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` give some modules their own ``r`` / ``lora_alpha``
(a pattern applies to a module whose name is the pattern or ends in ``.`` + pattern, the first match
wins: PEFT's rule).

A *model reference* names a model wherever a model folder is accepted (merge recipes, seeds of searches):

- ``FOLDER``: a Hugging Face model folder;
- ``BASE+ADAPTER``: the adapter applied to the base folder (mergekit's syntax);
- ``ADAPTER``: an adapter folder alone, applied to the folder its ``base_model_name_or_path`` names
  (a local folder: absolute, or relative to the current directory as PEFT wrote it).

Features that change the merged weights in ways other than ``W + scale * B @ A`` are refused with one
line naming the file and the key (DoRA, trained biases, ``modules_to_save``, embedding targets, ...):
a merge that silently left them out would not be the adapted model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import numpy as np

from evojax_merge.errors import DataError
from evojax_merge.files import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves the factors under the wrapped model's names: base_model.model.<module>.lora_A.weight.
_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
# With lm_head or embeddings among the targets PEFT also saves the base's own weight (save_embedding_layers,
# meant for resized vocabularies): accepted when it is the base's weight, since only then is W + B @ A right.
_SAVED_BASE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
# Files that define a tokenizer's ids, in any of the formats models.tokenizer_identity compares.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Config entries whose (truthy) value makes the adapted weights more than W + scale * B @ A.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales the weights by a learned magnitude",
    "lora_bias": "a trained LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save replaces whole modules with trained copies",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights, GPT-2 style) is not a Llama Linear",
    "layer_replication": "layer_replication duplicates layers",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "target_parameters": "target_parameters adapts nn.Parameter tensors, not Linear modules",
    "use_qalora": "QA-LoRA (use_qalora) pools the inputs",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after given tokens",
    "megatron_config": "Megatron-parallel LoRA layers",
}


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model: a folder, or a base folder with a LoRA adapter folder applied to it."""

    base: str
    adapter: str | None = None

    def __str__(self) -> str:
        return self.base if self.adapter is None else f"{self.base}+{self.adapter}"


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """A PEFT adapter folder: adapter_config.json or adapter weights, and no config.json of a whole model."""
    folder = Path(folder)
    return (folder.is_dir() and not (folder / "config.json").is_file()
            and ((folder / ADAPTER_CONFIG).is_file() or any(folder.glob("adapter_model.*"))))


def split_reference(text: str) -> tuple[str, str | None]:
    """``"BASE+ADAPTER"`` -> (base, adapter), anything else -> (text, None), touching the disk only to keep
    a folder whose own name holds ``+`` whole. No path is resolved."""
    if "+" in text and not Path(text).expanduser().exists():
        base, _, adapter = text.rpartition("+")
        if base and adapter:
            return base, adapter
    return text, None


def parse_reference(text: str | os.PathLike) -> ModelRef:
    """The model a reference names (see the module docstring).

    Raises:
      DataError: an adapter folder alone whose ``base_model_name_or_path`` is not a local folder (naming
        the file and the value), or an adapter_config.json that cannot be read.
    """
    base, adapter = split_reference(str(text))
    if adapter is not None:
        return ModelRef(base, adapter)
    if not is_adapter_folder(base):
        return ModelRef(base)
    config_path = Path(base) / ADAPTER_CONFIG
    named = _read_config(config_path).get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise DataError(f"{config_path}: no base_model_name_or_path, so the model it adapts is unknown; name "
                        "the base as BASE_FOLDER+ADAPTER_FOLDER")
    if not (Path(named).expanduser() / "config.json").is_file():
        raise DataError(f"{config_path}: base_model_name_or_path {named!r} is not a local model folder (models are "
                        "read from local folders); name the base as BASE_FOLDER+ADAPTER_FOLDER")
    return ModelRef(str(Path(named).expanduser()), base)


def tokenizer_folder(reference: str | os.PathLike) -> str:
    """Where a model's tokenizer files are: the adapter folder when it has any (a fine-tune that added
    tokens saves them there), else the base folder."""
    ref = parse_reference(reference)
    if ref.adapter is not None and any((Path(ref.adapter) / name).is_file() for name in _TOKENIZER_FILES):
        return ref.adapter
    return ref.base


# ------------------------------------------------------------------------------------------ adapters
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One targeted Linear: ``W + scale * B @ A``."""

    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scale: float

    def delta(self) -> np.ndarray:
        """``scale * B @ A`` in float32 (out x in)."""
        return self.scale * (self.b.astype(np.float32) @ self.a.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter: its folder, the base it names and its factors by Hugging Face weight name
    (``model.layers.0.self_attn.q_proj.weight``)."""

    folder: Path
    base_model: str | None
    factors: dict[str, LoraFactors]
    saved_base_weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def adapted(self, name: str, weight: np.ndarray, base: str) -> np.ndarray:
        """The base's tensor ``name`` as the adapter makes it: ``W + scale * B @ A`` computed in float32 and
        stored in W's dtype, as PEFT's ``merge_and_unload`` does; an untargeted tensor unchanged."""
        factors = self.factors.get(name)
        if factors is None:
            return weight
        self.check_saved_base_weight(name, weight, base)
        return (weight.astype(np.float32) + factors.delta()).astype(weight.dtype)

    def check_saved_base_weight(self, name: str, weight: np.ndarray, base: str) -> None:
        """A base weight the adapter saved a copy of (``save_embedding_layers``) is the base's ``weight``.

        Raises:
          DataError: the copy differs (an adapter trained on a resized vocabulary or another base).
        """
        saved = self.saved_base_weights.get(name)
        if saved is not None and (saved.shape != weight.shape or not np.array_equal(saved, weight.astype(np.float32))):
            raise DataError(f"{self.folder / ADAPTER_WEIGHTS}: the adapter saves its own {name!r} (save_embedding_layers) "
                            f"and it differs from the base model {base}'s: an adapter of another base or a resized "
                            "vocabulary is not supported")

    def check_against(self, shapes: dict[str, tuple[int, ...]], base: str) -> None:
        """Every targeted weight is in the base with the shape the factors imply.

        Args:
          shapes: the base's tensor shapes by Hugging Face name.
          base: the base's name, for messages.

        Raises:
          DataError: naming the adapter file, the weight and both shapes.
        """
        path = self.folder / ADAPTER_WEIGHTS
        for name, f in self.factors.items():
            if name not in shapes:
                raise DataError(f"{path}: the adapter targets {name!r}, which the base model {base} does not have "
                                "(an adapter of another architecture?)")
            implied = (f.b.shape[0], f.a.shape[1])
            if tuple(shapes[name]) != implied:
                raise DataError(f"{path}: the factors of {name!r} make a {list(implied)} update, but the base model "
                                f"{base} has it {list(shapes[name])} (an adapter of another model size?)")


def _read_config(path: Path) -> dict:
    if not path.is_file():
        why = "" if path.parent.is_dir() else " (the folder does not exist)"
        raise DataError(f"no {ADAPTER_CONFIG} in adapter folder {path.parent}{why}")
    return read_json_object(path, "an adapter config")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first pattern that is the module name or its suffix
    after a dot (a regular expression) gives the value."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _number(config: dict, key: str, path: Path, where: str | None = None) -> float:
    value = config.get(key) if where is None else config[key].get(where)
    shown = key if where is None else f"{key}[{where!r}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DataError(f"{path}: {shown} must be a positive number, got {value!r}")
    return value


def read_adapter(folder: str | os.PathLike) -> LoraAdapter:
    """Reads a PEFT LoRA adapter folder (config and factors; they are small, so all of them).

    Raises:
      DataError: a missing or malformed adapter_config.json or weights file, a feature this merge does not
        apply (DoRA, biases, modules_to_save, embedding targets, ...), factors whose ranks disagree with the
        config or hold NaN / infinity; the one-line message names the file and the key.
    """
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    config = _read_config(config_path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise DataError(f"{config_path}: peft_type {peft_type!r} is not supported (only LORA adapters)")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise DataError(f"{config_path}: {key}: {what}; not supported (only W + scale * B @ A)")
    if config.get("bias", "none") != "none":
        raise DataError(f"{config_path}: bias {config['bias']!r}: trained biases are not supported (only "
                        "W + scale * B @ A; train with bias='none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise DataError(f"{config_path}: {key} must map module name patterns to numbers")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r, alpha = _number(config, "r", config_path), _number(config, "lora_alpha", config_path)
    rslora = bool(config.get("use_rslora", False))
    tensors = _read_weights(folder)
    by_module: dict[str, dict[str, np.ndarray]] = {}
    saved_base: dict[str, np.ndarray] = {}
    path = folder / ADAPTER_WEIGHTS
    for key, tensor in tensors.items():
        if "lora_embedding" in key:
            raise DataError(f"{path}: {key}: LoRA on an embedding is not supported (only Linear targets)")
        if "lora_magnitude_vector" in key:
            raise DataError(f"{path}: {key}: DoRA magnitudes are not supported (only W + scale * B @ A)")
        module_key = key[len(_PREFIX):] if key.startswith(_PREFIX) else ""
        saved = _SAVED_BASE.match(module_key)
        if saved is not None:
            saved_base[f"{saved['module']}.weight"] = np.asarray(tensor, np.float32)
            continue
        match = _FACTOR.match(module_key)
        if match is None:
            raise DataError(f"{path}: tensor {key!r} is not a LoRA factor ({_PREFIX}<module>.lora_A.weight / "
                            ".lora_B.weight); only Linear targets are supported")
        if tensor.ndim != 2:
            raise DataError(f"{path}: {key} has shape {list(tensor.shape)}; a Linear target's factor is a matrix "
                            "(only Linear targets are supported)")
        tensor = np.asarray(tensor, np.float32)  # bfloat16 / float16 factors: the update is computed in float32
        if not np.isfinite(tensor).all():
            raise DataError(f"{path}: {key} holds NaN or infinite values: the adapter is broken")
        by_module.setdefault(match["module"], {})[match["factor"]] = tensor
    factors = {}
    for module, pair in sorted(by_module.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            lacking = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise DataError(f"{path}: {_PREFIX}{module} has no {lacking}.weight")
        a, b = pair["lora_A"], pair["lora_B"]
        rank = _pattern_value(rank_pattern, module, r)
        module_alpha = _pattern_value(alpha_pattern, module, alpha)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise DataError(f"{path}: {_PREFIX}{module}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}, but "
                            f"{config_path.name} gives it rank {rank}")
        scale = module_alpha / math.sqrt(rank) if rslora else module_alpha / rank
        factors[f"{module}.weight"] = LoraFactors(a, b, float(scale))
    if not factors:
        raise DataError(f"{path}: no LoRA factors in the adapter")
    base = config.get("base_model_name_or_path")
    unpaired = sorted(set(saved_base) - set(factors))
    if unpaired:
        raise DataError(f"{path}: {_PREFIX}{unpaired[0][:-len('.weight')]}.base_layer.weight without LoRA factors")
    return LoraAdapter(folder, base if isinstance(base, str) else None, factors, saved_base)


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        other = [p.name for p in folder.glob("adapter_model.*")]
        hint = (f" (only {other[0]}: re-save the adapter with safe_serialization=True)" if other else "")
        raise DataError(f"no {ADAPTER_WEIGHTS} in adapter folder {folder}{hint}")
    try:
        with safe_open(str(path), framework="np") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                        f"{' '.join(str(e).split())}") from None
