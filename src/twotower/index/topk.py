"""Exact top-k over the whole corpus, in chunks of queries: the index's reference search
and the evaluator's ranking.

Every query is scored against every item (no sampled candidates), a chunk of queries
at a time so that memory stays at ``chunk_size x N`` scores. The result is a pure
function of the scores: equal scores go to the lower item index, so it does not
depend on ``chunk_size``, on the device, or on how ``torch.topk`` orders ties.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

# Maps a chunk of query indices (B,) to the scores of every item (B, N).
ScoreFn = Callable[[np.ndarray], torch.Tensor]

# The most scores one chunk holds (128 MiB of float32): on a large corpus a chunk has
# fewer queries than ``chunk_size``, so memory does not grow with N.
MAX_CHUNK_SCORES = 2**25


def top_k(
    score_fn: ScoreFn,
    query_idx: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    chunk_size: int = 1024,
    num_items: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks every item for every query and keeps the best k, exactly.

    Args:
        score_fn: (B,) query indices -> (B, N) float scores of every item, on any
            device; the top k is taken there and only (B, k) comes back to the CPU.
        query_idx: (Q,) int64 the queries to rank for.
        k: how many items to keep per query.
        exclude: (num_queries, N) CSR; items set in row q are never returned for q.
        chunk_size: queries scored at once; bounds memory, never changes the result.
        num_items: N, when known: a chunk then holds at most ``MAX_CHUNK_SCORES``
            scores, fewer queries than ``chunk_size`` on a large corpus.

    Returns:
        ``(ids, scores)``: (Q, k) int64 item indices, best first, ties toward the lower
        index; (Q, k) float32 their scores. Where fewer than k items remain (excluded
        items, or any item scored -inf), the row ends with -1 / -inf.

    Raises:
        ValueError: bad ``k`` or ``chunk_size``, a score matrix of the wrong shape,
            or NaN scores.
    """
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
    query_idx = np.asarray(query_idx, dtype=np.int64)
    if num_items:
        chunk_size = max(1, min(chunk_size, MAX_CHUNK_SCORES // num_items))
    ids = np.full((len(query_idx), k), -1, dtype=np.int64)
    scores = np.full((len(query_idx), k), -np.inf, dtype=np.float32)
    for start in range(0, len(query_idx), chunk_size):
        chunk = query_idx[start : start + chunk_size]
        chunk_scores = _checked_scores(score_fn(chunk), len(chunk), exclude)
        if exclude is not None and exclude.nnz:
            chunk_scores = _mask(chunk_scores, *row_pairs(exclude, chunk))
        chunk_ids, chunk_top = _exact_top_k(chunk_scores, k)
        ids[start : start + len(chunk)] = chunk_ids.cpu().numpy()
        scores[start : start + len(chunk)] = chunk_top.cpu().numpy()
    return ids, scores


def _checked_scores(
    scores: torch.Tensor, num_queries: int, exclude: sp.csr_matrix | None
) -> torch.Tensor:
    scores = scores.detach().to(dtype=torch.float32)
    if scores.ndim != 2 or scores.shape[0] != num_queries:
        raise ValueError(
            f"score_fn must return ({num_queries}, N) scores, got {tuple(scores.shape)}"
        )
    if exclude is not None and scores.shape[1] != exclude.shape[1]:
        raise ValueError(f"score_fn scored {scores.shape[1]} items, exclude has {exclude.shape[1]}")
    if torch.isnan(scores).any():
        raise ValueError("score_fn returned NaN scores")
    return scores


def row_pairs(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nonzeros of ``matrix[rows]`` as (P,) positions in ``rows`` and (P,) columns,
    read from the CSR arrays directly (no sliced matrix is built).

    Args:
        matrix: (R, N) CSR.
        rows: (B,) int64 row numbers of ``matrix``, each in 0..R-1 (repeats allowed).
    """
    starts = matrix.indptr[rows]
    lengths = matrix.indptr[rows + 1] - starts
    total = int(lengths.sum())
    # each nonzero's place in matrix.indices: its row's start, plus its rank in the row
    before = np.cumsum(lengths) - lengths
    picked = np.repeat(starts - before, lengths) + np.arange(total)
    return np.repeat(np.arange(len(rows)), lengths), matrix.indices[picked].astype(np.int64)


def _mask(scores: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """Sets the excluded (rows, cols) of (B, N) scores to -inf in one scatter, on a copy:
    score_fn owns its tensor."""
    where = (torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device))
    return scores.index_put(where, torch.tensor(-torch.inf, device=scores.device))


def _exact_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of (B, N) scores; equal scores go to the lower index.

    ``torch.topk`` finds the k best values fast, but which of several items tied at
    the k-th value it returns is unspecified. So a row is only taken from it when no
    item outside its result ties with the k-th value (the count of items at that
    value shows it), with equal values put in index order; the rare rows where a tie
    crosses the cut go through ``_top_k_with_ties``.

    Returns:
        (B, k) int64 item ids and (B, k) float32 scores; -1 / -inf pad rows with fewer
        than k items above -inf.
    """
    B, N = scores.shape
    kept = min(k, N)
    ids = torch.full((B, k), -1, dtype=torch.int64, device=scores.device)
    top = torch.full((B, k), -torch.inf, dtype=torch.float32, device=scores.device)
    if kept == 0 or B == 0:
        return ids, top
    values, cols = torch.topk(scores, kept, dim=1)  # (B, kept)
    threshold = values[:, -1:]  # (B, 1) the k-th best
    crossing = (values > threshold).sum(dim=1) + (scores == threshold).sum(dim=1) > kept
    by_index = torch.argsort(cols, dim=1)  # equal values in index order after a stable sort
    cols, values = cols.gather(1, by_index), values.gather(1, by_index)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    ids[:, :kept], top[:, :kept] = cols.gather(1, order), values.gather(1, order)
    if crossing.any():
        rows = crossing.nonzero()[:, 0]
        ids[rows, :kept], top[rows, :kept] = _top_k_with_ties(scores[rows], kept)
    ids[top == -torch.inf] = -1  # excluded (or -inf scored) items are never returned
    return ids, top


def _top_k_with_ties(scores: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, kept) ids and scores where ties cross the cut: the lowest-index tied items win.

    Every item above the k-th value is kept, the remaining slots go to the
    lowest-index items equal to it, and a stable sort orders the kept items (which
    ``nonzero`` lists by ascending index).
    """
    B = scores.shape[0]
    threshold = torch.topk(scores, kept, dim=1).values[:, -1:]  # (B, 1) the k-th best
    above = scores > threshold
    tied = scores == threshold
    room = kept - above.sum(dim=1, keepdim=True)  # (B, 1) slots left for tied items
    keep = above | (tied & (tied.cumsum(dim=1) <= room))  # exactly `kept` per row
    cols = keep.nonzero()[:, 1].view(B, kept)  # (B, kept) ascending item index
    values = scores.gather(1, cols)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return cols.gather(1, order), values.gather(1, order)
