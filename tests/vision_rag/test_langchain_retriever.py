"""The LangChain retriever over a vision_rag index: the standard ``RetrieversIntegrationTests`` suite, and our
checks against an independent computation (MaxSim by its definition over the embedder's own page vectors,
the PDF text written by the test, pypdfium2 rendering).

The index holds 5 pages of two generated PDFs (with a text layer), ingested by ``vision_rag.index_paths`` at
50 dpi with a tiny random ColPali (``tests/vision_rag/tiny_colpali.py``).
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from langchain_core.documents import Document
from langchain_tests.integration_tests import RetrieversIntegrationTests

from vision_rag import index_paths
from vision_rag.colpali import ColPaliEmbedder
from vision_rag.index import Index, ModelMismatchError
from vision_rag.langchain import PageRetriever, PageSourceError, page_image, page_text

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(Path(__file__).parent))

import sample_data  # noqa: E402  (examples/sample_data.py: PDFs with a text layer)
import tiny_colpali  # noqa: E402


@functools.cache
def tiny_setup() -> tuple[Path, ColPaliEmbedder, list[Path]]:
    root = Path(tempfile.mkdtemp(prefix="retriever-"))
    tokenizer = tiny_colpali.paligemma_tokenizer()
    checkpoint = tiny_colpali.save_colpali(tiny_colpali.hf_colpali(tokenizer, seed=1, image_size=56), tokenizer,
                                           root / "colpali")
    embedder = ColPaliEmbedder.load(checkpoint)
    pdfs = sample_data.write_sample_pdfs(root / "pdfs")
    with Index.open(root / "index", create=True, model_id=embedder.model_id, dim=embedder.dim, storage="fp32") as index:
        index_paths(index, embedder, pdfs, dpi=50, progress=False)
    return root / "index", embedder, pdfs


# The suite holds an async test; pytest-asyncio runs it when marked (the project runs in its strict mode). The
# mark on the class also reaches the sync tests, where pytest-asyncio only warns: silenced.
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:.*marked with '@pytest.mark.asyncio':pytest.PytestWarning")
class TestPageRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self):
        return PageRetriever

    @property
    def retriever_constructor_params(self):
        index_dir, embedder, _ = tiny_setup()
        return {"index": str(index_dir), "embedder": embedder, "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "what is the total of the invoice?"


def maxsim_by_definition(query: torch.Tensor, page: torch.Tensor) -> float:
    return float((query @ page.T).max(dim=1).values.sum())


def test_ranking_and_scores_match_maxsim_over_directly_embedded_pages():
    index_dir, embedder, pdfs = tiny_setup()
    retriever = PageRetriever(index=str(index_dir), embedder=embedder, k=5)
    query = "chart of the quarterly revenue"
    docs = retriever.invoke(query)
    # Independent: render each page with pypdfium2 here, embed it, score it by the definition.
    import pypdfium2 as pdfium

    (q,) = embedder.embed_queries([query], progress=False)
    expected = {}
    for path in pdfs:
        pdf = pdfium.PdfDocument(path)
        for number in range(len(pdf)):
            image = pdf[number].render(scale=50 / 72).to_pil().convert("RGB")
            (vectors,) = embedder.embed_pages([image], progress=False)
            expected[(path.name, number)] = maxsim_by_definition(q, vectors)
        pdf.close()
    got = {(Path(d.metadata["source"]).name, d.metadata["page_number"]): d.metadata["score"] for d in docs}
    assert set(got) == set(expected)
    for key, score in got.items():
        # Same fp32 vectors on both sides; only the summation order differs.
        assert score == pytest.approx(expected[key], abs=1e-4)
    assert [d.metadata["score"] for d in docs] == sorted(got.values(), reverse=True)
    for d in docs:
        assert d.metadata["normalized_score"] == pytest.approx(d.metadata["score"] / q.shape[0])


def test_document_text_metadata_images_and_filters(tmp_path):
    index_dir, embedder, pdfs = tiny_setup()
    retriever = PageRetriever(index=str(index_dir), embedder=embedder, k=5,
                              image_url_template="/api/pages/{page_id}/image", image_dir=str(tmp_path / "img"))
    docs = retriever.invoke("invoice")
    by_page = {(Path(d.metadata["source"]).name, d.metadata["page_number"]): d for d in docs}
    for name, pages in sample_data.SAMPLE_PAGES.items():
        for number, (title, lines, _colour) in enumerate(pages):
            doc = by_page[(name, number)]
            # The text layer is what the PDF writer put there, line by line.
            assert [line.strip() for line in doc.page_content.splitlines()] == [title, *lines]
            assert doc.metadata["source"] == doc.metadata["document_id"] == str((pdfs[0].parent / name).resolve())
            assert doc.metadata["image_url"] == f"/api/pages/{doc.metadata['page_id']}/image"
            png = Path(doc.metadata["image_path"])
            assert png.is_file() and png.parent == tmp_path / "img"
    report = str(pdfs[1].resolve())
    only = retriever.invoke("invoice", k=5, filter={"document_id": report})
    assert sorted(d.metadata["page_number"] for d in only) == [0, 1, 2]
    assert {d.metadata["document_id"] for d in only} == {report}
    from vision_rag.index import SearchFilter

    typed = PageRetriever(index=str(index_dir), embedder=embedder, k=5,
                          filter=SearchFilter(document_id=str(pdfs[0].resolve())))
    assert sorted(d.metadata["page_number"] for d in typed.invoke("invoice")) == [0, 1]
    prefix = str(pdfs[0].parent.resolve() / "rep")
    assert len(retriever.invoke("invoice", filter=SearchFilter(source_path_prefix=prefix))) == 3
    assert len(retriever.invoke("invoice", k=1)) == 1
    with pytest.raises(ValueError, match="k must be"):
        retriever.invoke("invoice", k=1000)
    with pytest.raises(ValueError, match="empty"):
        retriever.invoke("  ")
    with pytest.raises(Exception, match="unknown_field"):
        retriever.invoke("invoice", filter={"unknown_field": 1})


def test_page_image_rendering_and_missing_sources(tmp_path):
    import pypdfium2 as pdfium

    _, _, pdfs = tiny_setup()
    record = {"source_path": str(pdfs[1]), "page_number": 2}
    image = page_image(record, dpi=72)
    pdf = pdfium.PdfDocument(pdfs[1])
    reference = pdf[2].render(scale=1.0).to_pil().convert("RGB")
    pdf.close()
    assert image.size == reference.size == (612, 792)
    assert np.array_equal(np.asarray(image), np.asarray(reference))
    assert max(page_image(record, max_side=200).size) <= 200
    assert page_text({"source_path": str(tmp_path / "scan.png"), "page_number": 0}) == ""
    with pytest.raises(PageSourceError, match="missing"):
        page_image({"source_path": str(tmp_path / "gone.pdf"), "page_number": 0})
    with pytest.raises(PageSourceError, match="has 3 pages"):
        page_image({"source_path": str(pdfs[1]), "page_number": 7})


def test_scanned_page_without_text_layer_and_model_mismatch(tmp_path):
    from PIL import Image

    _, embedder, _ = tiny_setup()
    scan = tmp_path / "scan.png"
    Image.new("RGB", (80, 100), (200, 30, 30)).save(scan)
    with Index.open(tmp_path / "idx", create=True, model_id=embedder.model_id, dim=embedder.dim) as index:
        (vectors,) = embedder.embed_pages([page_image({"source_path": str(scan), "page_number": 0})], progress=False)
        index.add([({"document_id": "scan", "source_path": str(scan)}, vectors)])
        (doc,) = PageRetriever(index=index, embedder=embedder).invoke("red")
        assert isinstance(doc, Document) and doc.page_content == "[page 1 of scan.png: a page image without a text layer]"
    with Index.open(tmp_path / "other", create=True, model_id="another-model", dim=embedder.dim) as other:
        with pytest.raises(ModelMismatchError, match="another-model"):
            PageRetriever(index=other, embedder=embedder).invoke("red")
    with pytest.raises(TypeError, match="embed_queries"):
        PageRetriever(index=tmp_path / "idx", embedder=object())
