"""The metrics by group as a reader sees them: a text table and a bar chart.

Both read the flat keys ``evaluate`` writes (``"{part}/groups/item:tail/ndcg@10"``,
``twotower.evaluation.groups``) and show a group only where the metrics hold it.
"""

from __future__ import annotations

import math
from pathlib import Path

from twotower.evaluation.groups import ITEM_GROUPS, QUERY_GROUPS

GROUPS = tuple(f"item:{g}" for g in ITEM_GROUPS) + tuple(f"query:{g}" for g in QUERY_GROUPS)


def present_groups(metrics: dict[str, float], part: str) -> list[str]:
    """The groups (``item:head`` ...) ``metrics`` holds for ``part``, in ``GROUPS`` order."""
    return [g for g in GROUPS if f"{part}/groups/{g}/queries" in metrics]


def count_range(metrics: dict[str, float], part: str, group: str) -> str:
    """A group's training counts as ``min-max`` (one number where they are equal)."""
    low = metrics[f"{part}/groups/{group}/min_count"]
    high = metrics[f"{part}/groups/{group}/max_count"]
    return f"{low:.0f}" if low == high else f"{low:.0f}-{high:.0f}"


def format_groups(
    metrics: dict[str, float], ks: list[int], parts: tuple[str, ...] = ("valid", "test")
) -> str:
    """One table per part with groups: a row per group (its training counts, queries
    counted), recall@k and ndcg@k at each cutoff, and the share of the top k its items
    take at the smallest cutoff (item groups); empty when there are no groups."""
    k0 = min(ks)
    columns = [f"{name}@{k}" for k in ks for name in ("recall", "ndcg")]
    tables = []
    for part in parts:
        groups = present_groups(metrics, part)
        if not groups:
            continue
        header = [f"{part + ' by group':<16}", f"{'counts':>10}", f"{'queries':>8}"]
        lines = ["  ".join(header + [f"{c:>10}" for c in columns] + [f"{f'share@{k0}':>10}"])]
        for group in groups:
            key = f"{part}/groups/{group}/"
            values = [metrics.get(key + c, math.nan) for c in columns]
            share = metrics.get(key + f"share@{k0}")
            row = [f"{group:<16}", f"{count_range(metrics, part, group):>10}"]
            row.append(f"{int(metrics[key + 'queries']):>8}")
            row += [f"{v:>10.4f}" for v in values]
            row.append(f"{share:>10.4f}" if share is not None else f"{'':>10}")
            lines.append("  ".join(row).rstrip())
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def plot_groups(runs: dict[str, dict[str, float]], part: str, metric: str, path: Path) -> None:
    """Saves a PNG of ``metric`` (e.g. ``ndcg@10``) by group, one bar per run in each
    group: item popularity groups on the left, query activity groups on the right.

    Args:
        runs: each run's (or baseline's) name and its flat metrics.
        part: ``valid`` or ``test``.
        metric: a metric at a cutoff, as the keys name it.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("item", "query"), strict=True):
        groups = [g for g in GROUPS if g.startswith(kind) and _held(runs, part, g)]
        width = 0.8 / max(len(runs), 1)
        for i, (name, values) in enumerate(runs.items()):
            heights = [values.get(f"{part}/groups/{g}/{metric}", math.nan) for g in groups]
            positions = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(groups))]
            ax.bar(positions, heights, width, label=name)
        ax.set_xticks(range(len(groups)), [_tick(runs, part, g) for g in groups])
        ax.set_title(f"by {'item popularity' if kind == 'item' else 'query activity'}")
    axes[0].set_ylabel(f"{part} {metric}")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _held(runs: dict[str, dict[str, float]], part: str, group: str) -> bool:
    return any(f"{part}/groups/{group}/queries" in values for values in runs.values())


def _tick(runs: dict[str, dict[str, float]], part: str, group: str) -> str:
    """A group's name and its training counts (from the first run that holds it)."""
    values = next(v for v in runs.values() if f"{part}/groups/{group}/queries" in v)
    return f"{group.split(':')[1]}\n({count_range(values, part, group)})"
