"""Per-unit costs for the 100M-user, 100M-item plan (docs/scaling.md): the bytes an
event, a user, an item and an index entry take, and the CPU-seconds each stage spends
per unit, measured at a thousandth of the plan's size.

    nice -n 15 python benchmarks/unit_costs.py [--out benchmarks/results/unit-costs]
        [--work runs/unit-costs] [--parts pipeline,towers,memory,state,indexes]

Each part writes ``OUT/PART.json``; a part whose file exists is not run again.

- ``pipeline``: ``twotower data synth --raw`` (unless ``WORK/raw`` holds them) of
  1,000,000 events, 10 a user (100,000 users) over 100,000 items: the plan's ratios
  (1B events, 100M users, 100M items) at 1/1000. Then, each command in its own
  process with one thread: ``data build`` (DuckDB, 1 GB), ``train`` (20 steps of
  1,024, validation on 5,000 users against every item), ``evaluate --sample 2000``,
  ``export --index exact``. Each command's CPU seconds (user + system, its threads
  and child processes included), wall seconds and peak memory (the process tree's
  resident memory, sampled every 0.2 s), and the bytes of every file it writes, per
  event, per user and per item.
- ``towers``: in one process on one thread, from the run and the build above: the CPU
  time of the build's feature fit (its pass over the training rows) and of the Spark
  driver's rewrite of the training parts (``write_stream``), the training rows' mean
  history length, to embed every
  item (raw row -> features -> item tower) and 10,000 known users (their stored state
  -> query tower), and of exact scoring (256 queries against every item vector, top
  100); the bytes per item of the item table and of its model inputs in memory; the
  model's tables, row by row.
- ``memory``: the anonymous memory ``Artifact.load`` adds, without the users (a
  service over Redis) and with them (the memory store), per item and per user; and
  the bytes of the per-item arrays the loaded catalogue holds (the item table, its
  keys and masks, the history codes), the part of it that grows with the items.
- ``state``: the bytes a known user's state takes on the wire from Redis (the replies
  of ``RedisStore.read``'s four commands, RESP2), computed from the artifact's users as
  ``twotower state load`` writes them; and a ``/recall`` answer's bytes at k = 10.
- ``indexes``: the bytes per item of an HNSW index (M 32; built with efConstruction 40,
  which does not change its size) at 10,000 and 40,000 items, and of an IVF-PQ index
  (the project's defaults) at 100,000 items, with its build's CPU time; and the cost
  of one IVF-PQ query shaped as at 100,000,000 items (lists of 2,500 codes, 16
  probed: 500,000 items in 200 lists) plus its coarse step (40,000 centroids).

CPU time, not wall time, is the cost: the machine is shared with other jobs, and a
process waiting for a core spends no CPU. It is still an upper bound (caches and the
memory bus are shared too). Sizes are structural and do not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

EVENTS, USERS, ITEMS = 1_000_000, 100_000, 100_000
STEPS, SAMPLE = 20, 2000
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
PARTS = ("pipeline", "towers", "memory", "state", "indexes")


def resp_size(reply: object) -> int:
    """Bytes of a Redis reply in RESP2: an integer, a bulk string (str or bytes), or an
    array (list, tuple or set) of those; a dict is sent flat, field then value."""
    if isinstance(reply, bool | int):
        return len(f":{int(reply)}\r\n")
    if isinstance(reply, str | bytes):
        size = len(reply.encode() if isinstance(reply, str) else reply)
        return len(f"${size}\r\n") + size + 2
    if isinstance(reply, dict):
        reply = [part for pair in reply.items() for part in pair]
    if isinstance(reply, list | tuple | set | frozenset):
        return len(f"*{len(reply)}\r\n") + sum(resp_size(part) for part in reply)
    raise TypeError(f"not a RESP2 reply: {type(reply).__name__}")


def per_unit(total: float, units: int) -> float:
    """``total`` over ``units``, rounded to four significant figures (0 for no units)."""
    return float(f"{total / units:.4g}") if units else 0.0


def folder_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_measured(command: list[str], log: Path) -> dict:
    """Runs a command with one thread; its wall and CPU seconds (every thread and waited
    child) and the peak resident memory of its process tree, in MiB."""
    import scale

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, peak, status = scale.run_measured(command, log, env=ONE_THREAD)
    if status:
        raise SystemExit(f"{command[3:5]} failed; see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(peak)}


def twotower(*args: str) -> list[str]:
    return [sys.executable, "-m", "twotower", *args]


def pipeline(work: Path) -> dict:
    """The ``pipeline`` part (module doc)."""
    import scale

    raw, built, run, artifact = (work / n for n in ("raw", "built", "run", "artifact"))
    config = {
        "raw": scale.CONFIG.format(data=scale.RAW.format(raw=raw.resolve()), steps=STEPS),
        "built": scale.CONFIG.format(data=scale.BUILT.format(built=built.resolve()), steps=STEPS),
    }
    for name, text in config.items():
        (work / f"{name}.yaml").write_text(text)
    stages = {
        "synth": twotower("data", "synth", "--raw", "--out", str(raw), "--per-query", "10")
        + ["--interactions", str(EVENTS), "--items", str(ITEMS)],
        "build": twotower("data", "build", str(work / "raw.yaml"), "--out", str(built))
        + ["--threads", "1", "--memory-limit", "1GB"],
        "train": twotower("train", str(work / "built.yaml"), "--out", str(run))
        + ["--set", "threads=1"],
        "evaluate": twotower("evaluate", str(run), "--split", "test")
        + ["--sample", str(SAMPLE), "--threads", "1"],
        "export": twotower("export", str(run), "--out", str(artifact))
        + ["--index", "exact", "--threads", "1"],
    }
    result: dict = {"events": EVENTS, "users": USERS, "items": ITEMS, "stages": {}}
    if (raw / "users.parquet").is_file():  # raw logs are the plan's input, not a stage
        del stages["synth"]
    for name, command in stages.items():
        print(f"pipeline: {name}", flush=True)
        result["stages"][name] = run_measured(command, work / f"{name}.log")
    result["rows"] = json.loads((built / "manifest.json").read_text())["rows"]
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    result["stages"]["train"]["examples_per_s"] = round(record["examples_per_s"])
    evaluated = json.loads((run / "evaluation-test.json").read_text())
    result["stages"]["evaluate"]["queries"] = evaluated["test/queries"]
    result["bytes"] = file_bytes(raw, built, artifact, result["rows"])
    return result


def file_bytes(raw: Path, built: Path, artifact: Path, rows: dict) -> dict:
    """Every written file's bytes, and per the unit it grows with."""
    units = {
        "raw/interactions": EVENTS,
        "raw/users.parquet": USERS,
        "raw/items.parquet": ITEMS,
        "built/train": rows["train"],
        "built/valid.parquet": rows["valid"],
        "built/test.parquet": rows["test"],
        "built/queries_valid.parquet": USERS,
        "built/queries_test.parquet": USERS,
        "built/queries_all.parquet": USERS,
        "built/items.parquet": ITEMS,
        "artifact/queries.parquet": USERS,
        "artifact/seen.npz": USERS,
        "artifact/recent.npz": USERS,
        "artifact/heldout.npz": USERS,
        "artifact/items.parquet": ITEMS,
        "artifact/item_vectors.npy": ITEMS,
        "artifact/index": ITEMS,
        "artifact/query_tower.pt": None,
        "artifact/item_tower.pt": None,
        "artifact/features": None,
    }
    roots = {"raw": raw, "built": built, "artifact": artifact}
    out = {}
    for name, unit in units.items():
        top, _, rest = name.partition("/")
        path = roots[top] / rest
        if path.exists():
            size = folder_bytes(path)
            out[name] = {"bytes": size, "per_unit": per_unit(size, unit) if unit else None}
    for top, path in roots.items():
        out[f"{top} (all)"] = {"bytes": folder_bytes(path)}
    return out


