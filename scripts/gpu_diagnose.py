"""Where a step's time goes on a GPU machine: launch cost, the decode graph against eager, a prefill step.

    PYTHONPATH=. python3 scripts/gpu_diagnose.py OUT_DIR [--shape llama3-8b]

1. Host cost of one kernel launch, alone and with a second Python thread busy (the engine thread shares
   the GIL with the event loop), at the default and a 0.5 ms GIL switch interval.
2. One decode step of 192 rows: the captured graph with the Triton decode kernel and with SDPA (GPU
   time by CUDA events, and host time of the whole static step), and the same step run eagerly.
3. One prefill step of the benchmark's shape under torch.profiler: kernel launches, host and GPU time.
Without a GPU it is a dry run of the script on the tiny shape.
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from app.bench.ours import engine_config
from app.bench.workload import NullTokenizer, build_models, prompt_files, prompt_tensors, workload
from app.engine.decode_graphs import StaticDecoder
from app.engine.llm_engine import LLMEngine
from app.engine.sampling import SamplingParams
from app.engine.weights import resolve_device
from prompt_store.format import Task

DEVICE = resolve_device("auto")  # as the server picks it: cuda when there is one


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def per_launch_us(x: torch.Tensor, n: int = 3000) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    host = time.perf_counter() - t
    sync()
    return host / n * 1e6


def launch_cost() -> None:
    x = torch.zeros(1, device=DEVICE)
    per_launch_us(x)
    alone = per_launch_us(x)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            sum(range(200))

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    default = sys.getswitchinterval()
    contended = per_launch_us(x, 300)
    sys.setswitchinterval(0.0005)
    contended_fast = per_launch_us(x, 1000)
    sys.setswitchinterval(default)
    stop.set()
    thread.join()
    print(f"launch cost: {alone:.1f} us alone; with a busy Python thread {contended:.1f} us at the default "
          f"{default * 1e3:.0f} ms GIL switch interval, {contended_fast:.1f} us at 0.5 ms", flush=True)


def cuda_ms(fn, repeats: int = 20) -> float:
    if DEVICE != "cuda":
        return host_ms(fn)
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn, repeats: int = 10) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def steps(shape: str, out: Path) -> None:
    models = build_models(shape, DEVICE, torch.bfloat16, Path("."))
    n, lo, hi, virtual, new = 192, 32, 256, 20, 128
    config = engine_config(models.ours, n, virtual + hi + new, max_batched_tokens=8192,
                           static_decode=True)  # on CPU: the static step, eagerly
    engine = LLMEngine(models.ours, NullTokenizer(), config)
    for pf in prompt_files(models, prompt_tensors(models.args, virtual)):
        engine.prompts.load(pf)
    rows, max_seq_len = n, config.max_seq_len
    tokens = torch.randint(3, models.args.vocab_size, (rows,)).tolist()
    positions = torch.randint(20, max_seq_len - 1, (rows,)).tolist()  # uniform, as the workload's
    per_row = -(-max_seq_len // config.block_size)
    slots = [list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]  # each row's block table
    weights = sum(p.numel() * p.element_size() for p in models.ours.parameters())
    live_kv = (sum(positions) + rows) * engine.cache.bytes_per_token(models.args, torch.bfloat16)
    kernel_static = engine.runner.static
    sdpa_static = StaticDecoder(models.ours, engine.cache, n, max_seq_len, use_graphs=DEVICE == "cuda", kernel=False)
    for name, static in (("triton kernel" if kernel_static.kernel else "sdpa (kernel unavailable)", kernel_static),
                         ("sdpa", sdpa_static)):
        step_host = host_ms(lambda: static.run(tokens, positions, slots))  # captures its bucket on first use
        length = max(b for b in static.length_buckets if b >= max(positions) + 1)
        graph_gpu = cuda_ms(lambda: static.graphs[(rows, length)].replay()) if static.use_graphs else step_host
        static.use_graphs = False
        eager_host = host_ms(lambda: static.run(tokens, positions, slots))
        eager_gpu = cuda_ms(lambda: static.run(tokens, positions, slots))
        static.use_graphs = DEVICE == "cuda"
        print(f"decode step, {rows} rows, mean context {sum(positions) / rows + 1:.0f} ({shape}), attention {name}: "
              f"graph replay {graph_gpu:.2f} ms on the GPU ({(weights + live_kv) / graph_gpu / 1e6:,.0f} GB/s over "
              f"weights + live KV, {(weights + live_kv) / 1e9:.1f} GB); whole static step {step_host:.2f} ms; "
              f"eager {eager_host:.2f} ms wall ({eager_gpu:.2f} ms by events)", flush=True)

    # one prefill step, as the benchmark's first step: 8192 tokens over several requests
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for r in workload(64, models.args.vocab_size, lo, hi, seed=5):
        engine.scheduler.waiting.append(engine.make_sequence(r.task, r.token_ids, Task.GENERATE, params))
    step = engine.scheduler.schedule()
    wall = host_ms(lambda: engine.runner.run(step), repeats=3)  # the same step again: it rewrites the same K,V
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        engine.runner.run(step)
        sync()
    events = prof.key_averages()
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    kernels_ms = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e3
    print(f"prefill step ({shape}): {len(step.prefill)} chunks, {sum(n for _, n in step.prefill)} tokens: "
          f"{wall:.1f} ms wall unprofiled; GPU kernels {kernels_ms:.1f} ms; {launches} kernel launches", flush=True)
    by_host = events.table(sort_by="self_cpu_time_total", row_limit=20)
    by_device = events.table(sort_by="self_device_time_total", row_limit=15) if DEVICE == "cuda" else ""
    (out / f"prefill_profile_{shape}.txt").write_text(by_host + "\n\n" + by_device)
    print(by_host, flush=True)


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    shape = sys.argv[sys.argv.index("--shape") + 1] if "--shape" in sys.argv else "llama3-8b"
    shape = shape if DEVICE == "cuda" else "tiny"
    launch_cost()
    steps(shape, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
