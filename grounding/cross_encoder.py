"""A cross-encoder that reads a statistic phrase and a candidate variable together, to order near twins.

A bi-encoder (the variable index's dense search) embeds the query and each variable apart, so two
variables under the same description ("Population: Divorced" / "Population: Separated") or with one
opposite word get nearly the same cosine. A cross-encoder runs the PAIR through the encoder,
``[CLS] phrase [SEP] variable name (dcid words) [SEP]``, so every query token attends to every
variable token, and a linear head on the mean-pooled tokens gives a relevance logit.

It is all-MiniLM-L6-v2 (the index's own embedding model: no second download) with a LoRA update on
every linear layer, merged into a private copy of the weights when first used, plus that head. The
LoRA factors and head (about 0.7 MB in fp16) live in the search model file
(``grounding/data/variable_search.safetensors``), and apply only to the embedding model they were
trained for (its fingerprint). Trained by ``benchmarks/experiment_cross_encoder.py`` on the tuning
half of Data Commons' gold queries only.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import numpy as np
import torch

from .types import GroundingError

__all__ = ["CrossEncoder", "CrossEncoderError", "CROSS_ENCODER_PREFIX", "pooled_pairs"]

CROSS_ENCODER_PREFIX = "ce."  # tensor names in the search model file


class CrossEncoderError(GroundingError):
    """A cross-encoder's tensors do not fit the embedding model, or are damaged."""


def pooled_pairs(model, encodings) -> torch.Tensor:
    """Mean-pooled last hidden states ``(len(encodings), hidden)`` of tokenized pairs (``tokenizers``
    encodings, token types included), right-padded into one batch. Differentiable: training and
    :meth:`CrossEncoder.score` share it, so both read a pair the same way."""
    lengths = torch.tensor([len(e.ids) for e in encodings], dtype=torch.int32)
    n = int(lengths.max())
    ids = torch.zeros(len(encodings), n, dtype=torch.long)
    types = torch.zeros(len(encodings), n, dtype=torch.long)
    for j, e in enumerate(encodings):
        ids[j, : len(e.ids)] = torch.tensor(e.ids)
        types[j, : len(e.ids)] = torch.tensor(e.type_ids)
    device = model.device
    hidden = model(ids.to(device), lengths.to(device), types.to(device)).float().cpu()
    valid = (torch.arange(n)[None, :] < lengths[:, None])[..., None]
    return (hidden * valid).sum(1) / lengths[:, None]


class CrossEncoder:
    """``CrossEncoder.from_tensors(embedder, tensors, rank=..., alpha=...).score(pairs)`` -> logits.

    ``embedder`` is a :class:`models.sentence_embedder.SentenceEmbedder`: its BERT weights are copied
    (never modified) and its tokenizer is shared. ``tensors``: ``lora`` factors named as
    :func:`models.lora.add_lora` names them (``encoder.layer.0.attention.self.query.lora_A.weight``...)
    and ``head.weight`` (1, hidden), ``head.bias`` (1,), without :data:`CROSS_ENCODER_PREFIX`.
    """

    def __init__(self, model, tokenizer, head_weight: torch.Tensor, head_bias: torch.Tensor):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.head_weight = head_weight.float()
        self.head_bias = head_bias.float()
        self._lock = threading.Lock()

    @classmethod
    def from_tensors(cls, embedder, tensors: dict[str, np.ndarray], *, rank: int, alpha: float) -> CrossEncoder:
        from models.lora import LoraSettings, add_lora, lora_modules, merge_lora_modules

        model = getattr(embedder, "model", None)
        tokenizer = getattr(embedder, "tokenizer", None)
        if model is None or tokenizer is None:
            raise CrossEncoderError(f"the cross-encoder needs a SentenceEmbedder (a BERT model and its tokenizer), "
                                    f"got {type(embedder).__name__}")
        model = copy.deepcopy(model).float()
        add_lora(model, LoraSettings(r=rank, alpha=alpha, targets=["query", "key", "value", "dense"]))
        modules = lora_modules(model)
        expected = {f"{name}.lora_{ab}.weight" for name in modules for ab in "AB"}
        given = {k for k in tensors if ".lora_" in k}
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise CrossEncoderError(f"the cross-encoder's LoRA factors do not fit the embedding model "
                                    f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, module in modules.items():
                for ab, linear in (("A", module.lora_A), ("B", module.lora_B)):
                    value = torch.from_numpy(np.asarray(tensors[f"{name}.lora_{ab}.weight"], dtype=np.float32))
                    if value.shape != linear.weight.shape:
                        raise CrossEncoderError(f"cross-encoder tensor {name}.lora_{ab}.weight has shape "
                                                f"{tuple(value.shape)}, expected {tuple(linear.weight.shape)}")
                    linear.weight.copy_(value)
        merge_lora_modules(model)
        hidden = model.config.hidden_size
        try:
            weight = torch.from_numpy(np.asarray(tensors["head.weight"], dtype=np.float32)).reshape(hidden)
            bias = torch.from_numpy(np.asarray(tensors["head.bias"], dtype=np.float32)).reshape(())
        except (KeyError, RuntimeError, ValueError) as e:
            raise CrossEncoderError(f"the cross-encoder's head is missing or has the wrong shape ({e})") from None
        return cls(model.requires_grad_(False), tokenizer, weight, bias)

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64) -> np.ndarray:
        """One relevance logit per ``(phrase, variable text)`` pair, float32 ``(len(pairs),)``."""
        out = np.zeros(len(pairs), dtype=np.float32)
        if not len(pairs):
            return out
        with self._lock:  # the tokenizer's truncation settings and torch's threads are shared
            encodings = self.tokenizer.encode_batch([(str(a), str(b)) for a, b in pairs])
        order = sorted(range(len(pairs)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            pooled = pooled_pairs(self.model, [encodings[i] for i in rows])
            out[rows] = (pooled @ self.head_weight + self.head_bias).numpy()
        return out
