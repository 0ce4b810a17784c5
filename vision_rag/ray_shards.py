"""Sharded search on Ray: each shard of a collection (:mod:`vision_rag.sharded`) held open by a Ray actor,
queries fanned out to all of them and the per-shard top-k lists merged (``gemma-ground serve --ray``).

    client = RayShardedIndex("collection/")          # one actor per shard, restarted by Ray if it dies
    hits = client.search(query_vectors, k=10)        # ShardedHits: hits + missing_shards

A shard actor opens its shard index and keeps it in memory: the FAISS token indexes in the process, the
vectors memory-mapped and read ahead into the node's page cache when the actor starts (so it stays
there as far as the node's RAM allows: size shards with ``memory_per_shard``). It answers searches,
lookups and deletes for its shard, translating page ids (``g = local * N + shard``). Actors are
created with ``max_restarts=-1``: when one dies Ray starts it again and it reopens its shard. A search
waits at most ``timeout_s`` for each shard; the shards that did not answer (dead, restarting, too slow)
are listed in the result's ``missing_shards`` and the hits are those of the other shards: an answer is
never silently partial. An actor that cannot start (its shard directory unreadable) stays missing, with
the reason in :meth:`RayShardedIndex.status`; :meth:`RayShardedIndex.restart_shard` starts a new one.

Deletes and updates go to the owning shard's actor, which commits them with a short-lived writer
handle (the index's write lock is taken and released), so a build may write the shard afterwards.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from .index import Hit, Index, IndexSettings, IndexSettingsError, Page, PageNotFoundError, SearchFilter
from .sharded import (
    ShardedHits,
    ShardUnavailableError,
    as_query_list,
    global_page_id,
    merge_hits,
    relabel_hit,
    relabel_page,
    shard_directories,
    shard_filter,
    split_page_id,
)

DEFAULT_TIMEOUT_S = 30.0


class ShardStatus(BaseModel):
    shard: int
    available: bool
    pages: int | None = None  # live pages at the last answer
    generation: int | None = None
    worker: str | None = None  # "host:pid" of the actor process
    error: str | None = None


class ShardServer:
    """The body of a shard actor (a plain class; :class:`RayShardedIndex` runs it as a Ray actor)."""

    def __init__(self, directory: str, shard: int, n_shards: int, search_settings: Mapping[str, Any],
                 threads: int = 1):
        import torch

        torch.set_num_threads(threads)  # the actor's share of the node: no oversubscription with its neighbours
        self.directory, self.shard, self.n = directory, shard, n_shards
        self.index = Index.open(directory, **dict(search_settings))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        read_ahead(Path(directory) / "data", [s.vector_file for s in self.index.manifest.segments])

    def info(self) -> dict:
        return dict(model_id=self.index.model_id, dim=self.index.dim, settings=self.index.settings.model_dump(),
                    **self._state())

    def _state(self) -> dict:
        return dict(pages=len(self.index), generation=self.index.generation, worker=self.worker)

    def search(self, queries: list[np.ndarray], k: int, filter: dict | None, exact: bool | None) -> dict:
        local_filter = shard_filter(filter, self.shard, self.n)
        if local_filter is not None and local_filter.page_ids == []:
            hits: list[list[Hit]] = [[] for _ in queries]
        else:
            found = self.index.search(queries, k=k, filter=local_filter, exact=exact)
            hits = [[relabel_hit(h, self.shard, self.n) for h in row] for row in found]
        return dict(hits=hits, **self._state())

    def get(self, local_id: int) -> Page:
        return relabel_page(self.index.get(local_id), self.shard, self.n)

    def vectors(self, local_id: int) -> np.ndarray:
        return self.index.vectors(local_id).numpy()

    def pages(self, document_id: str | None, source_path: str | None) -> list[Page]:
        return [relabel_page(p, self.shard, self.n) for p in self.index.pages(document_id=document_id,
                                                                               source_path=source_path)]

    def absent(self, local_ids: list[int]) -> list[int]:
        """The ids among ``local_ids`` that are not live pages of this shard."""
        live = set(self.index.page_ids())
        return [p for p in local_ids if p not in live]

    def delete(self, local_ids: list[int]) -> dict:
        with Index.open(self.directory) as writer:
            writer.delete(local_ids)
        self.index.refresh()
        return self._state()

    def update(self, local_id: int, fields: dict) -> dict:
        with Index.open(self.directory) as writer:
            writer.update(local_id, **fields)
        self.index.refresh()
        return self._state()


def read_ahead(data_dir: Path, files: Sequence[str]) -> None:
    """Ask the kernel to read the files into the page cache now (asynchronously), so the first searches do
    not wait on the disk; a no-op where posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return
    for name in files:
        try:
            fd = os.open(data_dir / name, os.O_RDONLY)
        except OSError:
            continue  # replaced by a commit meanwhile: the index reopens what it needs
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return tuple(getattr(rex, name) for name in ("RayActorError", "ActorUnavailableError", "GetTimeoutError",
                                                  "ObjectLostError", "OwnerDiedError") if hasattr(rex, name))


