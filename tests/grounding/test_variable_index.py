"""Hybrid variable search on a small catalogue with the real all-MiniLM-L6-v2.

Expected values are computed independently in the tests: cosines from the embedder's own vectors
(numpy), the lexical share from hand-counted words and the catalogue's document frequencies, and the
score from the documented formula. Retrieval is checked on paraphrases none of which copies a
variable's name.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading

import numpy as np
import pytest

from grounding.variable_index import (
    RERANK_FEATURES,
    FusionWeights,
    Reranker,
    SearchModel,
    StaleIndexError,
    VariableCandidate,
    VariableDoc,
    VariableIndex,
    VariableIndexError,
    dcid_words,
)
from models.sentence_embedder import SentenceEmbedder

CATALOGUE = [
    VariableDoc(dcid="Count_Person", name="Total Population", description="Number of people living in a place"),
    VariableDoc(dcid="LifeExpectancy_Person", name="Life Expectancy", description="Years a newborn is expected to live"),
    VariableDoc(dcid="Median_Age_Person", name="Median Age of Population"),
    VariableDoc(dcid="UnemploymentRate_Person", name="Unemployment Rate", aliases=["jobless rate"]),
    VariableDoc(dcid="Count_Person_BelowPovertyLevelInThePast12Months", name="Population Below Poverty Line"),
    VariableDoc(dcid="Annual_Emissions_CarbonDioxide", name="Annual Carbon Dioxide Emissions", tags=["climate"]),
    VariableDoc(dcid="Annual_Emissions_Methane", name="Annual Methane Emissions", tags=["climate"]),
    VariableDoc(dcid="Annual_Consumption_Coal", name="Yearly Coal Consumption"),
    VariableDoc(dcid="Amount_EconomicActivity_GrossDomesticProduction_Nominal_PerCapita", name="GDP Per Capita"),
    VariableDoc(dcid="Count_Death_Infant", name="Infant Deaths"),
    VariableDoc(dcid="Percent_Person_WithDiabetes", name="Prevalence of Diabetes"),
    VariableDoc(dcid="Percent_Person_Obesity", name="Obesity Prevalence Among Adults"),
    VariableDoc(dcid="Count_Household_WithInternet", name="Households With Internet Access"),
    VariableDoc(dcid="Median_Income_Household", name="Median Household Income"),
    VariableDoc(dcid="Count_Student_PrimaryEducation", name="Students in Primary School"),
    VariableDoc(dcid="Mean_Rainfall", name="Average Rainfall"),
    VariableDoc(dcid="dc/7w0e0p0dzj82g", name="Wages of Textile Mill Workers"),
    VariableDoc(dcid="Count_Farm_Cattle", name="Number of Cattle Farms"),
]

PARAPHRASES = {
    "how many people live there": "Count_Person",
    "how long do people live on average": "LifeExpectancy_Person",
    "the jobless rate": "UnemploymentRate_Person",
    "people living in poverty": "Count_Person_BelowPovertyLevelInThePast12Months",
    "co2 emitted each year": "Annual_Emissions_CarbonDioxide",
    "how much coal is burned annually": "Annual_Consumption_Coal",
    "economic output per person": "Amount_EconomicActivity_GrossDomesticProduction_Nominal_PerCapita",
    "babies who die before their first birthday": "Count_Death_Infant",
    "share of adults who are obese": "Percent_Person_Obesity",
    "homes connected to the internet": "Count_Household_WithInternet",
    "typical household earnings": "Median_Income_Household",
    "children enrolled in elementary school": "Count_Student_PrimaryEducation",
    "pay of people working in textile mills": "dc/7w0e0p0dzj82g",
}


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder.load()


@pytest.fixture(scope="module")
def index(embedder):
    """What users get: the shipped search model (adapter trained for all-MiniLM-L6-v2)."""
    return VariableIndex.build(CATALOGUE, embedder=embedder)


@pytest.fixture(scope="module")
def plain(embedder, index):
    """No adapter, so features can be recomputed from the embedder's raw vectors."""
    return VariableIndex(index.docs, index.view_vectors, index.view_owner, embedder, search_model=SearchModel())


