"""Attention over the paged cache: its two ways of running prefill chunks agree beside decode rows, and both
equal plain attention over each sequence's keys laid out contiguously; the same with the CPU's C kernels
writing K,V and running decode attention (app/engine/native_attention.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.engine.attention import PagedAttention, PrefillChunk, length_groups
from app.engine.kv_cache import KVCache
from app.engine.model import ModelArgs
from app.engine.native_attention import use_native

ARGS = ModelArgs("llama", 100, 48, 96, 2, 6, 2, 8)  # 3 query heads per KV head
B = 4  # positions per block: every sequence below spans several, scattered over the pool


def step_inputs():
    """Two decode rows and three prefill chunks: one from position 0 (no prefix), one after a 7-position
    prefix, one continuing a chunked prompt at position 30. Block tables are scattered, not in order."""
    g = torch.Generator().manual_seed(3)
    order = (torch.randperm(60, generator=g) + 1).tolist()  # block 0 is scratch
    tables = [order[i * 12:(i + 1) * 12] for i in range(5)]
    decode = [(tables[0], 12), (tables[1], 40)]  # (table, position)
    chunks, positions, slots = [], [p for _, p in decode], [t[p // B] * B + p % B for t, p in decode]
    for table, start, length in ((tables[2], 0, 9), (tables[3], 7, 4), (tables[4], 30, 13)):
        chunks.append(PrefillChunk(table, len(positions), length, start))
        positions += range(start, start + length)
        slots += [table[p // B] * B + p % B for p in range(start, start + length)]
    return slots, positions, [t for t, _ in decode], chunks


@pytest.fixture(params=["torch", "native"])
def native(request):
    """None: torch's KV write and SDPA decode; else the C kernels (required: this machine has a compiler)."""
    if request.param == "torch":
        return None
    return use_native("native", torch.device("cpu"), torch.float32, ARGS)


def test_padded_and_per_chunk_prefill_attention_agree_with_contiguous_attention(native):
    slots, positions, decode_tables, chunks = step_inputs()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, len(slots), ARGS.num_heads, ARGS.head_dim, generator=g)
    k = torch.randn(1, len(slots), ARGS.num_kv_heads, ARGS.head_dim, generator=g)
    v = torch.randn(1, len(slots), ARGS.num_kv_heads, ARGS.head_dim, generator=g)
    outs = {}
    for padded in (False, True):
        cache = KVCache(ARGS, num_blocks=61, block_size=B, device="cpu", dtype=torch.float32)
        cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(1)))  # earlier tokens
        cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(2)))
        attention = PagedAttention(cache, slots, positions, decode_tables, chunks, batch_chunks=padded, native=native)
        outs[padded] = attention.attend(1, q, k, v)
    assert outs[True].shape == (1, len(slots), ARGS.num_heads, ARGS.head_dim)
    assert (outs[True] - outs[False]).abs().max() < 1e-5

    # The reference: each query over its sequence's keys 0..position, read in order from the blocks.
    kc, vc = cache.flat(1)
    tables = decode_tables + [c.table for c in chunks]
    rows = [(0, 0), (1, 1)] + [(2 + i, c.offset + t) for i, c in enumerate(chunks) for t in range(c.length)]
    for seq, row in rows:
        n = positions[row] + 1
        seq_slots = [tables[seq][p // B] * B + p % B for p in range(n)]
        keys, values = kc[:, seq_slots], vc[:, seq_slots]  # (KVH, n, hd)
        query = q[0, row].reshape(ARGS.num_kv_heads, -1, ARGS.head_dim)
        want = F.scaled_dot_product_attention(query, keys, values).reshape(ARGS.num_heads, ARGS.head_dim)
        assert (outs[False][0, row] - want).abs().max() < 1e-5


def test_decode_rows_of_mixed_lengths_are_grouped_in_runs_by_length_and_each_attends_to_exactly_its_own_keys(native):
    positions = [41, 40, 20, 6, 5, 3, 1]  # longest first, as the runner orders decode rows
    assert length_groups([p + 1 for p in positions]) == [(0, 2), (2, 3), (3, 5), (5, 7)]  # 4 runs at most
    assert length_groups([31, 30, 25]) == [(0, 3)]
    assert length_groups([10, 40, 12]) == [(0, 3)]  # out of order: one run, padded to its longest (40)
    order = (torch.randperm(80, generator=torch.Generator().manual_seed(4)) + 1).tolist()
    tables = [order[i * 11:(i + 1) * 11] for i in range(len(positions))]
    slots = [t[p // B] * B + p % B for t, p in zip(tables, positions)]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, len(slots), ARGS.num_heads, ARGS.head_dim, generator=g)
    k = torch.randn(1, len(slots), ARGS.num_kv_heads, ARGS.head_dim, generator=g)
    v = torch.randn(1, len(slots), ARGS.num_kv_heads, ARGS.head_dim, generator=g)
    cache = KVCache(ARGS, num_blocks=81, block_size=B, device="cpu", dtype=torch.float32)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    out = PagedAttention(cache, slots, positions, tables, [], native=native).attend(0, q, k, v)
    kc, vc = cache.flat(0)
    for row, (table, position) in enumerate(zip(tables, positions)):
        seq_slots = [table[p // B] * B + p % B for p in range(position + 1)]
        query = q[0, row].reshape(ARGS.num_kv_heads, -1, ARGS.head_dim)
        want = F.scaled_dot_product_attention(query, kc[:, seq_slots], vc[:, seq_slots])
        assert (out[0, row] - want.reshape(ARGS.num_heads, ARGS.head_dim)).abs().max() < 1e-5
