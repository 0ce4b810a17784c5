"""ColPali: multi-vector page and query embeddings from a PaliGemma backbone.

    tokens -> PaliGemma (SigLIP + Gemma, fully bidirectional attention) -> final RMSNorm
           -> Linear(hidden -> 128) -> L2-normalise each token vector -> zero the padding

Every non-padding token keeps its vector: a page is its ``N`` image patches followed by the prompt
tokens, a query all of its tokens including the 10 "augmentation" pads. Input layouts are those the
v1.x checkpoints were trained with (:class:`ColPaliSettings`)::

    page:  <image> x N  <bos>  Describe the image.  \\n          (N = (image_size / patch)^2; 1030 tokens at 448 px)
    query: <bos>  Question: {query}  <pad> x 10  \\n             (right-padded in a batch; batch padding has mask 0)

Checkpoints load from three sources: a merged checkpoint as colpali-engine saves it (``model.*`` +
``custom_text_proj``, a PaliGemma ``config.json``), one as transformers' ``ColPaliForRetrieval`` saves it
(``vlm.*`` + ``embedding_proj_layer``, a ``colpali`` config.json with ``vlm_config``), and a base
checkpoint plus a PEFT LoRA adapter directory, merged into the weights at load time
(:mod:`models.lora`).

:attr:`ColPaliEmbedder.model_id` fingerprints the weights (after merging) and the input settings, so an
index can refuse vectors from a different model.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.image import ImageProcessing, ImageSource, preprocess
from models.loading import CheckpointError, assign_weights, read_hf_config, read_safetensors, resolve_dtype
from models.lora import is_adapter_dir, merge_lora, read_adapter
from models.paligemma import PaliGemma, PaliGemmaConfig, normalize_checkpoint_keys
from models.tokenizer import GemmaTokenizer, load_tokenizer

__all__ = ["ColPaliError", "ColPaliSettings", "ColPali", "ColPaliEmbedder", "load_colpali", "EmbedderRecord",
           "write_embedder_record", "read_embedder_record",
           "normalize_colpali_keys", "EMBEDDING_DIM"]

EMBEDDING_DIM = 128  # every published ColPali projects to 128 dimensions


class ColPaliError(ValueError):
    """A ColPali checkpoint, tokenizer or input that cannot be used; the message says which and why."""


class ColPaliSettings(BaseModel):
    """How pages and queries are turned into tokens. The defaults are the layout the v1.x checkpoints
    (vidore/colpali-v1.1 .. v1.3) were trained with; change them only for checkpoints trained otherwise."""

    model_config = ConfigDict(extra="forbid")

    page_prompt: str = "Describe the image."  # text after the image tokens and <bos>
    # Recent colpali-engine / transformers processors write "<image><bos>Describe the image." and the
    # PaliGemma processor inserts another <bos> after the image tokens: N + 2 + prompt + 1 tokens (1031).
    page_double_bos: bool = False
    query_prefix: str = "Question: "  # later engine versions use "Query: ", then ""
    query_suffix: str = "\n"
    query_augmentation_tokens: int = Field(10, ge=0)  # appended pads with attention mask 1
    query_augmentation_token: str = "<pad>"


class ColPali(nn.Module):
    """PaliGemma stopped at the final norm, plus the 128-dim projection. Module names follow
    colpali-engine: ``model.*`` (a :class:`~models.paligemma.PaliGemma`) and ``custom_text_proj``."""

    def __init__(self, config: PaliGemmaConfig, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        self.config = config
        self.embedding_dim = embedding_dim
        self.model = PaliGemma(config)
        self.custom_text_proj = nn.Linear(config.text.hidden_size, embedding_dim, bias=True)

    @property
    def device(self) -> torch.device:
        return self.custom_text_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.custom_text_proj.weight.dtype

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``(batch, seq, dim)``: unit vectors, exact zeros where ``attention_mask`` is 0."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.model.hidden_states(input_ids, pixel_values, attention_mask=attention_mask, causal=False)
        embeddings = self.custom_text_proj(hidden)
        # Normalised in fp32 so bf16/fp16 models keep unit vectors to their storage precision.
        embeddings = embeddings.float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return embeddings * attention_mask[..., None].to(embeddings.dtype)


# -- checkpoints ----------------------------------------------------------------------------------------------
_PROJECTION = ("custom_text_proj.", "embedding_proj_layer.")  # colpali-engine, transformers
_BACKBONE = ("model.", "vlm.")
_LM_HEAD = re.compile(r"^model\.language_model\.lm_head\.weight$")  # tied to the embeddings; never needed


def normalize_colpali_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename colpali-engine (``model.*`` + ``custom_text_proj``) and transformers (``vlm.*`` +
    ``embedding_proj_layer``) checkpoint keys to :class:`ColPali`'s; the backbone keys may be in any of
    the PaliGemma layouts :func:`models.paligemma.normalize_checkpoint_keys` knows."""
    backbone: dict[str, torch.Tensor] = {}
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(_PROJECTION):
            renamed["custom_text_proj." + key.split(".", 1)[1]] = tensor
        elif key.startswith(_BACKBONE):
            backbone[key.split(".", 1)[1]] = tensor
        else:
            raise CheckpointError(f"checkpoint key {key!r} is neither backbone (model.* / vlm.*) nor projection "
                                  "(custom_text_proj / embedding_proj_layer); is this a ColPali checkpoint?")
    for key, tensor in normalize_checkpoint_keys(backbone).items():
        renamed["model." + key] = tensor
    return renamed


