"""Training objectives: which negatives each positive meets, and which loss scores them.

An objective pairs a sampler with a loss. It gets the batch's query vectors and
positive item ids, draws negatives, embeds every distinct item once through the
one item tower, and hands scores (never the model) to the loss:

    pointwise  per-row negatives (uniform or popularity^alpha), BCE on scaled cosines
    hinge      per-row negatives, triplet max(0, m + cos- - cos+)
    logistic   per-row negatives, triplet log(1 + exp(sigma (cos- - cos+)))
    listwise   per-row negatives, softmax over [pos, negs] of scaled cosines
    in_batch   the batch's positives are everyone's candidates; logQ, hit masking
    mixed      in-batch plus corpus items sampled uniformly, one softmax
    full       every item of the corpus, one exact softmax (small corpora)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from twotower.errors import ConfigError
from twotower.losses import (
    LOSSES,
    MultiPositiveSoftmax,
    SampledSoftmax,
    hardest_negatives,
    logq_correction,
    mask_accidental_hits,
    mask_known_positives,
    negative_mask,
)
from twotower.sampling import CANDIDATE_SAMPLERS, FREQUENCIES, SAMPLERS
from twotower.training.config import (
    FullConfig,
    HingeConfig,
    InBatchConfig,
    ListwiseConfig,
    LogisticConfig,
    MixedConfig,
    ObjectiveConfig,
    PointwiseConfig,
)
from twotower.training.distributed import Collective

# (M,) item indices -> (M, D) item vectors, through the item tower.
EmbedItems = Callable[[torch.Tensor], torch.Tensor]

# (S,) rows and (S,) items: row at[s] leaves item items[s] out of its softmax.
SeenItems = tuple[torch.Tensor, torch.Tensor]


class RowNegatives(nn.Module):
    """Objectives with per-row sampled negatives: pointwise, hinge, logistic, listwise.

    Args:
        loss: takes (B,) positive and (B, n) negative scores and a (B, n) mask.
        sampler: draws (B, n) negatives per positive.
        num_negatives: n.
        scaled: the loss takes cosines divided by the temperature (BCE, softmax),
            rather than raw cosines (triplet losses, whose margin is in cosine units).
    """

    def __init__(self, loss: nn.Module, sampler, num_negatives: int, scaled: bool) -> None:
        super().__init__()
        self.loss = loss
        self.sampler = sampler
        self.num_negatives = num_negatives
        self.scaled = scaled

    def forward(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        generator: torch.Generator,
        weights: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against their (B,) positive items, each row
        weighted by ``weights`` (B,) if given (``queries``: unused here)."""
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return query.sum() + embed_items(positives).sum()
        negatives = self.sampler.sample(positives.cpu(), self.num_negatives, generator)
        negatives = negatives.to(positives.device)  # (B, n)
        items = embed_unique(torch.cat([positives, negatives.flatten()]), embed_items)
        pos_items, neg_items = items[: len(positives)], items[len(positives) :]
        pos = (query * pos_items).sum(-1)  # (B,)
        neg = torch.einsum("bd,bnd->bn", query, neg_items.view(*negatives.shape, -1))  # (B, n)
        if self.scaled:
            pos, neg = pos * scale, neg * scale
        return self.loss(pos, neg, negative_mask(positives, negatives), weights)


