"""Gemma checkpoints in GGUF files (llama.cpp): metadata, dequantised tensors under Hugging Face names.

``read_gguf(path)`` returns ``(GemmaConfig, state, metadata)`` where ``state`` maps Hugging Face key
names (``model.layers.3.self_attn.q_proj.weight``) to fp32 tensors in ``[out, in]`` layout, and
``load_gguf_model(path)`` builds a :class:`~models.gemma.GemmaLM` on the meta device and assigns them.

Conventions of llama.cpp's Gemma converters that are undone here:

- every RMSNorm weight (``*_norm``) is stored as ``1 + w``; the model stores ``w``, so 1 is subtracted;
- ``ffn_norm`` is the norm before the MLP: Hugging Face calls it ``post_attention_layernorm`` in Gemma 1
  and ``pre_feedforward_layernorm`` in Gemma 2/3 (where ``post_attention_norm`` is the sandwich norm);
- Q and K are not permuted for Gemma (unlike Llama), so matrices are used as stored.

The header is parsed here from the memory-mapped bytes rather than with ``gguf.GGUFReader``, which builds
one numpy view per vocabulary string (about 14 s and 700 MB for a 262k vocabulary): numeric arrays are
read with one ``np.frombuffer`` each, and a string array is one walk over its length prefixes plus one
UTF-8 decode. Tensor data is never read up front: the file is mapped, F32 tensors are views of the
mapping and quantised ones are dequantised whole with vectorised torch ops. The parsed header of the
most recently read file is kept in memory (nothing is written to disk), so loading the model and the
tokenizer from one file parses it once.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import FULL, SLIDING, ConfigError, GemmaConfig
from .loading import CheckpointError, assign_weights, meta_construction

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
# GGUF value types (gguf's GGUFValueType) -> numpy dtype; 8 (string) and 9 (array) are handled apart.
_NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_DEFAULT_ALIGNMENT = 32
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

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


def _map(path: Path) -> mmap.mmap:
    """The whole file mapped copy-on-write: tensors are views of it (no read, no copy), and torch
    accepts the mapping as a writable buffer while the file itself is never written."""
    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


class _DeferredStrings:
    """A string array of the header, kept as NUL-separated UTF-8 bytes until first read."""

    def __init__(self, path: Path, what: str, joined: np.ndarray, lengths: np.ndarray):
        self.path, self.what, self.joined, self.lengths = path, what, joined, lengths

    def __len__(self) -> int:
        return self.lengths.size

    def decode(self) -> list[str]:
        if self.lengths.size == 0:
            return []
        try:
            parts = self.joined.tobytes().decode("utf-8").split("\x00")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {self.what} holds a string that is not valid UTF-8 ({e})") from None
        if len(parts) == self.lengths.size + 1:
            return parts[1:]
        # Some string holds a NUL itself (never in Gemma vocabularies): cut them one by one.
        raw, ends = self.joined.tobytes(), np.cumsum(self.lengths + 1).tolist()
        return [raw[end - n:end].decode("utf-8") for end, n in zip(ends, self.lengths.tolist(), strict=True)]


class _Header:
    """A cursor over the mapped header; every read checks the file's end."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF file: {what} at byte {self.pos} needs "
                            f"{n} bytes but the file has {self.size}; re-download or re-assemble it")

    def u32(self, what: str) -> int:
        self._need(4, what)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self._need(8, what)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        n = self.u64(what)
        self._need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def numbers(self, vtype: int, count: int, what: str) -> np.ndarray:
        dtype = np.dtype(_NUMPY_TYPES[vtype])
        self._need(count * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return values.astype(bool) if vtype == _BOOL else values

    def strings(self, count: int, what: str) -> _DeferredStrings:
        """``count`` length-prefixed strings, decoded when first needed (a model load never needs the
        vocabulary). Only the walk over the length prefixes is a Python loop; the bytes are gathered
        with numpy and, when asked for, decoded in one call split on NUL."""
        buf, unpack, pos = self.buf, _U64.unpack_from, self.pos
        lengths = [0] * count
        try:
            for i in range(count):
                lengths[i] = n = unpack(buf, pos)[0]
                pos += 8 + n
        except struct.error:  # the next length prefix lies past the end of the file
            self.pos = pos
            self._need(8, f"{what}[{i}]")
        self.pos = pos
        if pos > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF file: {what} runs past the end of the "
                            f"file ({pos} > {self.size} bytes); re-download or re-assemble it")
        if count == 0:
            return _DeferredStrings(self.path, what, np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.int64))
        # Turn each 8-byte length prefix into one NUL separator (decoded and split later).
        sizes = np.array(lengths, dtype=np.int64)
        prefixes = np.zeros(count, dtype=np.int64)
        np.cumsum(sizes[:-1] + 8, out=prefixes[1:])
        base = self.pos - int(prefixes[-1] + 8 + sizes[-1])
        region = np.frombuffer(buf, dtype=np.uint8, count=pos - base, offset=base).copy()
        region[prefixes] = 0
        keep = np.ones(region.size, dtype=bool)
        keep[(prefixes[:, None] + np.arange(1, 8)).ravel()] = False
        return _DeferredStrings(self.path, what, region[keep], sizes)

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type, count = self.u32(what), self.u64(what)
            if item_type == _STRING:
                return self.strings(count, what)
            if item_type == _ARRAY:
                return [self.value(_ARRAY, f"{what}[{i}]") for i in range(count)]
            if item_type not in _NUMPY_TYPES:
                raise GGUFError(f"{self.path}: {what} has an unknown array item type {item_type}")
            return self.numbers(item_type, count, what).tolist()
        if vtype not in _NUMPY_TYPES:
            raise GGUFError(f"{self.path}: {what} has an unknown value type {vtype}")
        return self.numbers(vtype, 1, what)[0].item()


