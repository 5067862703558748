"""Run by test_decode_attention.py under TRITON_INTERPRET=1 (Triton's CPU interpreter), in its own process
because the interpreter is chosen when a kernel is defined. Exits non-zero with a message on a mismatch.

fp32 only: the interpreter's tl.dot gives garbage for bf16 inputs (a limitation of the interpreter; on a
GPU the engine checks bf16 against SDPA at start-up, and scripts/gpu_check.py checks the engine)."""
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
        k = torch.randn(5, kv_heads, 150, head_dim, generator=g)
        v = torch.randn(5, kv_heads, 150, head_dim, generator=g)
        q = torch.randn(4, kv_heads * groups, head_dim, generator=g)
        slots = torch.tensor([4, 0, 2, 1])
        lengths = torch.tensor([1, 64, 65, 150], dtype=torch.int32)  # one key, block edges, the whole slot
        got = decode_attention(q, k, v, slots, lengths)
        want = sdpa_reference(q, k, v, slots, lengths)
        error = ((got - want).norm() / want.norm()).item()
        if not error < 1e-5:
            sys.exit(f"kernel vs SDPA ({kv_heads} KV heads x {groups} groups, head {head_dim}): relative error {error}")


def static_step_cases() -> None:
    models = build_models("tiny", "cpu", torch.float32, Path("."))
    cache = KVCache(models.args, num_slots=9, max_seq_len=120, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    cache.k.normal_(), cache.v.normal_()  # earlier tokens' K,V
    slots, positions = [0, 2, 3, 7], [5, 119, 64, 1]  # idle rows 1, 4, 5, 6 between live ones
    tokens = [11, 12, 13, 14]
    logits = {}
    for kernel in (False, True):
        k0, v0 = cache.k.clone(), cache.v.clone()
        logits[kernel] = StaticDecoder(models.ours, cache, use_graphs=False, kernel=kernel).run(tokens, positions, slots)
        cache.k.copy_(k0), cache.v.copy_(v0)
    diff = (logits[True] - logits[False]).abs().max().item()
    if not diff < 1e-4:
        sys.exit(f"static decode step, kernel vs SDPA: max logit difference {diff}")


if __name__ == "__main__":
    kernel_cases()
    static_step_cases()
    print("ok")
