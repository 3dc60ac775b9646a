"""How twotower writes files it must trust later: atomically, with checksums.

A file is written to a temporary name in the same folder, synced, then renamed
over the target, so a crash leaves either the old file or the new one, never a
half-written one. Readers compare SHA-256 sums recorded at write time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from twotower.errors import DataError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write`` on a temporary file, then renames it to ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, missing: str) -> Any:
    """Parses a JSON file that twotower wrote.

    Args:
        path: the file.
        missing: what to say after the path when the file does not exist.

    Raises:
        DataError: the file is missing, or not valid UTF-8 JSON (both name the path).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: corrupt ({err})") from None