def _parse(path: Path, *, decode: bool = True) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata as plain Python values (the keys and values ``gguf.GGUFReader`` gives, its
    ``GGUF.version``/``tensor_count``/``kv_count`` pseudo-keys included) and the tensor table,
    parsed straight from the mapped bytes once per file version. With ``decode=False`` string arrays
    (the vocabulary) may still be :class:`_DeferredStrings`; they are decoded once, in the cache."""
    global _cached
    identity = _file_identity(path)
    with _cache_lock:
        cached = _cached if _cached is not None and _cached[0] == identity else None
    if cached is None:
        buf = _map(path)
        try:
            metadata, tensors = _parse_header(path, buf)
        finally:
            buf.close()
        cached = (identity, metadata, tensors)
        with _cache_lock:
            _cached = cached
    _, metadata, tensors = cached
    if decode:
        with _cache_lock:
            for key, value in metadata.items():
                if _has_deferred(value):
                    metadata[key] = _decoded(value)
    return metadata, tensors


def _has_deferred(value: Any) -> bool:
    if isinstance(value, _DeferredStrings):
        return True
    # Arrays hold one item type: only arrays of arrays need a look inside (not 262k numbers).
    return (isinstance(value, list) and bool(value) and isinstance(value[0], (list, _DeferredStrings))
            and any(map(_has_deferred, value)))


def _decoded(value: Any) -> Any:
    if isinstance(value, _DeferredStrings):
        return value.decode()
    return [_decoded(v) for v in value] if isinstance(value, list) else value


def _parse_header(path: Path, buf: mmap.mmap) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    h = _Header(path, buf)
    h.pos = 4  # the magic, checked by _check_path
    version = h.u32("version")
    if version & 0xFFFF == 0:  # a byte-swapped small number: written on a machine of the other order
        raise GGUFError(f"{path}: the file's byte order is the opposite of this machine's; convert it with "
                        "gguf-convert-endian")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors, n_kv = h.u64("tensor count"), h.u64("key/value count")
    if n_tensors > h.size or n_kv > h.size:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file: header claims {n_tensors} tensors and "
                        f"{n_kv} keys; re-download or re-assemble it")
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for i in range(n_kv):
        key = h.string(f"key {i}")
        metadata[key] = h.value(h.u32(f"type of {key!r}"), f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        name = h.string(f"tensor name {i}")
        n_dims = h.u32(f"tensor {name!r} rank")
        if n_dims > 8:
            raise GGUFError(f"{path}: truncated or corrupt GGUF file: tensor {name!r} has rank {n_dims}")
        dims = h.numbers(10, n_dims, f"tensor {name!r} shape").tolist()
        infos.append((name, dims, h.u32(f"tensor {name!r} type"), h.u64(f"tensor {name!r} offset")))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment = {alignment!r} is not a power of two")
    data_start = -(-h.pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has an unknown ggml type {type_id}; this version of the "
                            "gguf package cannot read it: upgrade gguf or re-quantise the model") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block_size:
            raise GGUFError(f"{path}: tensor {name} ({qtype.name}) has rows of {dims[0]} values, "
                            f"not a multiple of the block size {block_size}")
        info = GGUFTensorInfo(name=name, type_name=qtype.name, type_id=type_id, shape=tuple(reversed(dims)),
                              offset=data_start + offset, nbytes=count // block_size * type_size)
        if info.offset + info.nbytes > h.size:
            raise GGUFError(f"{path}: truncated GGUF file: tensor {name} ends at byte "
                            f"{info.offset + info.nbytes} but the file has {h.size} bytes; re-download or "
                            "re-assemble it")
        tensors.append(info)
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


# -- dequantisation ---------------------------------------------------------------------------------
# Whole tensors at once with torch (multi-threaded), reading the mapped bytes in place. Each formula
# is gguf.quants' (llama.cpp's ggml-quants.c) with the same fp32 operations in the same order, so the
# values are bit-identical to gguf.quants.dequantize (tests/models/test_gguf_reader.py checks it).
_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """``(blocks, 2)`` bytes -> ``(blocks, 1)`` fp32 from little-endian fp16."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Low then high nibbles of ``(blocks, groups * w)`` bytes: ``(blocks, 2 * groups, w)``."""
    blocks = qs.shape[0]
    return ((qs.reshape(blocks, groups, 1, -1) >> _NIBBLE_SHIFTS.view(1, 1, 2, 1)) & 15).reshape(blocks, 2 * groups, -1)