def towers(work: Path) -> dict:
    """The ``towers`` part (module doc): CPU seconds per item, per user and per scored
    (query, item) pair, on one thread, and the model's parameters by tensor."""
    from twotower.index import ExactIndex
    from twotower.serving.artifact import served_inputs
    from twotower.sources import open_source
    from twotower.threads import set_threads
    from twotower.towers.model import embed_inputs, embed_rows
    from twotower.training.run import load_model

    set_threads(1)
    config, pipeline, model = load_model(work / "run")
    source = open_source(config)
    known = source.known_queries("all", pipeline)
    items = source.items()
    clock = time.process_time()
    vectors = embed_rows(model.item_tower, known.pipeline, "item", items).numpy()
    item_cpu = time.process_time() - clock
    rows = np.sort(np.random.default_rng(0).choice(known.queries.num_rows, 10_000, replace=False))
    codes = known.pipeline.history_codes(items)
    clock = time.process_time()
    served = served_inputs(known.pipeline, known.queries, known.recent, codes, rows)
    queries = embed_inputs(model.query_tower, [served]).numpy()
    user_cpu = time.process_time() - clock
    index = ExactIndex()
    index.build(np.ascontiguousarray(vectors))
    times = []
    for _ in range(3):
        clock = time.process_time()
        index.search(np.ascontiguousarray(queries[:256]), 100)
        times.append(time.process_time() - clock)
    pairs = 256 * len(vectors)
    inputs = known.pipeline.transform("item", items)
    return {
        "fit_cpu_us_per_train_row": fit_cpu_us(work),
        "rewrite_cpu_us_per_train_row": rewrite_cpu_us(work),
        "history_mean_length": history_length(work),
        "items": len(vectors),
        "dim": int(vectors.shape[1]),
        "item_cpu_us": per_unit(item_cpu * 1e6, len(vectors)),
        "item_table_bytes": per_unit(items.nbytes, len(vectors)),
        "item_inputs_bytes": per_unit(sum(t.nbytes for t in inputs.values()), len(vectors)),
        "users": len(rows),
        "user_cpu_us": per_unit(user_cpu * 1e6, len(rows)),
        "exact_pair_cpu_ns": per_unit(statistics.median(times) * 1e9, pairs),
        "parameters": {
            name: list(p.shape) for name, p in model.named_parameters() if p.numel() >= 10_000
        },
        "parameters_total": sum(p.numel() for p in model.parameters()),
    }


