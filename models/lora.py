"""LoRA on the native models, and adapters in PEFT's file format (both directions).

Training: :func:`add_lora` replaces each targeted ``nn.Linear`` by a :class:`LoraLinear` computing
``x W^T + b + scale * dropout(x) A^T B^T`` (A: ``(r, in)``, B: ``(out, r)``, ``scale = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA), freezes every other parameter and unfreezes the modules named in
``trainable`` in full (PEFT's ``modules_to_save``, e.g. ColPali's projection). Targets are matched as
PEFT matches them: a list names modules by suffix (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``),
a string is a regular expression over the whole module name.

Files: an adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft``'s
``save_pretrained`` writes them. Tensors are named after the modules of the model, under
``base_model.model.``; our module names are Hugging Face's (``model.layers.3.self_attn.q_proj`` for the
Gemma decoders; colpali-engine's ``model.language_model.model.layers...`` and ``custom_text_proj`` for
ColPali), so ``peft`` loads our adapters on transformers' models and :func:`load_adapter` loads theirs::

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight     (r, in)
    base_model.model.custom_text_proj.weight                           (a modules_to_save copy)

Merging adds ``scale * B @ A`` to the weight (:func:`lora_delta`, the one implementation):
:func:`merge_lora` on a state dict (the ColPali loader merges adapters at load time) and
:func:`merge_lora_modules` on a model. ``rank_pattern`` / ``alpha_pattern`` override r and alpha per
module, and ``fan_in_fan_out`` means the base weight is stored ``(in, out)``. Tensors that are not
LoRA factors (``modules_to_save`` copies, trained biases) replace the base tensor. Key naming differs
between checkpoint layouts: callers pass ``rename`` to map a parameter name as the adapter spells it to
the name used in the model or state dict.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

__all__ = ["AdapterError", "LoraAdapterConfig", "LoraAdapter", "read_adapter", "merge_lora", "is_adapter_dir",
           "lora_delta", "lora_scale", "LoraSettings", "LoraLinear", "add_lora", "lora_modules",
           "trainable_parameters", "save_adapter", "load_adapter", "merge_lora_modules", "DEFAULT_TARGETS",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# base_model.model.<module>.lora_A[.<adapter name>].weight
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_UNSUPPORTED = re.compile(r"lora_embedding_[AB]|lora_magnitude_vector")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class AdapterError(ValueError):
    """An adapter that cannot be used: names the file or key and says what is wrong."""


class LoraAdapterConfig(BaseModel):
    """The fields of a PEFT ``adapter_config.json`` that decide how the adapter is applied (other fields
    are ignored when read; these are the ones written)."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    task_type: str | None = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None  # names (suffix match) or one regex (full match)
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None  # trained in full; their tensors replace the base's
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    fan_in_fan_out: bool = False  # base weights stored (in, out), as in GPT-2's Conv1D
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    layers_to_transform: list[int] | int | None = None
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: bool = True
    inference_mode: bool = True
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


def _targeted(name: str, spec: list[str] | tuple[str, ...] | str | None) -> bool:
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


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (rank-stabilised scaling)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The weight update ``scale * B @ A`` in fp32 (transposed for weights stored ``(in, out)``)."""
    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
    return delta.T if fan_in_fan_out else delta


class _Factors(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def adapter_factors(adapter: LoraAdapter) -> tuple[dict[str, _Factors], dict[str, torch.Tensor]]:
    """Validated LoRA factors per module (adapter-side module names) and the tensors that replace base
    tensors (``modules_to_save`` copies, trained biases) by parameter name."""
    config, source = adapter.config, adapter.directory
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if _UNSUPPORTED.search(key):
            raise AdapterError(f"{source}: {key} is an embedding-LoRA or DoRA tensor; only LoRA on linear "
                               "layers is supported")
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["factor"]] = tensor
            continue
        name = key.removeprefix(PEFT_PREFIX)
        name = re.sub(r"\.modules_to_save(\.[A-Za-z0-9_-]+)?(?=\.)", "", name)
        replacements[name] = tensor
    factors: dict[str, _Factors] = {}
    for module, pair in sorted(pairs.items()):
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
        a, b = pair["A"], pair["B"]
        rank = _pattern_value(module, config.rank_pattern, config.r)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{source}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                               f"have rank r={rank} from adapter_config.json")
        alpha = _pattern_value(module, config.alpha_pattern, config.lora_alpha)
        factors[module] = _Factors(a=a, b=b, scale=lora_scale(alpha, rank, config.use_rslora))
    if not factors and not replacements:
        raise AdapterError(f"{source}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return factors, replacements


def merge_lora(state: dict[str, torch.Tensor], adapter: LoraAdapter,
               rename: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    """``state`` with the adapter merged in (a new dict; ``state`` itself is not modified).

    ``rename`` maps an adapter-side parameter name (``model.language_model.model.layers.0.mlp.up_proj.weight``)
    to the key used in ``state``. Each update is computed in fp32 and cast back to the weight's dtype.
    """
    source = adapter.directory
    factors, replacements = adapter_factors(adapter)
    merged = dict(state)
    for module, f in factors.items():
        key = rename(module + ".weight")
        if key not in merged:
            raise AdapterError(f"{source}: LoRA weights for {module}, but the base checkpoint has no {key}; "
                               "is this adapter for another model?")
        weight = merged[key]
        delta = lora_delta(f.a, f.b, f.scale, adapter.config.fan_in_fan_out)
        if tuple(delta.shape) != tuple(weight.shape):
            raise AdapterError(f"{source}: {module}: the update B @ A has shape {tuple(delta.shape)} but the base "
                               f"weight {key} is {tuple(weight.shape)}")
        merged[key] = (weight.to(torch.float32) + delta).to(weight.dtype)
    for name, tensor in replacements.items():
        key = _replaced_key(source, name, tensor, merged, rename, "the base checkpoint")
        merged[key] = tensor.to(merged[key].dtype)
    return merged


def _replaced_key(source: str, name: str, tensor: torch.Tensor, targets: dict, rename: Callable[[str], str],
                  where: str) -> str:
    """The key in ``targets`` that an adapter's full tensor ``name`` replaces (checked: present, same shape)."""
    key = rename(name)
    if key not in targets:
        raise AdapterError(f"{source}: the adapter replaces {name}, but {where} has no {key}")
    if tuple(tensor.shape) != tuple(targets[key].shape):
        raise AdapterError(f"{source}: {name} has shape {tuple(tensor.shape)}, {where}'s {key} "
                           f"{tuple(targets[key].shape)}")
    return key