def test_paraphrases_find_their_variable_first(index):
    for query, dcid in PARAPHRASES.items():
        found = index.search(query, k=3)
        assert found[0].dcid == dcid, (query, [c.dcid for c in found])
        assert all(isinstance(c, VariableCandidate) for c in found)
        assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)


def test_scores_are_the_documented_fusion_of_independent_features(plain, embedder):
    index = plain
    query = "annual methane emissions from farms"
    found = {c.dcid: c for c in index.search(query, k=len(CATALOGUE))}
    qvec = embedder.encode([query])[0]
    # Dense: the cosine of the closest view (name, description, aliases, dcid words).
    doc = next(d for d in CATALOGUE if d.dcid == "Annual_Emissions_Methane")
    views = [doc.name, dcid_words(doc.dcid)]
    expected_dense = max(float(v @ qvec) for v in embedder.encode(views))
    methane = found["Annual_Emissions_Methane"]
    assert methane.dense_score == pytest.approx(expected_dense, abs=1e-4)
    # Lexical: informative query words (stemmed) "annual", "methane", "emission", "farm"; the methane
    # variable's text has the first three. Document frequencies counted by hand over CATALOGUE's text:
    # annual 3 (two emissions + coal consumption via its dcid), methane 1, emission 2, farm 1.
    n = len(CATALOGUE)
    idf = {w: math.log(1 + n / df) for w, df in {"annual": 3, "methane": 1, "emission": 2, "farm": 1}.items()}
    expected_lexical = (idf["annual"] + idf["methane"] + idf["emission"]) / sum(idf.values())
    assert methane.lexical_score == pytest.approx(expected_lexical, abs=1e-4)
    w = index.weights
    z = w.dense * methane.dense_score + w.lexical * methane.lexical_score + w.bias
    assert methane.score == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-3)
    assert "methane" in methane.reason and "Annual Methane Emissions" in methane.reason
    assert max(found.values(), key=lambda c: c.score).dcid == "Annual_Emissions_Methane"


def test_fusion_weights_decide_between_lexical_and_dense(index, embedder):
    # "coal" is one rare word in common with the coal variable; with all the weight on words it wins,
    # with all the weight on meaning the query (about power stations burning fuel) may rank others
    # first. Scores must follow the weights exactly.
    query = "coal"
    def with_weights(weights):
        return VariableIndex(index.docs, index.view_vectors, index.view_owner, embedder, weights=weights)

    lexical_only = with_weights(FusionWeights(dense=0, lexical=10, bias=-5))
    top = lexical_only.search(query, k=2)
    assert top[0].dcid == "Annual_Consumption_Coal" and top[0].lexical_score == 1.0
    assert top[0].score == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-4)
    assert top[1].lexical_score == 0.0 and top[1].score == pytest.approx(1 / (1 + math.exp(5)), abs=1e-4)
    dense_only = with_weights(FusionWeights(dense=10, lexical=0, bias=0))
    ranked = dense_only.search(query, k=len(CATALOGUE))
    assert [c.dense_score for c in ranked] == sorted((c.dense_score for c in ranked), reverse=True)


