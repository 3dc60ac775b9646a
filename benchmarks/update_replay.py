"""What updating the model is worth: MovieLens-100K replayed in time order, the model
left as it is, updated on each new period from its previous weights, or retrained.

    nice python benchmarks/update_replay.py [--out runs/update-replay] [--start 0.6]
        [--periods 4] [--valid-share 0.5] [--seeds 0,1,2] [--arms none,incremental,full]
        [--incremental-epochs 10] [--ledger benchmarks/results/update-replay/ledger.jsonl]
        [--data-dir ../shared/datasets] [--plot docs/update-replay-ml100k.png]
        [--threads 1] [--quick] [--timing LEDGER]

The log is ordered by time. Its first ``--start`` share is the initial data; the rest is
cut into ``--periods`` periods of equal counts, each ``[from, until)`` in time. Step t
(0 to periods - 1) knows everything before period t + 1 and is scored on period t + 1:
Recall@10 and NDCG@10 over the whole corpus, each user's items before the period left
out and the user's history as of the period's start (the library's ``evaluate_source``
on the test part of a time split). Every run of a step is early-stopped on the step's
validation window, the last ``--valid-share`` of a period's count before the step's
end, which it does not train on (``configs/ml100k.yaml``'s recipe otherwise). Step 0
trains the initial model (``initial``); each later step compares three arms:

    none         the initial model, not updated (histories and seen items still move on)
    incremental  the previous step's model (initial at step 1) trained from its weights
                 (``train_run(..., init_from=...)``) on what it has not trained on: from
                 the previous step's validation window to this step's, for at most
                 ``--incremental-epochs`` epochs; earlier interactions still feed
                 histories and seen items
    full         a new model trained from scratch on everything before the window

Each finished (arm, step, seed) is one line of the ledger, with its quality and the
wall time of its update (``train_run``, from reading the data to the final metrics);
a rerun skips recorded lines and refuses a ledger of another setup. The table and the
plot are drawn from the whole ledger. ``--quick`` (1 epoch, seed 0, 3 periods) writes
its ledger, table and plot in ``--out`` instead. ``--timing LEDGER`` takes the seconds
from another ledger of the same replay (some seeds, run with nothing else on the machine):
each (arm, step)'s seconds become that ledger's mean, and its quality must equal this
ledger's for the seeds both hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from twotower.config import Config, apply_overrides, load_config
from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, SplitConfig
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, Dataset
from twotower.data.movielens import load_movielens_100k
from twotower.sources import MemorySource
from twotower.storage import write_json
from twotower.training.evaluate import evaluate_source
from twotower.training.run import load_model, train_run

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("none", "incremental", "full")
METRICS = ("recall@10", "ndcg@10")
COLORS = {"initial": "grey", "none": "tab:blue", "incremental": "tab:orange", "full": "tab:green"}
# train_run takes a previous run to start from once warm-starting exists
WARM_START = "init_from" in inspect.signature(train_run).parameters
# the options a ledger's lines depend on (with the data, the config and its overrides)
SETUP = ("start", "periods", "valid_share", "incremental_epochs")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the replay, as times in the log's units (each bound exclusive above).

    Attributes:
        index: 0 for the initial training; t for the update after period t.
        new_from: where an incremental update's training interactions begin (the
            previous step's ``valid_from``); None at step 0.
        valid_from: the validation window ``[valid_from, known_until)`` begins.
        known_until: the end of the data so far, where the next period begins.
        next_until: the end of the next period.
    """

    index: int
    new_from: float | None
    valid_from: float
    known_until: float
    next_until: float


def replay_steps(
    timestamps: np.ndarray, start: float, periods: int, valid_share: float
) -> list[Step]:
    """The steps of a log: the first ``start`` share of its interactions (by time) is the
    initial data, the rest ``periods`` periods of equal counts (up to equal timestamps,
    which always fall in one period); each step's validation window is the last
    ``valid_share`` of a period's count before its end."""
    ordered = np.sort(np.asarray(timestamps, dtype=np.float64))
    n = len(ordered)
    first = round(start * n)
    length = (n - first) / periods
    window = round(valid_share * length)
    if first - window < 1 or window < 1 or length < 1:
        raise ValueError(f"{n} interactions are too few for {periods} periods after {start}")
    ends = [first + round(i * length) for i in range(periods + 1)]
    bounds = [float(ordered[e]) if e < n else float(ordered[-1]) + 1.0 for e in ends]
    valid = [float(ordered[e - window]) for e in ends]
    return [
        Step(t, valid[t - 1] if t else None, valid[t], bounds[t], bounds[t + 1])
        for t in range(periods)
    ]


