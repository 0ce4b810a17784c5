"""Gemma checkpoints in GGUF files (llama.cpp): metadata, dequantised tensors under Hugging Face names.

``read_gguf(path)`` returns ``(GemmaConfig, state, metadata)`` where ``state`` maps Hugging Face key
names (``model.layers.3.self_attn.q_proj.weight``) to fp32 tensors in ``[out, in]`` layout, and
``load_gguf_model(path)`` builds a :class:`~models.gemma.GemmaLM` on the meta device and assigns them.

Conventions of llama.cpp's Gemma converters that are undone here:

- every RMSNorm weight (``*_norm``) is stored as ``1 + w``; the model stores ``w``, so 1 is subtracted;
- ``ffn_norm`` is the norm before the MLP: Hugging Face calls it ``post_attention_layernorm`` in Gemma 1
  and ``pre_feedforward_layernorm`` in Gemma 2/3 (where ``post_attention_norm`` is the sandwich norm);
- Q and K are not permuted for Gemma (unlike Llama), so matrices are used as stored.

Parsing a GGUF header with ``gguf.GGUFReader`` builds one numpy view per vocabulary string (about 14 s
and 700 MB for a 262k vocabulary), so the parsed header of the most recently read file is kept as plain
Python data; loading the model and the tokenizer from the same file parses it once.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import FULL, SLIDING, ConfigError, GemmaConfig
from .loading import CheckpointError, assign_weights

__all__ = ["GGUFError", "GGUFTensorInfo", "read_gguf", "read_gguf_metadata", "load_gguf_model",
           "gguf_to_hf_name", "SUPPORTED_ARCHITECTURES"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# The LM head is tied to the embedding matrix; a file that also stores ``output.weight`` loads fine.
IGNORED_KEYS = (r"lm_head\.weight",)


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read as a Gemma checkpoint: names the file and what is wrong."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    type_name: str  # ggml type, e.g. "Q4_K"
    type_id: int
    shape: tuple[int, ...]  # torch order ([out, in] for matrices): GGUF's dims reversed
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


# -- names ------------------------------------------------------------------------------------------
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Per block: GGUF name -> module path under model.layers.{i}, for every Gemma generation.
_BLOCK_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# The norm in front of the MLP: Gemma 1 has no sandwich norms and names it post_attention_layernorm.
_FFN_NORM = {"gemma": "post_attention_layernorm", "gemma2": "pre_feedforward_layernorm",
             "gemma3": "pre_feedforward_layernorm"}


def gguf_to_hf_name(name: str, architecture: str) -> str:
    """The Hugging Face key of a GGUF tensor name; unknown names are returned unchanged (so the
    loader reports them as unexpected keys)."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _BLOCK.fullmatch(name)
    if m is None:
        return name
    layer, part = m.groups()
    target = _FFN_NORM.get(architecture) if part == "ffn_norm" else _BLOCK_COMMON.get(part)
    return f"model.layers.{layer}.{target}.weight" if target else name


# -- parsing ----------------------------------------------------------------------------------------
_cache_lock = threading.Lock()
_cached: tuple[tuple, dict[str, Any], list[GGUFTensorInfo]] | None = None


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file (expected a .gguf file)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                        "pass a .gguf file written by llama.cpp or the gguf package")
    return path


