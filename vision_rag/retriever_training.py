"""Fine-tuning a ColPali retriever on (query, page) pairs, with colpali-engine's losses.

Scores are MaxSim (``s(q, d) = sum_i max_j <q_i, d_j>``) between the queries and pages of a batch; with
``S`` the ``(B, B)`` score matrix of a batch of pairs (query ``i`` belongs with page ``i``):

- ``pairwise`` (the ColPali paper's loss, colpali-engine's ``ColbertPairwiseCELoss``):
  ``mean_i softplus(max_{j != i} S_ij - S_ii)``, the hardest in-batch negative against the positive.
- ``hard-negative`` (``ColbertPairwiseNegativeCELoss(in_batch_term=True)``): each pair brings its own
  negative page ``n_i``; ``(mean_i softplus(s(q_i, n_i) - S_ii) + pairwise) / 2``.
- ``cross-entropy`` (``ColbertLoss``): ``cross_entropy(S' / temperature, diagonal)`` with ``S'`` the scores
  divided by each query's number of (non-padding) tokens when ``normalize_scores``.

Trainable parts as in the paper: LoRA on the language model's linear layers (q, k, v, o, gate, up, down),
the vision tower frozen, and the 128-dim projection trained (in full by default, as a PEFT
``modules_to_save``; ``projection="lora"`` adapts it with LoRA as vidore's published adapters do).
The result is a PEFT adapter directory over the base checkpoint, with colpali-engine's module names, that
loads with ``ColPaliEmbedder.load(base, adapter=out_dir)``.

Pairs files are JSON lines: ``{"query": "...", "image": "page.png"}`` with optional ``"page"`` (1-based,
for a PDF) and ``"negative"`` / ``"negative_page"``; paths are relative to the pairs file. Bad rows
(missing fields, missing or unreadable files) are counted and skipped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel

from models.lora import LoraSettings, add_lora, merge_lora_modules, save_adapter
from models.train import TrainResult, TrainSettings, train

from .colpali import ColPaliEmbedder, ColPaliSettings
from .ingest import PDF_SUFFIXES, BadFileError, read_page
from .scoring import maxsim

__all__ = ["maxsim_scores", "pairwise_softplus_loss", "hard_negative_loss", "in_batch_cross_entropy_loss",
           "RetrievalPair", "PairsReport", "read_pairs", "RetrievalBatches", "train_retriever",
           "RetrieverTrainResult", "retrieval_recall", "RetrieverTrainingError", "LM_TARGETS", "LOSSES"]

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTION = "custom_text_proj"
LOSSES = ("pairwise", "hard-negative", "cross-entropy")
_MAX_LISTED = 20


class RetrieverTrainingError(ValueError):
    """Pairs or settings that cannot be trained on; the message says which and why."""


# -- losses ---------------------------------------------------------------------------------------------------
def maxsim_scores(queries: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Differentiable ``(B, C)`` MaxSim of padded ``(B, Nq, D)`` queries against ``(C, Np, D)`` pages (padding
    vectors are zeros, as :class:`~vision_rag.colpali.ColPali` returns them)."""
    return torch.einsum("bnd,csd->bcns", queries, pages).amax(dim=3).sum(dim=2)


