"""Thread pools of the CPU path."""
from __future__ import annotations

import ctypes


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
