"""The serving cache's attention: its two ways of running prefill chunks agree, beside decode rows."""
from __future__ import annotations

import torch

from app.engine.kv_cache import CachedAttention, KVCache, PrefillChunk
from app.engine.model import ModelArgs

ARGS = ModelArgs("llama", 100, 48, 96, 2, 6, 2, 8)  # 3 query heads per KV head


def step_inputs():
    """Two decode rows (slots 5 and 1: not dense) and three prefill chunks: one from position 0 (no prefix),
    one after a 7-position prefix, one continuing a chunked prompt at position 30."""
    decode = [(5, 12), (1, 40)]  # (slot, position)
    chunks, slots, positions = [], [s for s, _ in decode], [p for _, p in decode]
    for slot, start, length in ((0, 0, 9), (3, 7, 4), (2, 30, 13)):
        chunks.append(PrefillChunk(slot, len(slots), length, start))
        slots += [slot] * length
        positions += range(start, start + length)
    return slots, positions, len(decode), chunks


def test_padded_and_per_chunk_prefill_attention_agree():
    slots, positions, num_decode, chunks = step_inputs()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, len(slots), ARGS.num_heads, ARGS.head_dim, generator=g)
    k = torch.randn(1, len(slots), ARGS.num_kv_heads, ARGS.head_dim, generator=g)
    v = torch.randn(1, len(slots), ARGS.num_kv_heads, ARGS.head_dim, generator=g)
    outs = {}
    for padded in (False, True):
        cache = KVCache(ARGS, num_slots=6, max_seq_len=64, device="cpu", dtype=torch.float32)
        cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(1)))  # earlier tokens
        cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(2)))
        attention = CachedAttention(cache, slots, positions, num_decode, chunks, batch_chunks=padded)
        outs[padded] = attention.attend(1, q, k, v)
    assert outs[True].shape == (1, len(slots), ARGS.num_heads, ARGS.head_dim)
    assert (outs[True] - outs[False]).abs().max() < 1e-5
    # The prefill rows see their own chunk causally: token 0 of the first chunk attends only itself.
    first = num_decode
    assert torch.allclose(outs[False][0, first], v[0, first].repeat_interleave(3, 0), atol=1e-6)
