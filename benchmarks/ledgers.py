"""A study's ledger: one JSON line per finished run, appended as each run ends and read
back so a killed study resumes where it stopped (``groups.py``, ``new_items.py``,
``next_item.py``); and the mean ± std its tables print."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read(ledger: Path) -> list[dict]:
    """The ledger's entries; none when it does not exist yet."""
    if not ledger.is_file():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]


def record(ledger: Path, entry: dict) -> None:
    """Appends one finished run's entry."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def spread(values: list[float | None]) -> str:
    """The mean of the values given (None: a run without that metric, left out), with
    ± their std where there is more than one; empty where there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    text = f"{np.mean(values):.4f}"
    return text + (f" ± {np.std(values):.4f}" if len(values) > 1 else "")
