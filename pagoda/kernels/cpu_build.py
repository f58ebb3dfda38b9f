"""Compile and load pagoda's small C kernels for the CPU (cpu_*.c beside this file).

Each is built with the system C compiler (0.1-0.6 s each) into PAGODA_CACHE_DIR, keyed by the
sources' hash, and called through ctypes, which releases the GIL during the call. The engine
starts every build at once in the background (`build_in_background`) so a first start compiles
them while the model loads; `load` waits for its own, or builds it if none was started.
torch's libgomp is already loaded when this runs, so the kernels' OpenMP shares torch's thread
pool. Where there is no x86 AVX2 or no compiler, `load` returns None and callers fall back to
their torch reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Optional

import torch

logger = logging.getLogger("pagoda")
_HERE = os.path.dirname(os.path.abspath(__file__))
_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_building: dict[str, Future] = {}   # name -> path of the built library (or None)
_times = {"build": None, "waited": 0.0, "compiled": 0}
_lock = threading.Lock()


def _cache_dir() -> str:
    root = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")
    return os.path.join(root, "kernels")


def _build(name: str) -> Optional[str]:
    """Path of the compiled library for cpu_<x>.c (compiled now unless cached), or None."""
    if os.environ.get("PAGODA_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("%s: needs x86 AVX2; using the torch path", name)
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        logger.warning("%s: no C compiler found; using the torch path", name)
        return None
    src_path = os.path.join(_HERE, f"{name}.c")
    h = hashlib.sha256(cc.encode())
    for f in sorted(os.listdir(_HERE)):  # a kernel may #include another one
        if f.startswith("cpu_") and f.endswith(".c"):
            with open(os.path.join(_HERE, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    key = h.hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"{name}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-o", tmp, src_path]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp)
            logger.warning("%s: build failed (%s); using the torch path", name,
                           (r.stderr.strip().splitlines() or [r.returncode])[-1])
            return None
        os.replace(tmp, path)  # atomic: a concurrent builder never loads a half-written file
        with _lock:
            _times["compiled"] += 1
    return path


def build_in_background() -> None:
    """Start building every cpu_*.c beside this file, all at once, each gcc in its own thread
    (the compiler runs outside the GIL). Idempotent; `load` waits for the one it needs."""
    with _lock:
        names = [f[:-2] for f in sorted(os.listdir(_HERE)) if f.startswith("cpu_") and f.endswith(".c")]
        todo = [n for n in names if n not in _building and n not in _loaded]
        if not todo:
            return
        t0, left = time.perf_counter(), [len(todo)]

        def run(name: str, fut: Future) -> None:
            try:
                fut.set_result(_build(name))
            except Exception as e:  # noqa: BLE001 - reported by load(), which falls back to torch
                fut.set_exception(e)
            with _lock:
                left[0] -= 1
                if left[0] == 0:
                    _times["build"] = time.perf_counter() - t0
        for name in todo:
            _building[name] = Future()
            threading.Thread(target=run, args=(name, _building[name]), daemon=True,
                             name=f"pagoda-build-{name}").start()


def build_times() -> Optional[dict]:
    """How many background builds compiled (0: all were cached), their wall seconds (None while
    some still run), and the seconds callers waited for them; None when none were started."""
    if not _building:
        return None
    return {"compiled": _times["compiled"], "seconds": _times["build"], "waited": _times["waited"]}


def load(name: str, signatures: dict[str, list]) -> Optional[ctypes.CDLL]:
    """The compiled library `name` (cpu_<x>.c) with argtypes set, or None; built once per process."""
    if name not in _loaded:
        fut = _building.get(name)
        if fut is not None:
            t0 = time.perf_counter()
            try:
                path = fut.result()
            except Exception as e:  # noqa: BLE001
                logger.warning("%s: build failed (%s); using the torch path", name, e)
                path = None
            _times["waited"] += time.perf_counter() - t0
        else:
            path = _build(name)
        lib = ctypes.CDLL(path) if path is not None else None
        if lib is not None:
            for fn, argtypes in signatures.items():
                getattr(lib, fn).argtypes = argtypes
                getattr(lib, fn).restype = None
        _loaded[name] = lib
    return _loaded[name]