def _bits(raw: torch.Tensor, width: int) -> torch.Tensor:
    """``(blocks, n)`` bytes -> ``(blocks, 8, n)``: bit i of every byte (``width`` = 1) or, for
    ``width`` = 2, ``(blocks, 4, n)`` 2-bit fields."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(1, -1, 1)
    return (raw[:, None, :] >> shifts) & ((1 << width) - 1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # A cast copy then an in-place product: torch's mixed int8 x fp32 product is ~7x slower.
    out = torch.empty(b.shape[0], 32)
    return out.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b[:, :2]))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


# Bit tricks on 64-bit words (8 values at a time): torch's uint8 shifts and broadcasts are slow.
_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
_SPREAD = 0x0101010101010101  # byte b -> b in all 8 bytes
_BIT_PER_BYTE = 0x8040201008040201 - (1 << 64)  # keep bit k in byte k (as a signed int64)
_BYTE_HIGH = 0x8080808080808080 - (1 << 64)
_SEVEN_F = 0x7F7F7F7F7F7F7F7F


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs = b[:, 6:22].contiguous().view(torch.int64)  # 16 bytes: values j (low nibble), j + 16 (high)
    nibbles = torch.cat([qs & _LOW_NIBBLES, (qs >> 4) & _LOW_NIBBLES], dim=1)
    # bit j of the little-endian u32 qh is bit 4 of value j: spread each byte's 8 bits over 8 bytes,
    # then turn every non-zero byte into 16 (its high bit via a carry-free add, shifted down)
    spread = (b[:, 2:6].long() * _SPREAD) & _BIT_PER_BYTE
    fifth = (((spread + _SEVEN_F) | spread) & _BYTE_HIGH) >> 3
    q = (nibbles | (fifth & 0x1010101010101010)).view(torch.uint8)
    out = torch.empty(n, 32)
    return out.copy_(q).sub_(16).mul_(_f16(b[:, :2]))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> ``(blocks, 8)`` each."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return scales, mins


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144], 4).float()
    return (d * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    q = (_nibbles(b[:, 48:176], 4) | (_bits(b[:, 16:48], 1) << 4)).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, :128], 2).reshape(n, 8, 32)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1))
            & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
    return (d * q).reshape(n, 256)


_DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_CHUNK_VALUES = 1 << 22  # tensors above this many values are dequantised in row chunks of about this size
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dequantize(path: Path, data: torch.Tensor, info: GGUFTensorInfo) -> torch.Tensor:
    """fp32 values of one tensor; F32 data stays a view of the mapped file (no copy)."""
    raw = data[info.offset:info.offset + info.nbytes]
    if info.type_name in _FLOATS:
        values = raw.view(_FLOATS[info.type_name]).float()
    elif info.type_name in _DEQUANTIZERS:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.type_id)][1]
        values = _DEQUANTIZERS[info.type_name](raw.view(-1, type_size))
    else:
        values = _dequantize_with_gguf(path, raw, info)
    return values.reshape(info.shape)


def _dequantize_with_gguf(path: Path, raw: torch.Tensor, info: GGUFTensorInfo) -> torch.Tensor:
    """The types without a torch formula above (rare in Gemma files) through gguf.quants (numpy)."""
    from gguf import GGMLQuantizationType, quants

    try:
        values = quants.dequantize(raw.numpy(), GGMLQuantizationType(info.type_id))
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {info.name} has type {info.type_name}, which gguf.quants cannot "
                        "dequantise; convert the model to F32/F16/BF16 or a Q*_0/Q*_K type") from None
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(-1))


def read_gguf(path: str | os.PathLike) -> tuple[GemmaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, state, metadata)`` of a Gemma GGUF file.

    ``state`` maps Hugging Face key names to dequantised fp32 tensors, norm weights already shifted
    back by -1. Raises :class:`GGUFError` for a file that is not GGUF, truncated, of another
    architecture or holding tensor types that cannot be dequantised.
    """
    config, state, _ = _read_weights(path)
    return config, state, read_gguf_metadata(path)


