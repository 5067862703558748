"""RMSNorm, RoPE and SiLU-and-mul on the CPU through the C kernels (app/engine/native/layer_ops.c).

In torch each of these is a chain of elementwise kernels, each reading and writing the whole activation
(~15% of a 2,048-token prefill step on this project's CPU machine, BENCHMARKS.md); the C kernels make one
pass (as vLLM's CPU backend does with its own C++ kernels). They are attached to the model's layers like the
packed linear kernels (app/engine/linear_kernels.py) and run only at inference: with autograd on
(training) every layer runs its torch form.

"auto" attaches them on a CPU where the library builds (app/engine/native_library.py) and the model is
float32 or bfloat16, after a start-up check of each against its torch form on random data of the model's
shapes; anything else keeps the torch forms.
"""
from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from app.engine import native_library
from app.engine.model import Transformer, apply_rope

log = logging.getLogger(__name__)

CHOICES = ("auto", "native", "torch")
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest output

_pointer, _i64, _int, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last dim), each row's values contiguous: a view where one exists (rows may then lie further
    apart than their length), else a copy."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class LayerOps:
    """The library's three functions, typed, over torch tensors of float32 or bfloat16."""

    def __init__(self, library: ctypes.CDLL):
        self._rms_norm = library.rms_norm
        self._rms_norm.argtypes = [_pointer, _i64, _pointer, _pointer, _int, _int, _float, _int, _int]
        self._silu_and_mul = library.silu_and_mul
        self._silu_and_mul.argtypes = [_pointer, _i64, _pointer, _int, _int, _int, _int]
        self._rope = library.rope
        self._rope.argtypes = [_pointer, _i64, _pointer, _pointer, _int, _int, _int, _int, _int]
        for function in (self._rms_norm, self._silu_and_mul, self._rope):
            function.restype = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = _rows(x)
        assert weight.is_contiguous() and weight.dtype == x.dtype
        out = torch.empty(x.shape, dtype=x.dtype)
        self._rms_norm(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), rows.shape[0],
                       rows.shape[1], eps, int(x.dtype == torch.bfloat16), torch.get_num_threads())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (..., 2 * width): gate, then up -> silu(gate) * up (..., width)."""
        rows = _rows(gate_up)
        width = gate_up.shape[-1] // 2
        out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype)
        self._silu_and_mul(rows.data_ptr(), rows.stride(0), out.data_ptr(), rows.shape[0], width,
                           int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
        return out

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin_signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """apply_rope on q (B, T, H, hd) and k (B, T, KVH, hd), in place (they may be views of one q,k,v
        projection); cos, sin_signed (B, T, 1, hd)."""
        head_dim = q.shape[-1]
        cos, sin_signed = cos.reshape(-1, head_dim).contiguous(), sin_signed.reshape(-1, head_dim).contiguous()
        for x in (q, k):
            batch, tokens, heads = x.shape[:3]
            step = x.stride(1) if tokens > 1 else x.stride(0)  # between consecutive tokens of the flat list
            evenly_spaced = batch == 1 or tokens == 1 or x.stride(0) == tokens * x.stride(1)
            heads_contiguous = (heads == 1 or x.stride(2) == head_dim) and x.stride(3) == 1
            if not evenly_spaced or not heads_contiguous or x.dtype != cos.dtype:
                raise ValueError("the C RoPE kernel takes heads of contiguous values, tokens evenly spaced")
            self._rope(x.data_ptr(), step, cos.data_ptr(), sin_signed.data_ptr(), batch * tokens, heads, head_dim,
                       int(x.dtype == torch.bfloat16), torch.get_num_threads())
        return q, k


class RMSNormKernel:
    def __init__(self, ops: LayerOps, weight: torch.Tensor, eps: float):
        self.ops, self.weight, self.eps = ops, weight.detach(), eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    error = (got.float() - want.float()).abs().max().item()
    return error <= CHECK_TOLERANCE[want.dtype] * max(1.0, want.float().abs().max().item())


def matches_torch(ops: LayerOps, model: Transformer) -> bool:
    """Each kernel once on random data of the model's shapes against the model's torch forms."""
    args, dtype = model.args, model.embed_tokens.weight.dtype
    g = torch.Generator().manual_seed(0)
    tokens = 37
    x = torch.randn(1, tokens, args.hidden_size, generator=g).to(dtype)
    norm = model.layers[0].input_layernorm
    want = norm.weight * F.rms_norm(x.float(), (args.hidden_size,), eps=norm.eps).to(dtype)
    checks = {"RMSNorm": (ops.rms_norm(x, norm.weight.detach(), norm.eps), want)}
    gate_up = torch.randn(tokens, 2 * args.intermediate_size, generator=g).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    checks["SiLU-and-mul"] = (ops.silu_and_mul(gate_up), F.silu(gate) * up)
    q_width, kv_width = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    qkv = torch.randn(1, tokens, q_width + 2 * kv_width, generator=g).to(dtype)
    q, k, _ = qkv.split([q_width, kv_width, kv_width], -1)
    q, k = q.view(1, tokens, args.num_heads, -1), k.view(1, tokens, args.num_kv_heads, -1)
    cos, sin = model.rope(torch.arange(100, 100 + tokens)[None], dtype)
    want_q, want_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    got_q, got_k = ops.rope(q, k, cos, sin)
    checks["RoPE (q)"], checks["RoPE (k)"] = (got_q, want_q), (got_k, want_k)
    failed = [name for name, (got, want) in checks.items() if not _close(got, want)]
    if failed:
        log.warning("the C layer kernels disagree with torch (%s); the model keeps its torch forms", ", ".join(failed))
    return not failed


def _detach(model: Transformer) -> None:
    for layer in model.layers:
        layer.input_layernorm.kernel = layer.post_attention_layernorm.kernel = None
        layer.self_attn.rope_kernel = layer.mlp.act_kernel = None
    model.norm.kernel = None


def _attach(model: Transformer, ops: LayerOps) -> None:
    for norm in [model.norm] + [n for layer in model.layers
                                for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        norm.kernel = RMSNormKernel(ops, norm.weight, norm.eps)
    for layer in model.layers:
        layer.self_attn.rope_kernel = ops.rope
        layer.mlp.act_kernel = ops.silu_and_mul


def use_layer_ops(model: Transformer, choice: str = "auto") -> str:
    """Attach the chosen RMSNorm, RoPE and SiLU-and-mul to the model's layers -> "native" or "torch".
    native: required (ValueError where the kernels cannot run or fail their check)."""
    if choice not in CHOICES:
        raise ValueError(f"layer_ops must be one of {', '.join(CHOICES)}, not {choice!r}")
    _detach(model)
    if choice == "torch":
        return "torch"
    weight = model.embed_tokens.weight
    why_not = (f"the model is on {weight.device.type}" if weight.device.type != "cpu" else
               f"the model is {str(weight.dtype).removeprefix('torch.')}" if weight.dtype not in CHECK_TOLERANCE else
               f"head size {model.args.head_dim} is odd" if model.args.head_dim % 2 else None)
    library = native_library.load() if why_not is None else None
    if why_not is None and library is None:
        why_not = "the C kernels could not be built here (see the log)"
    if why_not is not None:
        if choice == "native":
            raise ValueError(f"layer_ops=native: {why_not}")
        return "torch"
    ops = LayerOps(library)
    with torch.inference_mode():
        if matches_torch(ops, model):
            _attach(model, ops)
            return "native"
    if choice == "native":
        raise ValueError("layer_ops=native: the C layer kernels failed their start-up check (see the log)")
    return "torch"
