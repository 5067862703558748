"""glibc's allocator told to keep the memory a CPU step frees, for the next step, instead of handing it back.

A prefill step allocates and frees activations of several megabytes per layer (a 2,048-token step of the
default model: tensors of 4-25 MB). By default glibc gives back memory like this (fresh mmap()s, trimmed or
deleted heaps), so each step faults the same memory in again, page by page, zeroed by the kernel: about
200,000 minor page faults (0.8 GB) over the two prefill steps of the long benchmark workload, none with this
setting. vLLM's CPU backend gets the same by preloading tcmalloc. The cost: memory freed after a peak stays
with the process, for the next peak.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit: blocks beyond it are always mmap()ed
TRIM_THRESHOLD = 2**31 - 1  # free memory at the top of a heap is given back only beyond this


def keep_freed_memory() -> bool:
    """Set the process's allocator (once is enough; again is harmless). False where it is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it (musl and macOS have other allocators)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not kept:
        log.warning("glibc refused the allocator settings (mallopt): CPU steps fault their memory in again")
    return kept
