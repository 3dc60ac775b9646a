"""What may change between an earlier run's features and the ones grown from them.

Growing (``FeaturePipeline.extend``) keeps every feature's state but a vocabulary's
new values, so the two configs must describe the same features: the same names in
the same order, of the same kinds, reading the same columns, with the same settings.
Only what applies to the new values alone may differ (``GROWABLE``), and what owns
no state or weight (``WEIGHTLESS``).
"""

from __future__ import annotations

from typing import Any

from twotower.config_io import to_dict
from twotower.features.specs import SIDES, FeaturesConfig

GROWABLE = frozenset({"min_count", "max_size"})  # how many new values join a vocabulary
WEIGHTLESS = frozenset({"dropout", "item_dropout"})  # regularization in training only


def differences(old: Any, new: Any, prefix: str, free: frozenset[str]) -> list[str]:
    """Each setting that differs between two configs' plain data, as ``key (old vs
    new)``, lists compared whole; ``free``: setting names allowed to differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in dict.fromkeys([*old, *new])
            if key not in free
            for line in differences(old.get(key), new.get(key), f"{prefix}.{key}", free)
        ]
    return [] if old == new else [f"{prefix} ({old!r} vs {new!r})"]


def feature_differences(old: FeaturesConfig, new: FeaturesConfig) -> list[str]:
    """What differs between two runs' features beyond what growing allows: a feature
    only one has (or the order), then each setting, as ``features.side.name.key (old
    vs new)``; empty where the earlier features can be grown into the new ones."""
    lines = []
    for side in SIDES:
        before = {spec["name"]: spec for spec in to_dict(old)[side]}
        after = {spec["name"]: spec for spec in to_dict(new)[side]}
        if list(before) != list(after):
            lines.append(f"features.{side} ({list(before)} vs {list(after)})")
            continue
        for name, spec in before.items():
            free = GROWABLE | WEIGHTLESS
            lines += differences(spec, after[name], f"features.{side}.{name}", free)
    return lines
