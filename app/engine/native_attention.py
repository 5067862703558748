"""Attention and KV writes on the CPU through the C kernels (app/engine/native/paged_attention.c,
prefill_attention.c).

Decode: the SDPA path gathers every decode row's keys and values out of the paged cache into new tensors, a
copy of ~220 MB a step on the long benchmark workload, and masks rows to their run's longest; then SDPA reads
the copy again. The C kernel reads each row's own keys and values in place through its block table, once: 4-5x
faster per layer at 24 rows on this project's CPU machine (BENCHMARKS.md). Prefill: every chunk of a step in one
call a layer, flash-attention style over the chunk's block table, where SDPA took a call a chunk (~2x faster on
the benchmark's prompts). The KV write is one memcpy per token and head instead of two index_put calls a layer.

Chosen once per engine (`use_native`), like the Triton kernel on CUDA: on a CPU with a C compiler, after a
start-up check against SDPA on random data of the model's shape; anything else keeps the SDPA path.
"""
from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.engine import native_library
from app.engine.decode_attention import agrees, check_case
from app.engine.kv_cache import KVCache

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM, MAX_GROUPS = 256, 16  # the C kernel's compiled limits

_pointer, _i64, _int, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


@dataclass
class PrefillPlan:
    """A step's prefill chunks as the C prefill kernel takes them, built once a step for every layer."""
    tables: torch.Tensor  # (chunks, width) int64 block ids
    offsets: torch.Tensor  # (chunks,) int32: the chunk's first row in the step's flat token list
    lengths: torch.Tensor  # (chunks,) int32
    starts: torch.Tensor  # (chunks,) int32: the cache position of the chunk's first token
    scratch: torch.Tensor  # float32 workspace: every chunk's keys and values, staged once a layer

    @classmethod
    def build(cls, tables: list[list[int]], offsets: list[int], lengths: list[int], starts: list[int],
              key_tile: int, kv_heads: int, head_dim: int) -> "PrefillPlan":
        width = max(len(t) for t in tables)
        key_tiles = sum(-(-(s + n) // key_tile) for s, n in zip(starts, lengths))
        return cls(torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64),
                   *(torch.tensor(x, dtype=torch.int32) for x in (offsets, lengths, starts)),
                   torch.empty(2 * key_tiles * kv_heads * head_dim * key_tile, dtype=torch.float32))


class NativeKernels:
    """The library's functions, typed, over torch tensors."""

    def __init__(self, library: ctypes.CDLL):
        self._attention = library.paged_decode_attention
        self._attention.restype = _int
        self._attention.argtypes = [_pointer, _pointer, _pointer, _pointer, _pointer, _i64, _pointer,
                                    _int, _int, _int, _int, _i64, _int, _float, _int, _int]
        self._prefill = library.paged_prefill_attention
        self._prefill.restype = _int
        self._prefill.argtypes = [_pointer, _i64, _pointer, _pointer, _pointer, _pointer, _i64, _pointer, _pointer,
                                  _pointer, _int, _int, _int, _int, _i64, _int, _float, _int, _pointer, _i64, _int]
        self.key_tile = library.prefill_attention_key_tile()
        self._write = library.write_kv
        self._write.restype = None
        self._write.argtypes = [_pointer, _pointer, _pointer, _i64, _pointer, _i64, _pointer,
                                _int, _int, _int, _i64, _int, _int]

    def decode_attention(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                         tables: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """q (rows, H, hd); k_layer, v_layer (kv_heads, num_blocks, block_size, hd), one layer of the cache;
        tables (rows, width) int64 block ids; lengths (rows,) int32: row r attends its positions
        0..lengths[r]-1. -> (rows, H, hd), into `out` (contiguous) when given."""
        q = q.contiguous()
        rows, heads, head_dim = q.shape
        kv_heads, num_blocks, block_size = k_layer.shape[:3]
        assert k_layer.is_contiguous() and v_layer.is_contiguous() and k_layer.dtype == q.dtype
        assert tables.dtype == torch.int64 and tables.is_contiguous() and lengths.dtype == torch.int32
        assert tables.shape[0] == rows == lengths.shape[0]
        if out is None:
            out = torch.empty_like(q)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        status = self._attention(q.data_ptr(), k_layer.data_ptr(), v_layer.data_ptr(), out.data_ptr(), tables.data_ptr(),
                                 tables.shape[1], lengths.data_ptr(), rows, heads, kv_heads, head_dim, num_blocks,
                                 block_size, 1.0 / math.sqrt(head_dim), int(q.dtype == torch.bfloat16),
                                 torch.get_num_threads())
        if status != 0:
            raise ValueError(f"the C decode kernel does not take {heads} heads over {kv_heads} KV heads of "
                             f"size {head_dim}")
        return out

    def prefill_attention(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: PrefillPlan,
                          out: torch.Tensor) -> None:
        """q (tokens, H, hd) of the whole step, each row's heads contiguous; k_layer, v_layer (kv_heads,
        num_blocks, block_size, hd), one layer of the cache, already holding the chunks' own K,V. Writes each
        chunk's rows of out (tokens, H, hd), contiguous; its other rows are left as they are."""
        tokens, heads, head_dim = q.shape
        kv_heads, num_blocks, block_size = k_layer.shape[:3]
        assert q.stride(2) == 1 and (heads == 1 or q.stride(1) == head_dim)  # a size-1 dim has any stride
        assert out.is_contiguous() and out.shape == q.shape
        assert k_layer.is_contiguous() and v_layer.is_contiguous() and k_layer.dtype == q.dtype == out.dtype
        status = self._prefill(q.data_ptr(), q.stride(0), k_layer.data_ptr(), v_layer.data_ptr(), out.data_ptr(),
                               plan.tables.data_ptr(), plan.tables.shape[1], plan.offsets.data_ptr(),
                               plan.lengths.data_ptr(), plan.starts.data_ptr(), plan.lengths.shape[0], heads, kv_heads,
                               head_dim, num_blocks, block_size, 1.0 / math.sqrt(head_dim),
                               int(q.dtype == torch.bfloat16), plan.scratch.data_ptr(), plan.scratch.numel(),
                               torch.get_num_threads())
        if status != 0:
            raise ValueError(f"the C prefill kernel does not take {heads} heads over {kv_heads} KV heads of "
                             f"size {head_dim}, or its scratch is too small")

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
        """Both attention kernels once on random data of the model's shape against SDPA (decode: the Triton
        kernel's check data, decode_attention.check_case); False and a warning if either disagrees."""
        q, k, v, tables, lengths, want = check_case(torch.device("cpu"), dtype, kv_heads, groups, head_dim)
        k, v = (x.permute(2, 0, 1, 3).contiguous() for x in (k, v))  # the cache's (KVH, blocks, block_size, hd)
        got = self.decode_attention(q, k, v, tables.contiguous(), lengths)
        if not agrees(got, want, dtype, "C decode"):
            return False
        q, k, v, plan, want = prefill_check_case(dtype, kv_heads, groups, head_dim, self.key_tile)
        got = torch.zeros_like(q)
        self.prefill_attention(q, k, v, plan, got)
        return agrees(got, want, dtype, "C prefill")


def prefill_check_case(dtype: torch.dtype, kv_heads: int, groups: int, head_dim: int, key_tile: int):
    """Random data of a model's shape for the prefill kernel's check: chunks of 1 to 70 tokens from position 0
    or after a prefix, over scattered blocks of 16. -> q (tokens, H, hd), the cache's k, v (KVH, blocks, 16, hd),
    the plan, and SDPA's answer (tokens, H, hd) in float32."""
    g = torch.Generator().manual_seed(0)
    block_size, chunks = 16, [(1, 0), (37, 0), (20, 45), (70, 9)]  # (length, start)
    k, v = (torch.randn(kv_heads, 24, block_size, head_dim, generator=g).to(dtype) for _ in range(2))
    free = torch.randperm(24, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-(start + n) // block_size))] for n, start in chunks]
    offsets = [sum(n for n, _ in chunks[:i]) for i in range(len(chunks))]
    q = torch.randn(sum(n for n, _ in chunks), kv_heads * groups, head_dim, generator=g).to(dtype)
    want = []
    for (n, start), table, offset in zip(chunks, tables, offsets):
        keys, values = (x[:, table].flatten(1, 2)[:, :start + n].float() for x in (k, v))  # (KVH, positions, hd)
        mask = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]
        out = F.scaled_dot_product_attention(q[offset:offset + n].float().transpose(0, 1), keys, values,
                                             attn_mask=mask, enable_gqa=True)
        want.append(out.transpose(0, 1))
    plan = PrefillPlan.build(tables, offsets, [n for n, _ in chunks], [s for _, s in chunks], key_tile, kv_heads,
                             head_dim)
    return q, k, v, plan, torch.cat(want)


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
        raise ValueError("decode_attention=native: a C kernel failed its start-up check against SDPA (see the log)")
    return None
