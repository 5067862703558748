"""Host memory for serving on CPU: the KV cache in huge pages, and glibc's allocator keeping what a step frees.

Huge pages: the KV cache is read block by block at scattered places (a 16-position block of one head is 4 KiB
in float32, one small page), so gathering a decode step's keys missed the TLB on nearly every block. In
transparent huge pages (2 MiB, asked for with madvise) the gather of 24 rows' keys over 30 layers took 14-15
instead of 28-32 ms on this project's CPU machine. The weights, read in order, gained nothing from them.

Allocator: a prefill step allocates and frees activations of several megabytes per layer (a 2,048-token step
of the default model: tensors of 4-25 MB). By default glibc gives memory like this back (fresh mmap()s,
trimmed or deleted heaps), so each step faults the same memory in again, page by page, zeroed by the kernel:
about 200,000 minor page faults (0.8 GB) over the two prefill steps of the long benchmark workload, none once
glibc keeps it. vLLM's CPU backend gets the same by preloading tcmalloc. The cost: memory freed after a peak
stays with the process, for the next peak.
"""
from __future__ import annotations

import ctypes
import logging
import mmap

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit: blocks beyond it are always mmap()ed
TRIM_THRESHOLD = 2**31 - 1  # free memory at the top of a heap is given back only beyond this


def keep_freed_memory() -> bool:
    """Set the process's allocator (once is enough; again is harmless). False where it is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl, macOS have other allocators)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not kept:
        log.warning("glibc refused the allocator settings (mallopt): CPU steps fault their memory in again")
    return kept


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in anonymous memory that asks for transparent huge pages (where the kernel has them:
    /sys/kernel/mm/transparent_hugepage/enabled set to always or madvise; elsewhere small pages, same values).
    Its pages are touched here, so the memory is taken at start-up, as torch.zeros does."""
    size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages
            pass
    tensor = torch.frombuffer(memory, dtype=dtype, count=torch.Size(shape).numel()).view(shape)
    tensor.zero_()  # anonymous memory reads as zeros; writing them takes the pages now
    return tensor
