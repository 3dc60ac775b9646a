"""Serving: a verified artifact and a framework-free retriever over it.

artifact.py   the exported artifact's layout; ``Artifact.load`` checks every file
retriever.py  ``Retriever``: known users, new users' rows, free text, similar items
"""

from __future__ import annotations

from twotower.serving.artifact import Artifact
from twotower.serving.retriever import Result, Retriever, UnknownItemError, UnknownQueryError

__all__ = ["Artifact", "Result", "Retriever", "UnknownItemError", "UnknownQueryError"]
