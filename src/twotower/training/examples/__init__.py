"""Training examples: what one example is (``training.examples``), its batches and its loss.

    interactions.py  one example per training interaction (``TrainingData``, in memory)
    stream.py        the same, streamed from Parquet (``StreamingTrainingData``)
    queries.py       one example per query, its held-out items the positives
                     (``QueryTrainingData``, Mult-DAE style; the full softmax)
    sequences.py     every prefix of each query's history in one pass
                     (``SequenceTrainingData``, SASRec style)
    base.py          what they share: the ``TrainingExamples`` protocol, ``Batch``,
                     the loss of one example per row

``EXAMPLES`` maps each ``training.examples`` kind to its builder, which makes the
examples from data in memory (``from_split``) or from a stream (``from_stream``;
only ``interactions`` can be streamed). Each kind owns its batch type and how a batch
becomes a loss (``TrainingExamples.loss``), so the trainer never asks which it runs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from twotower.data.config import StreamConfig
from twotower.data.dataset import Dataset
from twotower.data.splits import Split
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.training.config import STREAM_REFUSAL
from twotower.training.examples.base import Batch, TrainingExamples
from twotower.training.examples.interactions import TrainingData
from twotower.training.examples.queries import QueryTrainingData
from twotower.training.examples.sequences import SequenceTrainingData
from twotower.training.examples.stream import StreamingTrainingData

if TYPE_CHECKING:
    from twotower.config import Config


@dataclasses.dataclass(frozen=True)
class ExampleBuilder:
    """Makes one kind of ``training.examples`` from a config: its class in memory, and
    whether it can be streamed (as ``StreamingTrainingData``).

    Attributes:
        in_memory: the class, built from its ``config_arguments`` of the training
            config and the shared ``device``, ``weights`` and ``weight_cap``.
        streams: False: the kind gathers each query's whole training history, which
            a stream does not hold (``from_stream`` refuses).
    """

    in_memory: type[TrainingData]
    streams: bool = False

    def from_split(
        self,
        config: Config,
        dataset: Dataset,
        split: Split,
        pipeline: FeaturePipeline,
        device: torch.device,
    ) -> TrainingData:
        """The examples of ``split``'s training interactions, held in memory."""
        training = config.training
        return self.in_memory(
            dataset,
            split,
            pipeline,
            *self.in_memory.config_arguments(training),
            device=device,
            weights=training.weights,
            weight_cap=training.weight_cap,
        )

    def from_stream(
        self,
        config: Config,
        stream: StreamConfig,
        pipeline: FeaturePipeline,
        items: pa.Table,
        counts: np.ndarray,
        device: torch.device,
    ) -> StreamingTrainingData:
        """The examples of the interactions ``stream`` reads; ``items`` the corpus,
        ``counts`` (N,) its training interactions per item.

        Raises:
            ConfigError: this kind needs the data in memory.
        """
        if not self.streams:
            raise ConfigError(STREAM_REFUSAL)
        training = config.training
        return StreamingTrainingData(
            stream,
            pipeline,
            items,
            counts,
            device,
            config.seed,
            training.weights,
            training.weight_cap,
        )


EXAMPLES: dict[str, ExampleBuilder] = {
    "interactions": ExampleBuilder(TrainingData, streams=True),
    "queries": ExampleBuilder(QueryTrainingData),
    "sequences": ExampleBuilder(SequenceTrainingData),
}

__all__ = [
    "EXAMPLES",
    "Batch",
    "ExampleBuilder",
    "QueryTrainingData",
    "SequenceTrainingData",
    "StreamingTrainingData",
    "TrainingData",
    "TrainingExamples",
]
