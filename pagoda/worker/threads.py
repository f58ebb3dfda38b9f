"""Threads of the CPU path: how many cores this process may use, applying --threads, and the
OpenMP worker pools.

A decode step is bound by memory and FMA units, which SMT siblings share, so the default is one
thread per physical core (as llama.cpp's), counted among the CPUs this process is allowed on
(taskset, cgroup cpusets) and capped by a cgroup CPU quota (docker --cpus).
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
from typing import Optional

logger = logging.getLogger("pagoda")


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _core_of(cpu: int) -> Optional[str]:
    """An id shared by the SMT siblings of `cpu` (its sibling list), or None off Linux."""
    for name in ("core_cpus_list", "thread_siblings_list"):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/{name}") as f:
                return f.read().strip()
        except OSError:
            continue
    return None


def _cgroup_quota() -> Optional[int]:
    """CPUs a cgroup v2 quota allows (`max 100000` -> None), rounded up."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = _allowed_cpus()
    cores = {_core_of(c) or f"cpu{c}" for c in cpus}
    n = len(cores) or 1
    quota = _cgroup_quota()
    return min(n, quota) if quota else n


def default_threads() -> tuple[int, str]:
    """OMP_NUM_THREADS where the user set it, else physical_cores(); and where it came from."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return physical_cores(), "physical cores"


def set_threads(threads: Optional[int], ranks_here: int = 1) -> int:
    """Apply --threads to torch and pagoda's C kernels; returns it. None: default_threads(),
    shared out among the `ranks_here` worker processes of this host (tensor parallelism), so
    that they do not oversubscribe the cores."""
    from pagoda.kernels import cpu_build
    n, why = (threads, "--threads") if threads else default_threads()
    if not threads and ranks_here > 1:
        n, why = max(1, n // ranks_here), f"{why} / {ranks_here} ranks on this host"
    cpu_build.set_threads(n)
    logger.info("CPU threads: %d (%s)", n, why)
    return n


def release_openmp_pool() -> None:
    """Free the calling thread's OpenMP worker pool (OpenMP 5's omp_pause_resource_all).

    libgomp keeps one worker pool per thread that ran a parallel region. When the model is
    loaded on one thread and run on another, two pools stay alive; libgomp then counts more
    threads than CPUs and stops spinning between parallel regions, and every region waits on a
    futex wake: on 2 cores a decode step ran ~40% slower than on the main thread (see
    BENCHMARKS.md). Without libgomp (or an older one) this does nothing."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the copy torch already loaded, by its soname
        gomp.omp_pause_resource_all(1)      # omp_pause_soft
    except (OSError, AttributeError):
        pass
