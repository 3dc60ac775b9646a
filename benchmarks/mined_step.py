"""What mined negatives add to one training step of the ``mixed`` softmax: the loss's
forward and backward with and without ``mined_negatives``, in one process.

    python benchmarks/mined_step.py [--items 11924] [--queries 19412] [--batch 2048]
        [--dim 64] [--sampled 2048] [--ratio 0.5] [--window 101,500] [--repeat 7]

The sizes default to Amazon Toys under the next-item recipe (``configs/next-item.yaml``
with ``training.objective.mined_negatives.ratio=0.5``). The towers are stand-ins: an
item table and a linear map, a query table; the candidates are a refreshed table of
random windows. Each figure is the median of ``--repeat`` steps after one warm-up
step, in seconds; the ratio is the mined step's over the plain one's, taken in the same
process. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from twotower.sampling import MinedNegatives
from twotower.training.config import MiningConfig, MixedConfig
from twotower.training.objectives import build_objective


def median_step(objective, args: argparse.Namespace, seed: int) -> float:
    """The median seconds of one step's loss, forward and backward."""
    torch.manual_seed(seed)
    items = torch.nn.Embedding(args.items, args.dim)
    project = torch.nn.Linear(args.dim, args.dim)
    queries = torch.nn.Embedding(args.queries, args.dim)
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor(33.0)

    def step() -> float:
        rows = torch.randint(0, args.queries, (args.batch,), generator=generator)
        positives = torch.randint(0, args.items, (args.batch,), generator=generator)
        start = time.perf_counter()
        query = F.normalize(queries(rows), dim=-1)
        embed = lambda ids: F.normalize(project(items(ids)), dim=-1)  # noqa: E731
        objective(query, positives, embed, scale, generator, None, rows).backward()
        return time.perf_counter() - start

    step()
    return statistics.median(step() for _ in range(args.repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=11_924)
    parser.add_argument("--queries", type=int, default=19_412)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--sampled", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--window", default="101,500")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    first, last = (int(rank) for rank in args.window.split(","))
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, args.items).clip(1, 1000)
    mined = MinedNegatives(args.queries, args.items, (first, last), max_candidates=2**40)
    windows = rng.integers(0, args.items, (args.queries, last - first + 1))
    mined.candidates = torch.from_numpy(np.sort(windows, axis=1).astype(np.int32))
    mined.counts = torch.full((args.queries,), last - first + 1)
    mined.ready = True
    plain = build_objective(MixedConfig(num_sampled=args.sampled), counts)
    mining = MiningConfig(ratio=args.ratio, window=(first, last))
    hard = build_objective(
        MixedConfig(num_sampled=args.sampled, mined_negatives=mining), counts, mined=mined
    )
    base, with_mined = median_step(plain, args, 0), median_step(hard, args, 0)
    print(
        f"threads {torch.get_num_threads()}; {args.items:,} items, batch {args.batch:,}, "
        f"{args.sampled:,} sampled ({args.ratio:.0%} mined from ranks {first}-{last})"
    )
    print(f"step without mined negatives: {base:.3f} s")
    print(f"step with mined negatives:    {with_mined:.3f} s ({with_mined / base:.1f}x)")


if __name__ == "__main__":
    main()