# -- LoRA modules -----------------------------------------------------------------------------------------
class LoraSettings(BaseModel):
    """What :func:`add_lora` adapts and how (saved into ``adapter_config.json``)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGETS))  # suffixes, or one regex
    exclude: list[str] | str | None = None
    rslora: bool = False
    trainable: list[str] = []  # modules trained in full (PEFT's modules_to_save), by name suffix

    @field_validator("targets")
    @classmethod
    def _non_empty(cls, value):
        if not value:
            raise ValueError("targets must name at least one module")
        if isinstance(value, str):
            re.compile(value)
        return value


class LoraLinear(nn.Module):
    """A linear layer with a low-rank update: ``F.linear(x, W, b) + scale * B(A(dropout(x)))``.

    ``weight`` and ``bias`` are the base layer's own parameters (the state-dict keys do not change);
    ``lora_A`` / ``lora_B`` are ``nn.Linear`` modules, so parameter names end as PEFT's do. The factors
    are fp32 when the base is half precision (as PEFT does), and PEFT's default initialisation is used:
    A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA adapts nn.Linear layers, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = lora_scale(alpha, r, rslora)
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # an adapter added to a model in eval mode must not start dropping out
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)
            init = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32) * 2 - 1
            self.lora_A.weight.copy_(init * bound)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scale).to(out.dtype)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W + scale * B @ A`` (same device and dtype as W)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = lora_delta(self.lora_A.weight, self.lora_B.weight, self.scale)
            linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, rslora={self.rslora}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_lora(model: nn.Module, settings: LoraSettings | None = None, *, seed: int = 0) -> list[str]:
    """Adapt every targeted ``nn.Linear`` of ``model`` in place; freeze everything else except the
    ``trainable`` modules. Returns the adapted module names. ``model.lora_settings`` remembers the
    settings for :func:`save_adapter`."""
    settings = settings or LoraSettings()
    if lora_modules(model):
        raise AdapterError("the model already has LoRA modules; merge them (merge_lora_modules) first")
    names = [name for name, m in model.named_modules()
             if name and _targeted(name, settings.targets) and not _targeted(name, settings.exclude)]
    not_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if not_linear:
        raise AdapterError(f"LoRA targets must be nn.Linear layers; {', '.join(not_linear[:5])} are not "
                           f"(targets={settings.targets!r})")
    if not names:
        raise AdapterError(f"no module of {type(model).__name__} matches the LoRA targets {settings.targets!r}")
    trainable = [name for name, _ in model.named_modules() if name and _targeted(name, settings.trainable)]
    missing = [t for t in settings.trainable if not any(_targeted(n, [t]) for n in trainable)]
    if missing:
        raise AdapterError(f"trainable modules {missing} match no module of {type(model).__name__}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        _set_module(model, name, LoraLinear(model.get_submodule(name), settings.r, settings.alpha,
                                            settings.dropout, settings.rslora, generator))
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    model.lora_settings = settings
    return names


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _adapter_tensors(model: nn.Module, to_adapter_name: Callable[[str], str]) -> dict[str, torch.Tensor]:
    settings: LoraSettings | None = getattr(model, "lora_settings", None)
    tensors = {}
    for name, module in lora_modules(model).items():
        for factor in ("lora_A", "lora_B"):
            weight = getattr(module, factor).weight
            tensors[f"{PEFT_PREFIX}{to_adapter_name(name)}.{factor}.weight"] = weight.detach().contiguous().cpu()
    for name, module in model.named_modules():
        if settings and name and _targeted(name, settings.trainable):
            for pname, p in module.named_parameters(recurse=True):
                tensors[f"{PEFT_PREFIX}{to_adapter_name(name)}.{pname}"] = p.detach().contiguous().cpu()
    return tensors


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model: str | None = None,
                 task_type: str | None = "CAUSAL_LM", to_adapter_name: Callable[[str], str] = lambda n: n) -> Path:
    """Write the model's LoRA factors and ``trainable`` modules as a PEFT adapter directory.

    ``to_adapter_name`` maps one of our module names to the name the adapter should use (identity: our
    names are Hugging Face's / colpali-engine's). The weights file is written before the config and
    each file replaces the old one atomically, so an interrupted save never leaves a mixed adapter.
    """
    from safetensors.torch import save_file

    settings: LoraSettings | None = getattr(model, "lora_settings", None)
    modules = lora_modules(model)
    if settings is None or not modules:
        raise AdapterError("the model has no LoRA modules (call add_lora or load_adapter first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = LoraAdapterConfig(
        task_type=task_type, r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.targets, exclude_modules=settings.exclude,
        modules_to_save=list(settings.trainable) or None, use_rslora=settings.rslora,
        base_model_name_or_path=base_model)
    _atomic_write(directory / ADAPTER_WEIGHTS,
                  lambda tmp: save_file(_adapter_tensors(model, to_adapter_name), str(tmp), metadata={"format": "pt"}))
    text = json.dumps(config.model_dump(), indent=2)
    _atomic_write(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_adapter(model: nn.Module, adapter: str | os.PathLike | LoraAdapter, *, merge: bool = False,
                 rename: Callable[[str], str] = lambda k: k) -> nn.Module:
    """Apply a PEFT LoRA adapter (ours or ``peft``'s) to ``model`` in place.

    ``merge=True`` folds it into the weights (:func:`merge_lora` on the state dict). Otherwise targeted
    layers become :class:`LoraLinear` holding the adapter's factors (trainable, to continue training;
    everything else frozen, the replaced modules trainable). ``rename`` maps an adapter-side parameter
    name to the model's.
    """
    adapter = adapter if isinstance(adapter, LoraAdapter) else read_adapter(adapter)
    if merge:
        state = model.state_dict()
        merged = merge_lora(state, adapter, rename)
        with torch.no_grad():
            for key, tensor in merged.items():
                if tensor is not state[key]:
                    state[key].copy_(tensor)
        return model
    if lora_modules(model):
        raise AdapterError("the model already has LoRA modules; merge them (merge_lora_modules) first")
    config, source = adapter.config, adapter.directory
    if config.fan_in_fan_out:
        raise AdapterError(f"{source}: fan_in_fan_out adapters can only be merged (load_adapter(..., merge=True))")
    factors, replacements = adapter_factors(adapter)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for module, f in factors.items():
        name = rename(module + ".weight").removesuffix(".weight")
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{source}: LoRA weights for {module}, but the model has no module {name}") from None
        if not isinstance(base, nn.Linear) or tuple(base.weight.shape) != (f.b.shape[0], f.a.shape[1]):
            raise AdapterError(f"{source}: {module}: lora_A {tuple(f.a.shape)} / lora_B {tuple(f.b.shape)} do not fit "
                               f"{name} ({type(base).__name__} {tuple(getattr(base, 'weight', torch.empty(0)).shape)})")
        rank = f.a.shape[0]
        lora = LoraLinear(base, rank, 1.0, config.lora_dropout, config.use_rslora)
        lora.scale, lora.alpha = f.scale, f.scale * (math.sqrt(rank) if config.use_rslora else rank)
        with torch.no_grad():
            lora.lora_A.weight.copy_(f.a)
            lora.lora_B.weight.copy_(f.b)
        _set_module(model, name, lora)
    trainable_modules = set()
    for pname, tensor in replacements.items():
        key = _replaced_key(source, pname, tensor, params, rename, "the model")
        with torch.no_grad():
            params[key].copy_(tensor)
        params[key].requires_grad_(True)
        trainable_modules.add(key.rsplit(".", 1)[0])
    targets = config.target_modules if config.target_modules is not None else sorted(factors)
    model.lora_settings = LoraSettings(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                       targets=targets, exclude=config.exclude_modules, rslora=config.use_rslora,
                                       trainable=sorted(config.modules_to_save or trainable_modules))
    return model


def merge_lora_modules(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoraLinear` into its weight and put a plain ``nn.Linear`` back (in place)."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merged())
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model
