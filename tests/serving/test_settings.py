"""The service's settings refuse bad values themselves; ``twotower serve`` reports them."""

from __future__ import annotations

import pytest

from twotower.cli import main
from twotower.errors import ConfigError
from twotower.serving.settings import ServiceConfig

LIMITS = "--batch-queries and --max-body-bytes must be >= 1, --batch-wait-ms >= 0"


@pytest.mark.parametrize(
    ("option", "value"),
    [("--batch-queries", "0"), ("--max-body-bytes", "0"), ("--batch-wait-ms", "-1")],
)
def test_serve_refuses_a_bad_option_in_one_line(demo_artifact, option, value, monkeypatch, capsys):
    command = ["twotower", "serve", str(demo_artifact[0]), "--port", "0", option, value]
    monkeypatch.setattr("sys.argv", command)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {LIMITS}\n"


def test_serve_refuses_an_unknown_runtime_in_one_line(demo_artifact, monkeypatch, capsys):
    command = ["twotower", "serve", str(demo_artifact[0]), "--port", "0", "--runtime", "tensorrt"]
    monkeypatch.setattr("sys.argv", command)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    expected = "error: unknown tower runtime 'tensorrt'; choose one of torch, onnx\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize(
    "values",
    [{"batch_queries": 0}, {"max_body_bytes": 0}, {"batch_wait_ms": -0.5}],
)
def test_the_settings_refuse_a_value_out_of_range(values):
    with pytest.raises(ConfigError) as err:
        ServiceConfig(**values)
    assert str(err.value) == LIMITS


def test_the_settings_refuse_an_unknown_runtime_and_take_each_known_one():
    with pytest.raises(ConfigError) as err:
        ServiceConfig(runtime="tensorrt")  # type: ignore[arg-type]
    assert str(err.value) == "unknown tower runtime 'tensorrt'; choose one of torch, onnx"
    assert [ServiceConfig(runtime=name).runtime for name in ("torch", "onnx")] == ["torch", "onnx"]


def test_the_settings_import_nothing_heavy():
    """The parent of several workers reads them: no torch, no web framework."""
    import subprocess
    import sys

    code = (
        "import sys; from twotower.serving.settings import ServiceConfig; ServiceConfig(); "
        "print(sorted({'torch', 'fastapi', 'starlette'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_serve_refuses_a_negative_exact_filter_limit_in_one_line(
    demo_artifact, monkeypatch, capsys
):
    command = ["twotower", "serve", str(demo_artifact[0]), "--exact-filter-limit", "-1"]
    monkeypatch.setattr("sys.argv", command)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --exact-filter-limit must be >= 0, got -1\n"
    assert ServiceConfig(exact_filter_limit=0).exact_filter_limit == 0
