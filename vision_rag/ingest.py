"""Turn files into indexed pages: PDFs (rendered with pypdfium2), PNG/JPEG/TIFF images (every frame of
a multi-page TIFF), and directories of them (recursively).

Each page becomes a record with a document id (the file's resolved path), its 0-based page number,
the source path, the SHA-256 of the file (an unchanged file is not indexed again; a changed one has
its old pages replaced in the same commit) and optional user metadata. A file that cannot be read is
reported in the :class:`IngestReport` and skipped; the other files are indexed.

Memory is bounded per page: a PDF page is rendered at ``dpi`` or at the lower resolution that keeps it
within ``max_pixels`` (the pixel budget, :data:`DEFAULT_MAX_PIXELS`: a 100 x 100 inch page would
otherwise be 207 megapixels at 144 dpi); image files are decoded by the models' guarded loader
(:func:`models.image.load_frames`: refused before decoding above :data:`models.image.MAX_IMAGE_PIXELS`,
or above ``max_pixels`` when that is larger; converted to RGB exactly as
``ColPaliEmbedder.embed_pages(path)`` converts them) and scaled down to the budget.

Concurrent writers: the decision to index a file is made while holding the index's write lock and is
checked again at the commit (:meth:`Index.transaction`), so any mix of writers (processes, threads,
the CLI and the Python API) leaves one live copy of each page of a file's content.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from models.image import MAX_IMAGE_PIXELS, ImageError, load_frames, load_image, to_rgb

from .index import Index, ModelMismatchError, Page, PageRecord

PDF_SUFFIXES = {".pdf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
SUPPORTED_SUFFIXES = PDF_SUFFIXES | IMAGE_SUFFIXES
DEFAULT_DPI = 144  # 8.5x11 in -> 1224x1584 px: enough detail before the embedder's own resize (448 px)
# The pixel budget of one page: 16 MP is 4000 x 4000 (an A1 sheet at 144 dpi is 4768 x 3370), ~64 MB while
# rendered; larger pages are rendered at a lower resolution (images scaled down) to fit it.
DEFAULT_MAX_PIXELS = 16_000_000


class PageEmbedder(Protocol):
    """What ingestion needs from an embedder (the ColPali embedder satisfies it)."""

    model_id: str

    def embed_pages(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """One ``(n_tokens, dim)`` tensor per page image."""
        ...


class BadFileError(ValueError):
    """A file that cannot be read as a document; the message names the file and the reason."""


class FileProblem(BaseModel):
    path: str
    reason: str


class IngestReport(BaseModel):
    """Summary of one :func:`index_paths` run (printed by the CLI, also as JSON)."""

    pages_added: int = 0
    page_ids: list[int] = Field(default_factory=list)
    files_indexed: list[str] = Field(default_factory=list)
    files_unchanged: list[str] = Field(default_factory=list)  # same content hash as already indexed
    pages_replaced: int = 0  # old pages of changed files, removed
    files_failed: list[FileProblem] = Field(default_factory=list)  # unreadable: reported, skipped
    files_ignored: list[FileProblem] = Field(default_factory=list)  # not a supported type


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[FileProblem], list[FileProblem]]:
    """Expand directories (recursively, sorted) -> (supported files, ignored files, missing paths)."""
    files: list[Path] = []
    ignored: list[FileProblem] = []
    missing: list[FileProblem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.suffix.lower() in SUPPORTED_SUFFIXES:
                    files.append(child)
                else:
                    ignored.append(FileProblem(path=str(child), reason=f"unsupported file type {child.suffix!r}"))
        elif path.is_file():
            if path.suffix.lower() in SUPPORTED_SUFFIXES:
                files.append(path)
            else:
                ignored.append(FileProblem(
                    path=str(path),
                    reason=f"unsupported file type {path.suffix!r}; supported: {sorted(SUPPORTED_SUFFIXES)}",
                ))
        else:
            missing.append(FileProblem(path=str(path), reason="no such file or directory"))
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, ignored, missing


def render_pdf(path: Path, dpi: int = DEFAULT_DPI, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """The pages of a PDF as RGB images at ``dpi``, or lower where a page would exceed ``max_pixels``."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except Exception as exc:  # pypdfium2 raises PdfiumError (and OSError for unreadable files)
        raise BadFileError(f"{path}: not a readable PDF ({exc})") from exc
    try:
        if len(pdf) == 0:
            raise BadFileError(f"{path}: the PDF has no pages")
        for number in range(len(pdf)):
            yield _render_pdf_page(pdf, number, path, dpi / 72, max_pixels)
    finally:
        pdf.close()


