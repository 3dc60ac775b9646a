"""One thread setting for every command: config, --threads, the service."""

from __future__ import annotations

import os

import pytest
import torch

from twotower.config import load_config
from twotower.errors import ConfigError
from twotower.serving.http import ServiceConfig, create_app
from twotower.threads import available_cpus, default_threads, set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_sets_torch_and_none_keeps_it(restore_threads):
    assert set_threads(1) == 1 == torch.get_num_threads()
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        set_threads(0)


def test_the_config_takes_threads_and_refuses_zero(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("threads: 1\n")
    assert load_config(path).threads == 1
    assert load_config(path, ["threads=null"]).threads is None
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        load_config(path, ["threads=0"])


def test_the_service_computes_with_its_threads(demo_artifact, restore_threads):
    torch.set_num_threads(2)
    create_app(demo_artifact[0], ServiceConfig(threads=1))
    assert torch.get_num_threads() == 1


def test_unset_is_the_cpus_available_capped_by_a_cgroup_quota(
    tmp_path, monkeypatch, restore_threads
):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # no variable says otherwise
        monkeypatch.delenv(variable, raising=False)
    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    assert available_cpus(tmp_path / "absent") == cores
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == cores
    quota.write_text("50000 100000\n")  # half a CPU: one thread
    assert available_cpus(quota) == 1
    quota.write_text(f"{100000 * (cores + 3)} 100000\n")  # a quota above the cores
    assert available_cpus(quota) == cores
    assert set_threads(None) == available_cpus() == torch.get_num_threads()


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_unset_follows_the_standard_variables(name, monkeypatch, restore_threads):
    """``OMP_NUM_THREADS=1 twotower train ...`` computes on one thread, as torch alone
    would, not on every CPU available."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setenv(name, "1")
    assert default_threads() == 1
    assert set_threads(None) == 1 == torch.get_num_threads()
    monkeypatch.setenv(name, "3,2")  # OpenMP's nested levels: the outer one counts
    assert default_threads() == 3
    assert set_threads(2) == 2  # threads, or --threads, wins over the variables


def test_mkl_num_threads_wins_over_omp_num_threads_as_in_torch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    assert default_threads() == 1


def test_an_empty_variable_is_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert default_threads(tmp_path / "absent") == available_cpus(tmp_path / "absent")


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_an_invalid_variable_is_refused_naming_it(value, monkeypatch, restore_threads):
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ConfigError, match=f"OMP_NUM_THREADS={value!r}"):
        set_threads(None)
    assert set_threads(1) == 1  # a count given needs no variable