def fit_cpu_us(work: Path) -> float:
    """CPU microseconds per training row of the build's feature fit (``data build``'s
    last step, one pass over the training rows in the driver's process, whatever the
    engine)."""
    from twotower.config import load_config
    from twotower.data.build.format import built_stream
    from twotower.features.streaming import fit_built_pipeline

    config = load_config(work / "built.yaml")
    stream = built_stream(config.data.stream)
    built = work / "built"
    rows = json.loads((built / "manifest.json").read_text())["rows"]["train"]
    clock = time.process_time()
    fit_built_pipeline(stream, built / "queries_valid.parquet", config.features, "user_id")
    return per_unit((time.process_time() - clock) * 1e6, rows)


def history_length(work: Path) -> float:
    """The mean length of the training rows' history lists (the item rows a training
    example reads besides its own item)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = count = 0
    for part in sorted((work / "built" / "train").glob("*.parquet")):
        lengths = pc.list_value_length(pq.read_table(part, columns=["history"])["history"])
        total += pc.sum(lengths).as_py() or 0
        count += len(lengths)
    return per_unit(total, count)


def rewrite_cpu_us(work: Path) -> float:
    """CPU microseconds per training row of the Spark build's driver step: its sorted
    files read and written again in the build's layout (``write_stream``, checksums
    included), here the DuckDB build's training parts."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from twotower.data.build.parquet import write_stream

    parts = sorted((work / "built" / "train").glob("*.parquet"))
    staging = work / "rewrite"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    clock = time.process_time()
    batches = (b for p in parts for b in pq.ParquetFile(p).iter_batches(batch_size=100_000))
    reader = pa.RecordBatchReader.from_batches(pq.read_schema(parts[0]), batches)
    files = write_stream(reader, staging, "train", 5_000_000, 100_000)
    cpu = time.process_time() - clock
    shutil.rmtree(staging)
    return per_unit(cpu * 1e6, sum(f["rows"] for f in files.values()))


