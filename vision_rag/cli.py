"""``gemma-ground index | search | explain``: build and query a ColPali page index from the shell.

    gemma-ground index   --model SOURCE [--adapter DIR] --index DIR PATH... [--shards N] [--ray [ADDRESS] --workers N]
    gemma-ground search  --index DIR "query" [-k 5] [--json]
    gemma-ground explain --index DIR "query" PAGE_ID --out map.png
    gemma-ground export-qdrant --index DIR (--edge PATH | --url URL --collection NAME)

Thin: parses arguments and calls :mod:`vision_rag.colpali`, :mod:`vision_rag.index`,
:mod:`vision_rag.ingest`, :mod:`vision_rag.distributed` (``--ray``), :mod:`vision_rag.sharded`
(``--shards``; ``search`` and ``explain`` open sharded collections too), :mod:`vision_rag.export_qdrant`
and :mod:`vision_rag.simmap`. The index records the id of the model that built
it and refuses another; ``index`` also writes ``embedder.json`` beside it (the checkpoint path, adapter
and input settings) so ``search`` and ``explain`` load the same model unless ``--model`` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

__all__ = ["register", "SearchHitOutput", "SearchOutput", "IndexSummary"]


class SearchHitOutput(BaseModel):
    rank: int
    page_id: int
    score: float  # MaxSim, in [-query tokens, query tokens]
    normalized_score: float  # score / query tokens
    document_id: str
    page_number: int  # 0-based
    source_path: str
    metadata: dict


class SearchOutput(BaseModel):
    """``search --json``."""

    query: str
    index: str
    model_id: str
    hits: list[SearchHitOutput]


class IndexSummary(BaseModel):
    """The last line ``index`` prints (as JSON with ``--json``)."""

    index: str
    model_id: str
    pages_added: int
    pages_skipped: int  # pages of files already indexed with the same content
    pages_replaced: int  # old pages of files that changed
    files_failed: int  # unreadable files: reported, skipped, not fatal
    failures: list[dict]  # {"path", "error"}
    files_ignored: list[str]  # unsupported file types found in directories
    pages_in_index: int


def _model_options(parser, required: bool) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="ColPali checkpoint directory (merged, or the base model when --adapter is given)"
                             + ("" if required else "; default: the model recorded in the index"))
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory merged into --model at load time")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")


def register(sub) -> None:
    from .train_cli import register as register_training

    p = sub.add_parser("index", help="add PDFs, images and directories to a ColPali page index",
                       description="Exit status: 0 when the files were indexed (unreadable ones among them are "
                                   "reported and skipped), 1 when every file failed, 2 bad input or settings.")
    _model_options(p, required=True)
    p.add_argument("--index", required=True, help="index directory (created if missing)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="PDF or image files, or directories (recursive)")
    p.add_argument("--dpi", type=int, default=None, help="PDF rendering resolution")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="pixel budget of one page (default 16000000): larger pages are rendered at a lower "
                        "resolution and larger images scaled down, which bounds memory; image files over 89.5 "
                        "megapixels are refused unless the budget is larger")
    p.add_argument("--batch-size", type=int, default=4, help="pages embedded per forward pass")
    p.add_argument("--storage", default=None, choices=("fp16", "fp32", "sq8", "pq", "plaid"),
                   help="vector storage of a new index (default fp16)")
    p.add_argument("--pool-factor", type=int, default=None, help="token pooling factor of a new index (default 1: none)")
    p.add_argument("--plaid-nbits", type=float, default=None,
                   help="residual bits per dimension of a new --storage plaid index: 1, 2 (default), 3, 4, or a "
                        "fraction that mixes the two widths around it (3.75: 62.4 KB per 1,030-token page)")
    p.add_argument("--shards", type=int, default=None,
                   help="build (or add to) a collection of N shard indexes in --index (page ids name their shard)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: render pages in Ray Data tasks, embed them in an actor pool (one model per actor, "
                        "a GPU each when the cluster has GPUs). No ADDRESS: a local cluster; 'auto': the cluster "
                        "`ray start` runs here; HOST:PORT or ray://HOST:10001: a remote one")
    p.add_argument("--workers", type=int, default=None, help="embedding actors with --ray (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per embedding actor with --ray (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("export-qdrant", help="export a page index to a Qdrant multi-vector collection (MaxSim)",
                       description="Each page becomes a point (id = page id, its token vectors as one multi-vector "
                                   "compared with MaxSim, its record as payload). Run again to update; points of "
                                   "deleted pages are removed. The server's API key is read from the environment "
                                   "variable named by --api-key-env, never from the command line.")
    p.add_argument("--index", required=True, help="index directory (a plain or a sharded one)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--edge", default=None, help="an embedded Qdrant Edge shard directory (created if missing)")
    target.add_argument("--url", default=None, help="a Qdrant server, e.g. http://localhost:6333")
    p.add_argument("--collection", default=None, help="collection name on the server (created if missing)")
    p.add_argument("--vector-name", default="colpali", help="name of the multi-vector (default colpali)")
    p.add_argument("--api-key-env", default="QDRANT_API_KEY", help="environment variable holding the API key")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_export_qdrant)

    p = sub.add_parser("search", help="find the pages of a ColPali index that best match a query")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("query", help="the query text")
    p.add_argument("-k", type=int, default=5, help="number of pages (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--document", action="append", default=None, help="only pages of this document id (repeatable)")
    p.add_argument("--path-prefix", default=None, help="only pages whose source path starts with this")
    p.add_argument("--exact", action="store_true", help="exhaustive MaxSim even where the index would use FAISS")
    _model_options(p, required=False)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("explain", help="save a similarity map: which page patches matched which query tokens")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("query", help="the query text")
    p.add_argument("page_id", type=int, metavar="PAGE_ID", help="page id (from search)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--dpi", type=int, default=None, help="PDF rendering resolution of the page shown")
    p.add_argument("--all-tokens", action="store_true",
                   help="a map for every query token (default: the query's own words, not <bos>/prefix/pads)")
    _model_options(p, required=False)
    p.set_defaults(func=_cmd_explain)
    register_training(sub)


# -- model loading shared by the commands ---------------------------------------------------------------------------
def _load_embedder(args, index_dir: Path, expected_model_id: str | None):
    """The embedder given on the command line, else the one recorded beside the index; refuses a model
    whose id differs from the index's."""
    from .colpali import ColPaliEmbedder, read_embedder_record
    from .index import ModelMismatchError

    if args.model is not None:
        embedder = ColPaliEmbedder.load(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
    else:
        record = read_embedder_record(index_dir)
        if record is None:
            raise ValueError(f"index {index_dir} does not record which model built it; pass --model")
        if not Path(record.source).is_dir():
            raise FileNotFoundError(f"the model that built index {index_dir} was at {record.source}, which is gone; "
                                    "pass --model (the same checkpoint, moved)")
        embedder = ColPaliEmbedder.load(record.source, adapter=record.adapter, dtype=args.dtype, device=args.device,
                                        settings=record.settings)
    if expected_model_id is not None and embedder.model_id != expected_model_id:
        raise ModelMismatchError(f"index {index_dir} was built with model {expected_model_id!r}, but the model given "
                                 f"is {embedder.model_id!r}; use the model that built the index or a new index directory")
    return embedder


def _open_index(directory: str):
    from .sharded import open_collection

    path = Path(directory)
    return path, open_collection(path)  # a plain index, or a sharded collection as one


# -- commands -------------------------------------------------------------------------------------------------------
def _cmd_index(args) -> int:
    index_dir = Path(args.index)
    for p in args.paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        raise ValueError("--workers and --gpus-per-worker need --ray")
    if args.plaid_nbits is not None and args.storage != "plaid":
        raise ValueError("--plaid-nbits needs --storage plaid")
    nbits = args.plaid_nbits
    if nbits is not None and nbits == int(nbits):
        nbits = int(nbits)  # "2" and "2.0" are the whole width 2
    options = {k: v for k, v in dict(storage=args.storage, pool_factor=args.pool_factor,
                                     plaid_nbits=nbits).items() if v is not None}
    kwargs = dict(batch_size=args.batch_size, progress=True)
    if args.dpi is not None:
        kwargs["dpi"] = args.dpi
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    if args.ray is not None:
        report, summary = _index_on_ray(args, index_dir, options, kwargs)
    else:
        report, summary = _index_here(args, index_dir, options, kwargs)
    for failure in summary.failures:
        reason = failure["error"]
        print(f"failed: {reason if failure['path'] in reason else failure['path'] + ': ' + reason}", file=sys.stderr)
    for path in summary.files_ignored:
        print(f"ignored (unsupported file type): {path}", file=sys.stderr)
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        print(f"{summary.pages_added} pages added, {summary.pages_skipped} skipped (unchanged), "
              f"{summary.pages_replaced} replaced, {summary.files_failed} files failed; "
              f"{summary.pages_in_index} pages in {index_dir}")
    if summary.files_failed and not (report.files_indexed or report.files_unchanged):
        print(f"gemma-ground index: error: none of the {summary.files_failed} files could be indexed", file=sys.stderr)
        return 1  # some files failed among good ones: reported above, exit 0 (the good ones are indexed)
    return 0


def _index_here(args, index_dir: Path, options: dict, kwargs: dict):
    from .colpali import ColPaliEmbedder, write_embedder_record
    from .ingest import index_paths
    from .sharded import open_collection

    embedder = ColPaliEmbedder.load(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device)
    # Opening refuses an existing index built by another model (ModelMismatchError).
    with open_collection(index_dir, create=True, model_id=embedder.model_id, dim=embedder.dim, shards=args.shards,
                         **options) as index:
        index.lock_for_writing()  # one writer at a time: refused now if another process is writing
        write_embedder_record(index_dir, embedder)
        embedder.progress = False  # ingestion shows its own progress bar (pages indexed)
        report = index_paths(index, embedder, args.paths, **kwargs)
        return report, _summary(report, index, index_dir, embedder.model_id)


def _index_on_ray(args, index_dir: Path, options: dict, kwargs: dict):
    from types import SimpleNamespace

    from .colpali import write_embedder_record
    from .distributed import EmbedderSpec, connect, index_paths_ray, summarize_workers
    from .sharded import open_collection

    source = Path(args.model).expanduser().resolve()
    adapter = str(Path(args.adapter).expanduser().resolve()) if args.adapter else None
    spec = EmbedderSpec(source=str(source), adapter=adapter, dtype=args.dtype)
    connect(args.ray)
    report = index_paths_ray(index_dir, spec, args.paths, workers=args.workers or 1, shards=args.shards,
                             gpus_per_worker=args.gpus_per_worker, index_settings=options, **kwargs)
    print(f"ray: {report.workers} workers, {report.attempts} pass(es), {report.elapsed_s:.1f} s; "
          f"{summarize_workers(report) or 'no pages embedded'}", file=sys.stderr)
    if not index_dir.exists() or not any(index_dir.iterdir()):
        return report, _summary(report, None, index_dir, "")  # nothing could be indexed: no index made
    with open_collection(index_dir) as index:
        # The workers' model built it: record the checkpoint (the actors loaded it from these paths).
        write_embedder_record(index_dir, SimpleNamespace(model_id=index.model_id, source=spec.source,
                                                         adapter=spec.adapter, settings=spec.settings))
        return report, _summary(report, index, index_dir, index.model_id)


def _summary(report, index, index_dir: Path, model_id: str) -> IndexSummary:
    # Pages of unchanged files were skipped whole: count them from the index.
    skipped = sum(len(index.pages(source_path=path)) for path in report.files_unchanged) if index is not None else 0
    failures = [{"path": f.path, "error": f.reason} for f in report.files_failed]
    return IndexSummary(index=str(index_dir), model_id=model_id, pages_added=report.pages_added,
                        pages_skipped=skipped, pages_replaced=report.pages_replaced, files_failed=len(failures),
                        failures=failures, files_ignored=[f.path for f in report.files_ignored],
                        pages_in_index=len(index) if index is not None else 0)


def _cmd_search(args) -> int:
    from .index import SearchFilter

    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    index_dir, index = _open_index(args.index)
    with index:
        embedder = _load_embedder(args, index_dir, index.model_id)
        query = embedder.embed_queries([args.query], progress=False)[0]
        conditions = dict(document_id=args.document, source_path_prefix=args.path_prefix)
        conditions = {k: v for k, v in conditions.items() if v is not None}
        hits = index.search(query, k=args.k, filter=SearchFilter(**conditions) if conditions else None,
                            exact=True if args.exact else None)
        output = SearchOutput(query=args.query, index=str(index_dir), model_id=index.model_id, hits=[
            SearchHitOutput(rank=rank, page_id=h.page_id, score=h.score, normalized_score=h.normalized_score,
                            document_id=h.page.document_id, page_number=h.page.page_number,
                            source_path=h.page.source_path, metadata=h.page.metadata)
            for rank, h in enumerate(hits, 1)])
    if args.json:
        print(output.model_dump_json(indent=2))
        return 0
    if not output.hits:
        print(f"no pages in {index_dir} match (the index is empty or the filter excludes everything)")
    for hit in output.hits:
        print(f"{hit.rank:3d}. {hit.score:8.3f} ({hit.normalized_score:.3f})  page_id={hit.page_id}  "
              f"{hit.source_path} p.{hit.page_number + 1}")
    return 0


def _cmd_explain(args) -> int:
    from .ingest import DEFAULT_DPI, BadFileError, file_hash, read_page
    from .simmap import save_similarity_maps

    index_dir, index = _open_index(args.index)
    with index:
        embedder = _load_embedder(args, index_dir, index.model_id)
        page = index.get(args.page_id)
    source = Path(page.source_path)
    if not source.is_file():
        raise FileNotFoundError(f"page {args.page_id} was indexed from {source}, which is gone")
    if page.content_hash and file_hash(source) != page.content_hash:
        raise ValueError(f"{source} changed since page {args.page_id} was indexed; re-index it first")
    try:
        image = read_page(source, page.page_number, args.dpi or DEFAULT_DPI)
    except BadFileError as e:
        raise ValueError(str(e)) from None
    # The page is embedded again (not read from the index): stored vectors may be pooled or compressed,
    # and the map needs one vector per patch.
    (page_vectors,) = embedder.embed_pages([image], progress=False)
    (query_vectors,) = embedder.embed_queries([args.query], progress=False)
    tokens = None if args.all_tokens else list(embedder.query_text_span(args.query))
    out = save_similarity_maps(image, query_vectors, page_vectors, args.out, grid=embedder.patch_grid,
                               query_tokens=embedder.query_tokens(args.query), token_indices=tokens)
    score = float((query_vectors @ page_vectors.T).max(dim=1).values.sum())
    print(f"wrote {out} (page {args.page_id}: {source} p.{page.page_number + 1}, MaxSim {score:.3f})")
    return 0


def _cmd_export_qdrant(args) -> int:
    import os

    from .export_qdrant import export_to_qdrant, open_target

    api_key = os.environ.get(args.api_key_env) if args.url else None
    target = open_target(edge=args.edge, url=args.url, collection=args.collection, vector_name=args.vector_name,
                         api_key=api_key)
    report = export_to_qdrant(args.index, target)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(f"{report.points_written} pages written to {report.target} (vector {report.vector_name!r}, "
              f"{report.datatype}, MaxSim), {report.points_removed} removed; {report.points_in_target} points there")
    return 0
