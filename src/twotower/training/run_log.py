"""Per-epoch records of a run: a JSONL file, TensorBoard scalars and a PNG of the curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from twotower.storage import atomic_write

log = logging.getLogger(__name__)

JSONL_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


class RunLog:
    """Writes each epoch's record to ``metrics.jsonl``, TensorBoard and ``curves.png``.

    Args:
        folder: the run folder.
        tensorboard: also write TensorBoard event files under ``tensorboard/``.
    """

    def __init__(self, folder: Path, tensorboard: bool = True) -> None:
        self.folder = folder
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a trimmed install may lack it
                log.warning("tensorboard is not installed; writing metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(folder / "tensorboard"))

    def restart(self, records: list[dict[str, Any]]) -> None:
        """Rewrites ``metrics.jsonl`` with the records a resumed checkpoint holds.

        Lines written after that checkpoint (by a run killed before its next one)
        are dropped, so the file always agrees with the state training resumes from.
        """
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write(self.folder / JSONL_FILE, lambda f: f.write(text.encode("utf-8")))

    def write(self, record: dict[str, Any], records: list[dict[str, Any]], metric: str) -> None:
        """Appends one epoch's record and redraws the curves of all of them."""
        with open(self.folder / JSONL_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()
        plot_curves(records, metric, self.folder / PLOT_FILE)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(records: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Training loss and the validation metric against the epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["loss"] for r in records], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    values = [r.get(metric, math.nan) for r in records]
    right.plot(epochs, values, marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
