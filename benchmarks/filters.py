"""Filtered search on a 1,000,000-item corpus: recall@10 against exact filtered search
and latency, for the exact, HNSW and IVF-PQ indexes, with and without the exact search
of narrow filters; and where that exact search stops paying (its default limit).

    python benchmarks/filters.py [--items 1000000] [--dim 64] [--queries 256]
        [--repeats 3] [--kinds exact,hnsw,ivfpq] [--sweep 1000,3000,...]
        [--out benchmarks/results/filters] [--plot docs/filters-1m.png]
        [--cache runs/filters] [--threads 1] [--quick]

The corpus (``corpus``): unit vectors in clusters of 1,000 items (cosine to their
centre about 0.8), with an item table of ``category`` (100 values, uniform and
independent of the clusters, so a category's items lie everywhere) and ``price``
(log-normal, 10% of items below 20); the queries are fresh points of the same
clusters. Each filter's mask is what the service computes (``FilterMasks``):

    category (1%)     {"category": {"in": ["c07"]}}
    price < 20 (10%)  {"price": {"lt": 20}}

Each index is built once and kept under ``--cache`` (HNSW and IVF-PQ as the service
builds them, default parameters); a later run reads it back (the folder's name holds
the corpus's size: delete it after changing ``corpus``). For each index and filter,
the service's ``Catalogue`` searches with the mask as its ``allowed`` items, the exact search of
narrow masks off (``index``: limit 0) and on (``fallback``: the service's default
limit): recall@10 against ``ExactIndex`` over the filtered items, the share of queries
answered with fewer than 10 items, single-query latency (p50 and p99 over the queries)
and the throughput of batches of 64. Every timing is the median of ``--repeats`` runs,
taken round robin over all the searches, on ``--threads`` threads (torch's and FAISS's;
one by default: two threads that wait on each other beside other jobs measure the
waiting).

The sweep: masks keeping M random items (for each M of ``--sweep``), searched by each
approximate index with its selector and by the exact search over the kept items:
recall@10 and latency. The crossover is the largest M up to which the exact search
answers batches of 64 at least as fast as HNSW (the index ``--index auto`` picks at
this size); the default limit is set from it.

Writes ``filters.json`` and ``filters.md`` in ``--out`` and the plot ``--plot``.
``--quick``: 20,000 items, 32 queries, one repeat, a short sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from twotower.index import INDEXES, ExactIndex, Index, load_index
from twotower.serving.catalogue import Catalogue
from twotower.serving.filters import FilterMasks
from twotower.serving.settings import EXACT_FILTER_LIMIT
from twotower.threads import set_threads

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = 100
K = 10
BATCH = 64
FILTERS = {
    "none": None,
    "category (1%)": {"category": {"in": ["c07"]}},
    "price < 20 (10%)": {"price": {"lt": 20}},
}
SWEEP = (1_000, 3_000, 10_000, 20_000, 30_000, 100_000)


def corpus(items: int, dim: int, seed: int = 0) -> tuple[np.ndarray, pa.Table, np.ndarray]:
    """(N, D) clustered unit vectors, their item table (``item_id``, ``category``,
    ``price``) and the (C, D) cluster centres the queries are drawn around."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((max(1, items // 1000), dim), dtype=np.float32))
    vectors = points(rng, centres, items)
    category = rng.integers(CATEGORIES, size=items)
    # ln 20 = mu - 1.2816 sigma: P(price < 20) = 10%
    price = np.round(np.exp(rng.normal(np.log(20) + 1.2816 * 0.8, 0.8, items)), 2)
    table = pa.table(
        {
            "item_id": np.arange(items, dtype=np.int64),
            "category": pa.array([f"c{c:02d}" for c in range(CATEGORIES)]).take(category),
            "price": price,
        }
    )
    return vectors, table, centres


