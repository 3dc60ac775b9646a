"""Training examples: what one example is (``training.examples``), its batches and its loss.

    interactions.py  one example per training interaction (``TrainingData``, in memory)
    stream.py        the same, streamed from Parquet (``StreamingTrainingData``)
    queries.py       one example per query, its held-out items the positives
                     (``QueryTrainingData``, Mult-DAE style; the full softmax)
    sequences.py     every prefix of each query's history in one pass
                     (``SequenceTrainingData``, SASRec style)
    base.py          what they share: the ``TrainingExamples`` protocol, ``Batch``

``EXAMPLES`` maps each ``training.examples`` kind to its builder, which makes the
examples from data in memory (``from_split``) or from a stream (``from_stream``;
only ``interactions`` can be streamed). Each kind owns its batch type and how a batch
becomes a loss (``TrainingExamples.loss``), so the trainer never asks which it runs.
"""

from __future__ import annotations

from twotower.training.examples.base import Batch, ExampleBuilder, TrainingExamples
from twotower.training.examples.interactions import InteractionExamples, TrainingData
from twotower.training.examples.queries import QueryExamples, QueryTrainingData
from twotower.training.examples.sequences import SequenceExamples, SequenceTrainingData
from twotower.training.examples.stream import StreamingTrainingData

EXAMPLES: dict[str, ExampleBuilder] = {
    "interactions": InteractionExamples(),
    "queries": QueryExamples(),
    "sequences": SequenceExamples(),
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