def test_the_adapter_moves_only_the_query_and_only_for_its_model(index, embedder):
    rng = np.random.default_rng(0)
    down, up = rng.normal(size=(384, 4)).astype(np.float32), rng.normal(size=(4, 384)).astype(np.float32) * 0.2
    model = SearchModel(down=down, up=up, base_fingerprint=embedder.fingerprint, weights=FusionWeights(), threshold=0.3)
    adapted = VariableIndex(index.docs, index.view_vectors, index.view_owner, embedder, search_model=model)
    assert adapted.threshold == 0.3
    query = "babies who die young"
    q = embedder.encode([query])[0]
    q = q + q @ down @ up
    q /= np.linalg.norm(q)
    views = embedder.encode(["Infant Deaths", dcid_words("Count_Death_Infant")])
    found = {c.dcid: c for c in adapted.search(query, k=len(CATALOGUE))}
    assert found["Count_Death_Infant"].dense_score == pytest.approx(float(np.max(views @ q)), abs=1e-4)
    other = SearchModel(down=down, up=up, base_fingerprint="f" * 32)
    unadapted = VariableIndex(index.docs, index.view_vectors, index.view_owner, embedder, search_model=other)
    assert unadapted.search_model.down is None  # trained for another model: not applied


def test_search_model_file_round_trip_and_errors(embedder, tmp_path):
    rng = np.random.default_rng(1)
    model = SearchModel(down=rng.normal(size=(384, 2)).astype(np.float32), up=rng.normal(size=(2, 384)).astype(np.float32),
                        base_fingerprint=embedder.fingerprint, weights=FusionWeights(dense=1.5, lexical=2.5, bias=-3),
                        threshold=0.4, notes="test")
    model.save(tmp_path / "m.safetensors")
    back = SearchModel.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(back.down, model.down)
    np.testing.assert_array_equal(back.up, model.up)
    assert (back.weights, back.threshold, back.base_fingerprint, back.notes) == \
        (model.weights, 0.4, embedder.fingerprint, "test")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VariableIndexError, match="bad.safetensors"):
        SearchModel.load(tmp_path / "bad.safetensors")


def test_abstains_on_questions_about_nothing_in_the_catalogue(index):
    for query in ["who won the football world cup", "recipe for banana bread", "ññññ", "東京の天気"]:
        best = index.best(query)
        assert best is None, (query, index.search(query, k=1))
    assert index.best("unemployment rate").dcid == "UnemploymentRate_Person"
    assert index.search("", k=5) == [] and index.search("   ", k=5) == []
    with pytest.raises(ValueError, match="k must be"):
        index.search("x", k=0)


def test_long_and_odd_queries_do_not_crash(index):
    assert len(index.search("population " * 2500, k=2)) == 2  # 10,000+ characters: truncated by the model
    assert isinstance(index.search('"quoted" OR (fts) syntax* NEAR -x', k=1), list)


def test_save_load_round_trip(index, embedder, tmp_path):
    path = tmp_path / "store.sqlite"
    with sqlite3.connect(path) as db:
        index.save(db)
        index.save(db)  # saving again replaces, never duplicates
    with sqlite3.connect(path) as db:
        loaded = VariableIndex.load(db, embedder=embedder)
        assert db.execute("SELECT count(*) FROM variable_index_docs").fetchone()[0] == len(CATALOGUE)
        # The stored FTS5 index answers plain SQL too.
        hit = db.execute("SELECT d.dcid FROM variable_index_fts f JOIN variable_index_docs d ON d.position = f.rowid "
                         "WHERE variable_index_fts MATCH 'methane'").fetchall()
        assert hit == [("Annual_Emissions_Methane",)]
    assert loaded.docs == index.docs and loaded.threshold == index.threshold and loaded.weights == index.weights
    for query in list(PARAPHRASES)[:4]:
        assert loaded.search(query, k=5) == index.search(query, k=5)


class _OtherModel:
    """The same vectors under another fingerprint: what the store sees when the model setting changes."""

    def __init__(self, inner):
        self.inner, self.fingerprint, self.model_id, self.dim = inner, "0" * 32, "other-model", inner.dim
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return self.inner.encode(texts)