def _parse(path: Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata as plain Python values and the tensor table, parsed once per file version."""
    global _cached
    identity = _file_identity(path)
    with _cache_lock:
        if _cached is not None and _cached[0] == identity:
            return _cached[1], _cached[2]
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad bytes
        if "GGMLQuantizationType" in str(e):
            raise GGUFError(f"{path}: a tensor has an unknown ggml type ({e}); this version of the gguf "
                            "package cannot read it: upgrade gguf or re-quantise the model") from None
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e}); "
                        "re-download or re-assemble it") from None
    if reader.byte_order == "S":  # the file's byte order is the opposite of this machine's
        # Tensor data is decoded below from the raw bytes in the host's byte order.
        raise GGUFError(f"{path}: the file's byte order is the opposite of this machine's; convert it with "
                        "gguf-convert-endian")
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except (UnicodeDecodeError, ValueError) as e:
            raise GGUFError(f"{path}: metadata {key!r} cannot be decoded ({e})") from None
    tensors = [
        GGUFTensorInfo(name=t.name, type_name=t.tensor_type.name, type_id=int(t.tensor_type),
                       shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                       offset=int(t.data_offset), nbytes=int(t.n_bytes))
        for t in reader.tensors
    ]
    del reader
    size = path.stat().st_size
    for t in tensors:
        if t.offset + t.nbytes > size:
            raise GGUFError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte "
                            f"{t.offset + t.nbytes} but the file has {size} bytes; re-download or "
                            "re-assemble it")
    with _cache_lock:
        _cached = (identity, metadata, tensors)
    return metadata, tensors


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every key/value of the GGUF header as Python values (strings, numbers, lists)."""
    return dict(_parse(_check_path(path))[0])


def _architecture(path: Path, metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r} in general.architecture; "
                        f"this loader reads Gemma text decoders: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _dequantize(path: Path, data: np.memmap, info: GGUFTensorInfo) -> torch.Tensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(info.type_id)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    inner = info.shape[-1]
    if inner % block_size:
        raise GGUFError(f"{path}: tensor {info.name} ({info.type_name}) has rows of {inner} values, "
                        f"not a multiple of the block size {block_size}")
    rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
    raw = data[info.offset:info.offset + info.nbytes].reshape(rows, inner // block_size * type_size)
    try:
        if qtype == GGMLQuantizationType.F64:
            values = raw.view(np.float64).astype(np.float32)
        else:
            values = quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {info.name} has type {info.type_name}, which gguf.quants cannot "
                        "dequantise; convert the model to F32/F16/BF16 or a Q*_0/Q*_K type") from None
    values = values.astype(np.float32, copy=False)
    if not values.flags.writeable:  # F32 data is a view into the read-only memory map: copy it out
        values = values.copy()
    return torch.from_numpy(values).reshape(info.shape)


# Gemma 2 27B and Gemma 3 27B scale attention by (hidden / heads) ** -0.5 (144, 168), not head_dim ** -0.5.
# Their GGUF files carry no query_pre_attn_scalar key: llama.cpp recognises them by block count.
_SCALE_BY_HIDDEN_OVER_HEADS = {("gemma2", 46), ("gemma3", 62)}


def _config_from_metadata(path: Path, metadata: dict[str, Any]) -> GemmaConfig:
    """GemmaConfig.from_gguf_metadata plus the optional keys newer llama.cpp files carry."""
    try:
        config = GemmaConfig.from_gguf_metadata(metadata)
        arch, n_layers = config.architecture, config.num_hidden_layers
        changes: dict[str, Any] = {}
        # Per-layer booleans (True = sliding window) or an int n: layer i slides iff i % n < n - 1.
        pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, list):
            if len(pattern) != n_layers:
                raise ValueError(f"sliding_window_pattern has {len(pattern)} entries for {n_layers} blocks")
            changes["layer_types"] = [SLIDING if p else FULL for p in pattern]
        elif isinstance(pattern, int) and arch != "gemma":
            changes["layer_types"] = [SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL
                                      for i in range(n_layers)]
        local_base = metadata.get(f"{arch}.rope.freq_base_swa")
        if local_base is not None:
            changes["rope_local_base_freq"] = float(local_base)
        if (f"{arch}.attention.query_pre_attn_scalar" not in metadata
                and (arch, n_layers) in _SCALE_BY_HIDDEN_OVER_HEADS):
            changes["query_pre_attn_scalar"] = config.hidden_size // config.num_attention_heads
        return config.replace(**changes) if changes else config
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise GGUFError(f"{path}: metadata does not describe a Gemma decoder "
                        f"({type(e).__name__}: {e})") from None


def read_gguf(path: str | os.PathLike) -> tuple[GemmaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, state, metadata)`` of a Gemma GGUF file.

    ``state`` maps Hugging Face key names to dequantised fp32 tensors, norm weights already shifted
    back by -1. Raises :class:`GGUFError` for a file that is not GGUF, truncated, of another
    architecture or holding tensor types that cannot be dequantised.
    """
    path = _check_path(path)
    metadata, tensors = _parse(path)
    arch = _architecture(path, metadata)
    config = _config_from_metadata(path, metadata)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    state: dict[str, torch.Tensor] = {}
    for info in tensors:
        key = gguf_to_hf_name(info.name, arch)
        tensor = _dequantize(path, data, info)
        if key.endswith("norm.weight"):
            tensor -= 1.0  # stored as 1 + w
        state[key] = tensor
    del data
    return config, state, dict(metadata)


def load_gguf_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """A :class:`~models.gemma.GemmaLM` with the weights of a Gemma GGUF file (dequantised, cast to
    ``dtype``). Built on the meta device, so only the dequantised fp32 weights are held once."""
    from .gemma import GemmaLM

    config, state, _ = read_gguf(path)
    with torch.device("meta"):
        model = GemmaLM(config)
    assign_weights(model, state, dtype=dtype, device=device, ignored=IGNORED_KEYS, source=str(path))
    return model.eval()