class SharedCandidates(nn.Module):
    """Softmax over candidates shared by the batch: in-batch, or in-batch + sampled.

    Corrections run in this order: logQ, accidental-hit masking, masking of the
    query's other known positives (with ``known``), hard negatives. With several
    training processes (``collective``), every rank's positives are each row's
    candidates: the global batch's.
    """

    def __init__(
        self,
        sampler,
        frequency,
        logq: bool,
        mask_hits: bool,
        hard_negatives: int,
        known: KnownPairs | None = None,
        collective: Collective | None = None,
    ) -> None:
        super().__init__()
        self.loss = SampledSoftmax()
        self.sampler = sampler
        self.frequency = frequency
        self.logq = logq
        self.mask_hits = mask_hits
        self.hard_negatives = hard_negatives
        self.known = known
        self.step = 0
        self.collective = collective or Collective()

    def forward(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        generator: torch.Generator,
        weights: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against their (B,) positive items, each row
        weighted by ``weights`` (B,) if given; ``queries`` (B,) are the rows' query
        indices, which masking known positives needs."""
        self.step += 1
        device = positives.device
        # with several processes every rank's positives are candidates (the global batch)
        everyone, offset = self.collective.gather_ids(positives)  # (G,), this rank's start
        self.frequency.update(everyone.cpu(), self.step)
        candidates, log_q = self.sampler.candidates(everyone.cpu(), generator)  # (M,)
        candidates, log_q = candidates.to(device), log_q.to(device)
        if self.collective.distributed:
            # a rank embeds its own positives; sampled extras are the same on every rank
            # (one sampler seed), so each rank embeds them itself
            vectors = self.collective.gather_rows(embed_unique(positives, embed_items))
            if len(candidates) > len(everyone):
                extra = embed_unique(candidates[len(everyone) :], embed_items)
                vectors = torch.cat([vectors, extra])  # (M, D)
        else:
            vectors = embed_unique(candidates, embed_items)
        logits = query @ vectors.T * scale  # (B, M)
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return logits.sum()
        labels = offset + torch.arange(len(positives), device=device)  # positives come first
        if self.logq:
            logits = logq_correction(logits, log_q)
        if self.mask_hits:
            logits = mask_accidental_hits(logits, labels, positives, candidates)
        if self.known is not None:
            if queries is None:
                raise ValueError("masking known positives needs each row's query")
            logits = mask_known_positives(logits, labels, self.known(queries, candidates))
        if self.hard_negatives:
            logits, labels = hardest_negatives(logits, labels, self.hard_negatives)
        return self.loss(logits, labels, weights)

    def get_extra_state(self) -> dict:
        """The step count and frequency estimate, saved in checkpoints for resuming."""
        return {"step": self.step, "frequency": self.frequency.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.frequency.load_state_dict(state["frequency"])


class KnownPairs:
    """The (query, item) pairs of the training interactions, for membership tests.

    Kept as one sorted int64 key per pair, ``query * N + item``, so a (B, M) test is
    one ``searchsorted``.

    Args:
        queries, items: (rows,) the training interactions' query and item indices.
        num_items: N.
    """

    def __init__(self, queries: torch.Tensor, items: torch.Tensor, num_items: int) -> None:
        self.num_items = num_items
        self.keys = torch.unique(queries.long() * num_items + items.long())  # sorted

    def __call__(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, M) bool: whether item ``items[j]`` is a training positive of ``queries[b]``."""
        keys = self._on(queries.device)
        wanted = queries.long()[:, None] * self.num_items + items.long()[None, :]  # (B, M)
        at = torch.searchsorted(keys, wanted).clamp(max=max(len(keys) - 1, 0))
        return keys[at] == wanted if len(keys) else torch.zeros_like(wanted, dtype=torch.bool)

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: row b marks every training positive of ``queries[b]``; the same
        as ``self(queries, arange(N))`` at the cost of the queries' pairs, not B x N
        searches (for the full softmax, whose candidates are every item)."""
        keys, n = self._on(queries.device), self.num_items
        first = queries.long() * n  # each query's keys lie in [q N, (q + 1) N)
        starts = torch.searchsorted(keys, first)
        counts = torch.searchsorted(keys, first + n) - starts  # (B,)
        row = torch.repeat_interleave(torch.arange(len(queries), device=keys.device), counts)
        # the k-th key of row b sits at starts[b] + k
        within = torch.arange(len(row), device=keys.device) - (counts.cumsum(0) - counts)[row]
        found = torch.zeros(len(queries), n, dtype=torch.bool, device=keys.device)
        found[row, keys[starts[row] + within] - first[row]] = True
        return found

    def _on(self, device: torch.device) -> torch.Tensor:
        """The keys on ``device``, moved there once."""
        if self.keys.device != device:
            self.keys = self.keys.to(device)
        return self.keys


class FullSoftmax(nn.Module):
    """Softmax over the whole corpus: each row's positive against every item, exactly.

    Each step runs the item tower once on every item; the (B, N) scores are then
    computed all at once, or ``chunk_rows`` rows at a time, each chunk's scores made
    again in the backward pass (activation checkpointing): a step then holds
    ``chunk_rows`` x N scores, not B x N, at the cost of a second (chunk, D) x (D, N)
    product per chunk. The loss and its gradient are the same either way.

    Args:
        num_items: N; every step embeds items 0..N-1 through the item tower.
        known: if given, each row's query's other training positives are masked.
        positives_compete: in ``sets``, a row's positives are not masked from one
            another's softmax (``FullConfig.positives_compete``).
        chunk_rows: rows scored at once; None: all of them.
    """

    def __init__(
        self,
        num_items: int,
        known: KnownPairs | None = None,
        positives_compete: bool = False,
        chunk_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.known = known
        self.positives_compete = positives_compete
        self.chunk_rows = chunk_rows
        self.loss = MultiPositiveSoftmax()  # every item a candidate: the full softmax

    def forward(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        generator: torch.Generator,
        weights: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        seen: SeenItems | None = None,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against their (B,) positive items, each row
        weighted by ``weights`` (B,) if given; ``queries`` (B,) are the rows' query
        indices, which masking known positives needs; ``seen``: items left out of
        each row's softmax (sequence training's ``mask_seen``). ``sets`` with one
        positive a row."""
        rows = torch.arange(len(positives), device=positives.device)
        return self.sets(query, positives, rows, embed_items, scale, weights, queries, seen)

    def sets(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        owners: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        weights: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        seen: SeenItems | None = None,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against (P,) positives, positive p belonging
        to row ``owners[p]``: what ``forward`` gives with each positive its own row
        (``query[owners]``, ``queries[owners]``), from one (B, N) score matrix.

        Each positive's term is ``-log softmax`` of its score among every item (with
        ``known``: among itself and the items that are not training positives of the
        row's query; with ``positives_compete`` also among the row's other positives;
        with ``seen``: among the items not seen by its row, and itself); the loss is
        their mean, weighted by ``weights`` (P,) if given.
        """
        items = embed_items(torch.arange(self.num_items, device=positives.device))  # (N, D)
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return (query.sum() + items.sum()) * scale * 0.0
        if self.known is not None and queries is None:
            raise ValueError("masking known positives needs each row's query")
        chunk = self.chunk_rows or len(query)
        terms, order = [], []
        for start in range(0, len(query), chunk):
            rows = slice(start, start + chunk)
            mine = torch.nonzero((owners >= start) & (owners < rows.stop)).squeeze(1)  # (P_c,)
            if not len(mine):
                continue
            part = (rows, owners[mine] - start, positives[mine], queries, seen)
            if self.chunk_rows is None:
                terms.append(self._terms(query, items, scale, *part))
            else:  # the (chunk, N) scores are made again in backward, not kept
                terms.append(
                    checkpoint(self._terms, query[rows], items, scale, *part, use_reentrant=False)
                )
            order.append(mine)
        weights = None if weights is None else weights[torch.cat(order)]
        return self.loss.mean(torch.cat(terms), weights)

    def _terms(
        self,
        query: torch.Tensor,
        items: torch.Tensor,
        scale: torch.Tensor,
        rows: slice,
        owners: torch.Tensor,
        positives: torch.Tensor,
        queries: torch.Tensor | None,
        seen: SeenItems | None,
    ) -> torch.Tensor:
        """(P_c,) the terms of the positives of ``rows``: (R, D) ``query`` (those rows)
        against (N, D) ``items``, ``owners`` counted from ``rows.start``."""
        logits = query @ items.T * scale  # (R, N)
        exclude = self._exclude(rows, len(logits), owners, positives, queries, seen)
        return self.loss.terms(logits, positives, owners, exclude)

    def _exclude(
        self,
        rows: slice,
        count: int,
        owners: torch.Tensor,
        positives: torch.Tensor,
        queries: torch.Tensor | None,
        seen: SeenItems | None,
    ) -> torch.Tensor | None:
        """(count, N) bool: the items left out of the softmax of ``rows`` (``count`` of
        them), whose (P_c,) positives are ``positives``, in rows ``owners`` (counted
        from ``rows.start``); None: none."""
        exclude = None
        if self.known is not None:
            assert queries is not None
            exclude = self.known.rows(queries[rows])
            if self.positives_compete:
                exclude[owners, positives] = False
        if seen is not None:
            at, items = seen
            mine = (at >= rows.start) & (at < rows.start + count)
            if exclude is None:
                exclude = torch.zeros(count, self.num_items, dtype=torch.bool, device=at.device)
            exclude[at[mine] - rows.start, items[mine]] = True
        return exclude


def embed_unique(items: torch.Tensor, embed_items: EmbedItems) -> torch.Tensor:
    """(M, D) vectors of (M,) item ids, running each distinct item through the tower once."""
    unique, inverse = torch.unique(items, return_inverse=True)
    return embed_items(unique).index_select(0, inverse)


def build_objective(
    config: ObjectiveConfig,
    counts: np.ndarray,
    known: KnownPairs | None = None,
    collective: Collective | None = None,
) -> nn.Module:
    """The objective a config names: its ``kind`` picks the loss from ``LOSSES`` and,
    for the shared-candidate softmax, the sampler from ``CANDIDATE_SAMPLERS``.

    Args:
        config: one of the objective configs.
        counts: (N,) training interactions per item (popularity sampling, logQ).
        known: the training (query, item) pairs, for ``mask_known``.
        collective: the training processes, whose positives the shared-candidate
            softmax gathers; None: this one alone.

    Raises:
        ConfigError: ``mask_known`` without the pairs; a corpus too large for ``full``.
    """
    num_items = len(counts)
    if isinstance(config, FullConfig):
        if num_items > config.max_items:
            raise ConfigError(
                f"the full softmax scores all {num_items:,} items at every step, more than "
                f"training.objective.max_items={config.max_items:,}; raise max_items if "
                "that is meant, or use in_batch or mixed"
            )
        _check_known(config, known)
        return FullSoftmax(
            num_items,
            known if config.mask_known else None,
            config.positives_compete,
            config.chunk_rows,
        )
    if isinstance(config, (InBatchConfig, MixedConfig)):
        frequency = _frequency(config, counts)
        sizes = (num_items, config.num_sampled) if isinstance(config, MixedConfig) else ()
        sampler = CANDIDATE_SAMPLERS[config.kind](frequency, *sizes)
        _check_known(config, known)
        return SharedCandidates(
            sampler,
            frequency,
            config.logq != "none",
            config.mask_hits,
            config.hard_negatives,
            known if config.mask_known else None,
            collective,
        )
    return _row_negatives(config, counts)


def _row_negatives(
    config: PointwiseConfig | HingeConfig | LogisticConfig | ListwiseConfig, counts: np.ndarray
) -> RowNegatives:
    """The per-row-negatives objective of a config: its sampler and its loss."""
    if config.sampler == "popularity":
        sampler = SAMPLERS["popularity"](counts, config.alpha)
    else:
        sampler = SAMPLERS["uniform"](len(counts))
    # a loss's settings are the config fields of the same names (margin, sigma)
    options = {
        name: getattr(config, name)
        for name in inspect.signature(LOSSES[config.kind]).parameters
        if hasattr(config, name)
    }
    loss = LOSSES[config.kind](**options)
    # BCE and softmax take cosines / temperature; the triplet margins are in cosine units
    scaled = isinstance(config, (PointwiseConfig, ListwiseConfig))
    return RowNegatives(loss, sampler, config.num_negatives, scaled)


def _check_known(config: InBatchConfig | MixedConfig | FullConfig, known: object) -> None:
    if config.mask_known and known is None:
        raise ConfigError(
            "training.objective.mask_known needs every training (query, item) pair, "
            "which in-memory training data has and a stream does not"
        )


def _frequency(config: InBatchConfig | MixedConfig, counts: np.ndarray):
    if config.logq == "streaming":
        return FREQUENCIES["streaming"](num_buckets=config.streaming_buckets)
    # "none" still needs an estimate for the mixed sampler's bookkeeping; it is unused.
    return FREQUENCIES["counts"](counts)
