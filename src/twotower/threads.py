"""How many CPU threads torch computes with: one setting for training, evaluation,
export and serving (``threads`` in the config, ``--threads`` on the command line).

Unset, it is what the standard variables say where one is set, as torch itself reads
them: ``MKL_NUM_THREADS``, else ``OMP_NUM_THREADS`` (a positive whole number, or
OpenMP's comma list of nested levels, whose first, outer level counts; empty is
unset; anything else is an error naming the variable, so a limit meant for this
process is never silently ignored). Else it is the CPUs this process may use: the
cores it is allowed to run on, capped by a container's CPU quota (cgroup v2
``cpu.max``), which torch's own default (every core of the host) ignores. Where other
processes compete for those cores (two trainings side by side, a service beside its
load generator, a shared CI box), set it lower: every matrix product then waits on
threads that are not running, and a step can take ten times longer than with one
thread (measured in ``docs/training.md``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from twotower.errors import ConfigError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# the variables torch's own default reads, the first set one winning (ATen reads
# OMP_NUM_THREADS, then lets MKL_NUM_THREADS override it)
THREAD_VARIABLES = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")


def set_threads(count: int | None) -> int:
    """Sets torch's intra-op thread count for this process.

    Args:
        count: threads; None for ``default_threads()``.

    Returns:
        The count set.

    Raises:
        ConfigError: a count below 1, or (count None) a thread variable that is not one.
    """
    if count is not None and count < 1:
        raise ConfigError(f"threads must be >= 1 (or unset: the CPUs available), got {count}")
    count = count or default_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def default_threads(cpu_max: Path = CPU_MAX) -> int:
    """The thread count when none is given: ``MKL_NUM_THREADS`` or ``OMP_NUM_THREADS``
    where set, else ``available_cpus()``.

    Raises:
        ConfigError: a set variable that is not a positive whole number (or a comma
            list starting with one), naming the variable and its value.
    """
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return _thread_variable(name, value)
    return available_cpus(cpu_max)


def _thread_variable(name: str, value: str) -> int:
    """The count a thread variable gives: OpenMP's comma list's first (outer) level."""
    first = value.split(",")[0].strip()
    if not (first.isascii() and first.isdigit()) or int(first) < 1:
        raise ConfigError(
            f"{name}={value!r} is not a number of threads: set it to a whole number >= 1, "
            "or unset it (then the CPUs available), or give threads (--threads)"
        )
    return int(first)


def available_cpus(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cores or 1)
    if quota == "max":
        return max(1, cores or 1)
    return max(1, min(cores or 1, math.ceil(int(quota) / int(period))))
