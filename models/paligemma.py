"""PaliGemma 1 and 2: SigLIP -> linear projector -> Gemma (1) or Gemma 2 (2) decoder, with a prefix-LM mask.

The input is ``<image>`` x N + ``<bos>`` + prefix + ``\\n`` [+ suffix]. The projected image features
replace the embedding rows at the ``<image>`` positions **unscaled**, while text embeddings are
scaled by sqrt(hidden) as in every Gemma. Positions start at 1. The prefix (image tokens, ``<bos>``,
the task prefix and its ``\\n``; token type 0) attends to itself bidirectionally; the suffix and
generated tokens (type 1) are causal and see the whole prefix.

Module names: ``vision_tower.*`` (SigLIP), ``multi_modal_projector.linear``, ``language_model.*``
(a :class:`~models.gemma.GemmaLM`: ``language_model.model.layers.{i}...``). Checkpoints in each of
the four published key layouts are renamed to these by :func:`normalize_checkpoint_keys`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, GemmaConfig
from .gemma import GemmaLM
from .siglip import SiglipVisionConfig, SiglipVisionModel

__all__ = ["PaliGemmaConfig", "PaliGemma", "build_from_config", "normalize_checkpoint_keys",
           "IGNORED_CHECKPOINT_KEYS", "prefix_lengths", "valid_lengths"]

# The SigLIP So400m/14 tower of every PaliGemma; used only for fields a config.json leaves out.
SO400M = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=224, patch_size=14, use_head=False)

# The decoders of PaliGemma-3B (gemma-2b shapes) and PaliGemma 2 3B (gemma-2-2b shapes), with the
# PaliGemma vocabulary (Gemma's 256000 + 1024 <loc> + 128 <seg> + <image>, padded to 257216 rows);
# used only for fields a text_config leaves out.
_TEXT_DEFAULTS = {
    "gemma": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                  num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216),
    "gemma2": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=257216,
                   query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
}

IMAGE_TOKEN_ID = 257152  # "<image>" in the PaliGemma tokenizer


@dataclass
class PaliGemmaConfig:
    vision: SiglipVisionConfig  # the SigLIP tower (no pooling head)
    text: GemmaConfig  # the Gemma 1 (PaliGemma) or Gemma 2 (PaliGemma 2) decoder
    image_token_id: int = IMAGE_TOKEN_ID  # placeholder token whose rows take the image features

    def __post_init__(self) -> None:
        if self.text.architecture not in ("gemma", "gemma2"):
            raise ConfigError(f"PaliGemma decoders are Gemma 1 or Gemma 2, got {self.text.architecture!r}")

    @property
    def num_image_tokens(self) -> int:
        """``<image>`` tokens per image: one per SigLIP patch."""
        return self.vision.num_patches

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @classmethod
    def from_hf(cls, raw: dict) -> PaliGemmaConfig:
        """From a PaliGemma ``config.json``: every size is read from it; a missing field takes the value
        of the official PaliGemma(2)-3B model (never transformers' class defaults, which differ: vision
        intermediate_size 4096 vs the real 4304)."""
        text_raw = dict(raw.get("text_config") or {})
        model_type = text_raw.get("model_type") or "gemma"
        if model_type not in _TEXT_DEFAULTS:
            raise ConfigError(f"text_config.model_type {model_type!r}: PaliGemma decoders are gemma or gemma2")
        text_raw = {**_TEXT_DEFAULTS[model_type], **text_raw}
        text_raw.pop("architectures", None)  # decided by model_type here
        text = GemmaConfig.from_hf(text_raw)
        vision = SiglipVisionConfig.from_hf(dict(raw.get("vision_config") or {}), SO400M)
        if vision.use_head:
            raise ConfigError("vision_config.vision_use_head is true: PaliGemma uses the SigLIP patch features, "
                              "not the pooling head")
        projection = int(raw.get("projection_dim", (raw.get("vision_config") or {}).get("projection_dim",
                                                                                    text.hidden_size)))
        if projection != text.hidden_size:
            raise ConfigError(f"projection_dim ({projection}) must equal the decoder hidden_size ({text.hidden_size})")
        image_token = raw.get("image_token_index", raw.get("image_token_id", IMAGE_TOKEN_ID))
        return cls(vision=vision, text=text, image_token_id=int(image_token))


class MultiModalProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear = nn.Linear(vision_hidden, text_hidden, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def valid_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row lengths of a right-padded ``attention_mask`` (ones, then zeros); rejects other layouts."""
    mask = attention_mask.to(torch.long)
    lengths = mask.sum(-1)
    expected = (torch.arange(mask.shape[-1], device=mask.device)[None, :] < lengths[:, None]).to(torch.long)
    if not torch.equal(mask, expected):
        raise ValueError("attention_mask must be right-padded (ones then zeros in each row); "
                         "pad sequences at the end")
    return lengths