def points(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    """``count`` unit vectors around random ``centres``, made in blocks (bounded memory)."""
    dim = centres.shape[1]
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        noise = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.75 / np.sqrt(dim))
        out[start : start + n] = _unit(centres[rng.integers(len(centres), size=n)] + noise)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def cached_index(kind: str, vectors: np.ndarray, folder: Path) -> tuple[Index, float | None]:
    """The ``kind`` index of ``vectors``, read from ``folder`` when it was built there
    before, else built and saved; and its build's seconds (None when read)."""
    if (folder / "index.json").is_file():
        index = load_index(folder)
        if index.num_items == len(vectors):
            return index, None
    index = INDEXES[kind]()
    start = time.perf_counter()
    index.build(vectors)
    seconds = time.perf_counter() - start
    index.save(folder)
    return index, seconds


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top k (padding left out) among the found ids."""
    relevant = truth >= 0
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=1) & relevant
    return float(hits.sum() / max(relevant.sum(), 1))


def latencies(
    searches: list[Callable], queries: np.ndarray, repeats: int
) -> list[dict[str, float]]:
    """Each search's single-query p50 / p99 (ms), the medians of ``repeats`` runs over
    the queries, and its throughput in batches of 64 (queries/s) at its median batch's
    time. Round robin: each repeat runs every search in turn, so that a slow spell of a
    shared machine falls on all of them alike."""
    for search in searches:
        search(queries[:1])  # warm-up
    p50, p99, batches = ([[] for _ in searches] for _ in range(3))
    for _ in range(repeats):
        for j, search in enumerate(searches):
            times = [_seconds(search, queries[i : i + 1]) for i in range(len(queries))]
            p50[j].append(float(np.percentile(times, 50)) * 1e3)
            p99[j].append(float(np.percentile(times, 99)) * 1e3)
            starts = range(0, len(queries) - BATCH + 1, BATCH)
            batches[j] += [_seconds(search, queries[i : i + BATCH]) for i in starts]
    return [
        {
            "p50_ms": statistics.median(p50[j]),
            "p99_ms": statistics.median(p99[j]),
            "batch_per_s": BATCH / statistics.median(batches[j]) if batches[j] else math.nan,
        }
        for j in range(len(searches))
    ]


def _seconds(call: Callable, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def measure_filters(
    indexes: dict[str, Index], vectors: np.ndarray, items: pa.Table, queries: np.ndarray, args
) -> tuple[list[dict], dict]:
    """One row per (index, filter, path): recall@10, short answers and latency; and
    each filter's share of items and mask times (cold, and a cached lookup)."""
    masks, exact, rows, kept, searches = FilterMasks(items), ExactIndex.over(vectors), [], {}, []
    for name, filter in FILTERS.items():
        allowed = None
        if filter is not None:
            cold = _seconds(masks.select, filter)
            allowed = masks.select(filter).mask
            cached = statistics.median(_seconds(masks.select, filter) for _ in range(200))
            kept[name] = {"share": float(allowed.mean()), "mask_ms": cold * 1e3}
            kept[name]["cached_us"] = cached * 1e6
        truth = exact.search(queries, K, allowed=allowed)[0]
        for kind, index in indexes.items():
            paths = {"index": 0}
            if filter is not None and not index.is_exact:
                paths["fallback"] = args.limit
            for path, limit in paths.items():
                search = Catalogue.exported(items, vectors, index, "item_id")
                found = search.search(queries, K, None, allowed, limit)[0]
                row = {"index": kind, "filter": name, "path": path}
                exactly = search.searched_exactly(allowed, limit)
                row["searched_by"] = "ExactIndex" if exactly else type(index).__name__
                row["recall@10"] = recall(found, truth)
                row["short"] = float(((found >= 0).sum(axis=1) < K).mean())
                rows.append(row)
                searches.append(lambda q, s=search, a=allowed, m=limit: s.search(q, K, None, a, m))
    for row, timing in zip(rows, latencies(searches, queries, args.repeats), strict=True):
        row |= timing
        print(json.dumps(row), flush=True)
    return rows, kept


def measure_sweep(
    indexes: dict[str, Index], vectors: np.ndarray, queries: np.ndarray, args
) -> list[dict]:
    """For masks keeping M random items: each approximate index with its selector, and
    the exact search over the kept items; recall@10 and latency."""
    rng = np.random.default_rng(7)
    exact, rows, searches = ExactIndex.over(vectors), [], []
    for size in args.sweep:
        allowed = np.zeros(len(vectors), dtype=bool)
        allowed[rng.choice(len(vectors), size, replace=False)] = True
        truth = exact.search(queries, K, allowed=allowed)[0]
        searchers = {"exact over the kept": exact}
        searchers |= {k: i for k, i in indexes.items() if not i.is_exact}
        for name, index in searchers.items():
            found = index.search(queries, K, allowed=allowed)[0]
            rows.append({"kept": size, "searched_by": name, "recall@10": recall(found, truth)})
            searches.append(lambda q, i=index, a=allowed: i.search(q, K, None, a))
    for row, timing in zip(rows, latencies(searches, queries, args.repeats), strict=True):
        row |= timing
        print(json.dumps(row), flush=True)
    return rows


def crossover(sweep: list[dict], against: str = "hnsw") -> int | None:
    """The largest M up to which the exact search over the kept items answers batches
    of 64 at least as fast as ``against`` with its selector (the service's micro-batches
    under load); None when it never does."""
    best = None
    for size in sorted({row["kept"] for row in sweep}):
        rate = {r["searched_by"]: r["batch_per_s"] for r in sweep if r["kept"] == size}
        if against not in rate or rate["exact over the kept"] < rate[against]:
            break
        best = size
    return best


