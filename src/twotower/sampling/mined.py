"""Hard negatives mined from a model's own ranking: each query's items in a window of ranks.

A refresh ranks every item for every training query (``index/topk.py``: exact, in
chunks of queries, ties to the lower index), the query's training positives excluded
before ranking, and keeps the items at ranks ``first..last`` (1-based) as the query's
candidates. A draw then picks, for each row of a batch, items uniformly from its
query's candidates: one gather with random column indices, no Python per row.

Because a query's positives are excluded before ranking, no candidate is ever one of
them. A query with fewer items than ``last`` outside its positives has fewer
candidates; one with none (fewer than ``first``) draws from the ``fallback`` sampler
instead, with that sampler's handling of its positive.

Memory: the candidates are a (Q, W) int32 table, W = last - first + 1: 4 Q W bytes
(6,040 queries x a window of 400: 9.7 MB; a million queries: 1.6 GB), refused above
``max_candidates`` cells. A refresh holds besides at most a chunk of queries x N
scores and that chunk's (chunk, last) ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from twotower.errors import ConfigError
from twotower.index.topk import ScoreFn, top_k
from twotower.sampling.samplers import PopularitySampler, UniformSampler

# the most (row, item) flags ``MinedNegatives.contains`` holds at once (one byte each)
DENSE_CELLS = 2**26


class MinedNegatives:
    """Each query's candidates from the latest refresh, and draws from them.

    Each query's row holds its candidates in ascending item order (their ranks do not
    matter once inside the window), padded with N after its ``counts`` real ones, so
    that a membership test is one batched ``searchsorted``.

    Args:
        num_queries: Q, the rows (query indices 0..Q-1).
        num_items: N.
        window: ``(first, last)`` 1-based ranks, both included.
        max_candidates: the most cells (Q x W) accepted.
        device: where the table lives (the batches' device).

    Raises:
        ConfigError: Q x W is above ``max_candidates``.
    """

    def __init__(
        self,
        num_queries: int,
        num_items: int,
        window: tuple[int, int],
        max_candidates: int,
        device: torch.device | str = "cpu",
    ) -> None:
        first, last = window
        width = last - first + 1
        if num_queries * width > max_candidates:
            raise ConfigError(
                f"mined negatives would hold {num_queries:,} queries x {width:,} ranks = "
                f"{num_queries * width:,} candidates ({num_queries * width * 4 / 2**20:,.0f} "
                f"MiB as int32), more than mined_negatives.max_candidates={max_candidates:,}: "
                "narrow the window or raise max_candidates"
            )
        self.num_items, self.first, self.last = num_items, first, last
        device = torch.device(device)
        self.candidates = torch.full((num_queries, width), num_items, dtype=torch.int32)
        self.candidates = self.candidates.to(device)  # (Q, W) item ids, N pads
        self.counts = torch.zeros(num_queries, dtype=torch.int64, device=device)  # (Q,)
        self.ready = False

    def refresh(
        self, score_fn: ScoreFn, queries: np.ndarray, exclude: sp.csr_matrix, chunk_size: int
    ) -> None:
        """Ranks the corpus for ``queries`` and keeps each one's window as its candidates.

        Args:
            score_fn: (B,) query indices -> (B, N) scores of every item.
            queries: (R,) the query indices to rank for (the training queries); the
                other rows keep no candidates.
            exclude: (Q, N) CSR, row q the items never candidates of q (its positives).
            chunk_size: queries ranked at once.
        """
        candidates = torch.full_like(self.candidates, self.num_items)
        counts = torch.zeros_like(self.counts)
        queries = np.asarray(queries, dtype=np.int64)
        for start in range(0, len(queries), chunk_size):
            chunk = queries[start : start + chunk_size]
            ids, _ = top_k(score_fn, chunk, self.last, exclude, chunk_size, self.num_items)
            ranked = torch.from_numpy(ids[:, self.first - 1 :]).to(candidates.device)  # (B, W)
            found = ranked >= 0  # an excluded or missing rank is -1
            rows = torch.from_numpy(chunk).to(candidates.device)
            candidates[rows] = torch.where(found, ranked, self.num_items).sort(dim=1).values.int()
            counts[rows] = found.sum(dim=1)
        self.candidates, self.counts, self.ready = candidates, counts, True

    def sample(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        n: int,
        generator: torch.Generator | None,
        fallback: UniformSampler | PopularitySampler,
        rows_before: int = 0,
    ) -> torch.Tensor:
        """Draws n negatives per row uniformly from the row's query's candidates.

        Args:
            queries: (B,) int64 each row's query index.
            positives: (B,) int64 each row's positive; only the rows whose query has
                no candidate use it (``fallback.sample`` avoids it).
            n: draws per row, with replacement.
            generator: the CPU generator the column indices come from.
            fallback: draws the rows whose query has no candidate.
            rows_before: the rows are a share of a larger batch, after this many
                rows of it: they draw what those rows of the whole would (one process
                with the global batch draws as its several ranks do together).

        Returns:
            (B, n) int64 item indices on the device of ``queries``.
        """
        table = self.candidates.to(queries.device)
        counts = self.counts.to(queries.device)[queries]  # (B,)
        shape = (rows_before + len(queries), n)
        u = torch.rand(shape, generator=generator, dtype=torch.float64)[rows_before:]
        columns = (u.to(queries.device) * counts[:, None]).long()  # (B, n) in [0, count)
        drawn = table[queries].gather(1, columns).long()  # (B, n)
        empty = counts == 0
        if bool(empty.any()):
            fresh = fallback.sample(positives[empty].cpu(), n, generator)
            drawn[empty] = fresh.to(drawn.device)
        return drawn

    def expected_counts(self, queries: torch.Tensor, items: torch.Tensor, n: int) -> torch.Tensor:
        """(B, M) float64: the expected number of times item ``items[b, m]`` (or
        ``items[m]`` for a (M,) ``items``) is among row b's n draws: n / count where it
        is a candidate of row b's query, n / N everywhere for a query without any
        (whose draws are then uniform), else 0; what the logQ correction needs."""
        counts = self.counts.to(queries.device)[queries]  # (B,)
        values = items.expand(len(queries), -1) if items.dim() == 1 else items  # (B, M)
        inside = self.contains(queries, values)
        per_draw = torch.where(counts > 0, 1.0 / counts.clamp(min=1), 1.0 / self.num_items)
        inside |= (counts == 0)[:, None]
        return inside.to(torch.float64) * (n * per_draw.to(torch.float64))[:, None]

    def contains(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, M) bool: whether ``items[b, m]`` is a candidate of row b's query.

        Where a (B, N) table of flags fits in ``DENSE_CELLS``, the rows' candidates are
        scattered into it and read back by one gather; otherwise each item is looked up
        in its row's sorted candidates (a batched ``searchsorted``, log W steps apiece).
        """
        table = self.candidates.to(queries.device)[queries].long()  # (B, W) ascending
        if len(queries) * (self.num_items + 1) <= DENSE_CELLS:
            # one column more than the items, for the pads (N) to land in
            shape = (len(queries), self.num_items + 1)
            flags = torch.zeros(shape, dtype=torch.bool, device=table.device)
            flags.scatter_(1, table, True)
            return flags.gather(1, items)
        at = torch.searchsorted(table, items.contiguous()).clamp(max=table.shape[1] - 1)
        return table.gather(1, at) == items

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The candidates of the latest refresh, for a checkpoint."""
        return {
            "candidates": self.candidates,
            "counts": self.counts,
            "ready": torch.tensor(self.ready),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Takes up a checkpoint's candidates, on this table's device."""
        device = self.candidates.device
        if tuple(state["candidates"].shape) != tuple(self.candidates.shape):
            raise ValueError(
                f"mined candidates of shape {tuple(state['candidates'].shape)} do not fit "
                f"this table's {tuple(self.candidates.shape)}"
            )
        self.candidates = state["candidates"].to(device)
        self.counts = state["counts"].to(device)
        self.ready = bool(state["ready"])
