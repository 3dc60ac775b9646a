"""Several training processes, one model: PyTorch DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node=N -m twotower train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in the environment;
``Collective.from_env`` joins them into one process group (``gloo`` on the CPU,
``nccl`` on GPUs). Without those variables training runs in one process, unchanged.

What a step means with W processes: the W local batches together make one global
batch, and the update is the one a single process would make on that global batch.

- Each rank's loss is the mean over its own rows, scaled by ``W * local / global``, so
  that DDP's average of the W gradients is the gradient of the mean over the global
  batch even when the local batches differ in size (the last one of an epoch).
- In-batch and mixed softmax see every rank's positives: ``gather_rows`` all-gathers the
  item vectors with gradients flowing back to the rank that computed each row.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Collective:
    """This process's place among the training processes.

    Attributes:
        rank: 0..world_size-1; rank 0 alone writes checkpoints, logs and metrics.
        world_size: the number of processes (1: no process group).
        local_rank: the rank among this machine's processes (picks the GPU).
        device: where collective operations' tensors live (NCCL needs the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> Collective:
        """Joins the process group ``torchrun`` describes in the environment, if any.

        Args:
            device: the training device; ``cuda`` selects NCCL and this rank's GPU.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = device.type == "cuda"
        if not dist.is_initialized():
            if on_gpu:
                torch.cuda.set_device(local_rank)
            backend = "nccl" if on_gpu else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        return cls(rank, world_size, local_rank, f"cuda:{local_rank}" if on_gpu else "cpu")

    def sizes(self, count: int, device: torch.device) -> list[int]:
        """Every rank's ``count``, in rank order."""
        if not self.distributed:
            return [count]
        local = torch.tensor([count], dtype=torch.int64, device=device)
        every = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(every, local)
        return [int(c) for c in every]

    def gather_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum of B_r,) every rank's ids in rank order, and where this rank's begin."""
        if not self.distributed:
            return ids, 0
        sizes = self.sizes(len(ids), ids.device)
        return _gather_padded(ids, sizes), sum(sizes[: self.rank])

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(sum of B_r, ...) every rank's rows in rank order, differentiable.

        The gradient of a gathered row flows back to the rank that computed it: each
        rank's gradient with respect to the whole gathered tensor is summed over
        ranks, and a rank keeps the part that is its own rows.
        """
        if not self.distributed:
            return rows
        sizes = self.sizes(len(rows), rows.device)
        return _GatherRows.apply(rows, sizes, self.rank)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.distributed:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.cpu().tolist()

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (a small JSON-like value)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def close_process_group() -> None:
    """Leaves the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _gather_padded(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gathers tensors whose first dimensions differ: pad to the largest, then trim."""
    longest = max(sizes)
    padded = values.new_zeros((longest, *values.shape[1:]))
    padded[: len(values)] = values
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(rows.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total)  # every rank's loss has a gradient for every gathered row
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None
