"""Averaging sparse gradients over training processes: one packed exchange against one
exchange per table.

    python benchmarks/sparse_average.py --out runs/sparse-average [--processes 2]
        [--tables 1,4,16] [--rows 4096] [--dim 64] [--repeats 30]

Starts itself under ``torchrun --standalone`` (gloo on the CPU). Each rank gives every
table a sparse gradient of ``--rows`` random rows of width ``--dim``, then times
``Collective.average_sparse`` (three collectives per step, whatever the number of
tables) against the reference written here, which exchanges table by table as
``average_sparse`` did before (three collectives per table), alternating the two
``--repeats`` times from the same gradients. Both results are checked equal first.
Reports medians and their ratio per number of tables into ``sparse_average.json`` and
``sparse_average.md`` in ``--out`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from twotower.training.distributed import Collective, _gather_padded


def per_table(collective: Collective, parameters: list[torch.nn.Parameter]) -> None:
    """The reference: each table's counts, indices and values exchanged on their own."""
    for parameter in parameters:
        grad = parameter.grad.coalesce()
        indices, values = grad.indices()[0], grad.values()
        sizes = collective.sizes(len(indices), indices.device)
        every_index = _gather_padded(indices, sizes, collective.group)
        every_value = _gather_padded(values, sizes, collective.group) / collective.world_size
        parameter.grad = torch.sparse_coo_tensor(
            every_index[None], every_value, parameter.shape, check_invariants=True
        ).coalesce()


def tables_with_gradients(count: int, rows: int, dim: int, rank: int) -> list:
    generator = torch.Generator().manual_seed(1000 * rank + count)
    parameters = []
    for _ in range(count):
        parameter = torch.nn.Parameter(torch.zeros(100_000, dim))
        indices = torch.randint(0, 100_000, (rows,), generator=generator)
        values = torch.randn((rows, dim), generator=generator)
        parameter.grad = torch.sparse_coo_tensor(
            indices[None], values, parameter.shape, check_invariants=True
        )
        parameters.append(parameter)
    return parameters


def timed(average, collective: Collective, parameters: list) -> float:
    grads = [parameter.grad for parameter in parameters]
    dist.barrier(group=collective.group)
    clock = time.perf_counter()
    average(parameters)
    seconds = time.perf_counter() - clock
    for parameter, grad in zip(parameters, grads, strict=True):
        parameter.grad = grad  # the same gradients for the next call
    return seconds


def rank_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    collective = Collective.from_env(torch.device("cpu"))
    results = []
    for count in (int(t) for t in args.tables.split(",")):
        parameters = tables_with_gradients(count, args.rows, args.dim, collective.rank)
        grads = [parameter.grad for parameter in parameters]
        collective.average_sparse(parameters)
        packed = [parameter.grad.to_dense() for parameter in parameters]
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.grad = grad
        per_table(collective, parameters)
        for got, want in zip(packed, parameters, strict=True):
            torch.testing.assert_close(got, want.grad.to_dense())
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.grad = grad
        times = {"packed": [], "per_table": []}
        for _ in range(args.repeats):
            times["packed"].append(timed(collective.average_sparse, collective, parameters))
            times["per_table"].append(
                timed(lambda p: per_table(collective, p), collective, parameters)
            )
        packed_ms = 1000 * statistics.median(times["packed"])
        per_table_ms = 1000 * statistics.median(times["per_table"])
        results.append(
            {
                "tables": count,
                "packed_ms": packed_ms,
                "per_table_ms": per_table_ms,
                "ratio": per_table_ms / packed_ms,
            }
        )
    if collective.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        setting = {k: v for k, v in vars(args).items() if k not in ("out", "rank")}
        result = {"setting": {**setting, "processes": collective.world_size}, "runs": results}
        (args.out / "sparse_average.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [
            f"{collective.world_size} processes (gloo), {args.rows} rows x {args.dim} per "
            f"table, medians of {args.repeats}",
            "",
            "| tables | packed (ms) | per table (ms) | per table / packed |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['tables']} | {r['packed_ms']:.2f} | {r['per_table_ms']:.2f} | "
            f"{r['ratio']:.2f}x |"
            for r in results
        ]
        (args.out / "sparse_average.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sparse-average"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tables", default="1,4,16")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    command = [torchrun or "torchrun", "--standalone", f"--nproc_per_node={args.processes}"]
    command += [__file__, *sys.argv[1:], "--rank"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