def _rename_one(key: str) -> str:
    return next(iter(normalize_colpali_keys({key: torch.empty(0)})))


def read_colpali_config(directory: Path) -> tuple[PaliGemmaConfig, dict]:
    """The backbone config from a ``colpali`` config.json (``vlm_config``) or a PaliGemma one."""
    raw = read_hf_config(directory)
    vlm = raw.get("vlm_config") if raw.get("model_type") == "colpali" else raw
    if not isinstance(vlm, dict) or vlm.get("model_type", "paligemma") != "paligemma":
        raise CheckpointError(f"{directory / 'config.json'}: model_type {raw.get('model_type')!r}; expected a "
                              "ColPali checkpoint (model_type colpali with a PaliGemma vlm_config, or paligemma)")
    try:
        return PaliGemmaConfig.from_hf(vlm), raw
    except ValueError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None


def _fingerprint(config: PaliGemmaConfig, embedding_dim: int, state: dict[str, torch.Tensor],
                 settings: ColPaliSettings) -> str:
    """Name + hash of the (normalised) config, the input settings and a sample of every tensor's values
    in its stored dtype: the same weights give the same id in either key layout, on any device or
    dtype; different (or differently merged) weights give a different one."""
    digest = hashlib.sha256()
    digest.update(repr(config).encode())
    digest.update(f"dim={embedding_dim}".encode())
    digest.update(settings.model_dump_json().encode())
    for key in sorted(state):
        tensor = state[key].detach()
        flat = tensor.reshape(-1)
        sample = torch.cat([flat[:512], flat[-512:]]) if flat.numel() > 1024 else flat
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    text = config.text
    name = f"colpali-{text.architecture}-{text.num_hidden_layers}L{text.hidden_size}-{config.image_size}px"
    return f"{name}@{digest.hexdigest()[:16]}"