def machine() -> dict:
    """What ran the benchmark."""
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
    }


def write_markdown(result: dict, path: Path) -> None:
    """The tables of ``result`` as Markdown."""
    lines = [
        f"{result['items']:,} items of {result['dim']} dimensions, {result['queries']} queries, "
        f"k = {K}, {result['threads']} thread(s), medians of {result['repeats']} runs; exact "
        f"search of filters keeping at most {result['limit']:,} items (`fallback`).",
        "",
        "| filter | items kept | mask (first / cached) |",
        "|---|---:|---:|",
    ]
    for name, kept in result["kept"].items():
        times = f"{kept['mask_ms']:.1f} ms / {kept['cached_us']:.1f} µs"
        lines.append(f"| {name} | {kept['share']:.2%} | {times} |")
    lines += [
        "",
        "| index | filter | path | searched by | recall@10 | short answers | p50 | p99 "
        "| batches of 64 |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['index']} | {r['filter']} | {r['path']} | {r['searched_by']} | "
            f"{r['recall@10']:.3f} | {r['short']:.0%} | {r['p50_ms']:.2f} ms | "
            f"{r['p99_ms']:.2f} ms | {r['batch_per_s']:,.0f} q/s |"
        )
    lines += [
        "",
        "| items kept | searched by | recall@10 | p50 | p99 | batches of 64 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["sweep"]:
        lines.append(
            f"| {r['kept']:,} | {r['searched_by']} | {r['recall@10']:.3f} | "
            f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['batch_per_s']:,.0f} q/s |"
        )
    lines += [
        "",
        "The exact search over the kept items answers batches of 64 at least as fast as "
        f"HNSW up to {result['crossover']:,} items kept (the largest such size measured)."
        if result["crossover"]
        else "The exact search over the kept items is slower than HNSW at every size measured.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(result: dict, path: Path) -> None:
    """Against the items a filter keeps: recall@10 of the approximate indexes with
    their selectors, single-query p50 and throughput in batches of 64 of every way of
    searching; the exact search's limit marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    names = list(dict.fromkeys(r["searched_by"] for r in result["sweep"]))
    for name in names:
        rows = [r for r in result["sweep"] if r["searched_by"] == name]
        sizes = [r["kept"] for r in rows]
        label = name if name == "exact over the kept" else f"{name} (selector)"
        axes[0].plot(sizes, [r["recall@10"] for r in rows], marker="o", label=label)
        axes[1].plot(sizes, [r["p50_ms"] for r in rows], marker="o", label=label)
        axes[2].plot(sizes, [r["batch_per_s"] for r in rows], marker="o", label=label)
    labels = ("recall@10 against exact filtered search", "one query: p50 (ms)")
    labels += ("batches of 64: queries/s",)
    for axis, label in zip(axes, labels, strict=True):
        axis.axvline(result["limit"], color="grey", linestyle=":", label="exact search limit")
        axis.set_xscale("log")
        axis.set_xlabel(f"items the filter keeps (of {result['items']:,})")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle(
        f"Masks keeping random items of {result['items']:,} ({result['dim']} dimensions), "
        f"{result['threads']} thread(s), k = {K}; measured beside other jobs",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="exact,hnsw,ivfpq")
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP)))
    parser.add_argument("--limit", type=int, default=EXACT_FILTER_LIMIT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "filters")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "filters-1m.png")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "filters")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.items, args.queries, args.repeats, args.sweep = 20_000, 32, 1, "200,2000"
    args.sweep = [int(s) for s in args.sweep.split(",") if s]
    return args


def main() -> None:
    args = arguments()
    set_threads(args.threads)  # torch's, for the exact search
    faiss.omp_set_num_threads(args.threads)
    vectors, items, centres = corpus(args.items, args.dim)
    queries = points(np.random.default_rng(1), centres, args.queries)
    indexes, builds = {}, {}
    for kind in args.kinds.split(","):
        folder = args.cache / f"{kind}-{args.items}x{args.dim}"
        indexes[kind], builds[kind] = cached_index(kind, vectors, folder)
        built = "read" if builds[kind] is None else f"built in {builds[kind]:.0f} s"
        print(f"{kind}: {built}", flush=True)
    rows, kept = measure_filters(indexes, vectors, items, queries, args)
    sweep = measure_sweep(indexes, vectors, queries, args)
    result = {
        "items": args.items,
        "dim": args.dim,
        "queries": args.queries,
        "repeats": args.repeats,
        "threads": args.threads,
        "limit": args.limit,
        "machine": machine(),
        "builds_s": builds,
        "kept": kept,
        "rows": rows,
        "sweep": sweep,
        "crossover": crossover(sweep),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "filters.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_markdown(result, args.out / "filters.md")
    plot(result, args.plot)


if __name__ == "__main__":
    main()
