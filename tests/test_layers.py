"""The layering of docs/architecture.md, as import-linter contracts in pyproject.toml,
and no import cycle anywhere in the package.

The contracts and the cycle check run on the package as it is, and are shown to fail
when a forbidden import, or a cycle, is added to a copy of it; serving is imported in
a fresh interpreter to see that it loads no training code.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(
    not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')"
)


def _lint(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache", *args],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_contract_holds() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "broken"),
    [
        ("serving/retriever.py", "import twotower.training.trainer", "serving", "Serving never"),
        ("losses/pointwise.py", "import twotower.towers.model", "losses", "Losses take scores"),
        ("training/config.py", "import torch", "config", "Config modules import no torch"),
        ("index/exact.py", "import twotower.evaluation.ranking", "index", "The index never"),
        ("data/dataset.py", "import twotower.cli", "pipeline", "Imports point down"),
        ("data/build/spark.py", "import twotower.data.build.duckdb", "build", "The data build"),
        ("data/build/format.py", "import twotower.data.build.plan", "build", "The data build"),
        ("export.py", "import twotower.data.build.duckdb", "build-readers", "Readers of a data"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str, broken: str
) -> None:
    shutil.copytree(ROOT / "src" / "twotower", tmp_path / "src" / "twotower")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "src" / "twotower" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    result = _lint(tmp_path, "--contract", contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout
    assert line.removeprefix("import ") in result.stdout  # the offending import is named


# the import graph of the package on the path, as (importer, imported) pairs
_EDGES = """
import json, grimp
graph = grimp.build_graph("twotower", cache_dir=None)
edges = [
    (module, imported)
    for module in sorted(graph.modules)
    for imported in sorted(graph.find_modules_directly_imported_by(module))
]
print(json.dumps(edges))
"""


def import_cycles(root: Path) -> list[list[str]]:
    """Every cycle of imports between twotower modules of ``root/src``: each strongly
    connected component of the import graph with more than one module, sorted (Tarjan's
    algorithm; imports under ``TYPE_CHECKING`` count)."""
    result = subprocess.run(
        [sys.executable, "-c", _EDGES],
        env={**os.environ, "PYTHONPATH": str(root / "src")},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    imports: dict[str, list[str]] = {}
    for importer, imported in json.loads(result.stdout):
        imports.setdefault(importer, []).append(imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in imports.get(module, []):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:  # the root of a component: pop it whole
            component = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return sorted(cycles)


def test_no_import_cycle_between_twotower_modules() -> None:
    cycles = import_cycles(ROOT)
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_an_import_cycle_added_to_a_copy_is_found_and_named(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "twotower", tmp_path / "src" / "twotower")
    for module, line in (
        ("data/matrix.py", "import twotower.data.splits"),
        ("data/splits.py", "import twotower.data.stream"),
        ("data/stream.py", "import twotower.data.matrix"),
    ):
        path = tmp_path / "src" / "twotower" / module
        path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    cycle = ["twotower.data.matrix", "twotower.data.splits", "twotower.data.stream"]
    assert import_cycles(tmp_path) == [cycle]


def _loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    code += "; import json, sys; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


def test_serving_loads_no_training_code() -> None:
    loaded = _loaded_after("import twotower.serving.http")
    assert "twotower.serving.http" in loaded
    forbidden = ("twotower.training", "twotower.losses", "twotower.sampling")
    assert [m for m in loaded if m.startswith(forbidden)] == []


def test_reading_and_writing_a_config_imports_no_torch(tmp_path: Path) -> None:
    """Package ``__init__`` files count too: import-linter does not see that importing
    ``twotower.baselines.config`` runs ``twotower/baselines/__init__.py``."""
    code = (
        "from twotower.config import load_config, save_config; "
        f"save_config(load_config({str(ROOT / 'configs' / 'ml1m.yaml')!r}), "
        f"__import__('pathlib').Path({str(tmp_path / 'config.yaml')!r}))"
    )
    loaded = _loaded_after(code)
    assert "twotower.config" in loaded and (tmp_path / "config.yaml").is_file()
    assert [m for m in loaded if m == "torch" or m.startswith("torch.")] == []