def prefix_lengths(token_type_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row prefix length from PaliGemma ``token_type_ids`` (0 = prefix, 1 = suffix): the 0s must come
    first among a row's valid (non-padding) tokens."""
    types = token_type_ids.to(torch.long)
    seq = types.shape[-1]
    if lengths is None:
        lengths = torch.full((types.shape[0],), seq, dtype=torch.long, device=types.device)
    positions = torch.arange(seq, device=types.device)[None, :]
    valid = positions < lengths[:, None]
    prefix = ((types == 0) & valid).sum(-1)
    expected = torch.where(positions < prefix[:, None], 0, 1)
    if not torch.equal(torch.where(valid, types, expected), expected):
        raise ValueError("token_type_ids must be 0 for a leading prefix and 1 for the rest of each row "
                         "(PaliGemma: image tokens + <bos> + prefix + \\n are 0, the suffix is 1)")
    return prefix


class PaliGemma(nn.Module):
    """A PaliGemma vision-language model. ``model(input_ids, pixel_values, prefix_lens=...)`` -> logits.

    ``input_ids`` hold ``num_image_tokens`` ``<image>`` tokens per image in ``pixel_values``
    ``(images, 3, size, size)`` (see :mod:`models.vlm_tasks` to build them), filled in order.
    """

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision.hidden_size, config.text.hidden_size)
        self.language_model = GemmaLM(config.text)

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def attention_backend(self) -> str | None:
        return self.language_model.attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: str | None) -> None:
        self.language_model.attention_backend = backend
        self.vision_tower.attention_backend = backend

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected SigLIP features ``(images, num_image_tokens, text_hidden)``, unscaled."""
        pixel_values = pixel_values.to(device=self.device)
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: scaled text embeddings, with projected image features (unscaled) written
        at the ``<image>`` positions in order. ``image_features`` (from :meth:`image_features`)
        can replace ``pixel_values`` to reuse an image across prompts."""
        image_id = self.config.image_token_id
        is_image = input_ids == image_id
        # The <image> id may lie past the embedding matrix; its row is overwritten anyway.
        text_ids = input_ids.masked_fill(is_image, 0) if image_id >= self.config.text.vocab_size else input_ids
        h = self.language_model.embed(text_ids)
        n_image_tokens = int(is_image.sum())
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is None:
            if n_image_tokens:
                raise ValueError(f"input_ids hold {n_image_tokens} <image> tokens but no pixel_values were given")
            return h
        per_image = self.config.num_image_tokens
        if n_image_tokens != image_features.shape[0] * per_image:
            raise ValueError(f"input_ids hold {n_image_tokens} <image> tokens (id {image_id}) but "
                             f"{image_features.shape[0]} image(s) need {image_features.shape[0] * per_image} "
                             f"({per_image} each); build prompts with models.vlm_tasks.build_prompt")
        return h.masked_scatter(is_image[..., None], image_features.to(h.dtype))

    # -- forward ---------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                      image_features: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                      prefix_lens: int | torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      kv_lens: torch.Tensor | None = None, causal: bool = True, input_pos=None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states ``(batch, seq, hidden)``.

        The prefix-LM mask comes from ``prefix_lens`` (per row or one int) or ``token_type_ids``;
        with neither, the whole (unpadded part of the) sequence is the prefix, as when a prompt is
        prefilled before generation. ``causal=False`` makes every token see every valid token
        (ColPali-style encoders). Padding: a right-padded ``attention_mask`` or ``kv_lens``.
        ``input_pos`` writes into the language model's KV cache (see :meth:`generate`).
        """
        h = self.embed(input_ids, pixel_values, image_features=image_features)
        batch, seq = input_ids.shape
        device = h.device
        lengths = None
        if attention_mask is not None:
            lengths = valid_lengths(attention_mask.to(device))
            if kv_lens is None:
                kv_lens = lengths
        elif kv_lens is not None:
            lengths = torch.as_tensor(kv_lens, device=device, dtype=torch.long)
        if causal and prefix_lens is None:
            if token_type_ids is not None:
                prefix_lens = prefix_lengths(token_type_ids.to(device), lengths)
            else:
                prefix_lens = lengths if lengths is not None else seq
        if position_ids is None:
            start = 0 if input_pos is None else input_pos
            base = torch.arange(seq, device=device)[None, :] + 1  # PaliGemma positions start at 1
            if isinstance(start, torch.Tensor) and start.dim() == 1:
                position_ids = base + start.to(device)[:, None]
            else:
                position_ids = (base + int(start)).expand(batch, seq)
        return self.language_model.hidden_states(inputs_embeds=h, input_pos=input_pos, position_ids=position_ids,
                                                 kv_lens=kv_lens, prefix_lens=prefix_lens if causal else None,
                                                 causal=causal)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.logits(hidden)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)``; keyword arguments as for :meth:`hidden_states`."""
        return self.logits(self.hidden_states(input_ids, pixel_values, **kwargs))

    # -- generation ------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        self.language_model.setup_cache(batch_size, max_len, dtype=dtype, device=device)

    def clear_cache(self) -> None:
        self.language_model.clear_cache()

    @torch.inference_mode()
    def stream_ids(self, prompts: Sequence[Sequence[int]] | torch.Tensor, pixel_values: torch.Tensor | None = None,
                   *, image_features: torch.Tensor | None = None, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, stop_token_ids: Sequence[int] | None = None) -> Iterator[list[int | None]]:
        """Yield step by step the new token of each row (``None`` once a row has stopped).

        Each prompt (image tokens + ``<bos>`` + prefix + ``\\n``) is prefilled as one bidirectional
        prefix into the static KV cache; generated tokens are causal. Prompts of different lengths
        are right-padded and each row decodes at its own position. A row stops after a stop token
        (yielded; default: the config's end-of-sequence ids) or ``max_new_tokens``.
        """
        from .generate import GenerationError, sample_next

        rows = [list(map(int, p)) for p in (prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts)]
        if not rows or any(not r for r in rows):
            raise GenerationError("every prompt needs at least one token")
        if max_new_tokens < 0 or (temperature is not None and temperature < 0):
            raise GenerationError(f"max_new_tokens and temperature must be >= 0, got {max_new_tokens}, {temperature}")
        if max_new_tokens == 0:
            return
        text = self.config.text
        lens = [len(r) for r in rows]
        batch, longest = len(rows), max(lens)
        if longest + max_new_tokens > text.max_position_embeddings:
            raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                                  f"context of {text.max_position_embeddings} tokens")
        stops = set(text.eos_token_ids if stop_token_ids is None else stop_token_ids)
        device = self.device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        ids = torch.full((batch, longest), text.pad_token_id, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor(lens, dtype=torch.long, device=device)

        self.setup_cache(batch, longest + max_new_tokens)
        hidden = self.hidden_states(ids, pixel_values, image_features=image_features, kv_lens=lengths,
                                    prefix_lens=lengths, input_pos=0)
        last = hidden[torch.arange(batch, device=device), lengths - 1]
        sample = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = sample_next(self.logits(last), **sample)
        done = [False] * batch
        for step in range(max_new_tokens):
            out: list[int | None] = []
            for i, t in enumerate(token.tolist()):
                out.append(None if done[i] else t)
                done[i] = done[i] or t in stops
            yield out
            if all(done) or step == max_new_tokens - 1:
                return
            pos = lengths + step
            h = self.language_model.embed(token[:, None])
            hidden = self.language_model.hidden_states(inputs_embeds=h, input_pos=pos, position_ids=pos[:, None] + 1)
            token = sample_next(self.logits(hidden[:, -1]), **sample)

    def generate(self, prompts, pixel_values: torch.Tensor | None = None, **kwargs) -> list[list[int]]:
        """New token ids per prompt (stop token included); arguments as for :meth:`stream_ids`."""
        outputs: list[list[int]] = []
        for step in self.stream_ids(prompts, pixel_values, **kwargs):
            if not outputs:
                outputs = [[] for _ in step]
            for out, t in zip(outputs, step, strict=True):
                if t is not None:
                    out.append(t)
        return outputs


# -- checkpoint conventions (models.loading.ARCHITECTURES["paligemma"]) ------------------------------------
# The LM head is tied to the embedding matrix; checkpoints that store it anyway carry a copy.
IGNORED_CHECKPOINT_KEYS = (r"language_model\.lm_head\.weight",)


def build_from_config(raw: dict) -> PaliGemma:
    return PaliGemma(PaliGemmaConfig.from_hf(raw))


_OUTER_MODEL = re.compile(r"^model\.(?=(language_model|vision_tower|multi_modal_projector)\.)")


def normalize_checkpoint_keys(state: dict) -> dict:
    """Rename the four published PaliGemma key layouts to this module's names.

    (a) Hub originals ``language_model.model.*``, ``vision_tower.vision_model.*``,
    ``multi_modal_projector.linear.*``, optional ``language_model.lm_head.weight``; (b) transformers
    4.52-4.57 ``model.language_model.*``, ``model.vision_tower.vision_model.*``,
    ``model.multi_modal_projector.*``, ``lm_head.weight``; (c) as (b) without ``vision_model.``;
    (d) transformers 5.x ``save_pretrained``: ``language_model.model.*``, ``vision_tower.embeddings...``.
    """
    from .loading import CheckpointError

    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state.items():
        k = _OUTER_MODEL.sub("", key)
        if k.startswith("vision_tower.vision_model."):
            k = "vision_tower." + k.removeprefix("vision_tower.vision_model.")
        if k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("language_model.") and not k.startswith(("language_model.model.",
                                                                   "language_model.lm_head.")):
            k = "language_model.model." + k.removeprefix("language_model.")
        if k in renamed:
            raise CheckpointError(f"checkpoint keys {origin[k]!r} and {key!r} both name {k!r} "
                                  "(a mix of key layouts); keep one copy")
        renamed[k], origin[k] = tensor, key
    return renamed
