"""The engine's knobs, each default, limit and meaning written once, and how a config meets a model: its
context bounds max_seq_len, and an unset KV budget is measured on its device.

`EngineKnobs` are the knobs a server setting spells the same way: `Settings` (app/config.py) inherits them,
so each is also `SOFTSERVE_<NAME>`. `EngineConfig` adds the three the engine takes in its own units (bytes,
and the static decode steps' three states); `Settings.engine` converts the settings' spelling of those
(`kv_cache_gb`, `prompt_cache_mb`, `cuda_graphs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from app.engine.model import Transformer

DEFAULT_CACHE_DIR = Path("~/.cache/softserve").expanduser()  # the default model's download, converted GGUF files
WEIGHTS_READ_TIMEOUT_S = 60.0  # a weights file that gives no bytes for this long fails the load
CPU_KV_CACHE_BYTES = 2 << 30  # the KV budget on CPU when none is set
CUDA_KV_CACHE_SHARE = 0.9  # the KV budget on CUDA when none is set: this share of the memory free after the weights


class EngineKnobs(BaseModel):
    """The knobs that Settings inherits as they are (SOFTSERVE_MAX_SEQ_LEN, ...)."""
    model_config = ConfigDict(extra="forbid")

    max_seq_len: int = Field(2048, ge=16, description="positions per request: virtual tokens + input + max_tokens "
                                                      "(at most the model's context)")
    block_size: int = Field(16, ge=1, le=256, description="positions per KV cache block")
    prefix_caching: bool = Field(True, description="reuse the KV blocks of equal prefixes (same prompt, same tokens) "
                                                   "across requests")
    max_batched_tokens: int = Field(2048, ge=16, description="tokens per forward pass (prefill chunks + decode tokens)")
    max_num_seqs: int = Field(256, ge=1, description="sequences running at once (the static decode steps' largest "
                                                     "bucket)")
    max_waiting: int = Field(256, ge=1, description="queued requests, each with all its inputs, beyond which new "
                                                    "ones get 429")
    decode_attention: Literal["auto", "triton", "native", "sdpa"] = Field(
        "auto", description="decode attention: auto (on CUDA the Triton kernel when it is installed, on CPU the C "
                            "kernels when a C compiler builds them; each after its start-up check), triton, native "
                            "(on CPU the C kernels attend prefill chunks too), or sdpa")
    layer_ops: Literal["auto", "native", "torch"] = Field(
        "auto", description="RMSNorm, RoPE and SiLU-and-mul at inference: auto (the C kernels on CPU when a C compiler "
                            "builds them and they pass their start-up check, else torch), native, or torch")
    linear_kernel: Literal["auto", "native", "onednn", "torch"] = Field(
        "auto", description="linear layers at inference: auto (on CPU native where it builds, else oneDNN with packed "
                            "weights, each after its start-up check; else F.linear), native (the C kernel for "
                            "decode-sized calls, float32 with AVX-512, and oneDNN above), onednn, or torch")


class EngineConfig(EngineKnobs):
    """What AsyncEngine takes: the knobs, the two budgets in bytes, and the static decode steps' switch."""
    kv_cache_bytes: int | None = Field(None, gt=0, description="the KV budget; None: measured (for_model)")
    prompt_cache_bytes: int | None = Field(None, gt=0, description="CPU memory for loaded prompts; beyond it the "
                                                                   "least recently used are unloaded; None: no limit")
    # Decode-only steps at static shapes (app/engine/decode_graphs.py). None: on CUDA, replayed as CUDA
    # graphs; off on CPU. True on CPU runs the static steps eagerly (tests); False: always the dynamic path.
    static_decode: bool | None = None

    def for_model(self, model: Transformer) -> EngineConfig:
        """This config for `model`, its weights already on their device: max_seq_len within the model's
        context, and the KV budget, when none is set, measured there (after the weights)."""
        budget = self.kv_cache_bytes
        if budget is None:
            budget = measured_kv_cache_bytes(model.embed_tokens.weight.device)
        return self.model_copy(update={"max_seq_len": min(self.max_seq_len, model.args.max_context),
                                       "kv_cache_bytes": budget})


def measured_kv_cache_bytes(device: torch.device) -> int:
    """90% of the memory still free on a CUDA device, else 2 GiB."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_CACHE_SHARE)
    return CPU_KV_CACHE_BYTES