class RayShardedIndex:
    """A sharded collection searched through one Ray actor per shard; read API like :class:`Index`
    (``search`` / ``get`` / ``pages`` / ``vectors`` / ``delete`` / ``update``), global page ids.

    ``shards``: the expected number of shards (checked against the collection). ``timeout_s``: how long a
    call waits for a shard. ``cpus_per_shard`` / ``memory_per_shard`` (bytes): each actor's Ray resource
    request (defaults: the cluster's CPUs shared among the shards, at most 1; no memory request), which
    places shards on nodes with room for them. ``search_settings``: the search knobs each shard opens its
    index with (``nprobe``, ``rerank`` ...). Call :func:`vision_rag.distributed.connect` first (a local
    cluster is started if this process has none)."""

    def __init__(self, directory: str | os.PathLike, *, shards: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, cpus_per_shard: float | None = None,
                 memory_per_shard: int | None = None, **search_settings: Any):
        from .distributed import connect, require_ray

        ray = require_ray()
        if not ray.is_initialized():
            connect()
        self.directory = Path(directory)
        self.timeout_s = timeout_s
        self._paths = [str(p.resolve()) for p in shard_directories(self.directory, shards)]
        self.n_shards = len(self._paths)
        if cpus_per_shard is None:
            cpus_per_shard = min(1.0, float(ray.cluster_resources().get("CPU", 1)) / self.n_shards)
        options: dict[str, Any] = dict(max_restarts=-1, max_task_retries=0, num_cpus=cpus_per_shard)
        if memory_per_shard:
            options["memory"] = int(memory_per_shard)
        self._actor_class = ray.remote(ShardServer).options(**options)
        self._threads = max(1, int(cpus_per_shard))
        self._search_settings = dict(search_settings)
        self._lock = threading.Lock()
        self._actors = [self._start(s) for s in range(self.n_shards)]
        self._last: dict[int, dict] = {}
        infos, missing = self._call_all("info", timeout_s=max(timeout_s, 120.0))
        if missing:
            self.close()
            raise ShardUnavailableError(f"shards {sorted(missing)} of {self.directory} did not start: "
                                        + "; ".join(f"{s}: {why}" for s, why in sorted(missing.items())), missing)
        first = infos[0]
        if any(info["model_id"] != first["model_id"] for info in infos.values()):
            self.close()
            raise IndexSettingsError(f"the shards of {self.directory} were built by different models")
        self.model_id, self.dim = first["model_id"], first["dim"]
        self.settings = IndexSettings.model_validate(first["settings"])

    def _start(self, shard: int):
        return self._actor_class.remote(self._paths[shard], shard, self.n_shards, self._search_settings, self._threads)

    def close(self) -> None:
        """Stop the shard actors."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    def __enter__(self) -> RayShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- calls ---------------------------------------------------------------------------------

    def actor(self, shard: int):
        """The Ray actor handle of a shard (e.g. to watch or kill it)."""
        return self._actors[shard]

    def restart_shard(self, shard: int) -> None:
        """Replace a shard's actor by a new one (Ray restarts a crashed actor by itself; this is for one
        that could not start, once its shard is readable again)."""
        import ray

        with self._lock:
            ray.kill(self._actors[shard], no_restart=True)
            self._actors[shard] = self._start(shard)

    def _call_all(self, method: str, args_of=lambda shard: (), *, shards: Sequence[int] | None = None,
                  timeout_s: float | None = None) -> tuple[dict[int, Any], dict[int, str]]:
        """Call ``method`` on the shards (all by default) at once -> (answers, missing shard -> why)."""
        import ray

        shards = range(self.n_shards) if shards is None else shards
        refs = {s: getattr(self._actors[s], method).remote(*args_of(s)) for s in shards}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s or self.timeout_s)
        ready = set(ready)
        answers: dict[int, Any] = {}
        missing: dict[int, str] = {}
        for shard, ref in refs.items():
            if ref not in ready:
                missing[shard] = f"no answer within {timeout_s or self.timeout_s:g} s (down or restarting)"
                continue
            try:
                answers[shard] = ray.get(ref)
            except _unavailable_errors() as exc:
                missing[shard] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for shard, answer in answers.items():
            if isinstance(answer, dict) and "generation" in answer:
                self._last[shard] = {k: answer[k] for k in ("pages", "generation", "worker")}
        return answers, missing

    def _call_one(self, shard: int, method: str, *args, timeout_s: float | None = None):
        answers, missing = self._call_all(method, lambda s: args, shards=[shard], timeout_s=timeout_s)
        if missing:
            raise ShardUnavailableError(f"shard {shard} of {self.directory} is unavailable: {missing[shard]}", [shard])
        return answers[shard]

    # ---- reading -------------------------------------------------------------------------------

    def search(self, queries, k: int = 10, filter: SearchFilter | Mapping | None = None, *,
               exact: bool | None = None, timeout_s: float | None = None):
        """Best pages over all shards that answer: a :class:`ShardedHits` per query (a list of them for a
        list of queries); ``missing_shards`` names the shards that did not answer in ``timeout_s``."""
        single, query_list = as_query_list(queries, self.dim)
        if filter is not None and not isinstance(filter, SearchFilter):
            filter = SearchFilter.model_validate(dict(filter))
        filter_data = filter.model_dump() if filter is not None else None
        answers, missing = self._call_all("search", lambda s: (query_list, k, filter_data, exact), timeout_s=timeout_s)
        merged = [ShardedHits(merge_hits((answers[s]["hits"][q] for s in sorted(answers)), k),
                              shards=self.n_shards, missing_shards=list(missing))
                  for q in range(len(query_list))]
        return merged[0] if single else merged

    def status(self, timeout_s: float | None = None) -> list[ShardStatus]:
        """Every shard: answering now?, pages, generation, worker."""
        answers, missing = self._call_all("info", timeout_s=timeout_s)
        out = []
        for shard in range(self.n_shards):
            if shard in answers:
                a = answers[shard]
                out.append(ShardStatus(shard=shard, available=True, pages=a["pages"], generation=a["generation"],
                                       worker=a["worker"]))
            else:
                last = self._last.get(shard, {})
                out.append(ShardStatus(shard=shard, available=False, pages=last.get("pages"),
                                       generation=last.get("generation"), error=missing.get(shard)))
        return out

    def __len__(self) -> int:
        """Live pages, as of each shard's last answer (a search or a status call)."""
        return sum(last["pages"] for last in self._last.values())

    @property
    def generation(self) -> int:
        """Changes when any shard's generation (as of its last answer) changes."""
        return sum(last["generation"] for last in self._last.values())

    def get(self, page_id: int) -> Page:
        shard, local = split_page_id(page_id, self.n_shards)
        try:
            return self._call_one(shard, "get", local)
        except PageNotFoundError:
            raise PageNotFoundError(f"no page with id {page_id} in index {self.directory}") from None

    def vectors(self, page_id: int):
        import torch

        shard, local = split_page_id(page_id, self.n_shards)
        try:
            return torch.from_numpy(self._call_one(shard, "vectors", local))
        except PageNotFoundError:
            raise PageNotFoundError(f"no page with id {page_id} in index {self.directory}") from None

    def pages(self, document_id: str | None = None, source_path: str | None = None) -> list[Page]:
        """Live page records of all shards; :class:`ShardUnavailableError` if a shard does not answer (a
        listing is never silently partial)."""
        answers, missing = self._call_all("pages", lambda s: (document_id, source_path))
        if missing:
            raise ShardUnavailableError(f"shards {sorted(missing)} of {self.directory} did not answer", missing)
        return sorted((p for s in answers for p in answers[s]), key=lambda p: p.page_id)

    def page_ids(self) -> list[int]:
        return [p.page_id for p in self.pages()]

    def refresh(self) -> None:
        self.status()

    # ---- writing -------------------------------------------------------------------------------

    def delete(self, page_ids: Sequence[int]) -> None:
        """Delete pages by global id, each shard its own (checked first: :class:`PageNotFoundError` names
        the ids that are not live, and nothing is deleted)."""
        by_shard: dict[int, list[int]] = {}
        for page_id in page_ids:
            shard, local = split_page_id(page_id, self.n_shards)
            by_shard.setdefault(shard, []).append(local)
        not_live, missing = self._call_all("absent", lambda s: (by_shard[s],), shards=list(by_shard))
        if missing:
            raise ShardUnavailableError(f"shards {sorted(missing)} of {self.directory} are unavailable; "
                                        "nothing was deleted", missing)
        absent = sorted(global_page_id(p, s, self.n_shards) for s, ids in not_live.items() for p in ids)
        if absent:
            raise PageNotFoundError(f"cannot delete pages {absent}: no such pages in {self.directory}")
        _, failed = self._call_all("delete", lambda s: (by_shard[s],), shards=list(by_shard))
        if failed:
            raise ShardUnavailableError(f"shards {sorted(failed)} did not confirm the delete (it is applied if the "
                                        "shard received it; delete again to be sure)", failed)

    def update(self, page_id: int, **fields) -> None:
        """Change record fields of a page (``metadata=...``, ``document_id=...``) on its shard."""
        shard, local = split_page_id(page_id, self.n_shards)
        self._call_one(shard, "update", local, fields)
