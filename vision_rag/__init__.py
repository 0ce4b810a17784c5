"""Visual document retrieval (ColPali-style): page ingestion, a FAISS multi-vector index with exact
MaxSim rescoring, and similarity maps.

Public API: :class:`Index` (``open`` / ``add`` / ``delete`` / ``update`` / ``search`` / ``commit``),
:class:`PageRecord`, :class:`Page`, :class:`Hit`, :class:`SearchFilter`, :func:`index_paths` with its
:class:`IngestReport`, :func:`maxsim` / :func:`maxsim_packed` / :func:`top_k`, :func:`similarity_maps`
and :func:`save_similarity_maps`; the embedder :class:`ColPaliEmbedder` (with :class:`ColPaliSettings`);
:func:`train_retriever` (fine-tuning on query/page pairs).
Scale-out: :class:`ShardedIndex` (N shard indexes as one), :func:`index_paths_ray` (indexing on Ray),
:class:`RayShardedIndex` (shards held by Ray actors), :func:`export_to_qdrant`. Submodules import lazily
so ``import vision_rag`` stays cheap (and Ray / Qdrant are needed only by what uses them).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Index": "index", "Hit": "index", "Page": "index", "PageRecord": "index", "SearchFilter": "index",
    "IndexSettings": "index", "pool_tokens": "index",
    "IndexFormatError": "index", "IndexLockedError": "index", "IndexSettingsError": "index",
    "ModelMismatchError": "index", "PageNotFoundError": "index",
    "index_paths": "ingest", "IngestReport": "ingest", "PageEmbedder": "ingest", "read_pages": "ingest",
    "BadFileError": "ingest",
    "maxsim": "scoring", "maxsim_packed": "scoring", "pack_pages": "scoring", "top_k": "scoring",
    "similarity_maps": "simmap", "save_similarity_maps": "simmap",
    "ColPaliEmbedder": "colpali", "ColPaliSettings": "colpali", "load_colpali": "colpali",
    "train_retriever": "retriever_training",
    "ShardedIndex": "sharded", "ShardedHits": "sharded", "ShardUnavailableError": "sharded",
    "open_collection": "sharded",
    "index_paths_ray": "distributed", "DistributedIngestReport": "distributed", "EmbedderSpec": "distributed",
    "RayShardedIndex": "ray_shards",
    "export_to_qdrant": "export_qdrant", "EdgeShardTarget": "export_qdrant", "QdrantClientTarget": "export_qdrant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vision_rag' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
