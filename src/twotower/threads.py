"""How many CPU threads torch computes with: one setting for training, evaluation,
export and serving (``threads`` in the config, ``--threads`` on the command line).

Unset, it is the CPUs this process may use: the cores it is allowed to run on, capped
by a container's CPU quota (cgroup v2 ``cpu.max``), which torch's own default (every
core of the host) ignores. Where other processes compete for those cores (two
trainings side by side, a service beside its load generator, a shared CI box), set it
lower: every matrix product then waits on threads that are not running, and a step
can take ten times longer than with one thread (measured in ``docs/training.md``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from twotower.errors import ConfigError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def set_threads(count: int | None) -> int:
    """Sets torch's intra-op thread count for this process.

    Args:
        count: threads; None for ``available_cpus()``.

    Returns:
        The count set.

    Raises:
        ConfigError: a count below 1.
    """
    if count is not None and count < 1:
        raise ConfigError(f"threads must be >= 1 (or unset: the CPUs available), got {count}")
    count = count or available_cpus()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


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
