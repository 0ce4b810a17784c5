"""Export to Qdrant multi-vector collections, checked against Qdrant itself: the embedded Rust engine
(``qdrant-edge-py``) and qdrant-client's local mode (the client API a server export uses). Qdrant's
exact MaxSim top-k must equal ours, its payload filters must select what ours do, and re-exports
update and prune.

Tolerances: with fp16 storage Qdrant also rounds the query to fp16 before its products (observed: up
to 3e-4 apart), a relative error of <= 5e-4 per component, so a MaxSim of 6 unit query tokens may
differ by up to 3e-3 and 1e-3 is allowed; fp32 storage agrees to ~5e-7 (float32 sums in another
order), 5e-6 allowed. Rankings must be equal, except that two pages whose scores are closer than the
tolerance may swap places (and must then be tied by our scores too)."""

import numpy as np
import pytest
from test_index import clustered_corpus, queries_from_pages

from vision_rag.export_qdrant import EdgeShardTarget, QdrantClientTarget, export_to_qdrant, page_payload
from vision_rag.index import Index, IndexSettingsError
from vision_rag.sharded import ShardedIndex

qdrant_edge = pytest.importorskip("qdrant_edge")


def corpus_records(n):
    return [{"document_id": f"doc{i // 3}", "page_number": i % 3, "source_path": f"/scans/doc{i // 3}.pdf",
             "content_hash": f"h{i // 3}", "metadata": {"year": 2000 + i % 4, "lang": ["en", "de"][i % 2]}}
            for i in range(n)]


def edge_search(shard, query, k, filter=None):
    q = qdrant_edge
    points = shard.query(q.QueryRequest(limit=k, query=q.Query.Nearest(query.tolist(), using="colpali"),
                                        filter=filter, with_payload=True, params=q.SearchParams(exact=True)))
    return [(int(p.id), p.score) for p in points]


def same_ranking(ours, theirs, all_scores, atol) -> bool:
    """True if ``theirs`` lists the pages ``ours`` lists, in order; else assert that it differs only by
    pages tied within ``atol`` (by our scores) and return False."""
    if [p for p, _ in theirs] == [p for p, _ in ours]:
        return True
    for (_, our_score), (their_page, _) in zip(ours, theirs, strict=True):
        assert abs(all_scores[their_page] - our_score) <= 2 * atol, (ours, theirs)
    return False