def test_vectors_of_another_model_are_stale(index, embedder, tmp_path):
    path = tmp_path / "store.sqlite"
    with sqlite3.connect(path) as db:
        index.save(db)
    other = _OtherModel(embedder)
    with sqlite3.connect(path) as db, pytest.raises(StaleIndexError, match="other-model"):
        VariableIndex.load(db, embedder=other)
    with sqlite3.connect(path) as db:
        rebuilt = VariableIndex.load(db, embedder=other, rebuild_if_stale=True)
        assert other.calls == 1
        assert db.execute("SELECT value FROM variable_index_meta WHERE key='model_fingerprint'").fetchone()[0] == "0" * 32
        VariableIndex.load(db, embedder=other)  # now current: no second rebuild
    assert other.calls == 1 and rebuilt.search("the jobless rate")[0].dcid == "UnemploymentRate_Person"


def test_missing_or_damaged_index_is_a_clear_error(index, embedder, tmp_path):
    with sqlite3.connect(tmp_path / "empty.sqlite") as db, pytest.raises(VariableIndexError, match="no variable index"):
        VariableIndex.load(db, embedder=embedder)
    path = tmp_path / "store.sqlite"
    with sqlite3.connect(path) as db:
        index.save(db)
        db.execute("UPDATE variable_index_docs SET doc = replace(doc, 'Median', 'Mean') WHERE position = 2")
    with sqlite3.connect(path) as db, pytest.raises(VariableIndexError, match="damaged"):
        VariableIndex.load(db, embedder=embedder)
    with sqlite3.connect(path) as db:
        index.save(db)
        db.execute("UPDATE variable_index_vectors SET vector = x'0000' WHERE view = 0")
    with sqlite3.connect(path) as db, pytest.raises(VariableIndexError, match="damaged"):
        VariableIndex.load(db, embedder=embedder)


def test_duplicate_dcids_are_rejected(embedder):
    with pytest.raises(VariableIndexError, match="Count_Person"):
        VariableIndex.build([CATALOGUE[0], CATALOGUE[0]], embedder=embedder)


def test_search_is_thread_safe(index):
    queries = list(PARAPHRASES)[:3]
    expected = {q: index.search(q, k=3) for q in queries}
    errors = []

    def worker(queries):
        try:
            for q in queries:
                assert index.search(q, k=3) == expected[q]
        except Exception as e:  # collected and reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(queries,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_dcid_words():
    assert dcid_words("Count_Person_15OrMoreYears_Divorced") == "number of people 15 or more years divorced"
    assert dcid_words("Count_Person_BelowPovertyLevelInThePast12Months") == \
        "number of people below poverty level in the past 12 months"
    assert dcid_words("Amount_EconomicActivity_GrossDomesticProduction_NAICSMining") == \
        "amount economic activity gross domestic production industry mining"
    assert dcid_words("dc/7w0e0p0dzj82g") == ""
    assert np.isfinite(len(dcid_words("indianCensus/Count_Person_Religion_Muslim_Male")))


def test_the_embedding_model_setting_names_an_unknown_path(monkeypatch):
    from models.sentence_embedder import EmbeddingModelError

    monkeypatch.setenv("GEMMA_GROUNDING_EMBEDDING_MODEL", "/no/such/embedding-model")
    with pytest.raises(EmbeddingModelError, match="/no/such/embedding-model"):
        VariableIndex.build(CATALOGUE[:2])


# -- the reranker -----------------------------------------------------------------------------------------
TWINS = [
    VariableDoc(dcid="Amount_Exports_Goods", name="Value of Exports of Goods"),
    VariableDoc(dcid="Amount_Imports_Goods", name="Value of Imports of Goods"),
    VariableDoc(dcid="Count_Person_Female", name="Female Population"),
    VariableDoc(dcid="Count_Person_Male", name="Male Population"),
    VariableDoc(dcid="Count_Person_5To17Years", name="Population Aged 5 to 17"),
    VariableDoc(dcid="Count_Person_65OrMoreYears", name="Population Aged 65 or More"),
    VariableDoc(dcid="Count_Person_BelowPovertyLevel", name="People Below the Poverty Level"),
    VariableDoc(dcid="Count_Person_AbovePovertyLevel", name="People Above the Poverty Level"),
    *CATALOGUE,
]
COLUMN = {name: j for j, name in enumerate(RERANK_FEATURES)}