def write_step_data(dataset: Dataset, step: Step, folder: Path) -> DataConfig:
    """Writes the interactions before the step's next period ends, every user's and
    every item's row, as Parquet in ``folder``; returns the data config that reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    log = dataset.interactions.select([QUERY_ID, ITEM_ID, TIMESTAMP])
    log = log.filter(pc.less(log.column(TIMESTAMP), pa.scalar(step.next_until, pa.float64())))
    paths = {name: folder / f"{name}.parquet" for name in ("interactions", "queries", "items")}
    for name, table in zip(paths, (log, dataset.queries, dataset.items), strict=True):
        pq.write_table(table, paths[name])
    return DataConfig(
        source="files",
        interactions=InteractionsConfig(
            paths["interactions"], query_id=QUERY_ID, item_id=ITEM_ID, timestamp=TIMESTAMP
        ),
        queries=FeatureTableConfig(paths["queries"], key=dataset.query_key),
        items=FeatureTableConfig(paths["items"], key=dataset.item_key),
    )


def step_config(base: Config, step: Step, data: DataConfig) -> Config:
    """``base`` on the step's data, split by time: training before the validation window,
    the window, then the next period as test."""
    split = SplitConfig(method="time", valid_from=step.valid_from, test_from=step.known_until)
    return dataclasses.replace(base, data=data, split=split)


def incremental_config(config: Config, step: Step, epochs: int) -> Config:
    """The step's config for an incremental update: its training interactions only those
    from ``step.new_from`` on, for at most ``epochs`` epochs."""
    return apply_overrides(
        config, [f"split.train_from={step.new_from}", f"training.epochs={epochs}"]
    )


def next_period(run: Path, config: Config) -> dict:
    """A run's best model scored on the step's next period (the test part of ``config``),
    histories and seen items as of the period's start."""
    _, pipeline, model = load_model(run)
    source = MemorySource.read(config)
    metrics = evaluate_source(model, source, pipeline, "test", [10], batch_size=1024)
    return {m: metrics[f"test/{m}"] for m in METRICS} | {"users": int(metrics["test/queries"])}


class Replay:
    """Every run of a replay, each in its folder ``out/seed-S/ARM-T``, trained once.

    Args:
        steps: the replay's steps.
        configs: each step's config (``step_config``), seed aside.
        out: where the runs go.
        incremental_epochs: the most epochs of an incremental update.
    """

    def __init__(
        self, steps: list[Step], configs: list[Config], out: Path, incremental_epochs: int
    ) -> None:
        self.steps, self.configs, self.out = steps, configs, out
        self.incremental_epochs = incremental_epochs

    def entry(self, arm: str, step: Step, seed: int) -> dict:
        """The ledger line of one (arm, step, seed): its quality on the next period and
        its update's wall time (its own training, not the runs it starts from)."""
        run, timing = self.run("initial" if arm == "none" else arm, step.index, seed)
        if arm == "none":
            timing = {"seconds": 0.0, "epochs": 0, "best_epoch": 0}
        config = apply_overrides(self.configs[step.index], [f"seed={seed}"])
        quality = next_period(run, config)
        timing = {name: timing[name] for name in ("seconds", "epochs", "best_epoch")}
        return {"arm": arm, "step": step.index, "seed": seed, **quality, **timing}

    def run(self, arm: str, index: int, seed: int) -> tuple[Path, dict]:
        """The run folder of ``arm`` at step ``index`` (``initial``: step 0's model), trained
        unless it finished before, and its timing (saved beside it as ``update.json``).
        A run killed before it finished starts over, so that its time is whole."""
        if arm == "initial":
            index = 0
        folder = self.out / f"seed-{seed}" / f"{arm}-{index}"
        if (folder / "update.json").is_file():
            return folder, json.loads((folder / "update.json").read_text())
        config = apply_overrides(self.configs[index], [f"seed={seed}"])
        previous = None
        if arm == "incremental":
            previous, _ = self.run("incremental" if index > 1 else "initial", index - 1, seed)
            config = incremental_config(config, self.steps[index], self.incremental_epochs)
        clock = time.perf_counter()
        if previous is None:
            state = train_run(config, folder).state
        else:
            state = train_run(config, folder, init_from=previous).state
        seconds = time.perf_counter() - clock
        timing = {
            "seconds": round(seconds, 1),
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
        }
        write_json(folder / "update.json", timing)
        return folder, timing