def _read_weights(path: str | os.PathLike) -> tuple[GemmaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`read_gguf` without decoding the vocabulary strings (a model does not need them)."""
    path = _check_path(path)
    metadata, tensors = _parse(path, decode=False)
    arch = _architecture(path, metadata)
    config = _config_from_metadata(path, metadata)
    data = torch.frombuffer(_map(path), dtype=torch.uint8)
    state = dict(zip((gguf_to_hf_name(info.name, arch) for info in tensors),
                     _dequantize_all(path, data, tensors), strict=True))
    for key, tensor in state.items():
        if key.endswith("norm.weight"):
            tensor -= 1.0  # stored as 1 + w
    return config, state, metadata


def _dequantize_all(path: Path, data: torch.Tensor, tensors: list[GGUFTensorInfo]) -> list[torch.Tensor]:
    """Every tensor, dequantised by one Python thread per torch thread, each running torch ops on
    one thread; large tensors are split into row chunks written into their output in place.

    torch's own intra-op threads meet at a barrier after every op: on a busy machine (more runnable
    threads than cores) each barrier waits for a time slice, which made loading several times
    slower. Independent single-threaded pieces keep both cores busy without any barrier.
    """
    workers = torch.get_num_threads()
    outputs, pieces = [], []
    for info in tensors:
        rows = info.shape[0]
        if (info.type_name in _FLOATS or len(info.shape) < 2 or rows * info.shape[-1] < _CHUNK_VALUES
                or workers == 1):
            outputs.append(None)
            pieces.append((len(outputs) - 1, info, None))
            continue
        out = torch.empty(info.shape)
        outputs.append(out)
        step = max(1, _CHUNK_VALUES // info.shape[-1])
        row_bytes = info.nbytes // rows
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            part = GGUFTensorInfo(name=info.name, type_name=info.type_name, type_id=info.type_id,
                                  shape=(stop - start, *info.shape[1:]), offset=info.offset + start * row_bytes,
                                  nbytes=(stop - start) * row_bytes)
            pieces.append((len(outputs) - 1, part, out[start:stop]))

    def run(piece) -> None:
        index, info, target = piece
        values = _dequantize(path, data, info)
        if target is None:
            outputs[index] = values
        else:
            target.copy_(values)

    if workers == 1:
        for piece in pieces:
            run(piece)
        return outputs
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, pieces))
    finally:
        torch.set_num_threads(workers)
    return outputs


def load_gguf_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """A :class:`~models.gemma.GemmaLM` with the weights of a Gemma GGUF file (dequantised, cast to
    ``dtype``). Built on the meta device, so only the dequantised fp32 weights are held once."""
    from .gemma import GemmaLM

    config, state, _ = _read_weights(path)
    with meta_construction():
        model = GemmaLM(config)
    assign_weights(model, state, dtype=dtype, device=device, ignored=IGNORED_KEYS, source=str(path))
    return model.eval()
