"""Llama-family decoder in one file: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM.

References: HF transformers `modeling_llama.py` / `modeling_qwen2.py` (the numbers must match them),
gpt-fast `model.py` (the shape of the code). RMSNorm, RoPE (default and Llama-3 scaling),
grouped-query attention through torch SDPA, SwiGLU MLP, tied or untied LM head.

The model never owns a KV cache. Each forward gets an `attention` object whose `attend(layer, q, k, v)`
decides where K,V come from and go to: `DenseAttention` below (a padded batch with an optional per-layer
prefix; used for training, references and computing shallow-prompt prefixes) or the serving cache's
(app/engine/kv_cache.py). The forward is plain autograd-friendly torch, so prompts can be trained
through the frozen model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style: factor, low/high_freq_factor, original_max_position_embeddings
    attention_bias: bool = False  # Qwen2 has biases on q, k, v
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # attention is full up to this many positions; serving stops there

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelArgs":
        """Build from a transformers PretrainedConfig (4.x `rope_theta/rope_scaling` or 5.x `rope_parameters`)."""
        arch = cfg.model_type
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; softserve runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported RoPE type {rope_type!r}; softserve supports 'default' and 'llama3'")
        heads = cfg.num_attention_heads
        return cls(
            architecture=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            attention_bias=arch == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=getattr(cfg, "max_position_embeddings", 4096),
            sliding_window=_sliding_window(cfg),
        )

    @property
    def max_context(self) -> int:
        """The longest sequence this model computes exactly (it has no sliding-window attention)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def kv_width(self) -> int:
        """Width of one layer's K (or V) for one token: PEFT's token_dim under GQA."""
        return self.num_kv_heads * self.head_dim


def _sliding_window(cfg) -> int | None:
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        return None
    return getattr(cfg, "sliding_window", None)


class Attention(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, D), k/v (B, T, KVH, D), already rotated -> output (B, T, H, D)."""


class DenseAttention:
    """Attention over a padded batch: an optional prefix of per-layer K,V, then the batch's own tokens.

    prefix: per layer (k, v), each (B or 1, KVH, P, D) - a deep prompt as PEFT feeds `past_key_values`.
    key_mask: (B, T) bool, False on padding. record=True keeps each layer's (k, v) of the batch's own
    tokens in `recorded`, which is how a shallow prompt becomes a KV prefix.
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 key_mask: torch.Tensor | None = None, record: bool = False):
        self.prefix = prefix
        self.key_mask = key_mask
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if record else None
        self._mask: torch.Tensor | None = None

    def _build_mask(self, B: int, T: int, P: int, device) -> torch.Tensor:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = torch.cat([torch.ones(T, P, dtype=torch.bool, device=device), causal], 1).expand(B, T, P + T)
        if self.key_mask is not None:
            keys = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), self.key_mask.to(device)], 1)
            mask = mask & keys[:, None, :]
            # A query always sees itself, so a left-padded row never has every key masked (NaN in softmax).
            itself = torch.cat([torch.zeros(T, P, dtype=torch.bool, device=device),
                                torch.eye(T, dtype=torch.bool, device=device)], 1)
            mask = mask | itself
        return mask[:, None]  # (B, 1, T, P+T)

    def attend(self, layer, q, k, v):
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, KVH, T, D)
        if self.recorded is not None:
            self.recorded.append((k, v))
        B, T = q.shape[:2]
        if self.prefix is not None:
            pk, pv = self.prefix[layer]
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], 2)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], 2)
        if self._mask is None:
            self._mask = self._build_mask(B, T, k.shape[2] - T, q.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=self._mask, enable_gqa=True)
        return out.transpose(1, 2)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1 frequency-dependent scaling (same formula as transformers' _compute_llama3_parameters).
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin` in three passes instead of six: rotate_half(x) * sin equals
    x.roll(half) * sin_signed, where sin_signed is sin with its first half negated."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


Kernel = Callable[[torch.Tensor], torch.Tensor]
RopeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
K = TypeVar("K")


def inference_kernel(kernel: K | None) -> K | None:
    """The faster kernel attached at load (app/engine/linear_kernels.py, native_layer_ops.py), when autograd
    is off; None when gradients flow (training) or none is attached: then the plain torch form runs."""
    return None if torch.is_grad_enabled() else kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    kernel: Kernel | None = None  # the C kernel at inference on CPU (app/engine/native_layer_ops.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = inference_kernel(self.kernel)
        if kernel is not None:
            return kernel(x)
        # As HF's LlamaRMSNorm, bit for bit: normalised in float32, cast back, then scaled. F.rms_norm is one
        # fused kernel where the written-out form is five; given the weight, it would scale before the cast.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that runs through `kernel` at inference when one is attached."""
    kernel: Kernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = inference_kernel(self.kernel)
        return kernel(x) if kernel is not None else F.linear(x, self.weight, self.bias)


class SelfAttention(nn.Module):
    qkv_kernel: Kernel | None = None  # q, k, v projections as one GEMM
    rope_kernel: RopeKernel | None = None  # apply_rope on q and k in place, one pass

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, args.kv_width, bias=bias)
        self.v_proj = Linear(args.hidden_size, args.kv_width, bias=bias)
        # Llama's attention_bias covers o_proj too; Qwen2 biases only q, k, v.
        o_bias = bias and args.architecture != "qwen2"
        self.o_proj = Linear(args.num_heads * args.head_dim, args.hidden_size, bias=o_bias)

    def project(self, x):
        kernel = inference_kernel(self.qkv_kernel)
        if kernel is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv_width = self.num_kv_heads * self.head_dim
        return kernel(x).split([self.num_heads * self.head_dim, kv_width, kv_width], -1)

    def forward(self, x, cos, sin, attention: Attention):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        rope = inference_kernel(self.rope_kernel)
        q, k = rope(q, k, cos, sin) if rope else (apply_rope(q, cos, sin), apply_rope(k, cos, sin))  # cos/sin: (B, T, 1, D)
        out = attention.attend(self.layer, q, k, v)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    gate_up_kernel: Kernel | None = None  # gate and up projections as one GEMM
    act_kernel: Kernel | None = None  # that GEMM's output -> silu(gate) * up, one pass

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        kernel = inference_kernel(self.gate_up_kernel)
        if kernel is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up, act = kernel(x), inference_kernel(self.act_kernel)
        if act is not None:
            return self.down_proj(act(gate_up))
        gate, up = gate_up.chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = SelfAttention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, attention: Attention):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names follow HF's `model.*` / `lm_head.*` so checkpoints load by name."""
    lm_head_kernel: Kernel | None = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (B, T) -> cos and the signed sin of apply_rope, each (B, T, 1, D)."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2), in float32 as HF does
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), -1)[:, :, None].to(dtype), torch.cat((-sin, sin), -1)[:, :, None].to(dtype)

    def forward(self, positions: torch.Tensor, attention: Attention, tokens: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) or embeds (B, T, hidden); positions (B, T) -> final-normed hidden (B, T, hidden)."""
        x = self.embed_tokens(tokens) if embeds is None else embeds
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (..., hidden) -> logits (..., vocab); into `out` when given (2-D hidden only)."""
        if out is not None:
            return torch.mm(hidden, self.lm_head_weight.t(), out=out)
        kernel = inference_kernel(self.lm_head_kernel)
        return kernel(hidden) if kernel is not None else F.linear(hidden, self.lm_head_weight)
