"""Ingestion: PDFs rendered at a DPI, PNG/JPEG/multi-page TIFF, recursive directories, no-op re-index of
unchanged files, replacement of changed ones, bad files reported and skipped."""

import numpy as np
import pytest
import torch
from PIL import Image

from vision_rag.index import Index, ModelMismatchError
from vision_rag.ingest import BadFileError, index_paths, read_page, read_pages


class ColourEmbedder:
    """A stand-in embedder: one token per cell of a 4x4 grid, the cell's mean RGB (+ a constant), unit length.

    Deterministic and sensitive to page content, so search results can be predicted."""

    model_id = "colour-test"

    def __init__(self):
        self.sizes = []

    def embed_pages(self, images):
        out = []
        for image in images:
            self.sizes.append(image.size)
            pixels = np.asarray(image.convert("RGB").resize((4, 4), Image.BOX), dtype=np.float32) / 255
            tokens = np.concatenate([pixels.reshape(16, 3), np.full((16, 1), 0.5, np.float32)], axis=1)
            out.append(torch.from_numpy(tokens / np.linalg.norm(tokens, axis=1, keepdims=True)))
        return out


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (250, 250, 250)]


def solid(colour, size=(60, 80)):
    return Image.new("RGB", size, colour)


def colour_query(colour):
    token = np.array([*(c / 255 for c in colour), 0.5], dtype=np.float32)
    return torch.from_numpy(np.tile(token / np.linalg.norm(token), (3, 1)))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "docs"
    (root / "nested" / "deeper").mkdir(parents=True)
    # A 3-page PDF written by Pillow (72 dpi: 1 pixel = 1 point).
    solid(COLOURS[0]).save(root / "report.pdf", save_all=True, append_images=[solid(COLOURS[1]), solid(COLOURS[2])])
    solid(COLOURS[3]).save(root / "nested" / "scan.png")
    solid(COLOURS[4]).save(root / "nested" / "photo.jpg", quality=95)
    solid(COLOURS[5]).save(root / "nested" / "deeper" / "fax.tiff", save_all=True, append_images=[solid(COLOURS[0])])
    (root / "notes.txt").write_text("not a page")
    (root / "nested" / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    good = root / "nested" / "scan.png"
    (root / "nested" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "empty.jpg").write_bytes(b"")
    return root


def open_index(tmp_path, **kw):
    return Index.open(tmp_path / "index", create=True, model_id="colour-test", dim=4, **kw)


def test_index_directory_recursively(tmp_path, corpus):
    index = open_index(tmp_path)
    embedder = ColourEmbedder()
    report = index_paths(index, embedder, [corpus], metadata={"collection": "tests"}, progress=False, batch_size=2)
    assert report.pages_added == 3 + 1 + 1 + 2
    assert sorted(p.split("/")[-1] for p in report.files_indexed) == ["fax.tiff", "photo.jpg", "report.pdf", "scan.png"]
    failed = {p.path.split("/")[-1]: p.reason for p in report.files_failed}
    assert set(failed) == {"broken.pdf", "truncated.png", "empty.jpg"}
    assert "not a readable PDF" in failed["broken.pdf"] and "broken.pdf" in failed["broken.pdf"]
    assert "not a readable image" in failed["truncated.png"]
    assert [p.path.split("/")[-1] for p in report.files_ignored] == ["notes.txt"]
    assert len(index) == 7 and report.page_ids == index.page_ids()

    pdf_pages = index.pages(document_id=str((corpus / "report.pdf").resolve()))
    assert [p.page_number for p in pdf_pages] == [0, 1, 2]
    assert all(p.metadata == {"collection": "tests"} and p.source_path.endswith("report.pdf") for p in pdf_pages)
    assert len({p.content_hash for p in pdf_pages}) == 1 and len(pdf_pages[0].content_hash) == 64

    # Every colour finds its page; the 2nd PDF page is green, the TIFF's 2nd frame red.
    hit = index.search(colour_query(COLOURS[1]), k=1)[0]
    assert hit.page.source_path.endswith("report.pdf") and hit.page.page_number == 1
    tiff_pages = index.search(colour_query(COLOURS[0]), k=2)
    assert {(h.page.source_path.split("/")[-1], h.page.page_number) for h in tiff_pages} == {("report.pdf", 0), ("fax.tiff", 1)}
    assert index.search(colour_query(COLOURS[5]), k=1)[0].page.page_number == 0


def test_pdf_rendered_at_chosen_dpi(tmp_path, corpus):
    embedder = ColourEmbedder()
    index_paths(open_index(tmp_path), embedder, corpus / "report.pdf", dpi=144, progress=False)
    assert embedder.sizes == [(120, 160)] * 3  # 60x80 pt pages at 2 px per point
    assert [im.size for im in read_pages(corpus / "report.pdf", dpi=36)] == [(30, 40)] * 3


@pytest.mark.parametrize("name", ["report.pdf", "nested/deeper/fax.tiff"])
def test_one_page_renders_exactly_as_in_the_whole_file(corpus, name):
    pages = list(read_pages(corpus / name, dpi=50))
    for number, expected in enumerate(pages):
        got = read_page(corpus / name, number, dpi=50)
        assert got.size == expected.size and got.tobytes() == expected.tobytes()
    assert max(read_page(corpus / name, 0, dpi=144, max_side=50).size) <= 50
    with pytest.raises(BadFileError, match="page|frame"):
        read_page(corpus / name, len(pages), dpi=50)


def test_reindex_unchanged_is_noop_and_changed_replaces(tmp_path, corpus):
    index = open_index(tmp_path)
    first = index_paths(index, ColourEmbedder(), [corpus], progress=False)
    generation = index.generation
    again = index_paths(index, ColourEmbedder(), [corpus], progress=False)
    assert again.pages_added == 0 and len(again.files_unchanged) == 4
    assert index.generation == generation  # nothing was written

    solid(COLOURS[2]).save(corpus / "nested" / "scan.png")  # the yellow page becomes blue
    changed = index_paths(index, ColourEmbedder(), [corpus], progress=False)
    assert changed.pages_added == 1 and changed.pages_replaced == 1
    assert [f.split("/")[-1] for f in changed.files_indexed] == ["scan.png"]
    assert len(index) == 7
    assert not set(changed.page_ids) & set(first.page_ids)  # the new page has a new id
    scan = index.pages(source_path=str((corpus / "nested" / "scan.png").resolve()))
    assert [p.page_id for p in scan] == changed.page_ids
    top_yellow = index.search(colour_query(COLOURS[3]), k=1)[0]
    assert not top_yellow.page.source_path.endswith("scan.png")


def test_missing_paths_reported_and_model_checked(tmp_path, corpus):
    index = open_index(tmp_path)
    report = index_paths(index, ColourEmbedder(), [corpus / "nope.pdf", corpus / "nested" / "scan.png"], progress=False)
    assert report.pages_added == 1 and report.files_failed[0].reason == "no such file or directory"

    class OtherModel(ColourEmbedder):
        model_id = "another-model"

    with pytest.raises(ModelMismatchError, match="another-model"):
        index_paths(index, OtherModel(), [corpus], progress=False)


def test_metadata_function_per_file(tmp_path, corpus):
    index = open_index(tmp_path)
    index_paths(index, ColourEmbedder(), [corpus], progress=False, metadata=lambda path: {"kind": path.suffix[1:]})
    hits = index.search(colour_query(COLOURS[4]), k=10, filter={"metadata": {"kind": "jpg"}})
    assert [h.page.source_path.split("/")[-1] for h in hits] == ["photo.jpg"]
