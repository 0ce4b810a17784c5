"""A LangChain retriever over a vision_rag index: a query in, the best pages out as ``Document`` objects.

Each Document stands for a page image. ``page_content`` is the page's text when its PDF has a text layer
(read with pypdfium2), else a short description (the page is a scan: the image is the content).
``metadata`` references the image: ``page_id``, ``document_id``, ``source`` (source path), ``page_number``
(0-based), ``score`` / ``normalized_score`` (MaxSim and MaxSim / query tokens), the page's user metadata
under ``page_metadata``, ``image_url`` when the retriever has an ``image_url_template`` (e.g. the web
app's ``/api/pages/{page_id}/image``), and ``image_path`` when it has an ``image_dir`` to render PNGs
into. :func:`page_image` renders any page record (or such metadata) to a PIL image on demand.

Example::

    retriever = PageRetriever(index=Index.open("my-index"), embedder=ColPaliEmbedder.load("colpali-v1.3"), k=5)
    docs = retriever.invoke("quarterly revenue chart", k=3, filter={"document_id": "report-2024"})
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, field_validator

__all__ = ["PageRetriever", "PageSourceError", "page_image", "page_text", "PDF_SUFFIXES", "MAX_K"]

PDF_SUFFIXES = (".pdf",)
MAX_K = 100  # the most pages one call returns
DEFAULT_DPI = 100

# pdfium is not thread-safe: every call into it goes through this lock (retrievers run in thread pools).
_PDFIUM = threading.Lock()


class PageSourceError(RuntimeError):
    """The file a page was indexed from cannot be read any more (moved, deleted, changed)."""


def _page_fields(page) -> tuple[str, int]:
    if isinstance(page, Mapping):
        return str(page.get("source_path") or page.get("source") or ""), int(page.get("page_number", 0))
    return str(page.source_path), int(page.page_number)


def page_text(page) -> str:
    """The text layer of a PDF page ("" for images and for PDFs without text). ``page`` is an index
    ``Page`` record or a Document's metadata."""
    source, number = _page_fields(page)
    if not source.lower().endswith(PDF_SUFFIXES):
        return ""
    import pypdfium2 as pdfium

    with _PDFIUM:
        try:
            pdf = pdfium.PdfDocument(source)
        except (OSError, pdfium.PdfiumError) as e:
            raise PageSourceError(f"cannot open {source} to read the text of page {number + 1}: {e}") from None
        try:
            if not 0 <= number < len(pdf):
                raise PageSourceError(f"{source} has {len(pdf)} pages; page {number + 1} is gone (re-index it)")
            textpage = pdf[number].get_textpage()
            return textpage.get_text_range().replace("\r\n", "\n").strip()  # pdfium ends lines with CRLF
        finally:
            pdf.close()


def page_image(page, dpi: int = DEFAULT_DPI, max_side: int | None = None):
    """The page as an RGB PIL image: a PDF page rendered at ``dpi``, or the frame of an image file.
    ``max_side`` shrinks it (keeping the aspect ratio) so neither side exceeds it."""
    from .ingest import BadFileError, read_page

    source, number = _page_fields(page)
    if not source or not Path(source).is_file():
        raise PageSourceError(f"the source file of this page is missing: {source or '(none recorded)'}")
    with _PDFIUM:
        try:
            return read_page(source, number, dpi=dpi, max_side=max_side)
        except BadFileError as e:
            raise PageSourceError(str(e)) from None


class PageRetriever(BaseRetriever):
    """The best pages of a vision_rag index for a text query (ColPali late interaction).

    ``index``: a :class:`vision_rag.index.Index` or the path of one (opened read-only on first use).
    ``embedder``: a :class:`vision_rag.colpali.ColPaliEmbedder` (anything with ``embed_queries`` and
    ``model_id``); it must be the model that built the index. ``k`` (constructor or ``invoke(..., k=)``),
    ``filter`` (constructor or call): ``document_id``, ``source_path_prefix``, ``metadata`` (equality) or
    ``page_ids``, as :class:`vision_rag.index.SearchFilter`. ``with_text`` reads PDF text layers into
    ``page_content``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any
    embedder: Any
    k: int = Field(default=4, ge=1, le=MAX_K)
    filter: dict[str, Any] | None = None
    with_text: bool = True
    image_url_template: str | None = None  # "{page_id}" is replaced, e.g. "http://127.0.0.1:8000/api/pages/{page_id}/image"
    image_dir: str | None = None  # render page PNGs here and put their path in metadata["image_path"]
    image_dpi: int = Field(default=DEFAULT_DPI, ge=18, le=600)

    @field_validator("index", mode="before")
    @classmethod
    def _open_index(cls, value):
        if isinstance(value, (str, Path)):
            from .index import Index

            return Index.open(value)
        return value

    @field_validator("filter", mode="before")
    @classmethod
    def _filter_as_dict(cls, value):
        return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value

    @field_validator("embedder")
    @classmethod
    def _check_embedder(cls, value):
        if not callable(getattr(value, "embed_queries", None)):
            raise TypeError(f"embedder must have embed_queries(texts) (a ColPaliEmbedder), got {type(value).__name__}")
        return value

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        from .index import ModelMismatchError, SearchFilter

        k = int(kwargs.get("k", self.k))
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the query is empty")
        model_id = getattr(self.embedder, "model_id", None)
        if model_id is not None and model_id != self.index.model_id:
            raise ModelMismatchError(f"the index was built with model {self.index.model_id!r} but the retriever's "
                                     f"embedder is {model_id!r}; use the model that built the index")
        conditions = kwargs.get("filter", self.filter)
        if hasattr(conditions, "model_dump"):
            conditions = conditions.model_dump(exclude_none=True)
        search_filter = SearchFilter.model_validate(conditions) if conditions else None
        (query_vectors,) = self.embedder.embed_queries([query])
        hits = self.index.search(query_vectors, k=k, filter=search_filter)
        return [self._document(hit) for hit in hits]

    def _document(self, hit) -> Document:
        page = hit.page
        name = Path(page.source_path).name or page.document_id
        metadata: dict[str, Any] = {
            "page_id": hit.page_id, "document_id": page.document_id, "source": page.source_path,
            "page_number": page.page_number, "score": hit.score, "normalized_score": hit.normalized_score,
            "page_metadata": dict(page.metadata),
        }
        if self.image_url_template:
            metadata["image_url"] = self.image_url_template.replace("{page_id}", str(hit.page_id))
        if self.image_dir:
            path = Path(self.image_dir) / f"page-{hit.page_id}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                page_image(page, dpi=self.image_dpi).save(path)
            metadata["image_path"] = str(path)
        text = ""
        if self.with_text:
            try:
                text = page_text(page)
            except PageSourceError as e:
                metadata["text_error"] = str(e)
        if not text:
            text = f"[page {page.page_number + 1} of {name}: a page image without a text layer]"
        return Document(page_content=text, metadata=metadata, id=str(hit.page_id))
