"""How twotower writes files it must trust later: atomically, with checksums.

A file is written to a temporary name in the same folder, synced, then renamed
over the target, so a crash leaves either the old file or the new one, never a
half-written one. Readers compare SHA-256 sums recorded at write time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from twotower.errors import DataError

if TYPE_CHECKING:
    import scipy.sparse as sp

log = logging.getLogger(__name__)


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


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON with sorted keys, written atomically (a metrics file)."""
    text = json.dumps(value, indent=2, sort_keys=True).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


@contextlib.contextmanager
def replaced_folder(out: Path, marker: str, kind: str) -> Iterator[Path]:
    """Yields an empty staging folder beside ``out``; when the block ends without an
    error, the staging folder becomes ``out`` in one atomic step.

    ``out`` is always whole, whenever the process is killed: the previous folder until
    the swap (``renameat2(RENAME_EXCHANGE)`` on Linux), the new one after it. Where the
    file system cannot swap, the previous folder is renamed aside to
    ``.<out>.<random>.old`` first; a process killed between the two renames leaves it
    there, and the next call puts it back. Calls for one ``out`` hold a lock
    (``.<out>.lock`` beside it), so the next one also removes whatever a killed one left
    half-built. A block that raises leaves ``out`` as it was.

    Args:
        out: the folder to replace (or create).
        marker: the file every folder of this kind holds (e.g. ``manifest.json``): an
            existing ``out`` without it is not replaced, and only a folder set aside with
            it is put back.
        kind: what such a folder is, for messages (``"an exported artifact"``).

    Raises:
        DataError: ``out`` exists and is not such a folder.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out) as locked:
        _recover(out, marker, remove_leftovers=locked)
        _check_replaceable(out, marker, kind)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            yield staging
            _swap_in(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Holds the lock ``replaced_folder`` takes for ``out`` (``.<out>.lock`` beside it),
    for a writer that changes files inside ``out`` instead of replacing it: it and
    every replacement of ``out`` then wait for each other."""
    with _folder_lock(Path(os.path.abspath(out))):
        yield


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[bool]:
    """Holds ``.<out>.lock`` (beside ``out``) exclusively: another writer of ``out`` waits.
    Yields whether it could (not where the system has no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(out.parent / f".{out.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recover(out: Path, marker: str, remove_leftovers: bool) -> None:
    """Puts back a previous folder that a killed swap left renamed aside; with the lock
    held, also removes the folders that killed writers left behind."""
    aside = sorted(
        out.parent.glob(f".{out.name}.*.old"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if aside and not out.exists() and (aside[0] / marker).is_file():
        os.rename(aside[0], out)
        log.warning("%s: put back the previous folder, left aside by a killed writer", out)
        aside = aside[1:]
    if not remove_leftovers:
        return
    for leftover in [*aside, *out.parent.glob(f".{out.name}.*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            log.info("removed %s, left by a writer that was killed", leftover)


def _check_replaceable(out: Path, marker: str, kind: str) -> None:
    """Refuses to replace something that is not a folder of the kind ``marker`` names."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; refusing to replace it")
    if not (out / marker).is_file() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not {kind} (no {marker}); refusing to replace it")


def _swap_in(staging: Path, out: Path) -> None:
    """Puts ``staging`` at ``out``; a previous ``out`` is swapped out, then removed."""
    if not out.exists():
        os.rename(staging, out)
        return
    if exchange_paths(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous folder
        return
    aside = staging.with_suffix(".old")  # unique, as the random part of staging's name is
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_array(path: Path, array: np.ndarray) -> None:
    """One numpy array as ``.npy`` (no pickle), atomically."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def load_array(
    path: Path, shape: tuple[int, ...], dtype: type = np.float32, mapped: bool = False
) -> np.ndarray:
    """Reads what ``save_array`` wrote, refusing another shape or type.

    ``mapped``: map the file instead of reading it (copy-on-write: the pages stay the
    page cache's, shared by every process that maps the file, until one writes them).

    Raises:
        DataError: the file is missing, unreadable, or holds another shape or type.
    """
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="c" if mapped else None)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable array ({err})") from None
    if array.dtype != dtype or array.shape != shape:
        raise DataError(
            f"{path}: expected {shape} {np.dtype(dtype).name} values, got {array.shape} "
            f"{array.dtype}"
        )
    return array


def save_csr(path: Path, matrix: sp.csr_matrix) -> None:
    """A 0/1 CSR matrix as its index arrays (``indptr``, ``indices``, ``shape``), no pickle."""
    shape = np.array(matrix.shape, np.int64)
    atomic_write(
        path, lambda f: np.savez(f, indptr=matrix.indptr, indices=matrix.indices, shape=shape)
    )


def load_csr(path: Path, shape: tuple[int, int]) -> sp.csr_matrix:
    """Reads what ``save_csr`` wrote (every stored entry 1), refusing another shape.

    Raises:
        DataError: the file is missing, unreadable or inconsistent, or of another shape.
    """
    try:
        with np.load(path, allow_pickle=False) as arrays:
            indptr, indices = arrays["indptr"], arrays["indices"]
            stored = tuple(int(n) for n in arrays["shape"])
    except (ValueError, OSError, EOFError, KeyError) as err:
        raise DataError(f"{path}: not readable sparse-matrix arrays ({err})") from None
    if stored != shape or len(indptr) != shape[0] + 1 or indptr[-1] != len(indices):
        raise DataError(f"{path}: expected a {shape} matrix, got shape {stored}")
    import scipy.sparse as sp  # here: the config, which writes through this module, never needs it

    ones = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix((ones, indices, indptr), shape=shape)
