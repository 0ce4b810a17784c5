"""Statistical grounding (DataGemma-style): statistics sources, RIG and RAG pipelines, LLM backends, ``ask``.

Public API: :func:`ask` -> :class:`Answer` (``guard=``: a :func:`models.load_guard` safety guard, its
verdicts in :class:`GuardReport`); pipelines :class:`RIG` (with :func:`parse_annotations`,
:class:`AnnotationParser`, :func:`ground_text`) and :class:`RAG`; LLM backends :class:`NativeGemma`,
:class:`GeminiREST`, :class:`LangChainLLM`; sources through :func:`open_source` and
:func:`lookup_many`; the result types and errors of :mod:`grounding.types`. Submodules import lazily so
``import grounding`` stays cheap.
"""

from __future__ import annotations

import importlib

from .types import __all__ as _types_all

_EXPORTS = {
    "Answer": "answer", "ask": "answer", "state_plainly": "answer", "GuardReport": "guard",
    "RIG": "rig", "RIGResult": "rig", "Claim": "rig", "Annotation": "rig", "AnnotationParser": "rig",
    "parse_annotations": "rig", "ground_text": "rig", "substitute": "rig",
    "RAG": "rag", "RAGResult": "rag", "NumberedTable": "rag", "parse_questions": "rag", "render_table": "rag",
    "NativeGemma": "llm", "GeminiREST": "llm", "LangChainLLM": "llm", "LLMError": "llm", "load_llm": "llm",
    "open_source": "sources", "lookup_many": "sources", "LocalSource": "sources", "NLClient": "sources",
    "RestClient": "sources", "Store": "store", "serve": "server", "start_server": "server",
    "VariableIndex": "variable_index", "VariableDoc": "variable_index", "VariableCandidate": "variable_index",
    "Gazetteer": "gazetteer",
    **{name: "types" for name in _types_all},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grounding' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
