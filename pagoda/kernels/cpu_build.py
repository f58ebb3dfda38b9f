"""Compile and load pagoda's small C kernels for the CPU (cpu_*.c beside this file).

Each is built with the system C compiler on first use (about a second) into PAGODA_CACHE_DIR,
keyed by the source's hash, and called through ctypes, which releases the GIL during the call.
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
from typing import Optional

import torch

logger = logging.getLogger("pagoda")
_HERE = os.path.dirname(os.path.abspath(__file__))
_loaded: dict[str, Optional[ctypes.CDLL]] = {}


def _cache_dir() -> str:
    root = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")
    return os.path.join(root, "kernels")


def _build(name: str) -> Optional[ctypes.CDLL]:
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
    return ctypes.CDLL(path)


def load(name: str, signatures: dict[str, list]) -> Optional[ctypes.CDLL]:
    """The compiled library `name` (cpu_<x>.c) with argtypes set, or None; built once per process."""
    if name not in _loaded:
        lib = _build(name)
        if lib is not None:
            for fn, argtypes in signatures.items():
                getattr(lib, fn).argtypes = argtypes
                getattr(lib, fn).restype = None
        _loaded[name] = lib
    return _loaded[name]