def _paired_scores(queries: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``(B,)`` MaxSim of query ``i`` with page ``i`` only."""
    return torch.einsum("bnd,bsd->bns", queries, pages).amax(dim=2).sum(dim=1)


def _check_batch(queries: torch.Tensor, pages: torch.Tensor) -> None:
    if queries.dim() != 3 or pages.dim() != 3 or queries.shape[0] != pages.shape[0] or queries.shape[2] != pages.shape[2]:
        raise RetrieverTrainingError(f"queries (B, Nq, D) and pages (B, Np, D) expected, got {tuple(queries.shape)} "
                                     f"and {tuple(pages.shape)}")


def pairwise_softplus_loss(queries: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """The paper's in-batch loss: ``mean_i softplus(max_{j != i} S_ij - S_ii)``."""
    _check_batch(queries, pages)
    scores = maxsim_scores(queries, pages)
    positive = scores.diagonal()
    # colpali-engine masks the positive out of the max by subtracting 1e6 from the diagonal.
    hardest = (scores - torch.eye(scores.shape[0], device=scores.device, dtype=scores.dtype) * 1e6).amax(dim=1)
    return F.softplus(hardest - positive).mean()


def hard_negative_loss(queries: torch.Tensor, pages: torch.Tensor, negatives: torch.Tensor, *,
                       in_batch_term: bool = True) -> torch.Tensor:
    """``(mean_i softplus(s(q_i, n_i) - s(q_i, d_i)) [+ pairwise in-batch loss]) / 2`` (colpali-engine halves
    it with or without the in-batch term)."""
    _check_batch(queries, pages)
    _check_batch(queries, negatives)
    loss = F.softplus(_paired_scores(queries, negatives) - _paired_scores(queries, pages)).mean()
    if in_batch_term:
        loss = loss + pairwise_softplus_loss(queries, pages)
    return loss / 2


def in_batch_cross_entropy_loss(queries: torch.Tensor, pages: torch.Tensor, *, temperature: float = 0.02,
                                normalize_scores: bool = True) -> torch.Tensor:
    """InfoNCE over the batch: ``cross_entropy(S / temperature, diagonal)``, ``S`` divided by each query's
    number of non-padding tokens first when ``normalize_scores``."""
    _check_batch(queries, pages)
    scores = maxsim_scores(queries, pages)
    if normalize_scores:
        lengths = (queries.abs().sum(dim=-1) != 0).sum(dim=1).clamp(min=1)
        scores = scores / lengths[:, None]
    return F.cross_entropy(scores / temperature, torch.arange(scores.shape[0], device=scores.device))


# -- data -----------------------------------------------------------------------------------------------------
class PageRef(NamedTuple):
    path: Path
    page: int | None = None  # 0-based page of a PDF

    def load(self) -> Image.Image:
        if self.path.suffix.lower() in PDF_SUFFIXES:
            return read_page(self.path, self.page or 0)
        with Image.open(self.path) as image:
            return image.convert("RGB")


class RetrievalPair(NamedTuple):
    query: str
    page: PageRef
    negative: PageRef | None = None


class PairsReport(BaseModel):
    source: str
    rows: int
    used: int
    skipped: int
    reasons: dict[str, int]
    problems: list[dict]  # {"row", "reason"} of the first skipped rows


class _BadPair(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def _page_ref(row: dict, base: Path, field: str, page_field: str) -> PageRef:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise _BadPair(f"missing {field}", f"missing or empty field {field!r}")
    path = (base / value).expanduser() if not Path(value).is_absolute() else Path(value)
    if not path.is_file():
        raise _BadPair("missing file", f"{field} {path}: no such file")
    page = row.get(page_field)
    if page is not None and (not isinstance(page, int) or page < 1):
        raise _BadPair(f"bad {page_field}", f"{page_field} must be a page number >= 1, got {page!r}")
    ref = PageRef(path, None if page is None else page - 1)
    try:
        if path.suffix.lower() not in PDF_SUFFIXES:
            with Image.open(path) as image:
                image.verify()
        else:
            ref.load()
    except (OSError, SyntaxError, BadFileError) as e:  # PIL raises SyntaxError for some broken files
        raise _BadPair("unreadable file", f"{field} {path}: unreadable ({e})") from None
    return ref


def read_pairs(path: str | os.PathLike) -> tuple[list[RetrievalPair], PairsReport]:
    """The usable pairs of a JSON-lines pairs file and a report of the skipped rows."""
    path = Path(path)
    if not path.is_file():
        raise RetrieverTrainingError(f"{path}: no such pairs file")
    pairs: list[RetrievalPair] = []
    reasons: Counter[str] = Counter()
    problems: list[dict] = []
    rows = 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _BadPair("invalid JSON", f"invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise _BadPair("not an object", "a row must be a JSON object")
                query = row.get("query")
                if not isinstance(query, str) or not query.strip():
                    raise _BadPair("missing query", "missing or empty field 'query'")
                page = _page_ref(row, path.parent, "image", "page")
                negative = _page_ref(row, path.parent, "negative", "negative_page") if "negative" in row else None
            except _BadPair as e:
                reasons[e.kind] += 1
                if len(problems) < _MAX_LISTED:
                    problems.append({"row": number, "reason": str(e)})
                continue
            pairs.append(RetrievalPair(query, page, negative))
    report = PairsReport(source=str(path), rows=rows, used=len(pairs), skipped=rows - len(pairs),
                         reasons=dict(reasons), problems=problems)
    if not pairs:
        raise RetrieverTrainingError(f"{path}: no usable pair ({rows} rows; skipped: {dict(reasons)})")
    return pairs, report


class RetrievalBatches:
    """Shuffled micro-batches of pairs for :func:`models.train.train` (weight 1 each: the losses are means)."""

    def __init__(self, pairs: Sequence[RetrievalPair], batch_size: int, embedder: ColPaliEmbedder, *,
                 shuffle: bool = True):
        self.pairs, self.batch_size, self.embedder, self.shuffle = list(pairs), batch_size, embedder, shuffle
        self._page_tokens = len(embedder.page_input_ids())

    def __len__(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def epoch(self, index: int, seed: int) -> list[list[RetrievalPair]]:
        order = list(range(len(self.pairs)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed * 1_000_003 + index)).tolist()
        return [[self.pairs[i] for i in order[s:s + self.batch_size]] for s in range(0, len(order), self.batch_size)]

    def weight(self, batch: list[RetrievalPair]) -> float:
        return 1.0

    def tokens(self, batch: list[RetrievalPair]) -> int:
        pages = len(batch) * (1 + any(p.negative is not None for p in batch))
        return pages * self._page_tokens + sum(len(self.embedder.query_input_ids(p.query)) for p in batch)


def _loss_function(embedder: ColPaliEmbedder, loss: str, temperature: float):
    def embed_pages(model, refs):
        return model(**embedder.page_batch([r.load() for r in refs]))

    def loss_fn(model, batch: list[RetrievalPair]) -> torch.Tensor:
        queries = model(**embedder.query_batch([p.query for p in batch]))
        pages = embed_pages(model, [p.page for p in batch])
        if loss == "pairwise":
            return pairwise_softplus_loss(queries, pages)
        if loss == "cross-entropy":
            return in_batch_cross_entropy_loss(queries, pages, temperature=temperature)
        return hard_negative_loss(queries, pages, embed_pages(model, [p.negative for p in batch]))

    return loss_fn


def retrieval_recall(embedder: ColPaliEmbedder, pairs: Sequence[RetrievalPair], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of each pair's query against every distinct page of ``pairs`` (exact MaxSim)."""
    refs = list(dict.fromkeys(p.page for p in pairs))
    position = {r: i for i, r in enumerate(refs)}
    pages = embedder.embed_pages([r.load() for r in refs], progress=False)
    queries = embedder.embed_queries([p.query for p in pairs], progress=False)
    scores = maxsim(queries, pages)
    target = torch.tensor([position[p.page] for p in pairs])
    rank = (scores > scores[torch.arange(len(pairs)), target][:, None]).sum(dim=1)  # pages scoring higher
    return {f"recall@{k}": float((rank < k).float().mean()) for k in ks}


class RetrieverTrainResult(BaseModel):
    out_dir: str
    pairs: PairsReport
    eval_pairs: PairsReport | None = None
    recall_before: dict[str, float] | None = None
    recall_after: dict[str, float] | None = None
    lora_modules: int
    trainable_parameters: int
    training: TrainResult


def train_retriever(base: str | os.PathLike, pairs: str | os.PathLike, out_dir: str | os.PathLike, *,
                    loss: Literal["pairwise", "hard-negative", "cross-entropy"] = "pairwise",
                    lora: LoraSettings | None = None, projection: Literal["full", "lora"] = "full",
                    train_settings: TrainSettings | None = None, batch_size: int = 8,
                    eval_pairs: str | os.PathLike | None = None, temperature: float = 0.02,
                    settings: ColPaliSettings | None = None, dtype=None, device="cpu", recall: bool = True,
                    resume: bool = False, embedder: ColPaliEmbedder | None = None) -> RetrieverTrainResult:
    """Fine-tune the ColPali checkpoint ``base`` on the pairs file (see the module docstring); the adapter
    and logs go to ``out_dir``. ``lora`` defaults to the paper's r = alpha = 32, dropout 0.1 on the
    language model; its ``targets`` and ``trainable`` are set from ``projection``. ``recall``: measure
    recall@1/5 on the evaluation pairs (or the training pairs) before and after training. ``embedder``
    (already loaded from ``base``) skips loading it again; it ends up holding the trained model (LoRA merged)."""
    if loss not in LOSSES:
        raise RetrieverTrainingError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if projection not in ("full", "lora"):
        raise RetrieverTrainingError(f"projection must be 'full' or 'lora', got {projection!r}")
    if batch_size < 2 and loss != "hard-negative":
        raise RetrieverTrainingError(f"the {loss} loss compares the pairs of a batch: batch_size must be >= 2")
    train_pairs, report = read_pairs(pairs)
    if loss == "hard-negative" and any(p.negative is None for p in train_pairs):
        raise RetrieverTrainingError(f"{pairs}: the hard-negative loss needs a 'negative' page on every row")
    eval_report, held_out = None, None
    if eval_pairs is not None:
        held_out, eval_report = read_pairs(eval_pairs)
    settings_ = train_settings or TrainSettings(learning_rate=5e-5)
    embedder = embedder or ColPaliEmbedder.load(base, dtype=dtype, device=device, settings=settings)
    model = embedder.model
    lora = (lora or LoraSettings(r=32, alpha=32, dropout=0.1)).model_copy()
    if projection == "full":
        lora.targets, lora.trainable = LM_TARGETS, [PROJECTION]
    else:
        lora.targets, lora.trainable = rf"({LM_TARGETS}|{PROJECTION})", []
    recall_pairs = held_out or train_pairs
    recall_before = retrieval_recall(embedder, recall_pairs) if recall else None
    names = add_lora(model, lora, seed=settings_.seed)
    batches = RetrievalBatches(train_pairs, batch_size, embedder)
    eval_batches = RetrievalBatches(held_out, batch_size, embedder, shuffle=False).epoch(0, 0) if held_out else None
    base_dir = str(Path(base).expanduser().resolve())

    def export(m, directory: Path) -> None:
        save_adapter(m, directory, base_model=base_dir, task_type="FEATURE_EXTRACTION")

    result = train(model, batches, _loss_function(embedder, loss, temperature), out_dir, settings_,
                   eval_data=eval_batches, export=export, resume=resume)
    # The embedder now holds the trained model, merged as ColPaliEmbedder.load(base, adapter) merges it, and
    # its model id (what an index records) is computed afresh.
    merge_lora_modules(model)
    embedder.weights_changed()
    recall_after = retrieval_recall(embedder, recall_pairs) if recall else None
    return RetrieverTrainResult(out_dir=str(out_dir), pairs=report, eval_pairs=eval_report,
                                recall_before=recall_before, recall_after=recall_after, lora_modules=len(names),
                                trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                                training=result)
