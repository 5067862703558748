"""Builds and loads the engine's C kernels for the CPU (app/engine/native/*.c), once per machine.

The sources are compiled on first use with the machine's C compiler (`$CC`, else `cc`), for this CPU
(`-march=native`), into one library in a cache folder keyed by the sources, the flags, the compiler and the CPU's feature
flags, and loaded with ctypes: a few milliseconds after the first start, ~1 s on it. No torch headers are
involved (the kernels take raw pointers), so no build system is either. Where no compiler is installed, or the
build fails, `load()` returns None and the engine keeps its torch paths: slower, never wrong. A new build
removes the folder's libraries that no process has loaded for a week (those of earlier versions or CPUs).

OpenMP: the library is linked against libgomp by its soname, which torch has already loaded from its own
wheel, so the kernels run on torch's thread pool rather than a second one competing for the same cores.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch  # imported first, unused here: its libgomp is the one the library binds to

from app.engine.config import DEFAULT_CACHE_DIR

log = logging.getLogger(__name__)

NATIVE_DIR = Path(__file__).parent / "native"
SOURCES = [NATIVE_DIR / name for name in ("paged_attention.c", "prefill_attention.c", "layer_ops.c",
                                          "few_rows_linear.c")]
HEADERS = [NATIVE_DIR / "bf16.h"]
# -ffast-math at compile time only (expf vectorizes through libmvec); linking without it keeps gcc's
# crtfastmath.o, which would switch the whole process to flush-to-zero, out of the library.
COMPILE_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-fPIC"]
LINK_FLAGS = ["-shared", "-fopenmp", "-lmvec", "-lm"]
BUILD_TIMEOUT_S = 120
# Each change of the sources, flags, compiler or CPU builds a new library beside the old ones; a library no
# process has loaded for this long is removed when a new one is built (loading one marks it used).
STALE_AFTER_S = 7 * 24 * 3600


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTSERVE_NATIVE_CACHE_DIR", DEFAULT_CACHE_DIR / "native"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCES and link them into target, atomically (a half-written library is never loaded)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        objects = [str(Path(work) / f"{source.stem}.o") for source in SOURCES]
        lib = Path(work) / target.name
        commands = [[compiler, *COMPILE_FLAGS, "-c", str(source), "-o", obj] for source, obj in zip(SOURCES, objects)]
        for command in commands + [[compiler, *objects, "-o", str(lib), *LINK_FLAGS]]:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(lib, target)


def _mark_used(library: Path) -> None:
    try:
        os.utime(library)
    except OSError:  # a read-only cache: nothing is removed from it either
        pass


def _remove_stale(keep: Path) -> None:
    """Remove the cache folder's other libraries that no process has loaded for STALE_AFTER_S."""
    for other in keep.parent.glob("softserve-kernels-*.so"):
        try:
            if other != keep and time.time() - other.stat().st_mtime > STALE_AFTER_S:
                other.unlink()
                log.info("removed %s, unused for %d days", other, STALE_AFTER_S // 86400)
        except OSError:  # another process removed it first, or the folder is not ours to change
            pass


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, building it if this machine has none yet; None (and a warning) if it cannot."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler (%s) on this machine: the CPU keeps torch's forms of the C kernels (slower)",
                    os.environ.get("CC", "cc"))
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = [path.read_text() for path in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*sources, *COMPILE_FLAGS, *LINK_FLAGS, version, _cpu_flags()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"softserve-kernels-{key}.so"
    try:
        if target.exists():
            _mark_used(target)
        else:
            log.info("building the CPU kernels into %s", target)
            _build(compiler, target)
            _remove_stale(target)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the CPU kernels could not be built or loaded (%s): the CPU keeps torch's forms (slower)", e)
        return None
