"""Levers on the MovieLens-1M recipe's model that the config cannot express yet, on
validation only.

    python benchmarks/ml1m_levers.py --ledger benchmarks/results/tuning/ml1m/levers.jsonl \
        [--data-dir DIR] [--levers base,bias,...] [--seeds 0,1,2] [--threads 1]

``configs/ml1m.yaml``'s model written out in plain torch, so that changes to it can be
tried before they become config keys: the user is the L2-normalized mean of the
vectors of their kept training items, the item its own normalized vector, the score
their cosine over a temperature; each epoch 40% of a user's training items are held
out of the input and are the positives, each against a softmax over every movie but
the user's other training items; Adam with a cosine schedule. The data, split and
metrics are the library's (``twotower.data``, ``twotower.evaluation.metrics``), so its
numbers are comparable with the recipe's validation Recall@10 (one difference: the
input here is every kept item, not the 250 most recent).

Each lever is one change to that model (``LEVERS``). Each finished (lever, seed) is
one line of the ledger (its settings, best epoch and validation metrics) and is not
run again; a killed run starts over. Test is never computed here. At the end the whole
ledger is drawn beside EASE's validation metrics (the library's, ``baselines.ease_l2``
of the config) into ``levers.png`` next to the ledger.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from twotower.baselines.run import evaluate_baseline
from twotower.config import load_config
from twotower.data.load import with_data_dir
from twotower.data.matrix import interaction_matrix
from twotower.evaluation.metrics import ranking_metrics
from twotower.sources import MemorySource, load_data

sys.path.insert(0, str(Path(__file__).parent))
from levers_ledger import arguments, plot, record, recorded  # noqa: E402  (the ledger, shared)

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Lever:
    """The recipe's settings (the defaults) and what a lever changes."""

    dim: int = 512
    shared: bool = True  # one table for the history and the item side
    item_bias: bool = False  # a learned per-item bias added to the cosine / temperature
    hidden: int = 0  # > 0: a residual tanh layer of this width over the pooled history
    temperature: float = 0.1
    lr: float = 0.0175
    weight_decay: float = 1.5e-7
    epochs: int = 40
    holdout: float = 0.4
    item_dropout: float = 0.05
    batch_size: int = 256
    ensemble: int = 1  # > 1: this many models (seeds s, s + 100, ...), scores averaged
    init_std: float = 0.1  # of the tables' normal initialization (the library: dim**-0.5)


LEVERS = {
    "base": Lever(),
    "own-history-table": Lever(shared=False),
    "item-bias": Lever(item_bias=True),
    "tanh-1024-residual": Lever(hidden=1024),
    "dim-1024": Lever(dim=1024),
    "dim-1024-temperature-0.08": Lever(dim=1024, temperature=0.08),
    "ensemble-3": Lever(ensemble=3),
    "epochs-15": Lever(epochs=15),
    "epochs-20": Lever(epochs=20),
    "epochs-25": Lever(epochs=25),
    "init-std-0.044": Lever(init_std=512**-0.5),
    "init-std-0.2": Lever(init_std=0.2),
}


