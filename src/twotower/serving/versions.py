"""A running service's artifact and the next version in its folder, applied in place.

An update (``POST /admin/items``, or ``twotower export --update`` beside a running
service) writes the artifact's next version into the folder: its changed rows and
their vectors under ``updates/<version>/``, then the manifest. A service that serves
the version before it need not load the folder again (every file hashed, every table
read): ``next_version`` reads only the new version's files, checks them against the
manifest, and applies them to the served artifact (``Artifact.updated``), whose index
grows in place. That growing must not run beside a search (FAISS's ``add`` is not
safe beside one), so it runs where the caller says: between two of the micro-batcher's
batches. The version served until then keeps answering as before: its catalogue
never returns the slots it does not know.

``next_version`` gives None where the folder is not exactly the served version's next
one (another export; several versions on; a served index that has grown past its
version, after a reload that failed in another worker): the service loads the
folder whole then, as a reload does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twotower.serving.artifact import Artifact
from twotower.serving.artifact_files import (
    manifest_and_fingerprint,
    read_update,
    verify_listed,
)

# runs a function where no search of the served index runs beside it, returns its result
Between = Callable[[Callable[[], Artifact]], Artifact]


def next_version(served: Artifact, between: Between) -> Artifact | None:
    """The folder's version after ``served``, applied to it in memory; None where the
    folder does not hold exactly that version on top of ``served`` (load it whole).

    Args:
        served: the artifact being served, loaded from its folder.
        between: runs a function where no search of ``served``'s index runs beside it
            (``MicroBatcher.between``): the index grows in that call.

    Raises:
        DataError: the new version's files are missing, corrupt, or at odds with the
            manifest (named); ``served`` keeps answering as before.
    """
    folder = served.folder
    manifest, fingerprint = manifest_and_fingerprint(folder)
    if not _follows(manifest, served):
        return None
    entry = manifest["updates"][-1]
    prefix = f"{entry['folder']}/"  # only the new version's files are read
    verify_listed(folder, manifest, [name for name in manifest["files"] if name.startswith(prefix)])
    update = read_update(folder, entry, served.items.schema, served.item_vectors.shape[1])
    try:
        artifact = between(lambda: served.updated(update, manifest))
    except ValueError:  # the served index grew past its version: only a whole load now
        return None
    # a manifest written otherwise than the writers write it is named as a load names it
    return artifact if artifact.fingerprint == fingerprint else None


def folder_fingerprint(folder: Path) -> str:
    """The fingerprint of the version the artifact folder holds now."""
    return manifest_and_fingerprint(folder)[1]


def _follows(manifest: dict[str, Any], served: Artifact) -> bool:
    """Whether ``manifest`` is the version right after ``served``: one version more,
    the same export, and every file ``served`` holds listed with the same checksum."""
    files = manifest["files"]
    return (
        manifest["version"] == served.version + 1
        and manifest.get("base_fingerprint") == served.base_fingerprint
        and all(files.get(name) == digest for name, digest in served.manifest["files"].items())
    )
