"""Training speed and memory on MovieLens-1M, per objective, beside a naive reference loop.

    python benchmarks/training.py --out runs/training [--data-dir DIR] [--quick]

For each objective (``benchmarks/objectives.py``'s settings on ``configs/ml1m.yaml``),
in a fresh process of its own so that its peak memory is its own:

- one epoch of ``Trainer``: training examples/s and the epoch's training time;
- exact evaluation of every test user against the whole corpus (median of 3);
- the process's peak resident memory (read before the ceiling below, whose batches
  built in advance are not training's memory);
- the bare-step ceiling: ``Trainer.train_step`` alone (the same model, loss and
  optimizers) on batches built in memory beforehand, so no data pipeline runs in the
  timed region; and, beside it, the pipeline: the trainer's loop, batches built from
  the same ``TrainingExamples`` as they are drawn. Both take the same shuffled
  batches (one generator seed), each from a fresh ``Trainer`` on a copy of the same
  start weights, alternated three times; their medians and the ratio pipeline /
  ceiling are reported (1.0: the pipeline costs nothing; the target is >= 0.8). On a
  busy machine that ratio moves by 0.1 or more from run to run, so building those
  batches alone is timed too: its share of a step (building plus bare step) is the
  pipeline's cost without the noise of two separate timings. The steps timed each
  way are bounded, so the batches held at once stay small: about 3 s (``--quick``;
  10 s otherwise) at the epoch's rate, at least 2, at most the epoch's and
  ``MAX_PREBUILT`` (64 batches of 1024: about 130 MB with histories of 250). The
  trainer's own loop adds only a progress bar to this one.

Then, in one process, the same model and the in-batch softmax loss (logQ from counts,
accidental hits masked) trained by a plain loop as it is commonly written: a
``torch.utils.data.Dataset`` whose ``__getitem__`` builds one example's feature
tensors, ``DataLoader`` collation, every positive item embedded (duplicates too),
and ``Trainer.train_step`` on this package's vectorized batches, for the same number
of steps from the same start, alternating three times. Their ratio holds on a noisy
machine, where absolute rates do not.

``--quick``: 300 sampled users, 20 reference steps. Writes ``training.json`` and
``training.md`` into ``--out``. ``--set key=value`` applies to every measurement
(e.g. ``--set threads=1`` where other processes share the cores).

``--encoders mean,attention,transformer,gru --objectives ''``: one epoch of in-batch
softmax with each history encoder instead, with its ceiling (``encoders.json``,
``encoders.md``). With ``--set training.examples=sequences`` (sequence encoders only) the
epoch and both sides of the ceiling take ``SequenceTrainingData``'s window batches,
and examples are training positions.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from twotower.config import Config, apply_overrides, load_config
from twotower.data.dataset import Dataset
from twotower.data.load import with_data_dir
from twotower.data.splits import Split
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import load_data
from twotower.threads import set_threads
from twotower.towers.model import TwoTower
from twotower.training.evaluate import evaluate_model
from twotower.training.examples import EXAMPLES, Batch, TrainingData
from twotower.training.run import train_run
from twotower.training.trainer import RunPlan, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from objectives import OBJECTIVES, objective_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/ml1m.yaml"


def config_for(
    data_dir: Path | None,
    quick: bool,
    objective: str = "in_batch",
    encoder: str | None = None,
    overrides: list[str] = (),
) -> Config:
    settings = objective_settings(objective)
    if encoder is not None:
        settings.append(f"features.query.history.encoder={encoder}")
    settings += overrides
    common = ["training.epochs=1", "training.tensorboard=false", "training.device=cpu"]
    config = load_config(CONFIG, [*common, *settings])
    if data_dir is not None:
        config = dataclasses.replace(config, data=with_data_dir(config.data, data_dir))
    return apply_overrides(config, ["data.sample_queries=300"]) if quick else config


def one_objective(
    objective: str,
    data_dir: Path | None,
    quick: bool,
    out: Path,
    encoder: str | None = None,
    overrides: list[str] = (),
    ceiling_seconds: float | None = None,
) -> dict:
    """One epoch's speed, the evaluation time, this process's peak memory and the
    bare-step ceiling (about ``ceiling_seconds`` of steps each way)."""
    config = config_for(data_dir, quick, objective, encoder, overrides)
    name = objective if encoder is None else f"{objective}-{encoder}"
    result = train_run(config, out / name)
    record = result.state.records[-1]
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.load(out / name / "features")
    data = training_data(config, dataset, split, pipeline)
    torch.manual_seed(config.seed)  # the start weights of train_run's model
    model = TwoTower.build(config.model, config.features, pipeline)
    start = copy.deepcopy(model.state_dict())
    times = []
    for _ in range(3):
        clock = time.perf_counter()
        metrics = evaluate_model(model, data, "test", config.training.ks)
        times.append(time.perf_counter() - clock)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = ceiling_seconds or (3.0 if quick else 10.0)
    steps = ceiling_steps(data, config.training.batch_size, record["examples_per_s"], seconds)
    return {
        "objective": objective,
        "encoder": encoder or "mean",
        "max_len": next(s.max_len for s in config.features.query if s.kind == "history"),
        "examples": len(data),
        "examples_per_s": record["examples_per_s"],
        "epoch_seconds": record["train_seconds"],
        "eval_seconds": statistics.median(times),
        "eval_users": metrics["test/queries"],
        "peak_rss_mib": peak_rss_mib,
        **bare_step_ceiling(config, data, model, start, steps, out / name / "ceiling"),
    }


def training_data(
    config: Config, dataset: Dataset, split: Split, pipeline: FeaturePipeline
) -> TrainingData:
    """The examples ``train_run`` trains on (``training.examples``), on the CPU."""
    builder = EXAMPLES[config.training.examples]
    return builder.from_split(config, dataset, split, pipeline, torch.device("cpu"))


MAX_PREBUILT = 64  # batches built ahead for the ceiling: bounds the memory they hold


def ceiling_steps(
    data: TrainingData, batch_size: int, examples_per_s: float, seconds: float
) -> int:
    """Steps timed each way: about ``seconds`` at the epoch's rate, at least 2, at most
    the epoch's steps and ``MAX_PREBUILT``."""
    epoch_steps = data.steps(batch_size, 1)
    wanted = round(seconds * examples_per_s * epoch_steps / len(data))
    return min(max(2, wanted), epoch_steps, MAX_PREBUILT)