@pytest.fixture(scope="module")
def twins(embedder):
    return VariableIndex.build(TWINS, embedder=embedder, search_model=SearchModel())


def _features(index, embedder, query):
    raw = embedder.encode([query])[0]
    raw = raw / np.linalg.norm(raw)
    fused, features = index.rerank_features(query, raw, raw)
    return {index.docs[i].dcid: row for (_, i, _, _), row in zip(fused, features, strict=True)}


def test_constraint_features_of_twins(twins, embedder):
    # Opposites: the query says "import", the exports twin says "export" and not "import".
    rows = _features(twins, embedder, "how much does the country import in goods")
    assert rows["Amount_Exports_Goods"][COLUMN["polarity_conflict"]] == 1
    assert rows["Amount_Imports_Goods"][COLUMN["polarity_conflict"]] == 0
    rows = _features(twins, embedder, "number of women")  # "women" is the catalogue's "female"
    assert rows["Count_Person_Male"][COLUMN["polarity_conflict"]] == 1
    assert rows["Count_Person_Female"][COLUMN["polarity_conflict"]] == 0
    # "female" is the female twin's only constraint word (population, person, count are schema words).
    assert rows["Count_Person_Female"][COLUMN["var_covered"]] == pytest.approx(1.0)
    assert rows["Count_Person_Male"][COLUMN["var_covered"]] == pytest.approx(0.0)
    # Numbers: the query's 65 is the 65-or-more variable's; the 5-17 one has numbers the query lacks.
    rows = _features(twins, embedder, "people aged 65 and over")
    old, young = rows["Count_Person_65OrMoreYears"], rows["Count_Person_5To17Years"]
    assert (old[COLUMN["number_match"]], old[COLUMN["number_conflict"]]) == (1.0, 0.0)
    assert (young[COLUMN["number_match"]], young[COLUMN["number_conflict"]]) == (0.0, 1.0)
    # Ranks and gaps are relative to the candidates: the best has gap 0 and rank 0.
    best = max(rows.values(), key=lambda r: r[COLUMN["dense_base"]])
    assert best[COLUMN["dense_base_gap"]] == 0 and best[COLUMN["dense_base_rank"]] == 0


def test_a_reranker_that_penalises_opposites_prefers_the_matching_twin(twins, embedder):
    n = len(RERANK_FEATURES)
    linear = np.zeros(n, np.float32)
    linear[COLUMN["polarity_conflict"]] = -6.0
    linear[COLUMN["dense"]] = 1.0
    reranker = Reranker(mean=np.zeros(n), scale=np.ones(n), linear=linear, bias=-0.5)
    model = SearchModel(reranker=reranker, base_fingerprint=embedder.fingerprint)
    index = VariableIndex(twins.docs, twins.view_vectors, twins.view_owner, embedder, search_model=model)
    query = "people above the poverty level"
    found = index.search(query, k=3)
    assert found[0].dcid == "Count_Person_AbovePovertyLevel"
    rows = _features(twins, embedder, query)
    expected = {d: 1 / (1 + math.exp(-(float(r @ linear) - 0.5))) for d, r in rows.items()}
    for c in found:
        assert c.score == pytest.approx(expected[c.dcid], abs=1e-4)
    below = next(c for c in index.search(query, k=len(TWINS)) if c.dcid == "Count_Person_BelowPovertyLevel")
    assert below.score < found[0].score
    # Explicit fusion weights mean the fusion alone, without the reranker.
    fusion = VariableIndex(twins.docs, twins.view_vectors, twins.view_owner, embedder, search_model=model,
                           weights=FusionWeights())
    assert fusion.reranker is None


