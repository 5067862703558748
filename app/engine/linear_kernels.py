"""The kernel the model's linear layers and LM head run through at inference, chosen once per model.

- "onednn" (CPU): each weight is reordered once into oneDNN's blocked layout and multiplied with
  `torch.ops.mkldnn._linear_pointwise`, what vLLM's CPU backend and inductor's weight freezing call. Torch's
  `F.linear` repacks the weight on every call; the packed GEMM measured 1.0-1.6x its speed on one of this
  project's CPU machines and 2-4x on another (BENCHMARKS.md). Projections that read the same input are packed together, so a layer
  runs q,k,v as one GEMM and gate,up as another (vLLM's QKVParallelLinear and MergedColumnParallelLinear).
- "native" (CPU, float32, AVX-512): oneDNN as above for calls of more than native_linear.MAX_ROWS rows (prefill),
  the C kernel of app/engine/native_linear.py for calls of fewer (decode steps), which streams the model's own
  weights with prefetching where oneDNN stalls on memory.
- "torch": `F.linear` (cuBLAS on CUDA).

"auto" takes native where it builds, else onednn, on a CPU where torch has oneDNN and the model is float32 or
bfloat16 (native: float32 only), each after a start-up check of every fused weight against `F.linear` on random
rows (both sides of the row split for native); a kernel that fails or disagrees costs speed, never correctness.
The packed weights are copies: the model's own parameters stay, and with autograd on (training) every layer runs
`F.linear` on them (app/engine/model.py).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from app.engine import native_linear
from app.engine.model import Transformer

log = logging.getLogger(__name__)

KERNELS = ("auto", "native", "onednn", "torch")
PACKING_ROWS = 64  # the row count oneDNN picks its blocked layout for; every row count runs on it
CHECK_ROWS = (1, 7, native_linear.MAX_ROWS + 1)  # the last on oneDNN where the row split sends few rows to C
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative to the largest output


def agrees_with_f_linear(kernel, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> bool:
    """kernel(x) against F.linear(x, weight, bias) on random rows of each CHECK_ROWS count."""
    g = torch.Generator().manual_seed(0)
    for rows in CHECK_ROWS:
        x = torch.randn(rows, weight.shape[1], generator=g).to(weight.dtype)
        want = F.linear(x, weight, bias).float()
        error = (kernel(x).float() - want).abs().max().item()
        if not error <= CHECK_TOLERANCE[weight.dtype] * max(1.0, want.abs().max().item()):
            log.warning("the %s linear kernel disagrees with F.linear (max error %.2e on %d rows)", name, error, rows)
            return False
    return True


class OneDNNLinear:
    """x (..., in) -> x @ weight.T (+ bias), weight packed once; weights given together are one GEMM."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None):
        weight = torch.cat(weights).detach()
        self.sizes = [w.shape[0] for w in weights]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_ROWS)
        biases = biases or [None] * len(weights)
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else weight.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        self._reference = (weight, self.bias)  # dropped after the start-up check

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def matches_reference(self) -> bool:
        (weight, bias), self._reference = self._reference, None
        return agrees_with_f_linear(self, weight, bias, "oneDNN")


class RowSplitLinear:
    """Calls of at most native_linear.MAX_ROWS rows through the C kernel, larger ones through oneDNN."""

    def __init__(self, function, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None):
        self.many = OneDNNLinear(weights, biases)
        self.few = native_linear.FewRowsLinear(function, weights, self.many.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        few = x.numel() <= native_linear.MAX_ROWS * x.shape[-1]
        return self.few(x) if few else self.many(x)

    def matches_reference(self) -> bool:
        (weight, bias), self.many._reference = self.many._reference, None
        return agrees_with_f_linear(self, weight, bias, "C few-rows")


def _onednn_available(model: Transformer) -> str | None:
    """None when the packed kernel can run this model, else why not."""
    weight = model.embed_tokens.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if weight.dtype not in CHECK_TOLERANCE:
        return f"the model is {str(weight.dtype).removeprefix('torch.')}"
    return None


def _pack(model: Transformer, few_rows_function=None) -> list:
    """One kernel per fused projection and one for the LM head, attached where the model looks for them;
    with few_rows_function (the C kernel), each splits its calls by row count (RowSplitLinear)."""
    def kernel(weights, biases=None):
        return (RowSplitLinear(few_rows_function, weights, biases) if few_rows_function is not None
                else OneDNNLinear(weights, biases))

    kernels = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        attn.qkv_kernel = kernel([p.weight for p in projections], [p.bias for p in projections])
        attn.o_proj.kernel = kernel([attn.o_proj.weight], [attn.o_proj.bias])
        mlp.gate_up_kernel = kernel([mlp.gate_proj.weight, mlp.up_proj.weight])
        mlp.down_proj.kernel = kernel([mlp.down_proj.weight])
        kernels += [attn.qkv_kernel, attn.o_proj.kernel, mlp.gate_up_kernel, mlp.down_proj.kernel]
    model.lm_head_kernel = kernel([model.lm_head_weight])
    return kernels + [model.lm_head_kernel]


def _unpack(model: Transformer) -> None:
    for layer in model.layers:
        layer.self_attn.qkv_kernel = layer.self_attn.o_proj.kernel = None
        layer.mlp.gate_up_kernel = layer.mlp.down_proj.kernel = None
    model.lm_head_kernel = None


def use_linear_kernel(model: Transformer, choice: str = "auto") -> str:
    """Attach the chosen kernel to the model's layers -> the kernel in use ("native", "onednn" or "torch").
    native, onednn: required (ValueError where it cannot run or fails its check); torch: F.linear."""
    if choice not in KERNELS:
        raise ValueError(f"linear_kernel must be one of {', '.join(KERNELS)}, not {choice!r}")
    _unpack(model)
    if choice == "torch":
        return "torch"
    why_not = _onednn_available(model)
    if why_not is not None:
        if choice != "auto":
            raise ValueError(f"the {choice} linear kernel cannot run here: {why_not}")
        return "torch"
    for kernel in {"auto": ("native", "onednn"), "native": ("native",), "onednn": ("onednn",)}[choice]:
        function = None
        if kernel == "native":
            function = native_linear.load_kernel() if model.embed_tokens.weight.dtype == torch.float32 else None
            if function is None:
                if choice == "native":
                    raise ValueError("the native linear kernel cannot run here: it needs a float32 model, a C "
                                     "compiler and a CPU with AVX-512")
                continue
        with torch.inference_mode():
            kernels = _pack(model, function)
            if all(k.matches_reference() for k in kernels):
                return kernel
        _unpack(model)
    if choice != "auto":
        raise ValueError(f"the {choice} linear kernel failed its start-up check against F.linear (see the log)")
    return "torch"