def replay(
    replay: Replay, arms: Sequence[str], seeds: Sequence[int], ledger: Path, setup: dict
) -> None:
    """Records every (arm, step, seed) the ledger lacks, step 0 as arm ``initial``, with
    a progress bar; every line carries its arm's setup (``arm_setup``).

    Raises:
        SystemExit: the ledger holds a line of another setup.
    """
    done = recorded(ledger, setup)
    wanted = [
        (arm, step, seed)
        for seed in seeds
        for step in replay.steps
        for arm in (["initial"] if step.index == 0 else arms)
    ]
    left = [(arm, step, seed) for arm, step, seed in wanted if (arm, step.index, seed) not in done]
    for arm, step, seed in tqdm(left, desc="update replay", unit="run", disable=None):
        record(ledger, {**replay.entry(arm, step, seed), "setup": arm_setup(setup, arm)})


def arm_setup(setup: dict, arm: str) -> dict:
    """What an arm's lines were recorded with: ``setup``, but ``incremental_epochs`` only
    for the incremental arm (it changes no other arm's runs)."""
    return {k: v for k, v in setup.items() if arm == "incremental" or k != "incremental_epochs"}


def recorded(ledger: Path, setup: dict) -> set[tuple[str, int, int]]:
    """The (arm, step, seed) the ledger holds.

    Raises:
        SystemExit: a line was recorded under another setup than its arm's.
    """
    lines = ledger.read_text().splitlines() if ledger.is_file() else []
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        if entry["setup"] != arm_setup(setup, entry["arm"]):
            raise SystemExit(
                f"{ledger}: a line of {entry['arm']} was recorded with {entry['setup']}, "
                f"not {arm_setup(setup, entry['arm'])}; give another --ledger"
            )
    return {(e["arm"], e["step"], e["seed"]) for e in entries}


def read_ledger(ledger: Path) -> list[dict]:
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def record(ledger: Path, entry: dict) -> None:
    """Appends one line to the ledger."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def summary(entries: Sequence[dict]) -> dict[tuple[int, str], dict]:
    """Per (step, arm): the mean and standard deviation over seeds of each metric, of
    the update's seconds and epochs, and the number of seeds."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for entry in entries:
        groups.setdefault((entry["step"], entry["arm"]), []).append(entry)
    result = {}
    for key, group in sorted(groups.items(), key=lambda kv: (kv[0][0], _arm_order(kv[0][1]))):
        values = {name: [e[name] for e in group] for name in (*METRICS, "seconds", "epochs")}
        result[key] = {name: (float(np.mean(v)), float(np.std(v))) for name, v in values.items()}
        result[key]["seeds"] = len(group)
    return result


def retimed(entries: Sequence[dict], timing: Sequence[dict]) -> list[dict]:
    """``entries`` with each (arm, step)'s seconds replaced by its mean in ``timing``, a
    ledger of the same replay timed alone; raises ``ValueError`` when a (arm, step, seed)
    both hold differs in quality (then they are not the same replay) or when ``timing``
    lacks a (arm, step) of ``entries``."""
    own = {(e["arm"], e["step"], e["seed"]): e for e in entries}
    seconds: dict[tuple[str, int], list[float]] = {}
    for entry in timing:
        key = (entry["arm"], entry["step"], entry["seed"])
        if key in own and any(own[key][m] != entry[m] for m in METRICS):
            raise ValueError(f"--timing: {key} has other metrics than the ledger's")
        seconds.setdefault(key[:2], []).append(entry["seconds"])
    missing = sorted({(e["arm"], e["step"]) for e in entries} - set(seconds))
    if missing:
        raise ValueError(f"--timing: no timing for (arm, step) {missing}")
    return [e | {"seconds": float(np.mean(seconds[(e["arm"], e["step"])]))} for e in entries]


def _arm_order(arm: str) -> int:
    return -1 if arm == "initial" else ARMS.index(arm)


