"""Compile and load pagoda's small C kernels for the CPU (cpu_*.c beside this file).

Each is built with the system C compiler (0.1-0.6 s each) into PAGODA_CACHE_DIR, keyed by the
sources' hash and the instruction set, and called through ctypes, which releases the GIL during
the call. The engine starts every build at once in the background (`build_in_background`) so a
first start compiles them while the model loads; `load` waits for its own, or builds it if none
was started. torch's libgomp is already loaded when this runs, so the kernels' OpenMP shares
torch's thread pool. Where there is no x86 AVX2 or no compiler, `load` returns None and callers
fall back to their torch reference.

Instruction sets: every kernel is built for the best one the CPU has (`best_isa`: AVX-512 where
torch's cpuinfo reports it, else AVX2 + FMA), one .so per set, so a kernel written for AVX-512
(cpu_gguf.c) gets its wide registers and the others at least their auto-vectorised loops.
PAGODA_CPU_ISA=avx2 forces the narrower build; tests load each variant the machine runs.
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
_loaded: dict[tuple[str, str], Optional[ctypes.CDLL]] = {}   # (name, isa) -> library
_building: dict[tuple[str, str], Future] = {}  # (name, isa) -> path of the built library (or None)
_times = {"build": None, "waited": 0.0, "compiled": 0}
_lock = threading.Lock()
_threads = 0  # set_threads' count; 0: OpenMP's default

# instruction set -> compiler flags (F16C converts GGUF's half-precision scales)
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}


def supported_isas() -> list[str]:
    """Instruction sets of ISA_FLAGS this CPU runs, narrowest first (empty off x86 / below AVX2)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()  # cpuinfo: "AVX512" needs F, BW, VL and DQ
    if cap.startswith("AVX512"):
        return ["avx2", "avx512"]
    return ["avx2"] if cap == "AVX2" else []


def best_isa() -> Optional[str]:
    isas = supported_isas()
    forced = os.environ.get("PAGODA_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in isas:
            logger.warning("PAGODA_CPU_ISA=%s: this CPU runs %s; using %s", forced,
                           ", ".join(isas) or "neither", isas[-1] if isas else "the torch path")
        else:
            return forced
    return isas[-1] if isas else None


def _cache_dir() -> str:
    root = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")
    return os.path.join(root, "kernels")


def _build(name: str, isa: Optional[str] = None) -> Optional[str]:
    """Path of the compiled library for cpu_<x>.c and `isa` (compiled now unless cached), or None."""
    if os.environ.get("PAGODA_CPU_KERNELS", "1") == "0":
        return None
    isa = isa or best_isa()
    if isa is None or isa not in supported_isas():
        logger.info("%s: needs x86 AVX2; using the torch path", name)
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        logger.warning("%s: no C compiler found; using the torch path", name)
        return None
    src_path = os.path.join(_HERE, f"{name}.c")
    h = hashlib.sha256(cc.encode())
    for f in sorted(os.listdir(_HERE)):  # a kernel may #include another one
        if f.startswith("cpu_") and f.endswith((".c", ".h")):
            with open(os.path.join(_HERE, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    h.update(" ".join(ISA_FLAGS[isa]).encode())
    key = h.hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"{name}-{isa}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        cmd = [cc, "-O3", *ISA_FLAGS[isa], "-fopenmp", "-shared", "-fPIC", "-o", tmp, src_path]
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
        isa = best_isa()
        names = [f[:-2] for f in sorted(os.listdir(_HERE)) if f.startswith("cpu_") and f.endswith(".c")]
        todo = [(n, isa) for n in names if (n, isa) not in _building and (n, isa) not in _loaded]
        if not todo:
            return
        t0, left = time.perf_counter(), [len(todo)]

        def run(key: tuple[str, str], fut: Future) -> None:
            try:
                fut.set_result(_build(*key))
            except Exception as e:  # noqa: BLE001 - reported by load(), which falls back to torch
                fut.set_exception(e)
            with _lock:
                left[0] -= 1
                if left[0] == 0:
                    _times["build"] = time.perf_counter() - t0
        for key in todo:
            _building[key] = Future()
            threading.Thread(target=run, args=(key, _building[key]), daemon=True,
                             name=f"pagoda-build-{key[0]}").start()


def build_times() -> Optional[dict]:
    """How many background builds compiled (0: all were cached), their wall seconds (None while
    some still run), and the seconds callers waited for them; None when none were started."""
    if not _building:
        return None
    return {"compiled": _times["compiled"], "seconds": _times["build"], "waited": _times["waited"]}


def load(name: str, signatures: dict[str, list], isa: Optional[str] = None,
         restypes: Optional[dict[str, object]] = None) -> Optional[ctypes.CDLL]:
    """The compiled library `name` (cpu_<x>.c) for `isa` (default: best_isa()) with argtypes set,
    or None; built once per process and instruction set."""
    isa = isa or best_isa()
    if (name, isa) not in _loaded:
        fut = _building.get((name, isa))
        if fut is not None:
            t0 = time.perf_counter()
            try:
                path = fut.result()
            except Exception as e:  # noqa: BLE001
                logger.warning("%s: build failed (%s); using the torch path", name, e)
                path = None
            _times["waited"] += time.perf_counter() - t0
        else:
            path = _build(name, isa)
        lib = ctypes.CDLL(path) if path is not None else None
        if lib is not None:
            for fn, argtypes in signatures.items():
                getattr(lib, fn).argtypes = argtypes
                getattr(lib, fn).restype = (restypes or {}).get(fn)
        if lib is not None:
            lib.pagoda_set_threads.argtypes = [ctypes.c_int]
            lib.pagoda_set_threads(_threads)
        _loaded[(name, isa)] = lib
    return _loaded[(name, isa)]


def set_threads(n: int) -> None:
    """Threads for torch's CPU ops and every OpenMP region of these kernels (each library keeps
    its own count: OpenMP's is per calling thread, and the engine steps on its own thread)."""
    global _threads
    _threads = n
    torch.set_num_threads(n)
    for lib in _loaded.values():
        if lib is not None:
            lib.pagoda_set_threads(n)
