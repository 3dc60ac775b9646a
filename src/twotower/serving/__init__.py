"""Serving: a verified artifact and a framework-free retriever over it.

artifact.py   the exported artifact's layout; ``Artifact.load`` checks every file
retriever.py  ``Retriever``: known users, new users' rows, free text, similar items
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twotower.serving.artifact import Artifact
    from twotower.serving.retriever import Result, Retriever, UnknownItemError, UnknownQueryError

__all__ = ["Artifact", "Result", "Retriever", "UnknownItemError", "UnknownQueryError"]
# Imported on first use, so that a module of this package that needs neither (the
# parent of several workers: server.py, workers.py) does not load torch.
_HOMES = {"Artifact": "twotower.serving.artifact"} | dict.fromkeys(
    ["Result", "Retriever", "UnknownItemError", "UnknownQueryError"], "twotower.serving.retriever"
)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
