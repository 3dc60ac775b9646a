"""docs/scaling.md shows the two configs of its path in full, ``raw.yaml`` (what a
data build reads) and ``built.yaml`` (training from the build), exactly as
benchmarks/scale.py writes them, and both load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from twotower.config import load_config

ROOT = Path(__file__).resolve().parents[3]


def _shown(doc: str, name: str) -> str:
    """The YAML block after the line that introduces ``name`` in the doc."""
    start = doc.index("```yaml\n", doc.index(f"`{name}` (")) + len("```yaml\n")
    return doc[start : doc.index("```", start)]


def test_the_scaling_doc_shows_the_configs_the_scale_benchmark_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    written = {
        "raw.yaml": scale.CONFIG.format(data=scale.RAW.format(raw="raw"), steps=400),
        "built.yaml": scale.CONFIG.format(data=scale.BUILT.format(built="built/"), steps=400),
    }
    for name, text in written.items():
        assert _shown(doc, name) == text, name
        (tmp_path / name).write_text(text, encoding="utf-8")
    raw, built = (load_config(tmp_path / name) for name in written)
    assert raw.data.source == "files" and raw.data.interactions is not None
    assert raw.data.interactions.path == tmp_path / "raw" / "interactions"
    assert built.data.stream is not None and built.data.stream.built == tmp_path / "built"
    assert raw.features == built.features and raw.model == built.model
