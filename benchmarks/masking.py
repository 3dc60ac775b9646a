"""Masking known positives in the full softmax: one step's (B, N) mask two ways.

    python benchmarks/masking.py [--queries 6040] [--items 3706] [--per-query 110]
        [--batch 1024] [--repeats 15]

``KnownPairs.rows`` (the batch's queries' own pairs, scattered) against the pairwise
membership test of every (row, item), which it replaced in ``FullSoftmax``; the two
masks are checked equal first. Prints the median of ``--repeats`` calls of each, and
their ratio, on one thread. The defaults are MovieLens-1M's shape (users, movies,
training ratings per user) with the recipe's batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twotower.training.objectives import KnownPairs


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=6040)
    parser.add_argument("--items", type=int, default=3706)
    parser.add_argument("--per-query", type=int, default=110)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    queries = torch.arange(args.queries).repeat_interleave(args.per_query)
    items = torch.randint(0, args.items, (len(queries),), generator=generator)
    known = KnownPairs(queries, items, args.items)
    batch = torch.randint(0, args.queries, (args.batch,), generator=generator)
    every = torch.arange(args.items)
    assert torch.equal(known.rows(batch), known(batch, every))
    pairwise = median_seconds(lambda: known(batch, every), args.repeats)
    rows = median_seconds(lambda: known.rows(batch), args.repeats)
    print(f"pairwise membership (B x N searches): {pairwise * 1e3:8.1f} ms")
    print(f"rows (the queries' own pairs):        {rows * 1e3:8.1f} ms")
    print(f"ratio: {pairwise / rows:.1f}x")


if __name__ == "__main__":
    main()
