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
    full       every item of the corpus, one exact softmax (small corpora;
               ``full_softmax``)
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch
from torch import nn

from twotower.errors import ConfigError
from twotower.losses import (
    LOSSES,
    SampledSoftmax,
    hardest_negatives,
    logq_correction,
    mask_accidental_hits,
    mask_known_positives,
    negative_mask,
)
from twotower.sampling import (
    CANDIDATE_SAMPLERS,
    FREQUENCIES,
    SAMPLERS,
    MinedNegatives,
    MixedSampler,
    UniformSampler,
)
from twotower.training.config import (
    MINING_REFUSAL,
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
from twotower.training.full_softmax import EmbedItems, FullSoftmax, KnownPairs, embed_unique


class RowNegatives(nn.Module):
    """Objectives with per-row sampled negatives: pointwise, hinge, logistic, listwise.

    Args:
        loss: takes (B,) positive and (B, n) negative scores and a (B, n) mask.
        sampler: draws (B, n) negatives per positive.
        num_negatives: n.
        scaled: the loss takes cosines divided by the temperature (BCE, softmax),
            rather than raw cosines (triplet losses, whose margin is in cosine units).
        mined: each query's mined candidates; once refreshed, ``num_mined`` of a row's
            n negatives come from its query's (the first columns), the rest from
            ``sampler``.
        num_mined: how many.
    """

    def __init__(
        self,
        loss: nn.Module,
        sampler,
        num_negatives: int,
        scaled: bool,
        mined: MinedNegatives | None = None,
        num_mined: int = 0,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.sampler = sampler
        self.num_negatives = num_negatives
        self.scaled = scaled
        self.mined, self.num_mined = mined, num_mined

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
        weighted by ``weights`` (B,) if given; ``queries`` (B,), the rows' query
        indices, pick the mined negatives."""
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return query.sum() + embed_items(positives).sum()
        negatives = self.negatives(positives, queries, generator)  # (B, n)
        items = embed_unique(torch.cat([positives, negatives.flatten()]), embed_items)
        pos_items, neg_items = items[: len(positives)], items[len(positives) :]
        pos = (query * pos_items).sum(-1)  # (B,)
        neg = torch.einsum("bd,bnd->bn", query, neg_items.view(*negatives.shape, -1))  # (B, n)
        if self.scaled:
            pos, neg = pos * scale, neg * scale
        return self.loss(pos, neg, negative_mask(positives, negatives), weights)

    def negatives(
        self, positives: torch.Tensor, queries: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """(B, n) negatives of each row: once mined candidates are refreshed, the first
        ``num_mined`` columns drawn from the row's query's, the rest from ``sampler``."""
        mined = self.num_mined if self.mined is not None and self.mined.ready else 0
        easy = self.sampler.sample(positives.cpu(), self.num_negatives - mined, generator)
        easy = easy.to(positives.device)
        if not mined:
            return easy
        if queries is None:
            raise ValueError("mined negatives need each row's query")
        hard = self.mined.sample(queries, positives, mined, generator, self.sampler)
        return torch.cat([hard, easy], dim=1)


@dataclasses.dataclass
class MinedShare:
    """Where the ``mixed`` softmax's mined negatives come from, once refreshed.

    Attributes:
        negatives: each query's mined candidates.
        count: h, drawn for each row: columns of that row alone.
        sampler: the shared candidates meanwhile, the batch plus m - h uniform items
            (before the first refresh the objective's own sampler draws all m).
        fallback: draws the rows whose query has no candidate (uniformly).
    """

    negatives: MinedNegatives
    count: int
    sampler: MixedSampler
    fallback: UniformSampler


class SharedCandidates(nn.Module):
    """Softmax over candidates shared by the batch: in-batch, or in-batch + sampled.

    Corrections run in this order: logQ, accidental-hit masking, masking of the
    query's other known positives (with ``known``), hard negatives. With several
    training processes (``collective``), every rank's positives are each row's
    candidates: the global batch's. With ``mined`` (``mixed`` only), each row also
    meets h negatives drawn from its query's mined candidates, as columns of its own,
    corrected and masked as the shared ones are (``_mined``).
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
        mined: MinedShare | None = None,
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
        self.mined = mined

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
        indices, which masking known positives and mined negatives need."""
        self.step += 1
        device = positives.device
        # with several processes every rank's positives are candidates (the global batch)
        everyone, offset = self.collective.gather_ids(positives)  # (G,), this rank's start
        self.frequency.update(everyone.cpu(), self.step)
        mined = self.mined if self.mined is not None and self.mined.negatives.ready else None
        sampler = self.sampler if mined is None else mined.sampler
        candidates, log_q = sampler.candidates(everyone.cpu(), generator)  # (M,)
        candidates, log_q = candidates.to(device), log_q.to(device)
        # the mined draws' own generator, seeded alike on every rank (one with no rows
        # too), so that the shared extras stay the same on every rank
        own = None if mined is None else _seeded_by(generator)
        vectors = self._vectors(positives, everyone, candidates, embed_items)  # (M, D)
        logits = query @ vectors.T * scale  # (B, M)
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return logits.sum()
        labels = offset + torch.arange(len(positives), device=device)  # positives come first
        if queries is None and self.known is not None:
            raise ValueError("masking known positives needs each row's query")
        if queries is None and mined is not None:
            raise ValueError("mined negatives need each row's query")
        if mined is not None:
            rows = (query, positives, queries, embed_items, scale, own)
            mined_logits, log_q = self._mined(mined, rows, candidates, log_q, everyone, offset)
        if self.logq:
            logits = logq_correction(logits, log_q)
        if self.mask_hits:
            logits = mask_accidental_hits(logits, labels, positives, candidates)
        if self.known is not None:
            logits = mask_known_positives(logits, labels, self.known(queries, candidates))
        if mined is not None:
            logits = torch.cat([logits, mined_logits], dim=1)  # (B, M + h)
        if self.hard_negatives:
            logits, labels = hardest_negatives(logits, labels, self.hard_negatives)
        return self.loss(logits, labels, weights)

    def _vectors(
        self,
        positives: torch.Tensor,
        everyone: torch.Tensor,
        candidates: torch.Tensor,
        embed_items: EmbedItems,
    ) -> torch.Tensor:
        """(M, D) the candidates' vectors, each distinct item through the tower once."""
        if not self.collective.distributed:
            return embed_unique(candidates, embed_items)
        # a rank embeds its own positives; sampled extras are the same on every rank
        # (one sampler seed), so each rank embeds them itself
        vectors = self.collective.gather_rows(embed_unique(positives, embed_items))
        if len(candidates) > len(everyone):
            extra = embed_unique(candidates[len(everyone) :], embed_items)
            vectors = torch.cat([vectors, extra])  # (M, D)
        return vectors

    def _mined(
        self,
        mined: MinedShare,
        rows: tuple,
        candidates: torch.Tensor,
        log_q: torch.Tensor,
        everyone: torch.Tensor,
        offset: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h) logits of each row's mined negatives, and the shared candidates'
        (B, M) log Q with the mined draws counted (``everyone``: the global batch's
        positives, this rank's from ``offset``).

        With logQ, a candidate's term is the log of its expected number of occurrences
        among the row's candidates, whichever part it came from: ``B p_j + (m - h) / N``
        from the shared part, plus ``h / c`` where j is one of the row's query's c
        mined candidates. Accidental hits and known positives are masked as in the
        shared columns (only rows whose query had no candidate can meet them).
        """
        query, positives, queries, embed_items, scale, own = rows
        # each rank draws its rows' share of the global batch's draws, as one process
        # with the global batch would
        h, batch = mined.count, len(everyone)
        items = mined.negatives.sample(queries, positives, h, own, mined.fallback, int(offset))
        logits = _row_logits(query, items, embed_items) * scale  # (B, h)
        if self.logq:
            expected = mined.sampler.expected_counts(items, batch)
            expected = expected + mined.negatives.expected_counts(queries, items, h)
            logits = logits - torch.log(expected).to(logits.dtype)
            shared = torch.exp(log_q.to(torch.float64))[None, :]
            shared = shared + mined.negatives.expected_counts(queries, candidates, h)
            log_q = torch.log(shared).to(log_q.dtype)  # (B, M)
        if self.mask_hits:
            logits = logits.masked_fill(~negative_mask(positives, items), float("-inf"))
        if self.known is not None:
            logits = logits.masked_fill(self.known(queries, items), float("-inf"))
        return logits, log_q

    def get_extra_state(self) -> dict:
        """The step count and frequency estimate, saved in checkpoints for resuming."""
        return {"step": self.step, "frequency": self.frequency.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.frequency.load_state_dict(state["frequency"])


def _row_logits(query: torch.Tensor, items: torch.Tensor, embed_items: EmbedItems) -> torch.Tensor:
    """(B, h) each row's query against its own (B, h) items, each distinct item through
    the tower once. Where the U distinct items are fewer than h D, the rows are scored
    against all U at once and their own columns gathered: a (B, U) product holds less
    than the (B, h, D) vectors a row-by-row product gathers, and runs as one matmul."""
    flat = items.flatten()
    # the distinct ids by flags over 0..max rather than a sort of all B h draws
    present = torch.zeros(int(flat.max()) + 1, dtype=torch.bool, device=flat.device)
    present[flat] = True
    unique = present.nonzero().squeeze(1)  # (U,) ascending, as torch.unique's
    position = torch.zeros(len(present), dtype=torch.int64, device=flat.device)
    position[unique] = torch.arange(len(unique), device=flat.device)
    inverse = position[flat]
    vectors = embed_items(unique)  # (U, D)
    if len(unique) <= items.shape[1] * vectors.shape[1]:
        return (query @ vectors.T).gather(1, inverse.view(items.shape))
    gathered = vectors.index_select(0, inverse).view(*items.shape, -1)  # (B, h, D)
    return torch.einsum("bd,bhd->bh", query, gathered)


def _seeded_by(generator: torch.Generator) -> torch.Generator:
    """A new CPU generator seeded by one draw of ``generator``."""
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))


def build_objective(
    config: ObjectiveConfig,
    counts: np.ndarray,
    known: KnownPairs | None = None,
    collective: Collective | None = None,
    mined: MinedNegatives | None = None,
    held_out: np.ndarray | None = None,
) -> nn.Module:
    """The objective a config names: its ``kind`` picks the loss from ``LOSSES`` and,
    for the shared-candidate softmax, the sampler from ``CANDIDATE_SAMPLERS``.

    Args:
        config: one of the objective configs.
        counts: (N,) training interactions per item (popularity sampling, logQ).
        known: the training (query, item) pairs, for ``mask_known``.
        collective: the training processes, whose positives the shared-candidate
            softmax gathers; None: this one alone.
        mined: each query's mined candidates, for ``mined_negatives`` (the trainer's
            ``NegativeMining`` refreshes them).
        held_out: items held out of training (``Split.held_out_items``), left out of
            the full softmax (a sampler drawing uniformly can still draw them).

    Raises:
        ConfigError: ``mask_known`` without the pairs; ``mined_negatives`` without the
            candidates; a corpus too large for ``full``.
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
            held_out,
        )
    _check_mined(config, mined)
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
            _mined_share(config, frequency, num_items, mined),
        )
    return _row_negatives(config, counts, mined)


def _mined_share(
    config: InBatchConfig | MixedConfig,
    frequency,
    num_items: int,
    mined: MinedNegatives | None,
) -> MinedShare | None:
    """The mixed softmax's mined negatives: h of its m sampled ones, per row."""
    if not isinstance(config, MixedConfig) or mined is None:
        return None  # in_batch refuses mined negatives in its config
    if not config.mined_negatives.enabled:
        return None
    h = config.mined_negatives.share(config.num_sampled)
    shared = MixedSampler(frequency, num_items, config.num_sampled - h)
    return MinedShare(mined, h, shared, UniformSampler(num_items))


def _row_negatives(
    config: PointwiseConfig | HingeConfig | LogisticConfig | ListwiseConfig,
    counts: np.ndarray,
    mined: MinedNegatives | None = None,
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
    mining = config.mined_negatives
    if not mining.enabled:
        mined = None
    num_mined = mining.share(config.num_negatives) if mined is not None else 0
    return RowNegatives(loss, sampler, config.num_negatives, scaled, mined, num_mined)


def _check_known(config: InBatchConfig | MixedConfig | FullConfig, known: object) -> None:
    if config.mask_known and known is None:
        raise ConfigError(
            "training.objective.mask_known needs every training (query, item) pair, "
            "which in-memory training data has and a stream does not"
        )


def _check_mined(config: ObjectiveConfig, mined: object) -> None:
    if config.mined_negatives.enabled and mined is None:
        raise ConfigError(MINING_REFUSAL)


def _frequency(config: InBatchConfig | MixedConfig, counts: np.ndarray):
    if config.logq == "streaming":
        return FREQUENCIES["streaming"](num_buckets=config.streaming_buckets)
    # "none" still needs an estimate for the mixed sampler's bookkeeping; it is unused.
    return FREQUENCIES["counts"](counts)