class Model(torch.nn.Module):
    def __init__(self, num_items: int, lever: Lever) -> None:
        super().__init__()
        self.lever = lever
        self.history = torch.nn.Parameter(torch.randn(num_items, lever.dim) * lever.init_std)
        self.items = (
            self.history
            if lever.shared
            else torch.nn.Parameter(torch.randn(num_items, lever.dim) * lever.init_std)
        )
        self.bias = torch.nn.Parameter(torch.zeros(num_items)) if lever.item_bias else None
        self.layer = (
            torch.nn.Sequential(
                torch.nn.Linear(lever.dim, lever.hidden),
                torch.nn.Tanh(),
                torch.nn.Linear(lever.hidden, lever.dim),
            )
            if lever.hidden
            else None
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, N) 0/1 input items -> (B, N) scores of every item."""
        pooled = inputs @ self.history / inputs.sum(1, keepdim=True).clamp(min=1)
        if self.layer is not None:
            pooled = pooled + self.layer(pooled)
        query = torch.nn.functional.normalize(pooled, dim=1)
        scores = query @ torch.nn.functional.normalize(self.items, dim=1).T
        scores = scores / self.lever.temperature
        return scores + self.bias if self.bias is not None else scores


def train(
    train_rows: torch.Tensor, valid: sp.csr_matrix, lever: Lever, seed: int, label: str
) -> tuple[Model, list[dict]]:
    """Trains one model; returns it and its validation metrics after each epoch."""
    torch.manual_seed(seed)
    model = Model(train_rows.shape[1], lever)
    optimizer = torch.optim.Adam(model.parameters(), lr=lever.lr, weight_decay=lever.weight_decay)
    users = torch.nonzero(train_rows.sum(1) > 0).squeeze(1)
    steps = lever.epochs * math.ceil(len(users) / lever.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    history = []
    for _ in tqdm(range(lever.epochs), desc=label, unit="epoch", file=sys.stderr):
        model.train()
        order = users[torch.randperm(len(users))]
        for start in range(0, len(order), lever.batch_size):
            rows = train_rows[order[start : start + lever.batch_size]]
            held = (torch.rand_like(rows) < lever.holdout) & (rows > 0)
            kept = rows * ~held * (torch.rand_like(rows) >= lever.item_dropout)
            # every training item that is not a positive leaves the softmax
            scores = model(kept).masked_fill((rows > 0) & ~held, -math.inf)
            log_p = torch.log_softmax(scores, dim=1).masked_fill(~held, 0.0)
            loss = -log_p.sum() / held.sum().clamp(min=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        history.append(validate([model], train_rows, valid))
    return model, history


@torch.no_grad()
def validate(models: list[Model], train_rows: torch.Tensor, valid: sp.csr_matrix) -> dict:
    """Recall and NDCG at 10 and 50 over the whole catalogue, training items excluded;
    several models' scores are averaged."""
    for model in models:
        model.eval()
    rows = np.nonzero(np.diff(valid.indptr))[0]
    ranked = []
    for start in range(0, len(rows), 1024):
        inputs = train_rows[rows[start : start + 1024]]
        scores = sum(model(inputs) for model in models) / len(models)
        ranked.append(torch.topk(scores.masked_fill(inputs > 0, -math.inf), 50).indices)
    metrics = ranking_metrics(torch.cat(ranked).numpy(), valid[rows], [10, 50])
    return {
        f"valid/{key}": float(value)
        for key, value in metrics.items()
        if key.split("@")[0] in ("recall", "ndcg")
    }


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], LEVERS, "0")
    torch.set_num_threads(args.threads)
    done = recorded(args.ledger)

    config = load_config(ROOT / "configs" / "ml1m.yaml")
    if args.data_dir is not None:
        config = dataclasses.replace(config, data=with_data_dir(config.data, args.data_dir))
    dataset, split = load_data(config)
    shape = (dataset.num_queries, dataset.num_items)
    train_rows = torch.from_numpy(interaction_matrix(split.train, *shape).toarray())
    valid = interaction_matrix(split.valid, *shape)

    for name in args.levers.split(","):
        lever = LEVERS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            if (name, seed) in done:
                continue
            clock = time.process_time()
            models = []
            for member in range(lever.ensemble):
                label = f"{name} s{seed}" + (f" model {member + 1}" if lever.ensemble > 1 else "")
                model, history = train(train_rows, valid, lever, seed + 100 * member, label)
                models.append(model)
            if lever.ensemble > 1:  # the members' final models together
                best = {"epoch": lever.epochs, **validate(models, train_rows, valid)}
            else:
                epoch = max(range(len(history)), key=lambda e: history[e]["valid/recall@10"])
                best = {"epoch": epoch + 1, **history[epoch]}
            entry = {
                "lever": name,
                "seed": seed,
                **dataclasses.asdict(lever),
                "best_epoch": best.pop("epoch"),
                **best,
                "cpu_minutes": round((time.process_time() - clock) / 60, 2),
            }
            record(args.ledger, entry)

    ease = evaluate_baseline(
        "ease", MemorySource(dataset, split), [10], config.baselines, parts=("valid",)
    )
    title = "MovieLens-1M: levers on the recipe's model (bar: mean; dots: seeds)"
    plot(args.ledger, ease, args.ledger.parent / "levers.png", title)


if __name__ == "__main__":
    main()