def bare_step_ceiling(
    config: Config, data: TrainingData, model: TwoTower, start: dict, steps: int, out: Path
) -> dict:
    """Examples/s of the trainer's loop (batches built as drawn) and of bare
    ``train_step`` on the same batches built beforehand: ``steps`` each, alternated
    three times, each from a fresh ``Trainer`` on the ``start`` weights; medians. And
    examples/s of building those batches alone (once), and the share of a pipeline
    step it takes."""
    batch_size = config.training.batch_size

    def batches() -> Iterable[Batch]:  # the same shuffle every time
        generator = torch.Generator().manual_seed(config.seed)
        return itertools.islice(data.batches(batch_size, generator), steps)

    clock = time.perf_counter()
    prebuilt = list(batches())
    build_seconds = time.perf_counter() - clock
    pipeline_rates, ceiling_rates = [], []
    for _ in range(3):
        for rates, source in ((pipeline_rates, batches()), (ceiling_rates, prebuilt)):
            model.load_state_dict(start)
            model.train()
            torch.manual_seed(config.seed)  # the same dropout
            trainer = Trainer(model, data, RunPlan(config.training), out, seed=config.seed)
            rates.append(timed_steps(trainer, source))
    pipeline, ceiling = statistics.median(pipeline_rates), statistics.median(ceiling_rates)
    build = sum(len(batch.positives) for batch in prebuilt) / build_seconds
    return {
        "ceiling_steps": steps,
        "pipeline_per_s": pipeline,
        "ceiling_per_s": ceiling,
        "ceiling_ratio": pipeline / ceiling,
        "build_per_s": build,
        "build_share": ceiling / (build + ceiling),  # of a step: build time / (it + step)
    }