LOAD = """
import json, sys
from pathlib import Path
from twotower.serving.artifact import Artifact
def anon():
    text = Path("/proc/self/status").read_text()
    return int(text.split("RssAnon:")[1].split()[0]) * 1024
start = anon()
artifact = Artifact.load(Path(sys.argv[1]), users=sys.argv[2] == "users")
codes = artifact.history_codes
catalogue = artifact.catalogue
arrays = [v for v in vars(catalogue).values() if hasattr(v, "nbytes")]
keys = catalogue.exported_keys._sorted
arrays += [keys._order, keys._sorted]
arrays += [catalogue.item_ids, catalogue.item_id_values, *codes.values()]
unique = {id(a): a for a in arrays if a is not catalogue.item_vectors}
held = sum(a.nbytes for a in unique.values())
print(json.dumps({"anon_bytes": anon() - start, "held_bytes": held}))
"""


def memory(work: Path) -> dict:
    """The ``memory`` part (module doc), each load in a fresh process."""
    out = {}
    for users in ("no-users", "users"):
        command = [sys.executable, "-c", LOAD, str(work / "artifact"), users]
        env = {**os.environ, **ONE_THREAD}
        text = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        out[users] = json.loads(text.stdout.strip().splitlines()[-1])
    return {
        "items": ITEMS,
        "users": USERS,
        "anon_bytes_without_users": out["no-users"]["anon_bytes"],
        "anon_bytes_with_users": out["users"]["anon_bytes"],
        "per_item_without_users": per_unit(out["no-users"]["anon_bytes"], ITEMS),
        "per_user": per_unit(out["users"]["anon_bytes"] - out["no-users"]["anon_bytes"], USERS),
        "per_item_held_arrays": per_unit(out["no-users"]["held_bytes"], ITEMS),
    }


def state(work: Path, count: int = 10_000) -> dict:
    """The ``state`` part (module doc)."""
    from twotower.serving.artifact import Artifact
    from twotower.serving.stores.memory import artifact_states
    from twotower.serving.stores.redis_store import _entry_text, _field

    artifact = Artifact.load(work / "artifact")
    rows = np.sort(np.random.default_rng(0).choice(artifact.queries.num_rows, count, replace=False))
    states = artifact_states(artifact, rows)
    sizes, recent, seen = [], [], []
    for features, entries, items in zip(states.features, states.recent, states.seen, strict=True):
        stored = dict(_field(c, v) for c, v in features.items())
        replies = [4, stored, [_entry_text(i, t) for i, t in entries], {str(i) for i in items}]
        sizes.append(resp_size(replies))
        recent.append(len(entries))
        seen.append(len(items))
    answer = {
        "artifact": "0" * 16,
        "version": 1,
        "query": 99_999_999,
        "items": [99_999_999] * 10,
        "scores": [0.123456789] * 10,
        "interests": None,
        "vector": "tower",
        "state": {"features": "stored", "history": "stored"},
    }
    return {
        "users": count,
        "read_reply_bytes_mean": per_unit(sum(sizes), count),
        "read_reply_bytes_p99": int(np.percentile(sizes, 99)),
        "recent_mean": per_unit(sum(recent), count),
        "seen_mean": per_unit(sum(seen), count),
        "recall_request_bytes": len(json.dumps({"user_id": 99_999_999, "k": 10})),
        "recall_answer_bytes_k10": len(json.dumps(answer, separators=(",", ":"))),
    }


