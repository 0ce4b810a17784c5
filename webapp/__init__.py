"""The web app (``gemma-ground serve``): page search and grounded statistical answers over a JSON API.

Public API: :func:`create_app` (a FastAPI app) and :func:`serve` (uvicorn on 127.0.0.1); see :mod:`.app`.
"""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'webapp' has no attribute {name!r}")
