"""Decode attention as one Triton kernel: one query token per row, each row reading only its own live keys.

SDPA takes one key length for a whole batch, so each decode row reads (and masks) as many cached keys
as the longest row, and on a GPU its kernels are built for long query blocks, not the handful of query
heads that share a KV head in decode. This kernel runs one program per (row, KV head): it loads that
head's group of query heads once, streams only the row's own `length` keys and values from the paged
cache, finding each key's block in the row's block table, with an online softmax (as FlashAttention does),
and writes the group's outputs.
Lengths are read on the device, so the kernel can be captured in a CUDA graph and replayed as lengths grow.

Used on CUDA when Triton is importable and the head size is a power of two (`kernel_supported`), after a
check against SDPA at start-up (`kernel_matches_sdpa`); everywhere else decode uses SDPA.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode uses SDPA
    triton = None

BLOCK_KEYS = 64


if triton is not None:
    @triton.jit
    def _decode_kernel(Q, K, V, Out, Tables, Lengths, scale,
                       stride_qr, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
                       stride_tr, stride_or, stride_oh,
                       GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       PAGE: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(Lengths + row)
        g = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUPS + g
        q = tl.load(Q + row * stride_qr + heads[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUPS)[:, None], other=0.0)
        best = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUPS_PAD], tl.float32)
        acc = tl.zeros([GROUPS_PAD, HEAD_DIM], tl.float32)
        start = tl.full([], 0, tl.int32)  # a tensor, not a Python int: the loop carries it
        while start < length:  # a while loop, not range(): Triton's CPU interpreter (the tests) needs it
            keys = start + tl.arange(0, BLOCK)
            live = keys < length
            # Each key's block from the row's block table, then its offset in that block.
            blocks = tl.load(Tables + row * stride_tr + keys // PAGE, mask=live, other=0).to(tl.int64)
            k_rows = K + blocks * stride_kb + (keys % PAGE) * stride_ko + kv_head * stride_kh
            v_rows = V + blocks * stride_vb + (keys % PAGE) * stride_vo + kv_head * stride_vh
            k = tl.load(k_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(live[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(v_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
            start += BLOCK
        out = acc / total[:, None]
        tl.store(Out + row * stride_or + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=(g < GROUPS)[:, None])


def kernel_supported(device: torch.device, head_dim: int) -> bool:
    return (triton is not None and device.type == "cuda" and head_dim >= 16
            and head_dim & (head_dim - 1) == 0)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """q (rows, H, hd); k_cache/v_cache (blocks, block_size, KVH, hd) of one layer; tables (rows, max_blocks)
    and lengths (rows,) on the device: row r attends its positions 0..lengths[r]-1 through tables[r].
    -> (rows, H, hd)."""
    rows, heads, head_dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = heads // kv_heads
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and tables.stride(-1) == 1
    out = torch.empty_like(q)
    _decode_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, out, tables, lengths, 1.0 / math.sqrt(head_dim),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        GROUPS=groups, GROUPS_PAD=max(16, triton.next_power_of_2(groups)), HEAD_DIM=head_dim,
        PAGE=page, BLOCK=BLOCK_KEYS, PRECISION="ieee" if q.dtype == torch.float32 else None,  # fp32: no TF32
        num_warps=4)
    return out


def sdpa_reference(q, k_cache, v_cache, tables, lengths) -> torch.Tensor:
    """The same attention through SDPA, row by row (for checks)."""
    page = k_cache.shape[1]
    out = []
    for r in range(q.shape[0]):
        n = int(lengths[r])
        positions = torch.arange(n, device=q.device)
        blocks = tables[r, positions // page]
        keys = k_cache[blocks, positions % page].transpose(0, 1)  # (KVH, n, hd)
        values = v_cache[blocks, positions % page].transpose(0, 1)
        qr = q[r].reshape(keys.shape[0], -1, q.shape[-1])  # (KVH, G, hd)
        out.append(F.scaled_dot_product_attention(qr, keys, values).reshape(q.shape[1:]))
    return torch.stack(out)


CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative error against SDPA in float32


def check_case(device: torch.device, dtype: torch.dtype, kv_heads: int, groups: int, head_dim: int):
    """Random data of a model's shape for a decode kernel's start-up check: 4 rows over scattered blocks,
    lengths around block edges. -> q, k, v (blocks, block_size, KVH, hd), tables, lengths, and SDPA's answer."""
    g = torch.Generator(device="cpu").manual_seed(0)
    blocks, page = 64, 16  # 4 rows of up to 13 blocks, all distinct
    k = torch.randn(blocks, page, kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(blocks, page, kv_heads, head_dim, generator=g).to(device, dtype)
    q = torch.randn(4, kv_heads * groups, head_dim, generator=g).to(device, dtype)
    tables = torch.randperm(blocks, generator=g)[:4 * 13].view(4, 13).to(device)
    lengths = torch.tensor([1, 63, 64, 200], device=device, dtype=torch.int32)
    return q, k, v, tables, lengths, sdpa_reference(q.float(), k.float(), v.float(), tables, lengths)


def agrees(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, kernel: str) -> bool:
    """Whether a kernel's check output is SDPA's within the dtype's tolerance; a warning if not."""
    error = ((got.float() - want).norm() / want.norm()).item()
    if error < CHECK_TOLERANCE[dtype]:
        return True
    log.warning("the %s kernel disagrees with SDPA (relative error %.2e); attention keeps SDPA", kernel, error)
    return False


def kernel_matches_sdpa(device: torch.device, dtype: torch.dtype, kv_heads: int, groups: int, head_dim: int) -> bool:
    """Run the kernel once on random data of the model's shape against SDPA; False (and a warning) if it
    fails or disagrees, so that a broken Triton install costs speed, never correctness."""
    q, k, v, tables, lengths, want = check_case(device, dtype, kv_heads, groups, head_dim)
    try:
        got = decode_attention(q, k, v, tables, lengths)
    except Exception as e:  # a Triton that cannot compile here
        log.warning("the Triton decode kernel failed (%s); decode attention uses SDPA", e)
        return False
    return agrees(got, want, dtype, "Triton decode")


def use_kernel(choice: str, device: torch.device, dtype: torch.dtype, args) -> bool:
    """The engine's decode_attention setting -> whether the static decode steps use the kernel.
    auto: where it is supported and passes its check; triton: required (ValueError otherwise); sdpa and
    native (the CPU's C kernel, app/engine/native_attention.py, for eager steps): never."""
    if choice not in ("auto", "triton", "native", "sdpa"):
        raise ValueError(f"decode_attention must be auto, triton, native or sdpa, not {choice!r}")
    if choice in ("sdpa", "native"):
        return False
    if not kernel_supported(device, args.head_dim):
        if choice == "triton":
            raise ValueError(f"the Triton decode kernel needs CUDA, Triton and a power-of-two head size "
                             f"(device {device}, head size {args.head_dim})")
        return False
    if kernel_matches_sdpa(device, dtype, args.num_kv_heads, args.num_heads // args.num_kv_heads, args.head_dim):
        return True
    if choice == "triton":
        raise ValueError("the Triton decode kernel failed its start-up check against SDPA (see the log)")
    return False
