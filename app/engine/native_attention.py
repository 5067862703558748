"""Decode attention and KV writes on the CPU through the C kernels (app/engine/native/paged_attention.c).

The SDPA path gathers every decode row's keys and values out of the paged cache into new tensors, a copy of
~220 MB a step on the long benchmark workload, and masks rows to their run's longest; then SDPA reads the
copy again. The C kernel reads each row's own keys and values in place through its block table, once: 4-5x
faster per layer at 24 rows on this project's CPU machine (BENCHMARKS.md). The KV write is one memcpy per
token and head instead of two index_put calls a layer.

Chosen once per engine (`use_native`), like the Triton kernel on CUDA: on a CPU with a C compiler, after a
start-up check against SDPA on random data of the model's shape; anything else keeps the SDPA path.
"""
from __future__ import annotations

import ctypes
import logging
import math

import torch

from app.engine import native_library
from app.engine.decode_attention import agrees, check_case
from app.engine.kv_cache import KVCache

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM, MAX_GROUPS = 256, 16  # the C kernel's compiled limits

_pointer, _i64, _int, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class NativeKernels:
    """The library's two functions, typed, over torch tensors."""

    def __init__(self, library: ctypes.CDLL):
        self._attention = library.paged_decode_attention
        self._attention.restype = _int
        self._attention.argtypes = [_pointer, _pointer, _pointer, _pointer, _pointer, _i64, _pointer,
                                    _int, _int, _int, _int, _i64, _int, _float, _int, _int]
        self._write = library.write_kv
        self._write.restype = None
        self._write.argtypes = [_pointer, _pointer, _pointer, _i64, _pointer, _i64, _pointer,
                                _int, _int, _int, _i64, _int, _int]

    def decode_attention(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                         tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """q (rows, H, hd); k_layer, v_layer (kv_heads, num_blocks, block_size, hd), one layer of the cache;
        tables (rows, width) int64 block ids; lengths (rows,) int32: row r attends its positions
        0..lengths[r]-1. -> (rows, H, hd)."""
        q = q.contiguous()
        rows, heads, head_dim = q.shape
        kv_heads, num_blocks, block_size = k_layer.shape[:3]
        assert k_layer.is_contiguous() and v_layer.is_contiguous() and k_layer.dtype == q.dtype
        assert tables.dtype == torch.int64 and tables.is_contiguous() and lengths.dtype == torch.int32
        assert tables.shape[0] == rows == lengths.shape[0]
        out = torch.empty_like(q)
        status = self._attention(q.data_ptr(), k_layer.data_ptr(), v_layer.data_ptr(), out.data_ptr(), tables.data_ptr(),
                                 tables.shape[1], lengths.data_ptr(), rows, heads, kv_heads, head_dim, num_blocks,
                                 block_size, 1.0 / math.sqrt(head_dim), int(q.dtype == torch.bfloat16),
                                 torch.get_num_threads())
        if status != 0:
            raise ValueError(f"the C decode kernel does not take {heads} heads over {kv_heads} KV heads of "
                             f"size {head_dim}")
        return out

    def write(self, cache: KVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (tokens, kv_heads, head_dim), each head's values contiguous -> the layer's cache at slots
        (tokens,) int64: what KVCache.write does."""
        tokens, kv_heads, head_dim = k.shape
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        assert k.dtype == v.dtype == k_cache.dtype and slots.dtype == torch.int64 and slots.is_contiguous()
        for x in (k, v):  # each head's values contiguous, heads one after another (a size-1 dim has any stride)
            assert (kv_heads == 1 or x.stride(1) == head_dim) and x.stride(2) == 1
        assert slots.shape[0] == tokens
        self._write(k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                    slots.data_ptr(), tokens, kv_heads, head_dim, k_cache.shape[1] * k_cache.shape[2],
                    k.element_size(), torch.get_num_threads())

    def matches_sdpa(self, dtype: torch.dtype, kv_heads: int, groups: int, head_dim: int) -> bool:
        """The kernel once on the Triton kernel's check data (decode_attention.check_case) against SDPA;
        False and a warning if it disagrees."""
        q, k, v, tables, lengths, want = check_case(torch.device("cpu"), dtype, kv_heads, groups, head_dim)
        k, v = (x.permute(2, 0, 1, 3).contiguous() for x in (k, v))  # the cache's (KVH, blocks, block_size, hd)
        got = self.decode_attention(q, k, v, tables.contiguous(), lengths)
        return agrees(got, want, dtype, "C")


def use_native(choice: str, device: torch.device, dtype: torch.dtype, args) -> NativeKernels | None:
    """The engine's decode_attention setting -> the C kernels for its eager steps, or None (SDPA).
    auto: on a CPU where they build and pass their check; native: required (ValueError otherwise)."""
    required = choice == "native"
    if choice not in ("auto", "native") or device.type != "cpu":
        if required:
            raise ValueError(f"decode_attention=native runs on the CPU, not {device.type}")
        return None
    groups = args.num_heads // args.num_kv_heads
    unsupported = (f"the model is {str(dtype).removeprefix('torch.')}" if dtype not in DTYPES else
                   f"head size {args.head_dim} is over {MAX_HEAD_DIM}" if args.head_dim > MAX_HEAD_DIM else
                   f"{groups} query heads a KV head is over {MAX_GROUPS}" if groups > MAX_GROUPS else None)
    if unsupported:
        if required:
            raise ValueError(f"decode_attention=native: {unsupported}")
        return None
    library = native_library.load()
    if library is None:
        if required:
            raise ValueError("decode_attention=native: the C kernels could not be built here (see the log)")
        return None
    kernels = NativeKernels(library)
    if kernels.matches_sdpa(dtype, args.num_kv_heads, groups, args.head_dim):
        return kernels
    if required:
        raise ValueError("decode_attention=native: the C kernel failed its start-up check against SDPA (see the log)")
    return None