def page_scale(width_pt: float, height_pt: float, scale: float, max_pixels: int) -> float:
    """``scale`` (pixels per point), lowered so that the rendered page has at most ``max_pixels`` pixels."""
    if width_pt <= 0 or height_pt <= 0:
        return scale
    # floor(w * s) * floor(h * s) <= w * h * s^2 <= max_pixels
    return min(scale, math.sqrt(max_pixels / (width_pt * height_pt)))


def _render_pdf_page(pdf, number: int, path: Path, scale: float, max_pixels: int) -> Image.Image:
    try:
        page = pdf[number]
        width, height = page.get_size()
        if not (width > 0 and height > 0):
            raise BadFileError(f"{path}: page {number + 1} has no area ({width} x {height} pt)")
        bitmap = page.render(scale=page_scale(width, height, scale, max_pixels))
        return to_rgb(bitmap.to_pil())
    except BadFileError:
        raise
    except Exception as exc:
        raise BadFileError(f"{path}: page {number + 1} cannot be rendered ({exc})") from exc


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image``, scaled down (aspect ratio kept) when it has more than ``max_pixels`` pixels."""
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    factor = math.sqrt(max_pixels / pixels)
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _decode_limit(max_pixels: int) -> int:
    """Images are decoded up to the guarded loader's limit, or up to a budget set above it."""
    return max(MAX_IMAGE_PIXELS, max_pixels)


def _bad_image(path: Path, error: ImageError) -> BadFileError:
    reason = str(error).removeprefix(f"{path}: ")
    return BadFileError(f"{path}: not a readable image ({reason})")


