"""Measurements shared by both sides: percentiles, peak memory, copy bandwidth and the decode bound."""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank-with-interpolation percentile (numpy's default 'linear'), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory over a block. CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs where the kernel allows; else ru_maxrss, which never resets)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.method = "VmHWM (reset per run)"
            except OSError:
                self.method = "ru_maxrss (process peak, not reset)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _vm_hwm()
            if hwm is None or self.method.startswith("ru_maxrss"):
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak_bytes = hwm
        return False


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes read + written per second by a large same-device tensor copy."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> tuple[float, str]:
    """The machine's dense matmul FLOP/s in the model's dtype (the compute roof) and the kernel that reached
    it: the best of torch's matmul and, where it runs, oneDNN with a packed weight (the engine's CPU linear
    kernel, app/engine/linear_kernels.py), so that the roof is the machine's, not one kernel's."""
    from app.engine.linear_kernels import OneDNNLinear

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    kernels = {"torch.matmul": lambda: a @ b}
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16):
        packed = OneDNNLinear([b])
        kernels["oneDNN packed"] = lambda: packed(a)
    times = {name: _best_time(fn, device, repeats) for name, fn in kernels.items()}
    best = min(times, key=times.get)
    return 2 * n ** 3 / times[best], best


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_bound(bandwidth: float, weight_bytes: int, kv_bytes_per_token: int, batch: int,
                 mean_context: float, flops: float | None = None, flops_per_token: float | None = None,
                 flops_kernel: str = "") -> dict:
    """Ceiling of decode. Memory: each step reads every weight once plus the live KV of the batch and
    yields one token per row: tokens/s = bandwidth / bytes per step * batch. Compute (when given):
    tokens/s = matmul FLOP/s / FLOPs per token. The bound is the lower of the two."""
    step_bytes = weight_bytes + kv_bytes_per_token * batch * mean_context
    memory = bandwidth / step_bytes * batch
    out = dict(bandwidth_gb_s=bandwidth / 1e9, weight_bytes=weight_bytes, batch=batch, mean_context=mean_context,
               step_bytes=int(step_bytes), memory_bound_tok_s=memory, bound_tok_s=memory, limited_by="memory")
    if flops and flops_per_token:
        compute = flops / flops_per_token
        out.update(matmul_tflops=flops / 1e12, matmul_kernel=flops_kernel, flops_per_token=flops_per_token,
                   compute_bound_tok_s=compute)
        if compute < memory:
            out.update(bound_tok_s=compute, limited_by="compute")
    return out


def _layer_flops(model: torch.nn.Module, mean_context: float) -> float:
    """A token through every layer: 2 x its projections' weights + attention over mean_context keys."""
    a = model.args
    layer_params = sum(p.numel() for n, p in model.layers.named_parameters() if n.endswith("proj.weight"))
    return 2 * layer_params + 4 * a.num_layers * a.num_heads * a.head_dim * mean_context


def _head_flops(model: torch.nn.Module) -> float:
    return 2 * model.args.vocab_size * model.args.hidden_size


def flops_per_token(model: torch.nn.Module, mean_context: float) -> float:
    """A decode token: 2 x (every matmul weight it passes through: layer projections and the LM head) + attention."""
    return _layer_flops(model, mean_context) + _head_flops(model)


def workload_flops(model: torch.nn.Module, forward_tokens: int, sampled_tokens: int, mean_context: float) -> float:
    """A whole workload's matmul work: every token a step computes (prompt and decode) through the layers, and
    the LM head for each token sampled (prefill computes it for a prompt's last position only)."""
    return forward_tokens * _layer_flops(model, mean_context) + sampled_tokens * _head_flops(model)


def device_memory_total(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"
