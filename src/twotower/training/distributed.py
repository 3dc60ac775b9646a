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
- Sparse gradients (``model.sparse_embeddings``) are averaged after backward by
  ``average_sparse``, in program order, not by DDP. DDP hands them to gloo's sparse
  all-reduce, which runs on gloo's threads while backward goes on; with it, two-process
  streamed training at 20M rows (a history over a sparse 1M-item table shared with the
  item tower, hashed user ids, text) corrupted the heap during backward in 5 runs of 6
  (``malloc(): unaligned tcache chunk detected``, found inside gloo's sparse
  all-reduce); averaged here, 0 runs of 4 did.
- The loss's own collectives (``sizes``, ``gather_ids``, ``gather_rows`` and its
  backward, ``average_sparse``) run in a process group of their own, apart from the
  all-reduces DDP's reducer has in flight during backward.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
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
    group: object = None  # the loss's collectives' own process group (see the module doc)

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
        group = dist.new_group(timeout=datetime.timedelta(minutes=60))  # every rank, in step
        device_name = f"cuda:{local_rank}" if on_gpu else "cpu"
        return cls(rank, world_size, local_rank, device_name, group)

    def sizes(self, count: int, device: torch.device) -> list[int]:
        """Every rank's ``count``, in rank order."""
        if not self.distributed:
            return [count]
        local = torch.tensor([count], dtype=torch.int64, device=device)
        every = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(every, local, group=self.group)
        return [int(c) for c in every]

    def gather_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum of B_r,) every rank's ids in rank order, and where this rank's begin."""
        if not self.distributed:
            return ids, 0
        sizes = self.sizes(len(ids), ids.device)
        return _gather_padded(ids, sizes, self.group), sum(sizes[: self.rank])

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(sum of B_r, ...) every rank's rows in rank order, differentiable.

        The gradient of a gathered row flows back to the rank that computed it: each
        rank's gradient with respect to the whole gathered tensor is summed over
        ranks, and a rank keeps the part that is its own rows.
        """
        if not self.distributed:
            return rows
        sizes = self.sizes(len(rows), rows.device)
        return _GatherRows.apply(rows, sizes, self.rank, self.group)

    def average_sparse(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replaces each parameter's sparse gradient by its mean over the ranks (as DDP
        averages dense ones): every rank's rows are all-gathered and summed, divided by
        the number of ranks. Every rank must call this with the same parameters, in the
        same order; a parameter without a gradient here counts as zero.

        Three collectives per step, whatever the number of tables: every table's row
        count, then every table's row indices end to end, then every table's values
        flattened end to end (in their common dtype, each table's cast back).
        """
        if not self.distributed or not parameters:
            return
        grads = [_sparse_rows(parameter) for parameter in parameters]
        counts = torch.tensor(
            [len(indices) for indices, _ in grads], dtype=torch.int64, device=self.device
        )
        every = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(every, counts, group=self.group)
        counts_by_rank = [part.tolist() for part in every]  # [rank][table]
        widths = [math.prod(parameter.shape[1:]) for parameter in parameters]  # per row
        sizes = [[n * w for n, w in zip(row, widths, strict=True)] for row in counts_by_rank]
        indices = _gather_padded(
            torch.cat([indices for indices, _ in grads]),
            [sum(row) for row in counts_by_rank],
            self.group,
        )
        values = (
            _gather_padded(
                torch.cat([values.reshape(-1) for _, values in grads]),
                [sum(row) for row in sizes],
                self.group,
            )
            / self.world_size
        )
        index_parts = [[] for _ in parameters]
        value_parts = [[] for _ in parameters]
        ranks_indices = indices.split([sum(row) for row in counts_by_rank])
        ranks_values = values.split([sum(row) for row in sizes])
        for rank in range(self.world_size):
            for table, piece in enumerate(ranks_indices[rank].split(counts_by_rank[rank])):
                index_parts[table].append(piece)
            for table, piece in enumerate(ranks_values[rank].split(sizes[rank])):
                value_parts[table].append(piece)
        for parameter, table_indices, table_values in zip(
            parameters, index_parts, value_parts, strict=True
        ):
            parameter.grad = torch.sparse_coo_tensor(
                torch.cat(table_indices)[None],
                torch.cat(table_values).view(-1, *parameter.shape[1:]).to(parameter.dtype),
                parameter.shape,
                check_invariants=True,
            ).coalesce()

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


def _sparse_rows(parameter: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """A parameter's coalesced sparse gradient as (R,) row indices and (R, ...) rows;
    no rows when it has no gradient."""
    grad = parameter.grad
    if grad is None:
        return (
            torch.zeros(0, dtype=torch.int64, device=parameter.device),
            parameter.new_zeros((0, *parameter.shape[1:])),
        )
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def _gather_padded(values: torch.Tensor, sizes: list[int], group: object) -> torch.Tensor:
    """All-gathers tensors whose first dimensions differ: pad to the largest, then trim."""
    longest = max(sizes)
    padded = values.new_zeros((longest, *values.shape[1:]))
    padded[: len(values)] = values
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, rows: torch.Tensor, sizes: list[int], rank: int, group: object
    ) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(rows.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        total = grad.contiguous().clone()
        # every rank's loss has a gradient for every gathered row; in the loss's own
        # group, apart from DDP's all-reduces in flight (see the module doc)
        dist.all_reduce(total, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None, None