@pytest.mark.parametrize("storage,atol", [("fp16", 1e-3), ("fp32", 5e-6)])
def test_edge_top_k_equals_ours(tmp_path, storage, atol):
    # Pages of different lengths (the multi-vector case a padded layout would get wrong).
    pages = [p[: 12 + i % 9] for i, p in enumerate(clustered_corpus(60, 20, 32, 6, seed=30))]
    records = corpus_records(60)
    with Index.open(tmp_path / "ix", create=True, model_id="m", dim=32, storage=storage) as index:
        ids = index.add(list(zip(records, pages, strict=True)))
        index.delete([ids[7]])
        report = export_to_qdrant(index, EdgeShardTarget(tmp_path / "edge"))
        assert (report.points_written, report.points_removed, report.points_in_target) == (59, 0, 59)
        assert report.datatype == ("float32" if storage == "fp32" else "float16")
        shard = qdrant_edge.EdgeShard.load(str(tmp_path / "edge"))
        identical = 0
        for query in queries_from_pages(pages, 8, 6, seed=31):
            ours = [(h.page_id, h.score) for h in index.search(query, k=10, exact=True)]
            theirs = edge_search(shard, query, 10)
            np.testing.assert_allclose([s for _, s in theirs], [s for _, s in ours], rtol=0, atol=atol)
            all_scores = {h.page_id: h.score for h in index.search(query, k=60, exact=True)}
            identical += same_ranking(ours, theirs, all_scores, atol)
        assert identical >= 7
        # The payload is the page record; Qdrant filters on it as SearchFilter does here.
        record = shard.retrieve([ids[4]], True, False)[0].payload
        assert record == page_payload(index.get(ids[4])) and record["metadata"] == {"year": 2000, "lang": "en"}
        q = qdrant_edge
        query = queries_from_pages(pages, 1, 5, seed=32)[0]
        for ours_filter, theirs_filter in [
            ({"document_id": "doc3"}, q.Filter(must=[q.FieldCondition("document_id", match=q.MatchValue("doc3"))])),
            ({"metadata": {"lang": "de"}}, q.Filter(must=[q.FieldCondition("metadata.lang", match=q.MatchValue("de"))])),
        ]:
            ours = [h.page_id for h in index.search(query, k=60, exact=True, filter=ours_filter)]
            assert sorted(p for p, _ in edge_search(shard, query, 60, theirs_filter)) == sorted(ours) and ours
        shard.close()
        # A second export updates in place and removes points of deleted pages.
        index.delete([ids[0], ids[1]])
        index.update(ids[2], metadata={"year": 1999})
        again = export_to_qdrant(index, EdgeShardTarget(tmp_path / "edge"))
        assert (again.points_written, again.points_removed, again.points_in_target) == (57, 2, 57)
        shard = qdrant_edge.EdgeShard.load(str(tmp_path / "edge"))
        assert shard.retrieve([ids[2]], True, False)[0].payload["metadata"] == {"year": 1999}
        assert shard.retrieve([ids[0]], False, False) == []
        shard.close()
    with pytest.raises(IndexSettingsError, match="does not fit"):
        export_to_qdrant(tmp_path / "ix", EdgeShardTarget(tmp_path / "edge", vector_name="other"))


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local Qdrant")
def test_sharded_index_and_qdrant_client_local_mode(tmp_path):
    qdrant_client = pytest.importorskip("qdrant_client")
    pages = clustered_corpus(40, 10, 16, 4, seed=33)
    with ShardedIndex.open(tmp_path / "c", create=True, shards=3, model_id="m", dim=16, storage="fp32") as index:
        index.add(list(zip(corpus_records(40), pages, strict=True)))
        client = qdrant_client.QdrantClient(":memory:")
        report = export_to_qdrant(index, QdrantClientTarget(client, "pages"))
        assert report.points_in_target == 40 and report.target == "qdrant:pages"
        assert {int(p.id) for p in client.scroll("pages", limit=100)[0]} == set(index.page_ids())
        for query in queries_from_pages(pages, 5, 4, seed=34):
            ours = [(h.page_id, h.score) for h in index.search(query, k=8, exact=True)]
            theirs = client.query_points("pages", query=query.tolist(), using="colpali", limit=8).points
            # qdrant-client's local mode scores in float64: our float32 sums are ~1e-6 off.
            np.testing.assert_allclose([p.score for p in theirs], [s for _, s in ours], rtol=0, atol=5e-6)
            all_scores = {h.page_id: h.score for h in index.search(query, k=40, exact=True)}
            assert same_ranking(ours, [(int(p.id), p.score) for p in theirs], all_scores, 5e-6)


def test_export_command(tmp_path, capsys):
    import json

    from models.cli import main

    pages = clustered_corpus(6, 8, 16, 2, seed=35)
    with Index.open(tmp_path / "ix", create=True, model_id="m", dim=16) as index:
        index.add(list(zip(corpus_records(6), pages, strict=True)))
    capsys.readouterr()
    assert main(["export-qdrant", "--index", str(tmp_path / "ix"), "--edge", str(tmp_path / "edge"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["points_written"], report["points_in_target"], report["datatype"]) == (6, 6, "float16")
    shard = qdrant_edge.EdgeShard.load(str(tmp_path / "edge"))
    assert sorted(int(r.id) for r in shard.scroll(qdrant_edge.ScrollRequest(limit=10))[0]) == list(range(6))
    shard.close()
    assert main(["export-qdrant", "--index", str(tmp_path / "ix"), "--url", "http://127.0.0.1:9"]) == 2
    assert "needs a collection name" in capsys.readouterr().err
