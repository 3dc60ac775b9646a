"""What runs the query tower of a served artifact: PyTorch, or ONNX Runtime.

    chunks of model inputs (FeaturePipeline.transform) -> runtime -> (B, D) or (B, K, D)

``torch`` runs the artifact's ``query_tower.pt``; ``onnx`` runs the graph that
``twotower export --onnx`` wrote beside it (``onnx/query_tower.onnx``, checked
against PyTorch when it was exported), on ONNX Runtime's CPU provider with the
threads torch was given. Both give the same vectors to within float rounding. In
process ONNX Runtime takes a third of PyTorch's time for one query
(``benchmarks/tower_runtime.py``); over HTTP the tower is a small part of a request and
the two serve alike (docs/serving.md), so ``torch`` stays the default.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from twotower.errors import ConfigError, DataError
from twotower.serving.artifact import Artifact
from twotower.serving.settings import Runtime, check_runtime
from twotower.towers.model import embed_inputs


class TowerRuntime(Protocol):
    """Query vectors of model inputs given a chunk at a time."""

    name: str

    def vectors(self, chunks: Iterable[dict[str, torch.Tensor]]) -> np.ndarray:
        """(rows, D) float32, or (rows, K, D) from a K-interest tower."""
        ...


class TorchRuntime:
    """The artifact's query tower on PyTorch."""

    name = "torch"

    def __init__(self, artifact: Artifact) -> None:
        self.tower = artifact.query_tower

    def vectors(self, chunks: Iterable[dict[str, torch.Tensor]]) -> np.ndarray:
        return embed_inputs(self.tower, chunks).cpu().numpy()


class OnnxRuntime:
    """An ONNX query tower (``twotower.towers.onnx``) on ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        inputs: the graph's input names, each a model input's.
        shape: (K, D) of each query's vectors (K = 1: (rows, D) vectors).

    Raises:
        DataError: ONNX Runtime cannot load ``path``.
        ConfigError: ``onnxruntime`` is not installed.
    """

    name = "onnx"

    def __init__(self, path: Path, inputs: list[str], shape: tuple[int, int]) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError(
                "running the tower on ONNX Runtime needs onnxruntime: pip install 'twotower[onnx]'"
            ) from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise DataError(f"{path}: ONNX Runtime cannot load it ({err})") from None
        self.inputs = inputs
        self.shape = shape

    def vectors(self, chunks: Iterable[dict[str, torch.Tensor]]) -> np.ndarray:
        parts = [self.session.run(None, self._feeds(chunk))[0] for chunk in chunks]
        if parts:
            return np.concatenate(parts)
        interests, dim = self.shape
        return np.zeros((0, dim) if interests == 1 else (0, interests, dim), np.float32)

    def _feeds(self, chunk: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The graph's inputs of one chunk; a list input without a column (every row's
        list empty) gets one column of padding, which its encoder reads as empty."""
        feeds = {}
        for name in self.inputs:
            values = chunk[name].numpy()
            if values.ndim == 2 and values.shape[1] == 0:
                values = np.zeros((len(values), 1), values.dtype)
            feeds[name] = values
        return feeds


def tower_runtime(artifact: Artifact, name: Runtime) -> TowerRuntime:
    """The runtime ``name`` (one of ``settings.RUNTIMES``) over ``artifact``'s query tower.

    Raises:
        ConfigError: an unknown runtime name, or its package is missing.
        DataError: the artifact lacks what the runtime runs.
    """
    check_runtime(name)
    if name == "torch":
        return TorchRuntime(artifact)
    entry = artifact.manifest.get("onnx")
    if entry is None:
        raise DataError(
            f"{artifact.folder}: the artifact has no ONNX query tower; export it with "
            "twotower export --onnx"
        )
    tower = artifact.query_tower
    inputs = [spec["name"] for spec in entry["inputs"]]
    return OnnxRuntime(artifact.folder / entry["file"], inputs, (tower.interests, tower.output_dim))
