"""Pick a statistics backend, and look many queries up at once.

``open_source()`` with no arguments gives the Data Commons NL endpoint when an API key is configured
(``DC_API_KEY`` or ``api_key=``) and the embedded local store otherwise, so everything works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from .http import DEFAULT_NL_URL, RetryPolicy, api_key_from_env, map_bounded
from .nl_client import NLClient
from .resolver import DEFAULT_THRESHOLD, LocalSource
from .rest_client import RestClient
from .store import open_store
from .types import AuthError, Lookup, StatSource

__all__ = ["open_source", "lookup_many", "LocalSource", "NLClient", "RestClient", "SOURCE_KINDS"]

SOURCE_KINDS = ("local", "nl", "rest")


def open_source(kind: Literal["local", "nl", "rest"] | None = None, **settings: Any) -> StatSource:
    """A ``StatSource`` of the given kind (None: "nl" when a key is configured, else "local").

    Settings:
      local: ``store`` (a store, or the path of a store file: packed or made with ``python -m
             grounding.store``; default the shipped default store), ``threshold``, ``matcher`` (a
             :class:`~grounding.variable_match.VariableMatcher`; default the lexical matcher fused with
             the hybrid index), ``embedding_model`` (for that index: a sentence-transformers directory
             or name, ``"none"`` for lexical only; default ``$GEMMA_GROUNDING_EMBEDDING_MODEL``, else
             all-MiniLM-L6-v2).
      nl:    ``base_url`` (default the public endpoint), ``api_key``, ``key_param`` ("key"; "apikey" for
             self-hosted Data Commons), ``policy`` (RetryPolicy), ``cache_dir``, ``cache_ttl``.
      rest:  ``base_url``, ``api_key``, ``policy``, ``cache_dir``, ``cache_ttl``, ``threshold``.
    """
    api_key = api_key_from_env(settings.pop("api_key", None))
    if kind is None:
        kind = "nl" if api_key else "local"
    if kind == "local":
        store = settings.pop("store", None)
        if isinstance(store, (str, Path)):
            store = open_store(store)
        threshold = settings.pop("threshold", DEFAULT_THRESHOLD)
        matcher = settings.pop("matcher", None)
        embedding_model = settings.pop("embedding_model", None)
        _no_extra(kind, settings)
        return LocalSource(store, threshold=threshold, matcher=matcher, embedding_model=embedding_model)
    if "policy" in settings and not isinstance(settings["policy"], RetryPolicy):
        raise TypeError(f"policy must be a grounding.http.RetryPolicy, got {type(settings['policy']).__name__}")
    if kind == "nl":
        base_url = settings.pop("base_url", DEFAULT_NL_URL)
        if not api_key and base_url.rstrip("/") == DEFAULT_NL_URL:
            raise AuthError("the public Data Commons NL endpoint needs an API key: set DC_API_KEY (keys from "
                            "apikeys.datacommons.org with the Data Commons NL API enabled) or use kind='local'")
        allowed = {"key_param", "policy", "cache_dir", "cache_ttl"}
        _no_extra(kind, {k: v for k, v in settings.items() if k not in allowed})
        return NLClient(base_url, api_key, **settings)
    if kind == "rest":
        allowed = {"base_url", "policy", "cache_dir", "cache_ttl", "threshold"}
        _no_extra(kind, {k: v for k, v in settings.items() if k not in allowed})
        return RestClient(api_key=api_key, **settings)
    raise ValueError(f"unknown source kind {kind!r}; choose one of {SOURCE_KINDS}")


def _no_extra(kind: str, settings: dict[str, Any]) -> None:
    if settings:
        raise TypeError(f"unknown settings for the {kind!r} source: {sorted(settings)}")


def lookup_many(source: StatSource, queries: list[str], mode: Literal["point", "table"] = "point",
                max_workers: int = 4) -> list[Lookup]:
    """Look every query up, at most ``max_workers`` at a time; one :class:`Lookup` per query, in order.

    A failing query does not stop the others: its Lookup carries ``error`` ("TransientError: ...").
    Duplicate queries are looked up once.
    """
    if mode not in ("point", "table"):
        raise ValueError(f"mode must be 'point' or 'table', got {mode!r}")
    distinct = list(dict.fromkeys(queries))
    fetch = source.point if mode == "point" else source.table
    outcomes = dict(zip(distinct, map_bounded(fetch, distinct, max_workers=max_workers), strict=True))
    lookups = []
    for query in queries:
        outcome = outcomes[query]
        error = None if outcome.error is None else f"{type(outcome.error).__name__}: {outcome.error}"
        lookups.append(Lookup(query=query, mode=mode, result=outcome.value, error=error))
    return lookups
