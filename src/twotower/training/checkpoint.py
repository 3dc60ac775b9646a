"""Checkpoints that are never half-written and are verified when read.

A checkpoint named ``last`` is written as ``last-<serial>.pt`` (temporary file, then
rename), and only then does the pointer ``last.json`` (also written atomically) name
it with its SHA-256; older files of that name are removed last. Whenever the process
dies, the pointer names a complete file. Files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, no pickle of
arbitrary objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from twotower.errors import DataError
from twotower.storage import atomic_write, read_json, sha256_file


class CheckpointStore:
    """Named checkpoints (``last``, ``best``) in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def save(self, name: str, state: dict[str, Any], serial: int) -> Path:
        """Writes ``state`` as checkpoint ``name``; returns the file written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}-{serial:06d}.pt"
        atomic_write(path, lambda f: torch.save(state, f))
        pointer = {"file": path.name, "sha256": sha256_file(path), "serial": serial}
        text = json.dumps(pointer, indent=2).encode("utf-8")
        atomic_write(self.folder / f"{name}.json", lambda f: f.write(text))
        for stale in self.folder.glob(f"{name}-*.pt"):
            if stale.name != path.name:
                stale.unlink(missing_ok=True)
        return path

    def exists(self, name: str) -> bool:
        return (self.folder / f"{name}.json").is_file()

    def path(self, name: str) -> Path:
        """The file checkpoint ``name`` points to."""
        return self.folder / self._pointer(name)["file"]

    def sha256(self, name: str) -> str:
        """The SHA-256 of checkpoint ``name``'s file, as its pointer records it."""
        return self._pointer(name)["sha256"]

    def load(self, name: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Reads checkpoint ``name`` after checking its checksum."""
        pointer = self._pointer(name)
        path = self.folder / pointer["file"]
        if not path.is_file():
            raise DataError(f"{path}: missing, though {name}.json points to it")
        if sha256_file(path) != pointer["sha256"]:
            raise DataError(f"{path}: corrupt (its checksum does not match {name}.json)")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises several types for a bad file
            raise DataError(f"{path}: not a readable checkpoint ({err})") from None

    def _pointer(self, name: str) -> dict[str, Any]:
        pointer_file = self.folder / f"{name}.json"
        pointer = read_json(pointer_file, f"no checkpoint {name!r} here")
        if not isinstance(pointer, dict) or not {"file", "sha256"} <= pointer.keys():
            raise DataError(f"{pointer_file}: not a checkpoint pointer")
        return pointer
