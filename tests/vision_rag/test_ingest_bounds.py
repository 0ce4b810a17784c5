"""Ingestion's bounds and its one conversion path: peak memory of a huge PDF page and a huge PNG, measured in a
fresh process; a transparent RGBA PNG and a 16-bit grey TIFF stored by ``index_paths`` exactly as
``ColPaliEmbedder.embed_pages(path)`` embeds them (same pixels, same vectors)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webapp_support import tiny_index

from models.image import MAX_IMAGE_PIXELS, load_image
from vision_rag import Index, index_paths
from vision_rag.ingest import DEFAULT_MAX_PIXELS, BadFileError, read_page, read_pages

REPO = Path(__file__).resolve().parents[2]

# Reads every page of each file in turn in a fresh process; prints, per file, how much the peak RSS grew.
PEAK = r"""
import json, resource, sys
from pathlib import Path
from vision_rag.ingest import BadFileError, read_pages
for name in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        sizes, error = [im.size for im in read_pages(Path(name))], None
    except BadFileError as e:
        sizes, error = [], str(e)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_mib": grown / 1024, "sizes": sizes, "error": error}))
"""


def peak_growth(*paths: Path) -> list[dict]:
    """Per file (read in this order: the peak only grows), the growth of the peak RSS in MiB, the page
    sizes and the error. One process for all: starting one costs seconds."""
    done = subprocess.run([sys.executable, "-c", PEAK, *map(str, paths)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(paths):]]


def write_blank_pdf(path: Path, width_pt: int, height_pt: int) -> Path:
    """A one-page PDF of the given size with a line of text on it (written by hand, with a correct xref)."""
    content = b"BT /F1 200 Tf 100 100 Td (huge page) Tj ET"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>" % (width_pt, height_pt),
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def write_grey_png(path: Path, side: int) -> Path:
    """A valid 8-bit grey PNG of side x side black pixels, compressed row by row (never held decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(1)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    rows_per_block = max(1, (1 << 22) // len(row))
    data = bytearray()
    for start in range(0, side, rows_per_block):
        data += compressor.compress(row * min(rows_per_block, side - start))
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(data)) + chunk(b"IEND", b""))
    return path


def test_huge_pages_stay_within_the_memory_bound(tmp_path):
    # 13000 x 13000 = 169 megapixels (0.2 MB on disk): refused by the guarded loader before decoding.
    png = write_grey_png(tmp_path / "huge.png", 13000)
    # 100 x 100 inches: 14400 x 14400 = 207 megapixels at the default 144 dpi (~1.2 GB as BGR + RGB).
    pdf = write_blank_pdf(tmp_path / "huge.pdf", 7200, 7200)
    assert png.stat().st_size < 1 << 20
    refused, rendered = peak_growth(png, pdf)
    assert refused["sizes"] == [] and "huge.png" in refused["error"] and str(MAX_IMAGE_PIXELS) in refused["error"]
    assert refused["grown_mib"] < 50, refused
    ((width, height),) = rendered["sizes"]
    assert width == height and DEFAULT_MAX_PIXELS * 0.99 <= width * height <= DEFAULT_MAX_PIXELS
    # Rendering 16 MP holds a BGR bitmap and its RGB copy (48 MB each) plus pdfium's own buffers.
    assert rendered["grown_mib"] < 250, rendered
    # the budget is a setting
    (small,) = list(read_pages(pdf, max_pixels=10_000))
    assert small.size[0] * small.size[1] <= 10_000 and small.size[0] == small.size[1]


def test_images_over_the_budget_are_scaled_down(tmp_path):
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "wide.png")
    (image,) = list(read_pages(tmp_path / "wide.png", max_pixels=6000))
    assert image.size == (94, 63) and image.size[0] * image.size[1] <= 6000
    assert read_page(tmp_path / "wide.png", 0, max_pixels=6000).size == (94, 63)
    with pytest.raises(BadFileError, match="wide.png"):
        read_page(tmp_path / "wide.png", 1)  # no second frame


@pytest.fixture(scope="module")
def awkward_images(tmp_path_factory) -> dict[str, Path]:
    """A transparent RGBA PNG (alpha from 0 to 255 over colours) and a 16-bit grey two-page TIFF."""
    root = tmp_path_factory.mktemp("awkward")
    rng = np.random.default_rng(16)
    rgba = rng.integers(0, 256, (90, 70, 4), dtype=np.uint8)
    rgba[:30, :, 3] = 0  # fully transparent: white once composited
    rgba[30:60, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(root / "transparent.png")
    grey = rng.integers(0, 65536, (60, 80), dtype=np.uint16)
    grey[0, :3] = [0, 32768, 65535]
    frames = [Image.fromarray(grey), Image.fromarray(65535 - grey)]
    assert frames[0].mode == "I;16"
    frames[0].save(root / "grey16.tiff", save_all=True, append_images=frames[1:])
    return {"png": root / "transparent.png", "tiff": root / "grey16.tiff"}


def test_ingestion_converts_images_as_the_model_loader_does(awkward_images):
    png = list(read_pages(awkward_images["png"]))[0]
    np.testing.assert_array_equal(np.asarray(png), np.asarray(load_image(awkward_images["png"])))
    # spec: alpha 0 over white is white; 16-bit values scale by 255/65535 (0, 32768, 65535 -> 0, 128, 255)
    assert (np.asarray(png)[:30] == 255).all()
    first, second = read_pages(awkward_images["tiff"])
    np.testing.assert_array_equal(np.asarray(first), np.asarray(load_image(awkward_images["tiff"])))
    np.testing.assert_array_equal(np.asarray(second), np.asarray(load_image(awkward_images["tiff"], frame=1)))
    assert np.asarray(first)[0, :3, 0].tolist() == [0, 128, 255]
    assert np.asarray(read_page(awkward_images["tiff"], 1))[0, :3, 0].tolist() == [255, 127, 0]


def test_stored_vectors_equal_embed_pages_of_the_file(tmp_path, awkward_images):
    _, embedder = tiny_index()
    with Index.open(tmp_path / "index", create=True, model_id=embedder.model_id, dim=embedder.dim,
                    storage="fp32") as index:
        report = index_paths(index, embedder, [awkward_images["png"], awkward_images["tiff"]], progress=False)
        assert not report.files_failed and report.pages_added == 3
        stored = {(Path(p.source_path).name, p.page_number): index.vectors(p.page_id) for p in index.pages()}
    direct = embedder.embed_pages([awkward_images["png"], awkward_images["tiff"]], progress=False)
    # same pixels in, same model: equal up to float reassociation in batched matmuls
    torch.testing.assert_close(stored[("transparent.png", 0)], direct[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(stored[("grey16.tiff", 0)], direct[1], atol=1e-5, rtol=0)