def markdown(entries: Sequence[dict], steps: Sequence[Step]) -> str:
    """The table: per step and arm, quality on the next period and the update's cost
    (mean ± standard deviation over seeds); then each arm's mean over the update steps."""
    lines = [
        "| step | next period (UTC) | arm | seeds | Recall@10 | NDCG@10 | seconds | epochs |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    table = summary(entries)
    for (index, arm), row in table.items():
        step = steps[index]
        period = f"{_day(step.known_until)} to {_day(step.next_until)}"
        cells = [_cell(row[m], 4) for m in METRICS] + [
            _cell(row["seconds"], 0),
            _cell(row["epochs"], 1),
        ]
        lines.append(f"| {index} | {period} | {arm} | {row['seeds']} | {' | '.join(cells)} |")
    lines += [
        "",
        "| arm | Recall@10, mean over steps 1+ | NDCG@10 | update seconds |",
        "|---|---:|---:|---:|",
    ]
    for arm in ARMS:
        rows = [row for (index, name), row in table.items() if name == arm and index > 0]
        if rows:
            cells = [f"{np.mean([r[m][0] for r in rows]):.4f}" for m in METRICS]
            lines.append(
                f"| {arm} | {' | '.join(cells)} | {np.mean([r['seconds'][0] for r in rows]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def _cell(value: tuple[float, float], digits: int) -> str:
    mean, spread = value
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if round(spread, digits) else "")


def _day(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def plot(entries: Sequence[dict], path: Path) -> None:
    """Recall@10 and NDCG@10 on the next period per step for each arm (step 0: the
    initial model, every arm's start), and the seconds of each update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary(entries)
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    start = {index: row for (index, arm), row in table.items() if arm == "initial"}
    for arm in ARMS:
        rows = {index: row for (index, name), row in table.items() if name == arm}
        if not rows:
            continue
        steps = sorted({**start, **rows})
        for axis, metric in zip(axes, METRICS, strict=False):
            values = [(rows.get(t) or start[t])[metric] for t in steps]
            mean, spread = [v[0] for v in values], [v[1] for v in values]
            axis.errorbar(steps, mean, spread, marker="o", capsize=3, label=arm, color=COLORS[arm])
    for offset, arm in ((0.0, "initial"), (-0.2, "incremental"), (0.2, "full")):
        rows = {index: row for (index, name), row in table.items() if name == arm}
        seconds = [row["seconds"][0] for row in rows.values()]
        if rows:
            axes[2].bar([t + offset for t in rows], seconds, 0.4, label=arm, color=COLORS[arm])
    for axis, label in zip(
        axes, ("Recall@10, next period", "NDCG@10, next period", "seconds per update"), strict=True
    ):
        axis.set_xlabel("step (data so far: initial + periods 1..step)")
        axis.set_xticks(sorted({index for index, _ in table}))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(
        "MovieLens-100K replayed in time order: no update, incremental update, full retrain"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    results = ROOT / "benchmarks" / "results" / "update-replay"
    parser.add_argument("--out", type=Path, default=Path("runs/update-replay"))
    parser.add_argument("--start", type=float, default=0.6, help="the initial share of the log")
    parser.add_argument("--periods", type=int, default=4)
    parser.add_argument("--valid-share", type=float, default=0.5, help="of a period's count")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--arms", default=",".join(a for a in ARMS if WARM_START or a != "incremental")
    )
    parser.add_argument("--incremental-epochs", type=int, default=10)
    parser.add_argument("--ledger", type=Path, default=results / "ledger.jsonl")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "update-replay-ml100k.png")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 epoch, seed 0, 3 periods")
    parser.add_argument(
        "--timing", type=Path, help="a ledger of the same replay timed alone: its seconds"
    )
    args = parser.parse_args()
    arms = args.arms.split(",")
    if any(arm not in ARMS for arm in arms):
        parser.error(f"--arms: each of {', '.join(ARMS)}")
    if "incremental" in arms and not WARM_START:
        parser.error("--arms incremental: this version of train_run cannot start from a run")
    if args.quick:
        args.periods, args.seeds, args.incremental_epochs = 3, "0", 1
        args.ledger, args.plot = args.out / "ledger.jsonl", args.out / "update-replay-ml100k.png"
    return args


def main() -> None:
    args = arguments()
    folder = args.data_dir / "ml-100k"
    if not (folder / "u.data").is_file():
        print(f"MovieLens-100K is not in {folder}: nothing to replay, skipped")
        return
    overrides = [f"threads={args.threads}", "training.tensorboard=false"]
    overrides += ["training.epochs=1"] if args.quick else []
    base = load_config(ROOT / "configs" / "ml100k.yaml", overrides)
    dataset = load_movielens_100k(folder)
    steps = replay_steps(dataset.column(TIMESTAMP), args.start, args.periods, args.valid_share)
    configs = [
        step_config(
            base, step, write_step_data(dataset, step, args.out / "data" / f"step-{step.index}")
        )
        for step in steps
    ]
    setup = {"data": "ml-100k", "config": "configs/ml100k.yaml", "overrides": overrides}
    setup |= {name: getattr(args, name) for name in SETUP}
    runs = Replay(steps, configs, args.out, args.incremental_epochs)
    replay(runs, args.arms.split(","), [int(s) for s in args.seeds.split(",")], args.ledger, setup)
    entries = read_ledger(args.ledger)
    if args.timing is not None:
        entries = retimed(entries, read_ledger(args.timing))
    table = markdown(entries, steps)
    (args.ledger.parent / "update-replay-ml100k.md").write_text(table)
    plot(entries, args.plot)
    print(table)


if __name__ == "__main__":
    main()
