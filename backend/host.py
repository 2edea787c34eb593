"""What this process may use of the machine it runs on: CPU cores (its affinity mask and a
cgroup v2 CPU quota, as `docker run --cpus` sets) and memory (physical, or a cgroup v2 limit),
and torch's intra-op thread count chosen from them."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CGROUP_DIR = Path("/sys/fs/cgroup")
OMP_NUM_THREADS_ENV = "OMP_NUM_THREADS"


def usable_cpu_count() -> int:
    """Cores this process may run on: its affinity mask (taskset, cpusets), lowered to a cgroup
    CPU quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS)
        cores = os.cpu_count() or 1
    quota = _read_cgroup("cpu.max")
    if quota is not None and not quota.startswith("max"):
        limit, period = (int(part) for part in quota.split()[:2])
        cores = min(cores, max(1, math.ceil(limit / period)))
    return cores


def physical_memory_bytes() -> int:
    """The machine's memory, or the cgroup's memory limit when that is lower."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _read_cgroup("memory.max")
    if limit is not None and limit.isdigit():
        memory = min(memory, int(limit))
    return memory


def choose_cpu_threads(requested: int | None) -> tuple[int, str]:
    """(threads, where the number came from): `requested` (cpu_threads), else $OMP_NUM_THREADS,
    else the usable cores. NOTE: more threads than the cores actually free is the slow case: one
    descheduled thread stalls the others at every operation's barrier."""
    if requested is not None:
        return requested, "cpu_threads"
    from_env = os.environ.get(OMP_NUM_THREADS_ENV, "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), f"${OMP_NUM_THREADS_ENV}"
    return usable_cpu_count(), "usable cores"


def apply_cpu_threads(requested: int | None) -> int:
    """Set torch's intra-op threads as choose_cpu_threads says; returns the count."""
    threads, source = choose_cpu_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("CPU threads: %d (%s)", threads, source)
    return threads


def _read_cgroup(name: str) -> str | None:
    try:
        return (CGROUP_DIR / name).read_text().strip()
    except OSError:
        return None
