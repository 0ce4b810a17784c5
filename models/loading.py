"""``load_model``: Hugging Face checkpoint directories, GGUF files and preset names.

Checkpoints are read with safetensors only (never unpickled). Models are built on the meta device
and weights are assigned in place (``load_state_dict(assign=True)``), so loading never holds a
second full copy of the model. A checkpoint that does not fit its config fails with one
:class:`CheckpointError` listing every missing, unexpected and mis-shaped key.

Model families plug in through :data:`ARCHITECTURES`: a module exposing
``build_from_config(raw_config: dict) -> nn.Module`` and, optionally,
``normalize_checkpoint_keys(state: dict) -> dict`` (renames checkpoint keys to module keys) and
``IGNORED_CHECKPOINT_KEYS`` (regexes of keys a checkpoint may carry that the module does not need,
such as a tied LM head).
"""

from __future__ import annotations

import importlib
import json
import math
import mmap
import os
import re
import threading
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ConfigError, GemmaConfig, preset

if TYPE_CHECKING:
    from .recurrent_gemma import RecurrentGemmaConfig

__all__ = ["load_model", "CheckpointError", "read_safetensors", "assign_weights", "resolve_dtype", "meta_construction",
           "init_random_weights", "ARCHITECTURES", "read_hf_config"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file or the keys and what is wrong."""


# model_type in config.json -> module (relative to this package) that builds it.
ARCHITECTURES: dict[str, str] = {
    "gemma": ".gemma_hf", "gemma2": ".gemma_hf", "gemma3_text": ".gemma_hf", "gemma3": ".gemma_hf",
    "recurrent_gemma": ".recurrent_gemma",
    "paligemma": ".paligemma",
    "siglip": ".siglip", "siglip_vision_model": ".siglip",
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, device) -> torch.dtype:
    """``None`` means fp32 on CPU (fast, exact) and bf16 on accelerators; strings are accepted."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPES[key]


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {', '.join(bins)}: pickled checkpoints are never loaded; convert to safetensors)" if bins else ""
        raise CheckpointError(f"{directory}: no *.safetensors files{hint}")
    return files


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _mapped_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file as views of the file mapped copy-on-write: nothing is read
    until used and nothing is copied (the file is never written, even if a tensor is)."""
    with file.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{size} bytes, shorter than the header length field")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header_len = int.from_bytes(buf[:8], "little")
    if 8 + header_len > size:
        raise ValueError(f"header of {header_len} bytes runs past the end of the file ({size} bytes)")
    header = json.loads(buf[8:8 + header_len])
    data = torch.frombuffer(buf, dtype=torch.uint8)
    start = 8 + header_len
    state = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {key!r} has an unsupported dtype {entry.get('dtype')!r}")
        shape = [int(d) for d in entry["shape"]]
        begin, end = (start + int(o) for o in entry["data_offsets"])
        count = math.prod(shape)
        if not start <= begin <= end <= size or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {key!r} spans bytes {begin}..{end} of {size}, which does not hold "
                             f"{shape} {entry['dtype']} values")
        raw = data[begin:end]
        if begin % dtype.itemsize:  # unaligned for its dtype: the one case that needs a copy
            raw = raw.clone()
        state[key] = raw.view(dtype).reshape(shape)
    return state


def read_safetensors(source: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index) or of files.

    Tensors keep their stored dtype and are zero-copy views of the memory-mapped files (loading runs
    at page-cache/disk speed); a truncated or corrupt file raises :class:`CheckpointError` naming it.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = _safetensors_files(path) if path.is_dir() else [path]
    else:
        files = [Path(p) for p in source]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(_mapped_safetensors(file))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return state


def assign_weights(module: nn.Module, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                   device, ignored: Iterable[str] = (), source: str = "checkpoint") -> nn.Module:
    """Assign ``state`` to ``module`` (built on the meta device) with conversion to dtype/device.

    Raises one :class:`CheckpointError` listing every missing, unexpected and mis-shaped key.
    """
    expected = module.state_dict(keep_vars=True)
    ignored_res = [re.compile(p) for p in ignored]
    unexpected = [k for k in state if k not in expected and not any(r.fullmatch(k) for r in ignored_res)]
    missing = [k for k in expected if k not in state]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {'; '.join(misshaped[:20])}")
        raise CheckpointError(f"{source} does not fit the model config: " + " | ".join(parts))
    converted = {}
    for key in expected:
        t = state[key]
        target = dtype if t.is_floating_point() else t.dtype
        converted[key] = t.to(device=device, dtype=target)
    module.load_state_dict(converted, strict=True, assign=True)
    # Non-persistent buffers (RoPE frequencies) were built for real on the CPU: move them.
    return module.to(device)


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")
_init_lock = threading.Lock()


@contextmanager
def meta_construction():
    """Build modules on the meta device without running their weight initialisers.

    Initialising a meta tensor does no work, but the first such call in a process imports torch's
    Python decompositions (about 1-2 s here): a cold ``load_model`` paid it for weights that are
    overwritten at once. The ``torch.nn.init`` functions that ``reset_parameters`` calls are replaced by
    no-ops while this context is open (as transformers' ``no_init_weights`` does); a lock keeps two
    loads from interleaving their restores.
    """
    with _init_lock:
        saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, _no_init)
        try:
            with torch.device("meta"):
                yield
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)


def _no_init(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def init_random_weights(module: nn.Module, seed: int | None = 0, std: float = 0.02) -> nn.Module:
    """Random init for preset models: normal(0, std) matrices, zero biases, RMSNorm w = 0 (1 + w = 1)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias") or "norm" in name:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def _family(model_type: str | None, raw: dict):
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        archs = raw.get("architectures")
        raise CheckpointError(f"unknown architecture in config.json (model_type={model_type!r}, "
                              f"architectures={archs}); supported model types: {known}")
    return importlib.import_module(ARCHITECTURES[model_type], __package__)


def load_hf_directory(directory: str | os.PathLike, *, dtype=None, device="cpu") -> nn.Module:
    directory = Path(directory)
    raw = read_hf_config(directory)
    family = _family(raw.get("model_type"), raw)
    dtype = resolve_dtype(dtype, device)
    with meta_construction():
        try:
            module = family.build_from_config(raw)
        except ConfigError as e:
            raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    state = read_safetensors(directory)
    normalize = getattr(family, "normalize_checkpoint_keys", None)
    if normalize is not None:
        state = normalize(state)
    assign_weights(module, state, dtype=dtype, device=device,
                   ignored=getattr(family, "IGNORED_CHECKPOINT_KEYS", ()), source=str(directory))
    return module.eval()


def load_model(source: str | os.PathLike, *, dtype=None, device="cpu", seed: int | None = 0,
               quantize: str | None = None) -> nn.Module:
    """Load a model from a Hugging Face checkpoint directory, a ``.gguf`` file or a preset name.

    ``dtype`` is ``None`` (fp32 on CPU, bf16 on GPU), a torch dtype or its name. Preset names build
    the official shapes with random weights (seeded by ``seed``). ``quantize="int8"`` (or
    ``"int4"``) stores the projections of a Gemma text decoder as int8 (int4) and its LM head as int4
    rescored exactly, for ~4x faster CPU decoding (changes numerics; see :mod:`models.quantize`).
    Returns the model class of the architecture
    (:class:`~models.gemma.GemmaLM` for Gemma text decoders,
    :class:`~models.recurrent_gemma.RecurrentGemmaLM` for RecurrentGemma) in eval mode.
    """
    from .quantize import QUANTIZE_MODES, quantize_model

    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or one of {', '.join(map(repr, QUANTIZE_MODES))}, got {quantize!r}")
    model = _load_model(source, dtype=dtype, device=device, seed=seed)
    return model if quantize is None else quantize_model(model, quantize)


def _load_model(source, *, dtype, device, seed) -> nn.Module:
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        return load_hf_directory(path, dtype=dtype, device=device)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        from .gguf import load_gguf_model

        return load_gguf_model(path, dtype=resolve_dtype(dtype, device), device=device).eval()
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + *.safetensors) "
                              "or a .gguf file")
    from .recurrent_gemma import recurrent_preset, recurrent_preset_names

    try:
        config = preset(str(source))
    except ConfigError:
        if str(source).lower().removeprefix("google/") not in recurrent_preset_names():
            raise FileNotFoundError(f"{source!r} is neither a checkpoint directory, a .gguf file, nor a preset "
                                    f"name (see models.preset_names() and models.recurrent_preset_names())") from None
        config = recurrent_preset(str(source))
    return build_random(config, dtype=dtype, device=device, seed=seed)


def build_random(config: GemmaConfig | RecurrentGemmaConfig, *, dtype=None, device="cpu",
                 seed: int | None = 0) -> nn.Module:
    """A model of ``config`` with random weights."""
    from .gemma import GemmaLM
    from .recurrent_gemma import RecurrentGemmaConfig, RecurrentGemmaLM

    model_class = RecurrentGemmaLM if isinstance(config, RecurrentGemmaConfig) else GemmaLM
    model = init_random_weights(model_class(config), seed=seed)
    return model.to(device=device, dtype=resolve_dtype(dtype, device)).eval()
