"""Run by test_decode_attention.py under TRITON_INTERPRET=1 (Triton's CPU interpreter), in its own process
because the interpreter is chosen when a kernel is defined. Exits non-zero with a message on a mismatch.

fp32 only: the interpreter's tl.dot gives garbage for bf16 inputs (a limitation of the interpreter; on a
GPU the engine checks bf16 against SDPA at start-up, and tests/test_cuda.py checks the engine)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from app.bench.workload import build_models
from app.engine.decode_attention import decode_attention, sdpa_reference
from app.engine.decode_graphs import StaticDecoder
from app.engine.kv_cache import KVCache


def kernel_cases() -> None:
    for kv_heads, groups, head_dim in ((2, 3, 16), (1, 4, 64), (3, 1, 32), (2, 16, 16)):
        g = torch.Generator().manual_seed(kv_heads * 100 + groups)
        k = torch.randn(40, 16, kv_heads, head_dim, generator=g)  # 40 blocks of 16 positions
        v = torch.randn(40, 16, kv_heads, head_dim, generator=g)
        q = torch.randn(4, kv_heads * groups, head_dim, generator=g)
        tables = torch.randperm(40, generator=g)[:40].view(4, 10)  # scattered blocks
        lengths = torch.tensor([1, 64, 65, 160], dtype=torch.int32)  # one key, block edges, the whole table
        got = decode_attention(q, k, v, tables, lengths)
        want = sdpa_reference(q, k, v, tables, lengths)
        error = ((got - want).norm() / want.norm()).item()
        if not error < 1e-5:
            sys.exit(f"kernel vs SDPA ({kv_heads} KV heads x {groups} groups, head {head_dim}): relative error {error}")


def static_step_cases() -> None:
    models = build_models("tiny", "cpu", torch.float32, Path("."))
    cache = KVCache(models.args, num_blocks=40, block_size=16, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    cache.k.normal_(), cache.v.normal_()  # earlier tokens' K,V
    order = (torch.randperm(39) + 1).tolist()  # block 0 is scratch
    tables = [order[0:8], order[8:16], order[16:24], order[24:32]]
    positions, tokens = [5, 119, 64, 1], [11, 12, 13, 14]
    logits = {}
    for kernel in (False, True):
        k0, v0 = cache.k.clone(), cache.v.clone()
        decoder = StaticDecoder(models.ours, cache, max_rows=8, max_seq_len=128, use_graphs=False, kernel=kernel)
        logits[kernel] = decoder.run(tokens, positions, tables)
        cache.k.copy_(k0), cache.v.copy_(v0)
    diff = (logits[True] - logits[False]).abs().max().item()
    if not diff < 1e-4:
        sys.exit(f"static decode step, kernel vs SDPA: max logit difference {diff}")


if __name__ == "__main__":
    kernel_cases()
    static_step_cases()
    print("ok")
