"""Index files on a Ray cluster (``gemma-ground index --ray [ADDRESS] --workers N``).

    files --Ray Data tasks: hash, skip unchanged, render pages--> page images
          --actor pool (one ColPali per actor; a GPU each when the cluster has GPUs)--> page vectors
          --this process: a file's pages all arrived? commit files in groups--> the index (or N shards)

The pipeline is a Ray Data dataset streamed into this process, which is the index's one writer (it
holds the write lock from start to end). Vectors travel in the precision the index stores them in, and
every file goes through :func:`vision_rag.ingest.replace_file_pages` in an :meth:`Index.transaction`,
as in :func:`vision_rag.ingest.index_paths`: the same pages, records and vectors as a build in one
process; unchanged files (same path, same SHA-256) are skipped before their pages are rendered.

Failures: a file that cannot be read, or a page that cannot be rendered or embedded, is reported with
its page number (:class:`PageProblem`) and the file is not indexed (a file's pages are committed all or
none); the other files are. A killed embedding actor is restarted by Ray and its batch retried (Ray
Data's actor pools do this); whatever the cluster does, a file is committed only once every one of its
pages has arrived, a page arriving twice is kept once, and files left incomplete by a failed pipeline
are run again (``attempts``). A file is committed once: the transaction checks again that its content
is not indexed yet. Nothing committed is lost when this process dies; a re-run does the rest.

Multi-node: every node needs gemma-grounding installed (same version) and must read the files, the
checkpoint and (for the commit, this process) the index at the same paths, e.g. on a shared filesystem.
Ray moves objects between its processes with pickle (cloudpickle): run it on a cluster you trust, as
Ray's documentation says; nothing read from disk is unpickled.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .colpali import ColPaliSettings
from .index import Index, IndexSettingsError, ModelMismatchError
from .ingest import (
    DEFAULT_DPI,
    DEFAULT_MAX_PIXELS,
    BadFileError,
    FileProblem,
    IngestReport,
    file_hash,
    find_files,
    read_pages,
    replace_file_pages,
)
from .sharded import LAYOUT_FILE, ShardedIndex, open_collection

log = logging.getLogger(__name__)

# CPUs kept free for the tasks that read and render files while the actors embed (on a 2-CPU cluster two
# actors holding a CPU each would leave none, and the pipeline would wait forever).
READER_CPUS = 0.5
RENDER_TASK_CPUS = 0.25
MAX_READ_BLOCKS = 1000


class RayUnavailableError(RuntimeError):
    """Ray is not installed: ``pip install 'gemma-grounding[ray]'``."""


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("the Ray paths need Ray: pip install 'gemma-grounding[ray]'") from exc
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None, **init_options: Any) -> None:
    """Join a Ray cluster (nothing happens if this process already has one).

    ``address``: None or ``"local"`` starts a new cluster inside this process (``num_cpus``: its size,
    default all); ``"auto"`` joins the cluster ``ray start`` runs on this machine; ``"HOST:PORT"`` or
    ``"ray://HOST:10001"`` a remote one."""
    ray = require_ray()
    if ray.is_initialized():
        return
    options: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING)
    if address in (None, "local"):
        options.update(address="local", num_cpus=num_cpus)
    else:
        options.update(address=address)
    options.update(init_options)
    ray.init(**options)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """No progress bars or per-dataset INFO logs from Ray Data (this module prints its own progress)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# What crosses the cluster


