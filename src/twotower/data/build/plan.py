"""The build's plan: its steps in order, declared once and run on any engine's
``Database``.

1. ``inputs``: the interaction files read (source order kept), each side's feature
   table linked, ``min_weight`` applied and each kept row's ``position`` counted.
2. ``parts``: each row's part by the split's rules.
3. ``outputs``: each query's state per step, the histories, and the files written.

Each step writes its SQL once, asking the engine's ``Dialect`` for the few
expressions engines spell differently.
"""

from __future__ import annotations

from pathlib import Path

from twotower.data.build.inputs import load_interactions
from twotower.data.build.job import BuildJob, Built, Database
from twotower.data.build.outputs import write_items, write_parts, write_queries
from twotower.data.build.parts import DRAWS, assign_parts
from twotower.data.dataset import TIMESTAMP


def run_plan(db: Database, job: BuildJob, staging: Path) -> Built:
    """Runs every step of the build on ``db``, writing its files into ``staging``.

    Raises:
        DataError: bad input (named), or a part left empty by the split.
    """
    try:
        load_interactions(db, job.data, job.columns)
        assign_parts(db, job.split, staging)
        rule = job.histories.resolved_rule(TIMESTAMP in db.columns("interactions"))
        files = write_parts(db, job, rule)
        files.update(write_items(db, job))
        files.update(write_queries(db, job))
    finally:
        (staging / DRAWS).unlink(missing_ok=True)
    return Built(files, rule)
