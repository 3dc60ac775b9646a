"""What one request's fixed steps cost in process: each query feature's transform of
one stored row, and a micro-batch's setup and planning (``QueryBatch`` and ``plan``).

    python benchmarks/one_row.py ARTIFACT [--repeat 5] [--number 500]

Each figure is the best of ``--repeat`` timings of ``--number`` calls (``timeit``), in
microseconds a call, warm: the floor of what a lone request pays for that step. Run
it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path

from twotower.features.history import HistoryTransform
from twotower.serving.artifact import Artifact
from twotower.serving.query import Query
from twotower.serving.query_batch import QueryBatch


def best_us(call, repeat: int, number: int) -> float:
    """The best of ``repeat`` timings of ``number`` calls, in microseconds a call."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=500)
    args = parser.parse_args()
    artifact = Artifact.load(args.artifact)
    pipeline, row = artifact.pipeline, artifact.queries.slice(0, 1)
    print("one row's transform, per query feature:")
    for name, transform in pipeline.transforms["query"].items():
        if isinstance(transform, HistoryTransform):  # a request's history: recent_inputs
            continue
        column = pipeline.input_column("query", name)
        values = row.column(column)
        cost = best_us(lambda t=transform, v=values: t.transform(v), args.repeat, args.number)
        kind = type(transform).__name__
        print(f"  {name:>16} ({kind}, {values.type}): {cost:7.1f} us")
    print("a micro-batch's setup and planning (known users):")
    dim, items = artifact.item_vectors.shape[1], artifact.catalogue.num_items
    for size in (1, 3, 32):
        queries = [Query(user=user, k=10) for user in range(size)]
        cost = best_us(
            lambda q=queries: QueryBatch(q, dim, 1).plan(items), args.repeat, args.number
        )
        print(f"  {size:>3} queries: {cost:7.1f} us")


if __name__ == "__main__":
    main()
