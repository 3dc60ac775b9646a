"""Serving: a verified artifact and a framework-free retriever over it.

artifact.py   the exported artifact's layout; ``Artifact.load`` checks every file
query.py      ``Query`` and ``Result``: what one retrieval asks for and answers
retriever.py  ``Retriever``: known users, new users' rows, free text, similar items
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twotower.serving.artifact import Artifact
    from twotower.serving.query import Query, Result, UnknownItemError, UnknownQueryError
    from twotower.serving.retriever import Retriever

__all__ = [
    "Artifact",
    "Query",
    "Result",
    "Retriever",
    "UnknownItemError",
    "UnknownQueryError",
]
# Imported on first use, so that a module of this package that needs neither (the
# parent of several workers: server.py, workers.py) does not load torch.
_HOMES = {
    "Artifact": "twotower.serving.artifact",
    "Retriever": "twotower.serving.retriever",
} | dict.fromkeys(
    ["Query", "Result", "UnknownItemError", "UnknownQueryError"], "twotower.serving.query"
)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