def timed_steps(trainer: Trainer, batches: Iterable[Batch]) -> float:
    """Examples/s of ``trainer.train_step`` over ``batches``, drawing them included."""
    clock, examples = time.perf_counter(), 0
    for batch in batches:
        trainer.train_step(batch)
        examples += len(batch.positives)
    return examples / (time.perf_counter() - clock)


class Examples(torch.utils.data.Dataset):
    """The reference's data: one training example's tensors per ``__getitem__``."""

    def __init__(self, data: TrainingData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        query_idx, item_idx = self.data.query_idx[i], self.data.item_idx[i]
        query = {name: values[query_idx] for name, values in self.data.queries.items()}
        target = self.data.items["item_id"][item_idx]
        query["history"] = query["history"].masked_fill(query["history"] == target, 0)
        item = {name: values[item_idx] for name, values in self.data.items.items()}
        return query, item, item_idx


def reference_steps(model, data, loader, log_q, optimizer, steps: int) -> int:
    """The plain loop: in-batch softmax with logQ and accidental-hit masking."""
    examples = 0
    for query, item, item_idx in itertools.islice(loader, steps):
        q = model.query_tower(query)  # (B, D)
        v = model.item_tower(item)  # (B, D), duplicates embedded again
        logits = q @ v.T * model.scale() - log_q[item_idx][None, :]
        same = item_idx[:, None] == item_idx[None, :]
        logits = logits.masked_fill(same & ~torch.eye(len(item_idx), dtype=torch.bool), -1e9)
        loss = F.cross_entropy(logits, torch.arange(len(item_idx)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        examples += len(item_idx)
    return examples


def against_reference(
    data_dir: Path | None, quick: bool, out: Path, steps: int, overrides: list[str] = ()
) -> dict:
    """Examples/s of the plain loop and of ``Trainer.train_step``, same steps, alternated."""
    config = config_for(data_dir, quick, overrides=overrides)
    set_threads(config.threads)
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    data = TrainingData(dataset, split, pipeline, config.training.history)
    torch.manual_seed(0)
    naive_model = TwoTower.build(config.model, config.features, pipeline)
    ours_model = TwoTower.build(config.model, config.features, pipeline)
    ours_model.load_state_dict(naive_model.state_dict())
    counts = torch.tensor(data.item_counts(), dtype=torch.float32).clamp(min=1)
    log_q = torch.log(counts / counts.sum())
    loader = torch.utils.data.DataLoader(
        Examples(data), batch_size=config.training.batch_size, shuffle=True
    )
    optimizer = torch.optim.Adam(naive_model.parameters(), lr=config.training.lr)
    plan = RunPlan(config.training)
    trainer = Trainer(ours_model, data, plan, out / "reference", seed=0)
    naive_rates, ours_rates = [], []
    for repeat in range(3):
        clock = time.perf_counter()
        examples = reference_steps(naive_model, data, loader, log_q, optimizer, steps)
        naive_rates.append(examples / (time.perf_counter() - clock))
        generator = torch.Generator().manual_seed(repeat)
        batches = itertools.islice(data.batches(config.training.batch_size, generator), steps)
        ours_rates.append(timed_steps(trainer, batches))
    naive, ours = statistics.median(naive_rates), statistics.median(ours_rates)
    return {"steps": steps, "reference_per_s": naive, "ours_per_s": ours, "ratio": ours / naive}


def markdown(rows: list[dict], reference: dict) -> str:
    lines = [
        "| objective | examples/s | epoch (train) | bare-step ceiling | pipeline / ceiling "
        "| building batches | evaluation, all test users | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['objective']} | {r['examples_per_s']:,.0f} | {r['epoch_seconds']:.1f} s "
            f"| {ceiling_cells(r)} "
            f"| {r['eval_seconds']:.2f} s ({r['eval_users']:,.0f} users) "
            f"| {r['peak_rss_mib']:,.0f} MiB |"
        )
    lines += [
        "",
        CEILING_NOTE,
        "",
        f"In-batch softmax, {reference['steps']} steps each, median of 3 alternations: "
        f"this package {reference['ours_per_s']:,.0f} examples/s, the plain reference loop "
        f"{reference['reference_per_s']:,.0f} examples/s: **{reference['ratio']:.1f}x**.",
    ]
    return "\n".join(lines) + "\n"


CEILING_NOTE = (
    "Bare-step ceiling: examples/s of `Trainer.train_step` alone on batches built "
    "beforehand; pipeline / ceiling: the trainer's loop, building the same batches as it "
    "goes, against it (the steps each way in brackets, both from the same start weights, "
    "medians of 3 alternations in the same process; within about 0.15 of 1 it is the "
    "machine's noise). Building batches: the time building them alone takes, as a share "
    "of that plus a bare step (1 - share is the ratio without noise)."
)


def ceiling_cells(row: dict) -> str:
    """A row's ceiling rate, pipeline / ceiling ratio and building share: three cells."""
    return (
        f"{row['ceiling_per_s']:,.0f} | {row['ceiling_ratio']:.2f} ({row['ceiling_steps']} steps)"
        f" | {row['build_share']:.1%}"
    )


def encoders_markdown(rows: list[dict]) -> str:
    lines = [
        "| history encoder (in_batch) | max_len | examples/s | epoch (train) "
        "| bare-step ceiling | pipeline / ceiling | building batches | evaluation "
        "| peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {r['max_len']} | {r['examples_per_s']:,.0f} "
            f"| {r['epoch_seconds']:.1f} s | {ceiling_cells(r)} "
            f"| {r['eval_seconds']:.2f} s | {r['peak_rss_mib']:,.0f} MiB |"
        )
    return "\n".join(lines + ["", CEILING_NOTE]) + "\n"


def child(args: argparse.Namespace, objective: str, encoder: str | None = None) -> dict:
    """One measurement in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--one", objective, "--out", str(args.out)]
    command += ["--quick"] if args.quick else []
    command += ["--data-dir", str(args.data_dir)] if args.data_dir else []
    command += ["--encoder", encoder] if encoder else []
    command += [f"--set={item}" for item in args.overrides]
    command += [f"--ceiling-seconds={args.ceiling_seconds}"] if args.ceiling_seconds else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/training"))
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument(
        "--encoders",
        default="",
        help="Also time in_batch with each of these history encoders (e.g. "
        "mean,attention,transformer,gru); only those with --objectives ''.",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="A config override."
    )
    parser.add_argument(
        "--ceiling-seconds",
        type=float,
        default=None,
        help="About how long the ceiling times each way (default 3 with --quick, else 10).",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's objective
    parser.add_argument("--encoder", help=argparse.SUPPRESS)  # and its history encoder
    args = parser.parse_args()
    if args.one:
        row = one_objective(
            args.one,
            args.data_dir,
            args.quick,
            args.out,
            args.encoder,
            args.overrides,
            args.ceiling_seconds,
        )
        print(json.dumps(row))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    encoders = [child(args, "in_batch", e) for e in args.encoders.split(",") if e]
    if encoders:
        (args.out / "encoders.json").write_text(json.dumps(encoders, indent=2))
        (args.out / "encoders.md").write_text(encoders_markdown(encoders))
        print(encoders_markdown(encoders))
    rows = [child(args, objective) for objective in args.objectives.split(",") if objective]
    if not rows:
        return
    steps = 20 if args.quick else 200
    reference = against_reference(args.data_dir, args.quick, args.out, steps, args.overrides)
    print(json.dumps(reference), flush=True)
    (args.out / "training.json").write_text(
        json.dumps({"objectives": rows, "reference": reference}, indent=2)
    )
    text = markdown(rows, reference)
    (args.out / "training.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