def _resolve_sources(source: str | os.PathLike, adapter: str | os.PathLike | None) -> tuple[Path, Path | None]:
    path = Path(os.fspath(source)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such ColPali checkpoint directory (config.json + *.safetensors, "
                                "or a PEFT adapter directory)")
    if adapter is None and is_adapter_dir(path) and not (path / "config.json").is_file():
        # An adapter directory alone: its base must be a local directory named in adapter_config.json.
        base = read_adapter(path).config.base_model_name_or_path
        if not base or not Path(base).expanduser().is_dir():
            raise CheckpointError(f"{path} is a LoRA adapter whose base model {base!r} is not a local directory; "
                                  "pass the base checkpoint as the model and this directory as the adapter")
        return Path(base).expanduser(), path
    return path, Path(os.fspath(adapter)).expanduser() if adapter is not None else None


def load_colpali(source: str | os.PathLike, adapter: str | os.PathLike | None = None, *, dtype=None,
                 device="cpu", settings: ColPaliSettings | None = None) -> tuple[ColPali, str]:
    """Build :class:`ColPali` from a checkpoint directory (optionally + a LoRA adapter directory merged
    at load time). Returns the model (eval mode) and its :func:`model id <_fingerprint>`."""
    base, adapter_dir = _resolve_sources(source, adapter)
    config, _ = read_colpali_config(base)
    state = read_safetensors(base)
    state = {k: v for k, v in normalize_colpali_keys(state).items() if not _LM_HEAD.match(k)}
    if adapter_dir is not None:
        state = merge_lora(state, read_adapter(adapter_dir), rename=_rename_one)
    projection = state.get("custom_text_proj.weight")
    if projection is None:
        raise CheckpointError(f"{base}: no projection weights (custom_text_proj / embedding_proj_layer); this is a "
                              "plain PaliGemma checkpoint, not a ColPali one")
    embedding_dim = int(projection.shape[0])
    with torch.device("meta"):
        model = ColPali(config, embedding_dim)
    dtype = resolve_dtype(dtype, device)
    assign_weights(model, state, dtype=dtype, device=device, source=str(base))
    model_id = _fingerprint(config, embedding_dim, state, settings or ColPaliSettings())
    return model.eval(), model_id


# -- the embedder -------------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    # enabled=None: shown on a terminal only.
    return tqdm(total=total, desc=desc, unit="page" if desc == "pages" else "query", file=sys.stderr,
                disable=None if enabled is None else not enabled, leave=False)


class ColPaliEmbedder:
    """Page and query embeddings. ``ColPaliEmbedder.load(source, adapter=None, dtype=None, device="cpu")``
    or ``ColPaliEmbedder(model, tokenizer, settings)``.

    :meth:`embed_pages` and :meth:`embed_queries` return one ``(n_tokens, dim)`` float32 CPU tensor per
    input, holding only its real (mask 1) tokens. For a page the first :attr:`num_image_tokens` rows
    are the image patches in row-major order over :attr:`patch_grid`.
    """

    def __init__(self, model: ColPali, tokenizer: GemmaTokenizer, settings: ColPaliSettings | None = None, *,
                 image_processing: ImageProcessing | None = None, model_id: str | None = None,
                 source: str | None = None, adapter: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings or ColPaliSettings()
        config = model.config
        self.image_processing = image_processing or ImageProcessing.square(config.image_size)
        if (self.image_processing.height, self.image_processing.width) != (config.image_size, config.image_size):
            raise ColPaliError(f"image processing resizes to {self.image_processing.width}x"
                               f"{self.image_processing.height} but the model takes {config.image_size}px squares")
        self.source, self.adapter = source, adapter
        self.progress: bool | None = None  # default of embed_*(progress=): None shows a bar on a terminal only
        self._model_id = model_id
        image_id = tokenizer.token_to_id("<image>")
        if image_id != config.image_token_id:
            raise ColPaliError(f"the tokenizer's <image> id is {image_id}, the model's image_token_id "
                               f"{config.image_token_id}; use the tokenizer that belongs to the checkpoint")
        self._augmentation_id = tokenizer.token_to_id(self.settings.query_augmentation_token)
        if self._augmentation_id is None:
            raise ColPaliError(f"the tokenizer has no query augmentation token "
                               f"{self.settings.query_augmentation_token!r}")

    @classmethod
    def load(cls, source: str | os.PathLike, adapter: str | os.PathLike | None = None, dtype=None, device="cpu", *,
             settings: ColPaliSettings | None = None, tokenizer: str | os.PathLike | None = None) -> ColPaliEmbedder:
        """From a merged ColPali checkpoint directory, or a base checkpoint + a PEFT LoRA ``adapter``
        directory. ``dtype`` None: fp32 on CPU, bf16 on GPU. The tokenizer is read from ``tokenizer``,
        else the checkpoint directory, else the adapter directory."""
        settings = settings or ColPaliSettings()
        base, adapter_dir = _resolve_sources(source, adapter)
        model, model_id = load_colpali(base, adapter_dir, dtype=dtype, device=device, settings=settings)
        candidates = [Path(tokenizer)] if tokenizer is not None else [base] + ([adapter_dir] if adapter_dir else [])
        tokenizer_source = next((c for c in candidates if c.is_file() or (c.is_dir() and any(
            (c / n).is_file() for n in ("tokenizer.json", "tokenizer.model")))), None)
        if tokenizer_source is None:
            raise ColPaliError(f"no tokenizer.json or tokenizer.model in {', '.join(map(str, candidates))}; "
                               "pass tokenizer= (the PaliGemma tokenizer)")
        processing = ImageProcessing.from_pretrained(base, default_size=model.config.image_size)
        return cls(model, load_tokenizer(tokenizer_source), settings, image_processing=processing, model_id=model_id,
                   source=str(base.resolve()), adapter=str(adapter_dir.resolve()) if adapter_dir else None)

    # -- facts about the model ----------------------------------------------------------------------------
    def weights_changed(self) -> None:
        """Forget the cached :attr:`model_id` after the model's weights changed in place (training)."""
        self._model_id = None

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = _fingerprint(self.model.config, self.model.embedding_dim, self.model.state_dict(),
                                          self.settings)
        return self._model_id

    @property
    def dim(self) -> int:
        return self.model.embedding_dim

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.num_image_tokens

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of image patches; page token ``i < num_image_tokens`` is patch (i // cols, i % cols)."""
        side = self.model.config.vision.image_size // self.model.config.vision.patch_size
        return side, side

    # -- inputs ---------------------------------------------------------------------------------------------
    def page_input_ids(self) -> list[int]:
        """The token ids of every page (the image tokens are filled with its patches)."""
        s, tok = self.settings, self.tokenizer
        bos = [tok.bos_id, tok.bos_id] if s.page_double_bos else [tok.bos_id]
        return [self.model.config.image_token_id] * self.num_image_tokens + bos + tok.encode(s.page_prompt + "\n",
                                                                                              add_bos=False)

    def query_input_ids(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ColPaliError(f"a query must be a non-empty string, got {text!r}")
        s, tok = self.settings, self.tokenizer
        return ([tok.bos_id] + tok.encode(s.query_prefix + text, add_bos=False)
                + [self._augmentation_id] * s.query_augmentation_tokens + tok.encode(s.query_suffix, add_bos=False))

    def query_tokens(self, text: str) -> list[str]:
        """Readable labels of a query's tokens (for similarity maps), one per query vector."""
        pieces = [self.tokenizer.id_to_token(i) or "?" for i in self.query_input_ids(text)]
        return [p.replace("\u2581", " ").replace("\n", "\\n") for p in pieces]

    def query_text_span(self, text: str) -> range:
        """Positions of the query's own words among its tokens (after <bos> and the prefix, before the
        augmentation pads): the tokens a similarity map is usually shown for."""
        prefix = self.tokenizer.encode(self.settings.query_prefix, add_bos=False)
        full = self.tokenizer.encode(self.settings.query_prefix + text, add_bos=False)
        shared = 0  # the prefix's last piece may merge with the first word ("Question: " + "red" -> "▁red")
        while shared < min(len(prefix), len(full)) and prefix[shared] == full[shared]:
            shared += 1
        if shared == len(full):
            shared -= 1
        return range(1 + shared, 1 + len(full))

    def page_batch(self, images: Sequence[ImageSource]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``pixel_values`` and ``attention_mask`` for a batch of page images."""
        pixel_values = preprocess(list(images), self.image_processing)
        ids = torch.tensor([self.page_input_ids()] * len(images), dtype=torch.long)
        return dict(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids))

    def query_batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, right-padded with the pad token (mask 0)."""
        rows = [self.query_input_ids(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return dict(input_ids=ids, attention_mask=mask)

    # -- embedding -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _embed(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = self.model(**batch)
        lengths = batch["attention_mask"].sum(-1).tolist()
        return [row[:n].to("cpu", torch.float32) for row, n in zip(out, lengths, strict=True)]

    def embed_pages(self, images: Iterable[ImageSource], batch_size: int = 4, *,
                    progress: bool | None = None) -> list[torch.Tensor]:
        """One ``(num_image_tokens + prompt tokens, dim)`` tensor per page image (path, bytes or PIL image)."""
        return self._batched(list(images), batch_size, self.page_batch, "pages", progress)

    def embed_queries(self, texts: Iterable[str] | str, batch_size: int = 32, *,
                      progress: bool | None = None) -> list[torch.Tensor]:
        """One ``(query tokens incl. augmentation pads, dim)`` tensor per query."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._batched(texts, batch_size, self.query_batch, "queries", progress)

    def _batched(self, items: list, batch_size: int, make_batch: Callable, desc: str, progress) -> list[torch.Tensor]:
        if batch_size < 1:
            raise ColPaliError(f"batch_size must be >= 1, got {batch_size}")
        progress = self.progress if progress is None else progress
        out: list[torch.Tensor] = []
        with _progress(len(items), desc, progress) as bar:
            for start in range(0, len(items), batch_size):
                part = items[start:start + batch_size]
                out.extend(self._embed(make_batch(part)))
                bar.update(len(part))
        return out

    def __repr__(self) -> str:
        return f"ColPaliEmbedder(model_id={self.model_id!r}, dim={self.dim}, image_tokens={self.num_image_tokens})"


# -- what the CLI remembers about the model that built an index --------------------------------------------------
class EmbedderRecord(BaseModel):
    """Written beside an index (``embedder.json``) so ``search`` / ``explain`` can load the same model."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    source: str
    adapter: str | None = None
    settings: ColPaliSettings = Field(default_factory=ColPaliSettings)


EMBEDDER_RECORD = "embedder.json"


def write_embedder_record(index_dir: str | os.PathLike, embedder: ColPaliEmbedder) -> None:
    """Record (atomically) which checkpoint built the index in ``index_dir``."""
    if embedder.source is None:
        raise ColPaliError("this embedder was not loaded from a checkpoint directory; nothing to record")
    record = EmbedderRecord(model_id=embedder.model_id, source=embedder.source, adapter=embedder.adapter,
                            settings=embedder.settings)
    path = Path(index_dir) / EMBEDDER_RECORD
    tmp = path.with_name(f".{EMBEDDER_RECORD}.{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, path)


def read_embedder_record(index_dir: str | os.PathLike) -> EmbedderRecord | None:
    path = Path(index_dir) / EMBEDDER_RECORD
    if not path.is_file():
        return None
    try:
        return EmbedderRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ColPaliError(f"{path}: unreadable embedder record ({e}); pass --model") from None


