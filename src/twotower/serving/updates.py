"""Writing an artifact's next version in place, and serving it.

    ItemChange        raw item rows to add or replace; ids to block, unblock, remove
      -> prepare_update   (``twotower.serving.item_changes``) rows checked, unchanged
                          ones dropped, the others embedded by the artifact's item tower
      -> ItemUpdate       what the next version changes (``twotower.serving.catalogue``)
      -> write_update     updates/<version>/ then manifest.json, under the export lock
      -> Artifact.updated the next version in memory (``apply_update``: both)

A version's files are written first, each atomically, and synced; the manifest, which
lists them with their checksums, replaces the previous one last (``write_manifest``).
Whenever the writer is killed, the folder holds the previous version whole (the loader
does not read files of a version above the manifest's: ``artifact_files.is_leftover``)
or the new one; the next update removes what a killed one left. Updates and exports of
one folder hold the same lock (``twotower.storage.folder_lock``), and an update is
written only on top of the version it was prepared on (``ItemUpdate.follows``).
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from twotower.errors import DataError
from twotower.serving.artifact import Artifact
from twotower.serving.artifact_files import (
    CHANGE_FILE,
    CHANGE_LISTS,
    UPDATE_ITEMS_FILE,
    UPDATE_VECTORS_FILE,
    UPDATES_DIR,
    folder_version,
    manifest_and_fingerprint,
    update_folder,
    write_manifest,
)
from twotower.serving.catalogue import ItemUpdate
from twotower.serving.item_changes import ItemChange, item_rows, prepare_update
from twotower.storage import (
    atomic_write,
    folder_lock,
    remove_partial_files,
    save_array,
    sha256_file,
    write_json,
)


def write_update(folder: Path, update: ItemUpdate) -> dict[str, Any]:
    """Writes ``update`` as the next version of the artifact in ``folder``: its files in
    ``updates/<version>/``, then the manifest (every earlier file still listed), under
    the lock exports of ``folder`` hold. What a killed update left is removed first.

    Returns:
        The new manifest (``version``: the update's).

    Raises:
        DataError: the folder no longer holds the version ``update`` was prepared on
            (another update or an export came first: prepare it again), or holds no
            artifact.
        ValueError: ``update`` changes nothing (``ItemUpdate.empty``).
    """
    if update.empty:
        raise ValueError("the update changes nothing: there is no version to write")
    folder = Path(folder)
    with folder_lock(folder):
        manifest, fingerprint = manifest_and_fingerprint(folder)
        if fingerprint != update.follows or manifest["version"] + 1 != update.version:
            raise DataError(
                f"{folder}: now holds version {manifest['version']} ({fingerprint}), not the "
                f"one this update was prepared on ({update.follows or 'unknown'}); prepare it again"
            )
        remove_leftovers(folder, manifest["version"])
        name = update_folder(update.version)
        try:
            files = _write_files(folder, name, update)
            entry = {
                "version": update.version,
                "folder": name,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                **update.counts(),
            }
            manifest = {
                **manifest,
                "version": update.version,
                "updates": [*manifest["updates"], entry],
                "files": {**manifest["files"], **files},
                "base_fingerprint": manifest.get("base_fingerprint", fingerprint),
            }
            write_manifest(folder, manifest)  # the version exists from here on
        except BaseException:
            shutil.rmtree(folder / name, ignore_errors=True)
            raise
    return manifest


def apply_update(artifact: Artifact, update: ItemUpdate) -> Artifact:
    """Writes ``update`` into the artifact's folder (``write_update``) and returns the
    version it makes, in memory (``Artifact.updated``: its index grown in place)."""
    return artifact.updated(update, write_update(artifact.folder, update))


def remove_leftovers(folder: Path, version: int) -> list[Path]:
    """Removes what updates killed on top of ``version`` left in the artifact
    ``folder``: version folders above it and a manifest being written. Only a holder
    of the folder's lock may call this. Returns what it removed."""
    removed = remove_partial_files(folder)
    updates = folder / UPDATES_DIR
    later = (
        [p for p in updates.iterdir() if folder_version(p.name) > version]
        if updates.is_dir()
        else []
    )
    for path in later:
        shutil.rmtree(path, ignore_errors=True)
    return [*removed, *later]


def _write_files(folder: Path, name: str, update: ItemUpdate) -> dict[str, str]:
    """Writes a version's three files into ``folder/name`` (made here, synced) and
    returns their {path: sha256}, as the manifest lists them."""
    where = folder / name
    where.mkdir(parents=True)
    atomic_write(where / UPDATE_ITEMS_FILE, lambda f: pq.write_table(update.rows, f))
    save_array(where / UPDATE_VECTORS_FILE, np.ascontiguousarray(update.vectors, np.float32))
    lists = (update.blocked, update.unblocked, update.removed)
    write_json(
        where / CHANGE_FILE, {n: list(ids) for n, ids in zip(CHANGE_LISTS, lists, strict=True)}
    )
    for path in (where, where.parent):  # the new names reach the disk before the manifest
        _sync_folder(path)
    names = (UPDATE_ITEMS_FILE, UPDATE_VECTORS_FILE, CHANGE_FILE)
    return {f"{name}/{file}": sha256_file(where / file) for file in names}


def _sync_folder(path: Path) -> None:
    """Flushes a folder's entries to disk (where the system allows opening a folder)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


__all__ = [
    "ItemChange",
    "ItemUpdate",
    "apply_update",
    "item_rows",
    "prepare_update",
    "remove_leftovers",
    "write_update",
]
