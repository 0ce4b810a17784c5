"""PEFT LoRA adapters merged into a checkpoint's weights at load time.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as written by
``peft``'s ``save_pretrained``. Its tensors are named after the modules of the model the adapter was
trained on, under ``base_model.model.``::

    base_model.model.custom_text_proj.lora_A.weight                                   (r, in)
    base_model.model.model.language_model.model.layers.3.self_attn.q_proj.lora_B.weight (out, r)

Merging adds ``scale * B @ A`` to the module's weight, with ``scale = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` override r and alpha per module,
and ``fan_in_fan_out`` means the base weight is stored ``(in, out)`` so the update is transposed. The
result equals the base model with the adapter applied by ``peft`` (dropout is inactive at inference).
Tensors that are not LoRA factors (``modules_to_save`` copies, trained biases) replace the base tensor.

Key naming differs between checkpoint layouts; the caller passes ``rename`` to map a module's
parameter name as the adapter spells it to the name used in ``state``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["AdapterError", "LoraAdapterConfig", "LoraAdapter", "read_adapter", "merge_lora", "is_adapter_dir"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# base_model.model.<module>.lora_A[.<adapter name>].weight
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_UNSUPPORTED = re.compile(r"lora_embedding_[AB]|lora_magnitude_vector")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class AdapterError(ValueError):
    """An adapter directory that cannot be merged: names the file or key and says what is wrong."""


class LoraAdapterConfig(BaseModel):
    """The fields of a PEFT ``adapter_config.json`` that decide how the adapter is merged."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None  # names (suffix match) or one regex (full match)
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    fan_in_fan_out: bool = False  # base weights stored (in, out), as in GPT-2's Conv1D
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    layers_to_transform: list[int] | int | None = None
    use_dora: bool = False
    base_model_name_or_path: str | None = None


class LoraAdapter(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    directory: str
    config: LoraAdapterConfig
    tensors: dict[str, torch.Tensor]


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(directory: str | os.PathLike) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory (safetensors only; never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter directory)")
    try:
        config = LoraAdapterConfig.model_validate(json.loads(config_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as e:
        raise AdapterError(f"{config_path}: not a usable adapter config ({e})") from None
    if config.peft_type.upper() != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.peft_type!r}; only LoRA adapters can be merged")
    if config.use_dora:
        raise AdapterError(f"{config_path}: DoRA adapters (use_dora: true) are not supported; use a plain LoRA adapter")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        hint = " (adapter_model.bin is pickled and never loaded; convert it to safetensors)" if pickled else ""
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{weights}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return LoraAdapter(directory=str(directory), config=config, tensors=tensors)


def _targeted(name: str, spec: list[str] | str | None) -> bool:
    """PEFT's matching: a string is a regex over the whole module name; a list names modules by suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _pattern_value(name: str, patterns: dict, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def merge_lora(state: dict[str, torch.Tensor], adapter: LoraAdapter,
               rename: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    """``state`` with the adapter merged in (a new dict; ``state`` itself is not modified).

    ``rename`` maps an adapter-side parameter name (``model.language_model.model.layers.0.mlp.up_proj.weight``)
    to the key used in ``state``. Each update is computed in fp32 and cast back to the weight's dtype.
    """
    config, source = adapter.config, adapter.directory
    factors: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if _UNSUPPORTED.search(key):
            raise AdapterError(f"{source}: {key} is an embedding-LoRA or DoRA tensor; only LoRA on linear "
                               "layers can be merged")
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
            continue
        # modules_to_save copies and trained biases replace the base tensor.
        name = key.removeprefix("base_model.model.")
        name = re.sub(r"\.modules_to_save(\.[A-Za-z0-9_-]+)?(?=\.)", "", name)
        replacements[name] = tensor

    merged = dict(state)
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{source}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        if config.target_modules is not None and not _targeted(module, config.target_modules):
            raise AdapterError(f"{source}: LoRA weights for {module}, which adapter_config.json target_modules "
                               f"({config.target_modules!r}) does not name; the adapter files disagree")
        if _targeted(module, config.exclude_modules):
            raise AdapterError(f"{source}: LoRA weights for {module}, which exclude_modules names")
        if config.layers_to_transform is not None:
            layers = config.layers_to_transform
            layers = [layers] if isinstance(layers, int) else layers
            index = _LAYER_INDEX.search("." + module + ".")
            if index is not None and int(index[1]) not in layers:
                raise AdapterError(f"{source}: LoRA weights for layer {index[1]} ({module}), outside "
                                   f"layers_to_transform {layers}")
        a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)
        rank = _pattern_value(module, config.rank_pattern, config.r)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{source}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                               f"have rank r={rank} from adapter_config.json")
        alpha = _pattern_value(module, config.alpha_pattern, config.lora_alpha)
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        key = rename(module + ".weight")
        if key not in merged:
            raise AdapterError(f"{source}: LoRA weights for {module}, but the base checkpoint has no {key}; "
                               "is this adapter for another model?")
        weight = merged[key]
        delta = (b @ a) * scale
        if config.fan_in_fan_out:
            delta = delta.T
        if tuple(delta.shape) != tuple(weight.shape):
            raise AdapterError(f"{source}: {module}: the update B @ A has shape {tuple(delta.shape)} but the base "
                               f"weight {key} is {tuple(weight.shape)}")
        merged[key] = (weight.to(torch.float32) + delta).to(weight.dtype)
    for name, tensor in replacements.items():
        key = rename(name)
        if key not in merged:
            raise AdapterError(f"{source}: the adapter replaces {name}, but the base checkpoint has no {key}")
        if tuple(tensor.shape) != tuple(merged[key].shape):
            raise AdapterError(f"{source}: {name} has shape {tuple(tensor.shape)}, the base {key} "
                               f"{tuple(merged[key].shape)}")
        merged[key] = tensor.to(merged[key].dtype)
    if not factors and not replacements:
        raise AdapterError(f"{source}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return merged
