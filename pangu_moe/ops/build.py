"""Build the CPU kernels (`kernels/cpu/*.cc`) once into a shared library, on first use.

MindSpore's own AOT compile runs g++ without -O (about 2x slower kernels, measured
on MindSpore 2.10), so the library is built here with -O2 and OpenMP into a cache folder keyed by a hash of the
sources and flags: an edited kernel gets a new library, and concurrent processes (msrun workers)
each write a temporary file and rename it, so none ever loads a half-written library.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"  # package data (pyproject.toml)
CACHE_DIR = Path.home() / ".cache" / "pangu_moe" / "kernels"
# -ffp-contract=off: no fused multiply-adds (aarch64 would fuse), so sums round as the reference's do.
FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp")
LIBS = ("-lmvec",) if platform.machine() == "x86_64" else ()  # glibc's vector exp (kernels/cpu/moe_gating.cc)
LIBRARY = "libpangu_moe_cpu.so"


def set_threads(threads):
    """OpenMP threads of the CPU kernels' parallel loops in this process (0: every core)."""
    ctypes.CDLL(library_path()).PanguMoeSetThreads(threads)


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be built (no compiler, missing sources, compile error)."""


def _sources():
    """The kernel sources kernels/cpu/*.cc (list of Path); raises KernelBuildError if there are none."""
    sources = sorted((KERNELS_DIR / "cpu").glob("*.cc"))
    if not sources:
        raise KernelBuildError(f"runtime.kernels = custom: no kernel sources in {KERNELS_DIR / 'cpu'}; reinstall "
                               f"pangu_moe (pip install .) or use runtime.kernels = reference")
    return sources


_BUILT = {}  # (sources folder, cache folder) -> library path: each op's Custom asks, so hash the sources once


def library_path():
    """Path of the built CPU kernel library, building it if needed. Raises KernelBuildError."""
    key = (KERNELS_DIR, CACHE_DIR)
    if key not in _BUILT:
        _BUILT[key] = _build()
    return _BUILT[key]


def _target(sources):
    """The cache path of the library of `sources` (their bytes, the headers' and the flags name it)."""
    headers = sorted(KERNELS_DIR.glob("*/*.h"))
    digest = hashlib.sha256(" ".join(FLAGS + LIBS).encode())
    for path in sources + headers:
        digest.update(path.name.encode() + path.read_bytes())
    return CACHE_DIR / digest.hexdigest()[:16] / LIBRARY


def built_library():
    """The path of the library of the current sources if it is already built, else None (nothing is compiled)."""
    try:
        target = _target(_sources())
    except KernelBuildError:
        return None
    return str(target) if target.exists() else None


def _build():
    """Find the library for the current sources in the cache, or compile it there; returns its path."""
    sources = _sources()
    target = _target(sources)
    if target.exists():
        return str(target)
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelBuildError("runtime.kernels = custom needs a C++17 compiler (g++) to build kernels/cpu; "
                               "install one (e.g. apt install g++) or use runtime.kernels = reference")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    result = subprocess.run([compiler, *FLAGS, "-o", partial, *map(str, sources), *LIBS], capture_output=True,
                            text=True)
    if result.returncode != 0:
        os.unlink(partial)
        first_error = next((line for line in result.stderr.splitlines() if ": error:" in line), result.stderr[:300])
        raise KernelBuildError(f"building kernels/cpu failed: {first_error.strip()}")
    os.replace(partial, target)
    return str(target)
