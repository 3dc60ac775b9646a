"""Id dropout (DropoutNet, Volkovs et al. 2017): a training-time change of the inputs.

An ``id`` feature with ``dropout: p`` (``IdFeature.dropout``) reads, in each training
batch, a share p of its rows' ids as out of vocabulary (``OOV``), the index a value
never seen in training reads everywhere. Without it, that row of the embedding table is
trained only where ``min_count`` sends rare ids to it, and a tower that leans on the id
puts every new item (or user) in about the same place. With it, the tower learns to
place a row whose id it does not know from its other features (a title, a genre).

Only the training loss calls ``drop_ids`` (``twotower.training.examples``); evaluation,
export and serving transform the same features and never drop. The mask is drawn from
the generator the trainer passes to each loss, which a checkpoint saves, so a resumed
run draws the same masks as one never stopped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from twotower.features.specs import FeatureSpec, IdFeature
from twotower.features.transform import MISSING, OOV


def dropout_rates(specs: Iterable[FeatureSpec]) -> dict[str, float]:
    """Feature name -> its id dropout rate, for the id features that drop (p > 0)."""
    return {
        spec.name: spec.dropout for spec in specs if isinstance(spec, IdFeature) and spec.dropout
    }


def drop_ids(
    inputs: dict[str, torch.Tensor], rates: dict[str, float], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The inputs with each row of a dropping id feature read as ``OOV`` at its rate.

    One mask per feature per call, (B,) uniform draws on the CPU from ``generator``; a
    missing id (``MISSING``) stays missing. The inputs given are left as they are.

    Args:
        inputs: feature name -> (B,) int64 codes (and any other inputs, passed through).
        rates: ``dropout_rates`` of the side's features; empty: ``inputs`` itself.
        generator: a CPU generator (the trainer's, saved with each checkpoint).

    Returns:
        A new dict: the dropped features' new (B,) codes, the other inputs as given.
    """
    if not rates:
        return inputs
    dropped = dict(inputs)
    for name, rate in rates.items():
        codes = inputs[name]  # (B,)
        drop = (torch.rand(codes.shape[0], generator=generator) < rate).to(codes.device)
        dropped[name] = codes.masked_fill(drop & (codes != MISSING), OOV)
    return dropped
