"""Several training processes (torchrun, gloo on the CPU) make the one-process update.

The oracle: W processes with per-process batch B take the same steps, to float
tolerance, as one process with batch W * B. For in-batch and mixed softmax that holds
only if each rank's softmax sees every rank's positives with gradients flowing back
(without the gathering, parameters differ by about 1e-2 after two epochs here).
"""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twotower.config import load_config
from twotower.sources import load_data
from twotower.training.distributed import Collective
from twotower.training.examples import TrainingData

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "synthetic.yaml"
# 303 users give 2,305 training rows: 2305 % 128 == 1, so the last global batch of two
# ranks with B = 64 is a single row and rank 1's share of it is empty.
SMALL = [
    "data.synthetic.num_queries=303",
    "data.synthetic.num_items=200",
    "data.synthetic.interactions_per_query=10",
    "model.query.dropout=0",
    "model.item.dropout=0",
    "training.patience=0",
    "training.tensorboard=false",
]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)


def _train(out: Path, overrides: list[str], processes: int = 1, resume: bool = False) -> None:
    sets = [arg for o in [*SMALL, *overrides] for arg in ("--set", o)]
    if processes == 1:
        command = [sys.executable, "-m", "twotower", "train", str(CONFIG)]
    else:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", "-m", "twotower"]
        command += ["train", str(CONFIG)]
    command += ["--out", str(out), *sets, *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _last_model(out: Path) -> dict[str, torch.Tensor]:
    (path,) = glob.glob(str(out / "checkpoints" / "last-*.pt"))
    return torch.load(path, weights_only=True)["model"]


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_ranks_batches_together_are_the_one_process_batch():
    config = load_config(CONFIG, SMALL)
    dataset, split = load_data(config)
    from twotower.features.pipeline import FeaturePipeline

    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    data = TrainingData(dataset, split, pipeline)
    assert len(data) % 128 == 1  # the case the module docstring describes

    def epoch(batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(7)
        collective = Collective(rank=rank, world_size=world)
        return [b.positives for b in data.batches(batch_size, generator, collective)]

    one = epoch(128, 0, 1)
    ranks = [epoch(64, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)  # every rank takes every step
    for step, batch in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), batch)
    assert len(ranks[1][-1]) == 0  # the empty share the trainer must cope with


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.parametrize("objective", ["in_batch", "mixed", "in_batch-sparse", "mixed-mined"])
def test_two_processes_train_like_one_with_the_doubled_batch(tmp_path, objective):
    kind = objective.removesuffix("-sparse").removesuffix("-mined")
    settings = [f"training.objective.kind={kind}", "training.epochs=2"]
    if kind == "mixed":
        settings.append("training.objective.num_sampled=64")
    if objective.endswith("-mined"):  # every rank mines alike; each draws its rows' share
        mined = "training.objective.mined_negatives"
        settings += [f"{mined}.ratio=0.25", f"{mined}.window=[11, 60]", f"{mined}.every=7"]
    if objective.endswith("-sparse"):  # sparse gradients, averaged over ranks by hand
        settings += ["model.sparse_embeddings=true", "training.sparse_optimizer=adagrad"]
    _train(tmp_path / "one", [*settings, "training.batch_size=128"])
    _train(tmp_path / "two", [*settings, "training.batch_size=64"], processes=2)
    assert _largest_difference(_last_model(tmp_path / "one"), _last_model(tmp_path / "two")) < 1e-4
    # rank 0 alone wrote the records, and its loss is the global batch's mean
    lines = [(tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in ("one", "two")]
    assert len(lines[0]) == len(lines[1]) == 2
    for a, b in zip(lines[0], lines[1], strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["valid/ndcg@10"] == pytest.approx(b["valid/ndcg@10"], abs=1e-3)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_a_resumed_two_process_run_continues_as_if_never_stopped(tmp_path):
    settings = ["training.objective.kind=in_batch", "training.batch_size=64"]
    _train(tmp_path / "whole", [*settings, "training.epochs=2"], processes=2)
    _train(tmp_path / "parts", [*settings, "training.epochs=1"], processes=2)
    _train(tmp_path / "parts", [*settings, "training.epochs=2"], processes=2, resume=True)
    whole, parts = _last_model(tmp_path / "whole"), _last_model(tmp_path / "parts")
    assert _largest_difference(whole, parts) == 0.0


# One rank of the sparse-average test below, run under torchrun: its tables' sparse
# gradients from the JSON file argv[1], their averages saved to argv[2] + rank.
AVERAGE_ON_A_RANK = """
import json, sys, torch
from twotower.training.distributed import Collective, close_process_group

collective = Collective.from_env(torch.device("cpu"))
parameters = []
for shape, rows in zip(((7, 3), (5,), (4, 2)), json.load(open(sys.argv[1]))[collective.rank]):
    parameter = torch.nn.Parameter(torch.zeros(shape))
    if rows is not None:
        indices = torch.tensor(rows[0], dtype=torch.int64)
        values = torch.tensor(rows[1]).view(-1, *shape[1:])
        parameter.grad = torch.sparse_coo_tensor(indices[None], values, shape)
    parameters.append(parameter)
collective.average_sparse(parameters)
torch.save([p.grad.to_dense() for p in parameters], f"{sys.argv[2]}{collective.rank}.pt")
# leave the group together: a rank that exits while gloo still runs aborts
collective.barrier()
close_process_group()
"""


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_sparse_gradients_average_over_ranks_table_by_table(tmp_path):
    """Three sparse tables of different row shapes, repeated rows within a rank, a rank
    with no rows for one table and a table with no gradient at all on one rank: each
    table's gradient on every rank is the mean over ranks of the dense gradients."""
    generator = torch.Generator().manual_seed(0)
    shapes = ((7, 3), (5,), (4, 2))

    def rows(count: int, table: int) -> tuple[list, list]:
        shape = shapes[table]
        indices = torch.randint(0, shape[0], (count,), generator=generator)
        return indices.tolist(), torch.randn((count, *shape[1:]), generator=generator).tolist()

    grads = [
        [rows(6, 0), rows(3, 1), None],  # rank 0: table 2 has no gradient
        [rows(0, 0), rows(4, 1), rows(5, 2)],  # rank 1: no rows of table 0
    ]
    expected = [torch.zeros(shape) for shape in shapes]
    for rank_grads in grads:
        for table, entry in enumerate(rank_grads):
            if entry is not None:
                indices = torch.tensor(entry[0], dtype=torch.int64)
                values = torch.tensor(entry[1]).view(-1, *shapes[table][1:])
                dense = torch.sparse_coo_tensor(
                    indices[None], values, shapes[table], check_invariants=True
                ).to_dense()
                expected[table] += dense / len(grads)
    (tmp_path / "grads.json").write_text(json.dumps(grads))
    (tmp_path / "rank.py").write_text(AVERAGE_ON_A_RANK)
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(tmp_path / "rank.py")]
    command += [str(tmp_path / "grads.json"), str(tmp_path / "averaged-")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        averaged = torch.load(tmp_path / f"averaged-{rank}.pt", weights_only=True)
        for got, want in zip(averaged, expected, strict=True):
            torch.testing.assert_close(got, want)
