"""The engine's limits and switches, with their defaults: `Settings` (app/config.py) takes its defaults from
here, so each is written once."""
from __future__ import annotations

from dataclasses import dataclass

CPU_KV_CACHE_BYTES = 2 << 30  # the KV budget on CPU when none is set (on CUDA: 90% of the free memory)


@dataclass
class EngineConfig:
    max_seq_len: int = 2048  # positions per sequence: virtual tokens + prompt + generated tokens
    kv_cache_bytes: int = CPU_KV_CACHE_BYTES
    block_size: int = 16  # positions per KV block
    prefix_caching: bool = True  # reuse cached blocks of equal prefixes (same task prompt, same tokens)
    max_batched_tokens: int = 2048  # tokens per forward (prefill chunks + decode tokens)
    max_num_seqs: int = 256  # sequences running at once (the static decode steps' largest bucket)
    max_waiting: int = 256  # requests waiting, each with all its inputs
    prompt_cache_bytes: int | None = None  # CPU memory for loaded prompts; beyond it LRU ones are unloaded
    # Decode-only steps at static shapes (app/engine/decode_graphs.py). None: on CUDA, replayed as CUDA
    # graphs; off on CPU. True on CPU runs the static steps eagerly (tests); False: always the dynamic path.
    static_decode: bool | None = None
    # Decode attention of the static steps: "auto" (the Triton kernel on CUDA when it is importable and
    # passes its start-up check, else SDPA), "triton" (required) or "sdpa".
    decode_attention: str = "auto"
    # Linear layers and the LM head at inference (app/engine/linear_kernels.py): "auto" (oneDNN with packed
    # weights on CPU where it passes its start-up check, else F.linear), "onednn" (required) or "torch".
    linear_kernel: str = "auto"