def read_page(path: str | Path, page_number: int, dpi: int = DEFAULT_DPI, max_side: int | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One page of a file as an RGB image, rendered exactly as :func:`read_pages` renders it (without
    rendering the pages before it). ``max_side`` shrinks it, keeping the aspect ratio."""
    path = Path(path)
    if path.suffix.lower() in PDF_SUFFIXES:
        import pypdfium2 as pdfium

        try:
            pdf = pdfium.PdfDocument(str(path))
        except Exception as exc:  # PdfiumError, or OSError for unreadable files
            raise BadFileError(f"{path}: not a readable PDF ({exc})") from exc
        try:
            if not 0 <= page_number < len(pdf):
                raise BadFileError(f"{path} has {len(pdf)} pages; page {page_number + 1} is gone (re-index it)")
            scale = dpi / 72
            if max_side:
                scale = min(scale, max_side / max(pdf[page_number].get_size()))
            image = _render_pdf_page(pdf, page_number, path, scale, max_pixels)
        finally:
            pdf.close()
    else:
        try:
            image = fit_pixels(load_image(path, frame=page_number, max_pixels=_decode_limit(max_pixels)), max_pixels)
        except ImageError as exc:
            raise _bad_image(path, exc) from None
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image


def read_image_pages(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """The frames of an image file (one for PNG/JPEG, every page of a multi-page TIFF) as RGB, decoded and
    converted by :func:`models.image.load_frames`, each scaled down to ``max_pixels``."""
    try:
        for frame in load_frames(path, max_pixels=_decode_limit(max_pixels)):
            yield fit_pixels(frame, max_pixels)
    except ImageError as exc:
        raise _bad_image(path, exc) from None


def read_pages(path: Path, dpi: int = DEFAULT_DPI, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    if path.suffix.lower() in PDF_SUFFIXES:
        return render_pdf(path, dpi, max_pixels)
    return read_image_pages(path, max_pixels)


def index_paths(
    index: Index,
    embedder: PageEmbedder,
    paths: Sequence[str | Path] | str | Path,
    *,
    dpi: int = DEFAULT_DPI,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 4,
    metadata: Mapping[str, Any] | Callable[[Path], Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> IngestReport:
    """Embed and index every page of ``paths`` (files and directories).

    Pages go through ``embedder.embed_pages`` ``batch_size`` at a time (rendered lazily, so a long PDF
    never sits in memory whole; each page within ``max_pixels``). Each file is committed on its own: a
    crash loses at most the file being indexed. ``metadata`` is attached to every page (a mapping, or a
    function of the file path).

    The index's write lock is taken first (:class:`IndexLockedError` if another process is writing), so
    the files found already indexed stay so; each file's pages are committed in a transaction that checks
    again (threads sharing ``index``), so a file is never indexed twice.
    """
    if embedder.model_id != index.model_id:
        raise ModelMismatchError(
            f"index {index.directory} was built with model {index.model_id!r} but the embedder is "
            f"{embedder.model_id!r}; use the same model or a new index directory"
        )
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files, ignored, missing = find_files(paths)
    report = IngestReport(files_ignored=ignored, files_failed=missing)
    index.lock_for_writing()
    bar = tqdm(total=None, unit="page", desc="indexing", disable=not progress)
    try:
        for path in files:
            try:
                content_hash = file_hash(path)
            except OSError as exc:
                report.files_failed.append(FileProblem(path=str(path), reason=f"cannot read ({exc})"))
                continue
            if _indexed(index, path, content_hash) is None:  # saves the embedding; decided again below
                report.files_unchanged.append(str(path))
                continue
            user_metadata = dict(metadata(path) if callable(metadata) else (metadata or {}))
            try:
                held = np.float32 if index.settings.storage == "fp32" else np.float16
                vectors = _embed_file(path, embedder, dpi, max_pixels, batch_size, bar, held)
            except BadFileError as exc:
                report.files_failed.append(FileProblem(path=str(path), reason=str(exc)))
                continue
            with index.transaction():
                replace_file_pages(index, report, path, content_hash, vectors, user_metadata)
    finally:
        bar.close()
    return report


def replace_file_pages(index: Index, report: IngestReport, path: Path, content_hash: str,
                       vectors: Sequence[np.ndarray], metadata: Mapping[str, Any]) -> None:
    """Inside ``index.transaction()``: add the pages of ``path`` (one vector matrix per page, in page
    order) and delete its pages of older content, unless this content is indexed already (by another
    writer meanwhile); the outcome goes into ``report``. Every writer of files (this module and the Ray
    path, :mod:`vision_rag.distributed`) decides here, under the write lock."""
    previous = _indexed(index, path, content_hash)
    if previous is None:
        report.files_unchanged.append(str(path))
        return
    records = [PageRecord(document_id=str(path), page_number=n, source_path=str(path), content_hash=content_hash,
                          metadata=dict(metadata)) for n in range(len(vectors))]
    ids = index.add(list(zip(records, vectors, strict=True)))
    index.delete([p.page_id for p in previous])
    report.page_ids.extend(ids)
    report.pages_added += len(ids)
    report.pages_replaced += len(previous)
    report.files_indexed.append(str(path))


def _indexed(index: Index, path: Path, content_hash: str) -> list[Page] | None:
    """None when ``path`` is indexed with this content; else its live pages (of older content), to replace."""
    previous = index.pages(source_path=str(path))
    if previous and all(p.content_hash == content_hash for p in previous):
        return None
    return previous


def _embed_file(path: Path, embedder: PageEmbedder, dpi: int, max_pixels: int, batch_size: int, bar,
                held) -> list[np.ndarray]:
    vectors: list[np.ndarray] = []
    batch: list[Image.Image] = []

    def flush():
        out = embedder.embed_pages(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"embedder returned {len(out)} embeddings for {len(batch)} pages")
        # Held in the stored precision while the rest of the file is embedded.
        vectors.extend(torch.as_tensor(v).detach().to("cpu", torch.float32).numpy().astype(held) for v in out)
        bar.update(len(batch))
        batch.clear()

    for image in read_pages(path, dpi, max_pixels):
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not vectors:
        raise BadFileError(f"{path}: no pages found")
    return vectors
