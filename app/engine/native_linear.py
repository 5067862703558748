"""Linear layers over a few rows (decode steps) on the CPU through the C kernel (app/engine/native/few_rows_linear.c).

With a few rows a linear layer streams its weights from memory; the C kernel prefetches the next weights while it
multiplies the current ones, where oneDNN waits for them. Over every layer of the default model, weights streamed
from memory, on this project's 2-core machine: 1.4x oneDNN's speed at 24 rows, 1.2x at 64, 1.08x at 96, level at
120-128, slower from 160 (BENCHMARKS.md). So app/engine/linear_kernels.py sends calls of at most MAX_ROWS rows
(decode steps) here and larger ones (prefill) to oneDNN's blocked GEMM. The kernel reads the model's own float32
weights in place: no copy.
"""
from __future__ import annotations

import ctypes

import torch

from app.engine import native_library

MAX_ROWS = 96  # rows up to which the C kernel beats oneDNN with packed weights (measured; see the docstring)

_pointer, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def load_kernel() -> ctypes._CFuncPtr | None:
    """The C function, or None where the library does not build or this CPU lacks AVX-512."""
    library = native_library.load()
    if library is None or not library.few_rows_linear_supported():
        return None
    function = library.few_rows_linear
    function.argtypes = [_pointer, _i64, _int, _int, _pointer, _pointer, _int, _pointer, _pointer, _i64, _int]
    function.restype = None
    return function


class FewRowsLinear:
    """x (..., in) -> x @ cat(weights).T (+ bias) for at most MAX_ROWS rows, float32; weights given together
    (q, k, v) are one call whose outputs lie side by side."""

    def __init__(self, function: ctypes._CFuncPtr, weights: list[torch.Tensor], bias: torch.Tensor | None):
        if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
            raise ValueError("the few-rows linear kernel takes float32 weights on the CPU")
        self.function = function
        self.weights = [w.detach().contiguous() for w in weights]  # the parameters themselves where contiguous
        self.in_features = self.weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in self.weights)
        self.bias = None if bias is None else bias.detach().contiguous()
        self._pointers = (ctypes.c_void_p * len(self.weights))(*(w.data_ptr() for w in self.weights))
        self._rows = (ctypes.c_int * len(self.weights))(*(w.shape[0] for w in self.weights))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        if rows.dtype != torch.float32 or rows.shape[0] > MAX_ROWS:
            raise ValueError(f"the few-rows linear kernel takes at most {MAX_ROWS} rows of float32, "
                             f"not {rows.shape[0]} of {rows.dtype}")
        out = torch.empty(rows.shape[0], self.out_features)
        self.function(rows.data_ptr(), rows.stride(0), rows.shape[0], self.in_features, self._pointers,
                      self._rows, len(self.weights), None if self.bias is None else self.bias.data_ptr(),
                      out.data_ptr(), out.stride(0), torch.get_num_threads())
        return out.view(*x.shape[:-1], self.out_features)
