"""A tower as an ONNX graph, to run where this package and PyTorch are not.

The graph takes the tower's model inputs as separate tensors, named as
``FeaturePipeline.transform`` names them, and outputs the tower's unit vectors:
(batch, D), or (batch, K, D) from a K-interest tower. Axes named in ``shapes``
(the batch, a list's length) may take any size; the others are fixed.

It is written by ``torch.onnx.export``'s graph capture (``torch.export``), so the
encoders avoid what it cannot capture (a stable sort, packed sequences).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from twotower.errors import ConfigError
from twotower.towers.model import Tower

OUTPUT = "vectors"  # the graph's one output
QUIET_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
)


class _Positional(nn.Module):
    """The tower over positional tensors (the graph's inputs), in ``names`` order."""

    def __init__(self, tower: Tower, names: list[str]) -> None:
        super().__init__()
        self.tower = tower
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.tower(dict(zip(self.names, tensors, strict=True)))


def save_onnx(
    tower: Tower,
    example: dict[str, torch.Tensor],
    shapes: dict[str, list[int | str]],
    path: Path,
) -> None:
    """Writes ``tower`` as an ONNX graph to ``path``, its weights beside it in
    ``path.name + ".data"`` (ONNX's external data: any size, and ONNX Runtime maps
    the file instead of copying it, so processes running one graph share its weights).

    Args:
        tower: the tower, run in evaluation mode.
        example: a batch of its inputs, by name; every named axis at least 2 long.
        shapes: each input's axes: a fixed size, or a name for an axis that varies
            (inputs naming one axis alike share its size).
        path: the ``.onnx`` file.

    Raises:
        ConfigError: the ONNX exporter's packages (``twotower[onnx]``) are missing.
    """
    try:
        import onnxscript  # noqa: F401 (torch.onnx's exporter needs it)
    except ImportError:
        raise ConfigError(
            "exporting ONNX needs onnx and onnxscript: pip install 'twotower[onnx]'"
        ) from None
    names = list(example)
    dims: dict[str, torch.export.Dim] = {}
    dynamic = tuple(
        {
            axis: dims.setdefault(size, torch.export.Dim(_symbol(size), min=1))
            for axis, size in enumerate(shapes[name])
            if isinstance(size, str)
        }
        for name in names
    )
    module = _Positional(tower, names)
    was_training = tower.training
    tower.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                tuple(example[name] for name in names),
                dynamo=True,
                dynamic_shapes=(dynamic,),
                input_names=names,
                output_names=[OUTPUT],
                verbose=False,
            )
    finally:
        tower.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the exporter's step-by-step report (stdout), its warnings and its
    loggers' notes, none of which is the user's to act on; errors still raise."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _symbol(name: str) -> str:
    """An axis name as a Python identifier (``torch.export.Dim`` requires one)."""
    return "".join(c if c.isalnum() else "_" for c in name)
