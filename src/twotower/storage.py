"""How twotower writes files it must trust later: atomically, with checksums.

A file is written to a temporary name in the same folder, synced, then renamed
over the target, so a crash leaves either the old file or the new one, never a
half-written one. Readers compare SHA-256 sums recorded at write time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import sys
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


def remove_partial_files(folder: Path) -> list[Path]:
    """Deletes the temporary files that writers killed mid-write left in ``folder``.

    Only the one process that writes into ``folder`` may call this: another's write
    in progress would look the same as a leftover.
    """
    partial = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_paths(first: Path, second: Path) -> bool:
    """Swaps two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); returns False, having changed nothing, where the system or
    the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd = -100
    status = renameat2(
        at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE
    )
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {first} and {second}: {os.strerror(code)}")


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