def indexes(work: Path) -> dict:
    """The ``indexes`` part (module doc), on one thread, clustered unit vectors."""
    import faiss
    from filters import corpus

    from twotower.index import HNSWIndex, IVFPQIndex
    from twotower.threads import set_threads

    set_threads(1)
    faiss.omp_set_num_threads(1)
    out: dict = {"hnsw": [], "dim": 64}
    for count in (10_000, 40_000):
        vectors = corpus(count, 64)[0]
        index = HNSWIndex(neighbors=32, ef_construction=40)
        clock = time.process_time()
        index.build(vectors)
        cpu = time.process_time() - clock
        index.save(work / f"hnsw-{count}")
        size = folder_bytes(work / f"hnsw-{count}" / "faiss.index")
        out["hnsw"].append(
            {
                "items": len(vectors),
                "bytes": size,
                "per_item": per_unit(size, len(vectors)),
                "build_cpu_s": round(cpu, 1),
            }
        )
    vectors = corpus(100_000, 64)[0]
    index = IVFPQIndex()
    clock = time.process_time()
    index.build(vectors)
    cpu = time.process_time() - clock
    index.save(work / "ivfpq-100000")
    size = folder_bytes(work / "ivfpq-100000" / "faiss.index")
    raw = index._index
    out["ivfpq"] = {
        "items": len(vectors),
        "lists": int(raw.nlist),
        "code_bytes": int(raw.code_size),
        "bytes": size,
        "per_item": per_unit(size, len(vectors)),
        "build_cpu_s": round(cpu, 1),
    }
    out["ivfpq_at_100m"] = ivfpq_query_cost(faiss, corpus)
    return out


def ivfpq_query_cost(faiss, corpus, per_list: int = 2500, probes: int = 16) -> dict:
    """CPU time of one IVF-PQ query shaped as at 100M items with the project's defaults
    (4 sqrt(N) = 40,000 lists of 2,500 codes, 16 bytes a code, 16 probed): the scan of
    16 lists of 2,500 codes, measured on 500,000 items in 200 lists, plus the coarse
    step, one flat search over 40,000 centroids."""
    vectors, _, centres = corpus(500_000, 64, seed=1)
    lists = len(vectors) // per_list
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(64), 64, lists, 16, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:100_000])
    index.add(vectors)
    index.nprobe = probes
    queries = corpus(256, 64, seed=2)[0]
    coarse = faiss.IndexFlatIP(64)
    coarse.add(corpus(40_000, 64, seed=3)[0])
    return {
        "items": len(vectors),
        "lists": lists,
        "probes": probes,
        "scan_ms_alone": cpu_ms_per_query(index, queries, 1),
        "scan_ms_in_64": cpu_ms_per_query(index, queries, 64),
        "coarse_40000_ms_alone": cpu_ms_per_query(coarse, queries, 1),
        "coarse_40000_ms_in_64": cpu_ms_per_query(coarse, queries, 64),
    }


def cpu_ms_per_query(index, queries: np.ndarray, batch: int, k: int = 10) -> float:
    """Median over three passes of the CPU milliseconds per query, ``batch`` at a time."""
    passes = []
    for _ in range(3):
        clock = time.process_time()
        for start in range(0, len(queries), batch):
            index.search(queries[start : start + batch], k)
        passes.append(time.process_time() - clock)
    return round(statistics.median(passes) * 1000 / len(queries), 4)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def run_parts(parts: Iterable[str], out: Path, work: Path) -> None:
    """Runs each part not yet written to ``out`` and writes its JSON there."""
    functions = {
        "pipeline": pipeline,
        "towers": towers,
        "memory": memory,
        "state": state,
        "indexes": indexes,
    }
    for part in parts:
        path = out / f"{part}.json"
        if path.is_file():
            print(f"{part}: recorded in {path}", flush=True)
            continue
        print(f"{part} ...", flush=True)
        before = machine()
        clock = time.perf_counter()
        result = functions[part](work)
        result["machine"] = {**before, "load_average_after": machine()["load_average"]}
        result["wall_s"] = round(time.perf_counter() - clock, 1)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/unit-costs")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/unit-costs")
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    run_parts(parts, args.out, args.work)


if __name__ == "__main__":
    main()