def test_the_shipped_reranker_prefers_the_twin_the_query_asks_for(embedder):
    index = VariableIndex.build(TWINS, embedder=embedder)
    assert index.reranker is not None, "the shipped search model has a reranker"
    for query, dcid in {"how much does the country import in goods": "Amount_Imports_Goods",
                        "what is the value of goods sold abroad": "Amount_Exports_Goods",
                        "how many women live there": "Count_Person_Female",
                        "how many men live there": "Count_Person_Male",
                        "people above the poverty level": "Count_Person_AbovePovertyLevel",
                        "how many poor people": "Count_Person_BelowPovertyLevel",
                        "how many people are 65 or older": "Count_Person_65OrMoreYears",
                        "school age children 5 to 17": "Count_Person_5To17Years"}.items():
        found = index.search(query, k=3)
        assert found[0].dcid == dcid, (query, [(c.dcid, c.score) for c in found])
        assert 0 <= found[0].score <= 1


def test_reranker_weights_round_trip_and_bad_files(embedder, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    n = len(RERANK_FEATURES)
    base = SearchModel.default()
    features = rng.normal(size=(7, n)).astype(np.float32)
    for hidden in (0, 5):
        reranker = Reranker(mean=rng.normal(size=n), scale=rng.uniform(0.5, 2, size=n), linear=rng.normal(size=n),
                            bias=0.3, **({"w1": rng.normal(size=(n, hidden)), "b1": rng.normal(size=hidden),
                                          "w2": rng.normal(size=hidden)} if hidden else {}))
        model = SearchModel(down=base.down, up=base.up, base_fingerprint=embedder.fingerprint, reranker=reranker)
        model.save(tmp_path / "r.safetensors")
        back = SearchModel.load(tmp_path / "r.safetensors")
        np.testing.assert_allclose(back.reranker.logits(features), reranker.logits(features), rtol=1e-6)
        z = (features - reranker.mean) / reranker.scale
        expected = z @ reranker.linear + 0.3 + (np.maximum(z @ reranker.w1 + reranker.b1, 0) @ reranker.w2
                                                if hidden else 0)
        np.testing.assert_allclose(back.reranker.logits(features), expected, rtol=1e-5, atol=1e-5)
    # A format-1 file (adapter and fusion only) still loads, without a reranker.
    save_file({"down": base.down, "up": base.up}, str(tmp_path / "v1.safetensors"),
              metadata={"base_fingerprint": "x", "weights": FusionWeights().model_dump_json(), "threshold": "0.5"})
    assert SearchModel.load(tmp_path / "v1.safetensors").reranker is None
    tensors = {"down": base.down, "up": base.up, **{k: v for k, v in reranker.tensors().items() if v.size}}
    meta = {"format": "2", "base_fingerprint": "x", "weights": FusionWeights().model_dump_json(), "threshold": "0.5",
            "rerank_features": '["dense", "something_else"]'}
    save_file(tensors, str(tmp_path / "features.safetensors"), metadata=meta)
    with pytest.raises(VariableIndexError, match="retrain"):
        SearchModel.load(tmp_path / "features.safetensors")
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={**meta, "format": "99"})
    with pytest.raises(VariableIndexError, match="format 99"):
        SearchModel.load(tmp_path / "future.safetensors")
    bad = dict(tensors, rerank_linear=np.full(n, np.nan, np.float32))
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata={**meta, "rerank_features": json.dumps(RERANK_FEATURES)})
    with pytest.raises(VariableIndexError, match="not finite"):
        SearchModel.load(tmp_path / "nan.safetensors")
    short = dict(tensors, rerank_mean=np.zeros(3, np.float32))
    save_file(short, str(tmp_path / "short.safetensors"), metadata={**meta, "rerank_features": json.dumps(RERANK_FEATURES)})
    with pytest.raises(VariableIndexError, match="short.safetensors"):
        SearchModel.load(tmp_path / "short.safetensors")
    whole = (tmp_path / "r.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VariableIndexError, match="cut.safetensors"):
        SearchModel.load(tmp_path / "cut.safetensors")
