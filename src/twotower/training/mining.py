"""When and from what the objective's mined negatives are refreshed: the current model.

``training.objective.mined_negatives`` (``MiningConfig``): every ``every`` steps (or
at each epoch's start), after ``warmup`` steps, the model in eval mode embeds every
item and every query (histories as the training examples hold them), ranks the whole
corpus for each training query with its training positives excluded
(``MinedNegatives.refresh``), and the objective then draws the configured share of
its sampled negatives from each row's query's window. The schedule is a function of
the step alone, and the candidates travel in the checkpoint, so a resumed run draws
what the uninterrupted one would.

Under ``torchrun`` every rank refreshes alike (the ranks hold the same weights and
every training query), with no collective: the cost of one refresh per rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from twotower.errors import ConfigError
from twotower.sampling import MinedNegatives
from twotower.towers.model import TwoTower, interest_scores
from twotower.training.config import MINING_REFUSAL, MiningConfig, TrainingConfig
from twotower.training.evaluate import embed_all
from twotower.training.examples import TrainingExamples


class NegativeMining:
    """Each training query's mined candidates and the steps they are refreshed at.

    Args:
        config: the objective's ``mined_negatives``.
        data: the training examples; every (query, item) pair of their training
            interactions is at hand (in memory).
        batch_size: queries and items embedded, and queries ranked, at once.

    Raises:
        ConfigError: the data cannot list its training pairs (a stream), or the
            candidate table would be larger than ``max_candidates``.
    """

    def __init__(self, config: MiningConfig, data: TrainingExamples, batch_size: int) -> None:
        pairs = data.training_pairs()
        if pairs is None:
            raise ConfigError(MINING_REFUSAL)
        queries, items = (side.cpu().numpy() for side in pairs)
        shape = (data.num_queries, data.num_items)
        ones = np.ones(len(queries), dtype=np.float32)
        # (Q, N): each query's training positives, never its candidates
        self.exclude = sp.csr_matrix((ones, (queries, items)), shape=shape)
        self.queries = np.unique(queries)  # (R,) the queries with training rows
        self.config, self.data, self.batch_size = config, data, batch_size
        self.negatives = MinedNegatives(*shape, config.window, config.max_candidates, data.device)

    def due(self, step: int, epoch_start: bool) -> bool:
        """Whether to refresh before the step after ``step`` steps (``epoch_start``: it
        is its epoch's first)."""
        every, warmup = self.config.every, self.config.warmup
        if every == "epoch":
            return epoch_start and step >= (1 if warmup is None else warmup)
        warmup = every if warmup is None else warmup
        return step >= warmup and (step - warmup) % every == 0

    @torch.no_grad()
    def refresh(self, model: TwoTower) -> None:
        """Ranks the corpus with ``model`` (in eval mode) and keeps each training
        query's window as its candidates."""
        queries, items = embed_all(model, self.data, self.batch_size, part="train")

        def score(chunk: np.ndarray) -> torch.Tensor:
            return interest_scores(queries[torch.from_numpy(chunk).to(queries.device)], items)

        self.negatives.refresh(score, self.queries, self.exclude, self.batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The latest candidates, for the checkpoint."""
        return self.negatives.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.negatives.load_state_dict(state)


def negative_mining(config: TrainingConfig, data: TrainingExamples) -> NegativeMining | None:
    """The mining a training config asks for, or None where its objective mines none."""
    mining = config.objective.mined_negatives
    if not mining.enabled:
        return None
    return NegativeMining(mining, data, config.eval_batch_size)