class EmbedderSpec(BaseModel):
    """How each actor loads its embedder (:meth:`ColPaliEmbedder.load`'s arguments; paths absolute)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    adapter: str | None = None
    dtype: str | None = None  # None: fp32 on CPU, bf16 on GPU
    tokenizer: str | None = None
    settings: ColPaliSettings = Field(default_factory=ColPaliSettings)

    @classmethod
    def of(cls, model: EmbedderSpec | str | os.PathLike | Any) -> EmbedderSpec:
        """A spec from a spec, a checkpoint directory, or an embedder loaded from one."""
        if isinstance(model, EmbedderSpec):
            return model
        if isinstance(model, (str, os.PathLike)):
            return cls(source=str(Path(model).expanduser().resolve()))
        source = getattr(model, "source", None)
        if source is None:
            raise IndexSettingsError("the Ray path loads the model in every actor from a checkpoint directory; "
                                     "pass the directory (or an embedder loaded with ColPaliEmbedder.load)")
        return cls(source=source, adapter=model.adapter, settings=model.settings)

    def load(self, device: str):
        from .colpali import ColPaliEmbedder

        return ColPaliEmbedder.load(self.source, adapter=self.adapter, dtype=self.dtype, device=device,
                                    settings=self.settings, tokenizer=self.tokenizer)


class PageProblem(BaseModel):
    path: str
    page_number: int  # 0-based; -1: the file as a whole (unreadable, no pages, not completed)
    reason: str


class PageEvent(BaseModel):
    """One embedded page arriving in this process (given to ``on_page``)."""

    path: str
    page_number: int
    worker: str  # "host:pid" of the actor that embedded it


class DistributedIngestReport(IngestReport):
    """:class:`IngestReport` of :func:`index_paths_ray`, plus where pages failed and who did the work."""

    page_failures: list[PageProblem] = Field(default_factory=list)
    pages_per_worker: dict[str, int] = Field(default_factory=dict)  # embedded pages received, by "host:pid"
    workers: int = 0
    attempts: int = 0  # pipeline passes run (more than 1 when files were left incomplete)
    elapsed_s: float = 0.0


# Row kinds flowing through the pipeline (every row has every column, so batches have one schema).
PAGE, END, FILE_ERROR, PAGE_ERROR = "page", "end", "file_error", "page_error"


def _row(kind: str, path: str, content_hash: str = "", page_number: int = -1, n_pages: int = 0, *,
         pixels: bytes = b"", width: int = 0, height: int = 0, reason: str = "") -> dict:
    return dict(kind=kind, path=path, content_hash=content_hash, page_number=page_number, n_pages=n_pages,
                pixels=pixels, width=width, height=height, reason=reason)


def render_files(batch: dict[str, np.ndarray], *, dpi: int, max_pixels: int) -> Iterator[dict[str, list]]:
    """Ray Data stage (tasks; a generator, so a long PDF streams out page by page): a PAGE row per
    rendered page of each file (raw RGB bytes) and an END row with the page count, or a FILE_ERROR row
    naming the page that failed."""
    for path, content_hash in zip(batch["path"], batch["content_hash"], strict=True):
        for row in _file_rows(str(path), str(content_hash), dpi, max_pixels):
            yield {key: [value] for key, value in row.items()}


def _file_rows(path: str, content_hash: str, dpi: int, max_pixels: int) -> Iterator[dict]:
    count = 0
    try:
        for image in read_pages(Path(path), dpi, max_pixels):
            yield _row(PAGE, path, content_hash, count, pixels=image.tobytes(), width=image.width, height=image.height)
            count += 1
    except Exception as exc:  # BadFileError, or a reader bug: it must not end the whole pipeline
        reason = str(exc) if isinstance(exc, BadFileError) else f"{path}: {type(exc).__name__}: {exc}"
        # The page that failed; -1 when nothing could be read (the reason names a first page that failed).
        yield _row(FILE_ERROR, path, content_hash, count if count else -1, reason=reason)
        return
    if count == 0:
        yield _row(FILE_ERROR, path, content_hash, reason=f"{path}: no pages found")
    else:
        yield _row(END, path, content_hash, n_pages=count)


def hash_files(paths: Sequence[str], threads: int = 8) -> tuple[dict[str, str], list[FileProblem]]:
    """SHA-256 of each file (threads: hashing releases the GIL, reads overlap) -> (path -> hash, unreadable)."""
    def one(path: str):
        try:
            return path, file_hash(Path(path)), None
        except OSError as exc:
            return path, None, FileProblem(path=path, reason=f"cannot read ({exc})")

    hashes, problems = {}, []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path, digest, problem in pool.map(one, paths):
            if problem is None:
                hashes[path] = digest
            else:
                problems.append(problem)
    return hashes, problems


class PageEmbedderActor:
    """Ray Data actor: one embedder, loaded once; embeds the PAGE rows of each batch (a page that fails
    becomes a PAGE_ERROR row; the others in its batch are embedded one by one) and passes the rest on."""

    def __init__(self, spec: dict, device: str, threads: int, held_dtype: str):
        import torch

        torch.set_num_threads(threads)
        self.embedder = EmbedderSpec.model_validate(spec).load(device)
        self.embedder.progress = False
        self.held = np.dtype(held_dtype)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        n = len(batch["kind"])
        kinds = [str(k) for k in batch["kind"]]
        reasons = [str(r) for r in batch["reason"]]
        vectors: list[bytes] = [b""] * n
        tokens = [0] * n
        pages = [i for i in range(n) if kinds[i] == PAGE]
        images = [Image.frombytes("RGB", (int(batch["width"][i]), int(batch["height"][i])), batch["pixels"][i])
                  for i in pages]
        for i, out in zip(pages, self._embed(images), strict=True):
            if isinstance(out, Exception):
                kinds[i], reasons[i] = PAGE_ERROR, f"cannot embed page {int(batch['page_number'][i]) + 1}: {out}"
            else:
                tokens[i] = out.shape[0]
                vectors[i] = np.ascontiguousarray(out.to("cpu").float().numpy().astype(self.held)).tobytes()
        return {
            "kind": np.array(kinds, dtype=object), "path": batch["path"], "content_hash": batch["content_hash"],
            "page_number": batch["page_number"], "n_pages": batch["n_pages"], "reason": np.array(reasons, dtype=object),
            "vectors": np.array(vectors, dtype=object), "n_tokens": np.array(tokens, dtype=np.int64),
            "dim": np.full(n, self.embedder.dim, dtype=np.int64),
            "model_id": np.array([self.embedder.model_id] * n, dtype=object),
            "worker": np.array([self.worker] * n, dtype=object),
        }

    def _embed(self, images: list) -> list:
        """Embeddings of ``images``; where the batch fails, each image alone (an exception for a bad one)."""
        if not images:
            return []
        try:
            return self.embedder.embed_pages(images, batch_size=len(images))
        except Exception as exc:
            if len(images) == 1:
                return [exc]
            return [one for image in images for one in self._embed([image])]


# --------------------------------------------------------------------------------------------------
# This process: collect, check, commit


@dataclass
class _File:
    content_hash: str = ""
    n_pages: int | None = None
    pages: dict[int, np.ndarray] = field(default_factory=dict)
    problem: PageProblem | None = None

    @property
    def complete(self) -> bool:
        return self.problem is None and self.n_pages is not None and len(self.pages) == self.n_pages


@dataclass
class _Plan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def plan_resources(workers: int, cpus_per_worker: float | None = None,
                   gpus_per_worker: float | None = None) -> _Plan:
    """Per-actor CPUs and GPUs on the current cluster: a GPU per actor when there are GPUs (shared when
    there are fewer GPUs than actors), CPUs split among the actors after :data:`READER_CPUS` for reading."""
    if workers < 1:
        raise IndexSettingsError(f"workers must be >= 1, got {workers}")
    resources = require_ray().cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = min(1.0, gpus / workers) if gpus else 0.0
    if cpus_per_worker is None:
        cpus_per_worker = min(1.0, (cpus - READER_CPUS) / workers)
    if cpus_per_worker <= 0 or workers * cpus_per_worker + RENDER_TASK_CPUS > cpus + 1e-9:
        raise IndexSettingsError(
            f"the Ray cluster has {cpus:g} CPUs: too few for {workers} embedding workers plus the file readers; "
            "use fewer workers or a larger cluster"
        )
    if gpus_per_worker > 0 and workers * gpus_per_worker > gpus + 1e-9:
        raise IndexSettingsError(f"the Ray cluster has {gpus:g} GPUs, not {workers * gpus_per_worker:g}")
    return _Plan(workers, cpus_per_worker, gpus_per_worker, threads=max(1, int(cpus_per_worker)))


def index_paths_ray(
    directory: str | os.PathLike,
    model: EmbedderSpec | str | os.PathLike | Any,
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    workers: int = 1,
    shards: int | None = None,
    batch_size: int = 4,
    dpi: int = DEFAULT_DPI,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    metadata: Mapping[str, Any] | Callable[[Path], Mapping[str, Any]] | None = None,
    index_settings: Mapping[str, Any] | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    commit_pages: int = 256,
    attempts: int = 2,
    on_page: Callable[[PageEvent], None] | None = None,
    progress: bool = True,
) -> DistributedIngestReport:
    """Index ``paths`` (files and directories) into the index in ``directory`` on the Ray cluster this
    process is connected to (:func:`connect`; a local one is started if none).

    ``model``: the checkpoint directory every actor loads (or an :class:`EmbedderSpec`). ``workers``:
    actors in the embedding pool; ``batch_size``: pages per forward pass. ``shards``: build (or add to)
    a collection of that many shard indexes (:mod:`vision_rag.sharded`) instead of one index. A new index
    takes the model's id and dimension from the first embedded page and ``index_settings`` (``storage``,
    ``pool_factor`` ...). Files are committed in groups of about ``commit_pages`` pages. ``on_page`` is
    called here for every embedded page that arrives."""
    ray = require_ray()
    if not ray.is_initialized():
        connect()
    quiet_ray_data()
    if batch_size < 1:
        raise IndexSettingsError(f"batch_size must be >= 1, got {batch_size}")
    if max_pixels < 1:
        raise IndexSettingsError(f"max_pixels must be >= 1, got {max_pixels}")
    started = time.perf_counter()
    spec = EmbedderSpec.of(model)
    plan = plan_resources(workers, cpus_per_worker, gpus_per_worker)
    directory = Path(directory)
    settings = dict(index_settings or {})
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, ignored, missing = find_files(paths)
    report = DistributedIngestReport(files_ignored=ignored, files_failed=missing, workers=workers)
    writer = _Writer(directory, shards, settings, spec, metadata, report)
    try:
        hashes, unreadable = hash_files([str(p) for p in files])
        report.files_failed.extend(unreadable)
        known = writer.known_hashes()
        report.files_unchanged.extend(path for path, digest in hashes.items() if known.get(path) == digest)
        todo = {path: digest for path, digest in hashes.items() if known.get(path) != digest}
        last_error = ""
        for attempt in range(1, attempts + 1):
            if not todo:
                break
            report.attempts = attempt
            dataset = _pipeline(ray, todo, spec, plan, writer.held_name, batch_size, dpi, max_pixels)
            states = {path: _File(content_hash=digest) for path, digest in todo.items()}
            try:
                _collect(dataset, states, writer, commit_pages, on_page, progress)
                last_error = ""
            except (ModelMismatchError, IndexSettingsError, KeyboardInterrupt):
                raise
            except Exception as exc:  # the cluster failed us: keep what is complete, run the rest again
                last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.warning("Ray pipeline attempt %d failed (%s); committing the complete files", attempt, last_error)
            writer.commit_ready()
            todo = {path: states[path].content_hash for path in todo if path not in writer.decided}
        for path in todo:
            reason = "its pages did not all come back from the cluster"
            reason += f" after {report.attempts} attempts" + (f" ({last_error})" if last_error else "")
            report.page_failures.append(PageProblem(path=path, page_number=-1, reason=reason))
            report.files_failed.append(FileProblem(path=path, reason=reason))
    finally:
        writer.close()
    report.elapsed_s = time.perf_counter() - started
    return report


def _pipeline(ray, files: Mapping[str, str], spec: EmbedderSpec, plan: _Plan, held: str, batch_size: int, dpi: int,
              max_pixels: int):
    items = [{"path": path, "content_hash": digest} for path, digest in files.items()]
    # A block (a reading task) per file up to MAX_READ_BLOCKS: enough to keep every actor fed.
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), MAX_READ_BLOCKS)))
    dataset = dataset.map_batches(render_files, batch_size=1, batch_format="numpy",
                                  fn_kwargs=dict(dpi=dpi, max_pixels=max_pixels), num_cpus=RENDER_TASK_CPUS)
    return dataset.map_batches(
        PageEmbedderActor, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs=dict(spec=spec.model_dump(), device=plan.device, threads=plan.threads, held_dtype=held),
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker or None,
    )


def _collect(dataset, states: dict[str, _File], writer: _Writer, commit_pages: int,
             on_page: Callable[[PageEvent], None] | None, progress: bool) -> None:
    from tqdm.auto import tqdm

    report = writer.report
    with tqdm(total=None, unit="page", desc="indexing (ray)", disable=not progress) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["kind"])):
                path, kind = str(batch["path"][i]), str(batch["kind"][i])
                state = states.get(path)
                if state is None or path in writer.decided:
                    continue  # a late duplicate of a file already committed or reported
                writer.check_model(str(batch["model_id"][i]), int(batch["dim"][i]))
                number = int(batch["page_number"][i])
                if kind in (FILE_ERROR, PAGE_ERROR):
                    if state.problem is None:
                        state.problem = PageProblem(path=path, page_number=number, reason=str(batch["reason"][i]))
                        writer.fail(path, state.problem)
                elif kind == END:
                    state.n_pages = int(batch["n_pages"][i])
                elif kind == PAGE and number not in state.pages:
                    n_tokens, dim = int(batch["n_tokens"][i]), int(batch["dim"][i])
                    state.pages[number] = np.frombuffer(batch["vectors"][i], dtype=writer.held).reshape(n_tokens, dim)
                    worker = str(batch["worker"][i])
                    report.pages_per_worker[worker] = report.pages_per_worker.get(worker, 0) + 1
                    bar.update(1)
                    if on_page is not None:
                        on_page(PageEvent(path=path, page_number=number, worker=worker))
                if state.complete:
                    writer.ready(path, state)
            if writer.ready_pages >= commit_pages:
                writer.commit_ready()


class _Writer:
    """The index (or shards) this process writes: opened (or created once the model is known), locked,
    and fed complete files in groups, each group one transaction."""

    def __init__(self, directory: Path, shards: int | None, settings: dict, spec: EmbedderSpec, metadata,
                 report: DistributedIngestReport):
        self.directory, self.shards, self.settings, self.spec = directory, shards, settings, spec
        self.metadata, self.report = metadata, report
        self.index: Index | ShardedIndex | None = None
        self.decided: set[str] = set()  # committed or failed: later rows of it are ignored
        self._ready: list[tuple[str, _File]] = []
        self.ready_pages = 0
        exists = (directory / LAYOUT_FILE).is_file() or (directory / "manifest.json").is_file()
        if exists:
            self._open(open_collection(directory, shards=shards))

    @property
    def storage(self) -> str:
        return self.index.settings.storage if self.index is not None else self.settings.get("storage", "fp16")

    @property
    def held_name(self) -> str:
        """The precision vectors travel in: the index's (fp32 storage) or fp16 (every other storage)."""
        return "float32" if self.storage == "fp32" else "float16"

    @property
    def held(self):
        return np.dtype(self.held_name)

    def _open(self, index: Index | ShardedIndex) -> None:
        try:
            index.lock_for_writing()  # one writer: refused now (IndexLockedError) if another process writes
        except BaseException:
            index.close()
            raise
        self.index = index

    def known_hashes(self) -> dict[str, str]:
        """Source path -> content hash, for files whose live pages all have one hash (unchanged if equal)."""
        if self.index is None:
            return {}
        hashes: dict[str, set[str]] = {}
        for page in self.index.pages():
            hashes.setdefault(page.source_path, set()).add(page.content_hash)
        return {path: next(iter(h)) for path, h in hashes.items() if len(h) == 1}

    def check_model(self, model_id: str, dim: int) -> None:
        if self.index is None:
            options = dict(create=True, model_id=model_id, dim=dim, **self.settings)
            if self.shards is not None:
                self._open(ShardedIndex.open(self.directory, shards=self.shards, **options))
            else:
                self._open(Index.open(self.directory, **options))
        if model_id != self.index.model_id:
            raise ModelMismatchError(f"index {self.directory} was built with model {self.index.model_id!r} but the "
                                     f"workers' model is {model_id!r}; use the same model or a new index directory")

    def fail(self, path: str, problem: PageProblem) -> None:
        self.decided.add(path)
        self.report.page_failures.append(problem)
        where = "" if problem.page_number < 0 else f" (page {problem.page_number + 1})"
        self.report.files_failed.append(FileProblem(path=path, reason=problem.reason + where))

    def ready(self, path: str, state: _File) -> None:
        self.decided.add(path)
        self._ready.append((path, state))
        self.ready_pages += len(state.pages)

    def commit_ready(self) -> None:
        if not self._ready:
            return
        group, self._ready, self.ready_pages = self._ready, [], 0
        outcome = IngestReport()  # merged into the report only once the transaction has committed
        with self.index.transaction():
            for path, state in sorted(group):
                meta = self.metadata(Path(path)) if callable(self.metadata) else (self.metadata or {})
                vectors = [state.pages[n] for n in range(state.n_pages)]
                replace_file_pages(self.index, outcome, Path(path), state.content_hash, vectors, meta)
        for name in ("page_ids", "files_indexed", "files_unchanged"):
            getattr(self.report, name).extend(getattr(outcome, name))
        self.report.pages_added += outcome.pages_added
        self.report.pages_replaced += outcome.pages_replaced

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


def summarize_workers(report: DistributedIngestReport) -> str:
    """``"host:pid 12 pages, host:pid 9 pages"``: how the pages were shared among the actors."""
    return ", ".join(f"{worker} {count} pages" for worker, count in sorted(report.pages_per_worker.items()))
