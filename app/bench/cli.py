"""`softserve bench`: flags, then either the in-process comparison (engine vs peer) or the HTTP sweep."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from app.config import Settings, add_setting_flags

log = logging.getLogger("softserve.bench")


def add_bench_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="softserve's engine vs HF generate() per task (or an HTTP sweep): one table + JSON",
                       description="Runs one mixed-task workload through softserve's engine and through the peer "
                                   "(HF transformers generate() per task group) in this process, and prints one "
                                   "table; --http/--http-spawn sweeps client concurrency against a live server.")
    p.add_argument("--shape", default="default",
                   help="default (the real default model) or random weights: smollm2-135m | llama3-8b | tiny")
    p.add_argument("--n", type=int, default=24, help="requests")
    p.add_argument("--new", type=int, default=32, help="tokens generated per request (exactly)")
    p.add_argument("--batch", type=int, default=64, help="the peer's generate() batch per task group")
    p.add_argument("--lo", type=int, default=32, help="shortest prompt (tokens)")
    p.add_argument("--hi", type=int, default=256, help="longest prompt (tokens)")
    p.add_argument("--virtual", type=int, default=20, help="virtual tokens per task prompt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=1, help="seed of the request stream")
    p.add_argument("--max-batched-tokens", type=int, default=None,
                   help="the engine's tokens per forward (default: the server's, SOFTSERVE_MAX_BATCHED_TOKENS)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default bench_results/<time>.json)")
    p.add_argument("--skip-peer", action="store_true", help="run only softserve's side")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run every engine step eagerly (to measure the graphs)")
    p.add_argument("--decode-attention", default="auto", choices=("auto", "triton", "native", "sdpa"),
                   help="decode attention (auto: the Triton kernel in CUDA graphs, the C kernel on CPU, where they work)")
    p.add_argument("--linear-kernel", default="auto", choices=("auto", "native", "onednn", "torch"),
                   help="softserve's linear layers (auto: on CPU the C kernel for decode-sized calls and oneDNN with packed weights above, where they pass their checks)")
    p.add_argument("--layer-ops", default="auto", choices=("auto", "native", "torch"),
                   help="softserve's RMSNorm, RoPE and SiLU-and-mul (auto: the C kernels on CPU where they build)")
    add_setting_flags(p, ("--cache-dir",))
    http = p.add_mutually_exclusive_group()
    http.add_argument("--http", metavar="URL", help="sweep a running server on a loopback address")
    http.add_argument("--http-spawn", action="store_true", help="start `softserve serve` on a free loopback port, "
                                                                "sweep it, stop it")
    p.add_argument("--concurrency", default="1,4,16,64", help="HTTP mode: concurrent clients per sweep point")
    paged = p.add_mutually_exclusive_group()
    paged.add_argument("--capacity", action="store_true",
                       help="how many workload requests run at once in the default KV budgets, paged vs fixed slots")
    paged.add_argument("--stored-prompts", type=int, default=None, metavar="N",
                       help="start-up with N stored prompts (default model, CPU): time to healthy, memory, a cold "
                            "prompt's first use")
    paged.add_argument("--system-prompt-tokens", type=int, default=None, metavar="N",
                       help="the shared-system-prompt workload (--n chat requests, one N-token system prompt, "
                            "--lo/--hi unique tokens, --new new), with prefix caching on and off")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
    return p


def _run_paged_bench(args, cache_dir: Path) -> dict:
    import torch

    from app.bench import paged
    from app.engine.weights import resolve_device, resolve_dtype

    if args.capacity:
        rows = [paged.run_capacity(paged.CapacityConfig()),
                paged.run_capacity(paged.CapacityConfig(shape="llama3-8b", kv_cache_gb=40, max_seq_len=8192,
                                                        dtype=torch.bfloat16, new=128))]
        print(paged.format_capacity(rows))
        return {"capacity": rows}
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = paged.SharedPrefixConfig(shape=args.shape, n=args.n, system_tokens=args.system_prompt_tokens, lo=args.lo,
                                   hi=args.hi, new=args.new, virtual=args.virtual, device=device, dtype=dtype,
                                   max_batched_tokens=args.max_batched_tokens, seed=args.seed)
    result = paged.run_shared_prefix(cfg, cache_dir)
    print(paged.format_shared_prefix(result))
    return result


def cmd_bench(args, settings: Settings) -> int:
    """--device and --dtype are the bench's own (default auto); everything else a server or engine started
    here needs (the model cache, --max-batched-tokens' default, the HTTP mode's spawned server) comes from
    `settings`, the process's one Settings."""
    from app.bench.run import BenchConfig, format_table, write_json

    cache_dir = settings.cache_dir
    if args.max_batched_tokens is None:
        args.max_batched_tokens = settings.max_batched_tokens
    path = args.json or Path("bench_results") / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args.stored_prompts:
        from app.bench.many_prompts import format_many_prompts, run_many_prompts

        result = run_many_prompts(args.stored_prompts, settings)
        print(format_many_prompts(result))
    elif args.capacity or args.system_prompt_tokens:
        result = _run_paged_bench(args, cache_dir)
    elif args.http or args.http_spawn:
        from app.bench.http import format_sweep, run_sweep

        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        result = run_sweep(url=args.http, spawn=args.http_spawn, levels=levels, n=args.n, new=args.new,
                           lo=args.lo, hi=args.hi, seed=args.seed, settings=settings,
                           device=args.device, dtype=args.dtype)
        print(format_sweep(result))
    else:
        cfg = BenchConfig(shape=args.shape, n=args.n, new=args.new, batch=args.batch, lo=args.lo, hi=args.hi,
                          virtual=args.virtual, device=args.device, dtype=args.dtype, seed=args.seed,
                          skip_peer=args.skip_peer, max_batched_tokens=args.max_batched_tokens,
                          cuda_graphs=not args.no_cuda_graphs, decode_attention=args.decode_attention,
                          linear_kernel=args.linear_kernel, layer_ops=args.layer_ops,
                          cache_dir=cache_dir, progress=not args.no_progress)
        from app.bench.run import run_bench

        result = run_bench(cfg)
        print(format_table(result))
    print(f"\nwritten to {write_json(result, path)}")
    return 0
