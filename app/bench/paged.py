"""Benchmarks of the paged KV memory: how many requests run at once, and a shared-system-prompt workload.

capacity: the bench workload's requests admitted into a KV budget, by the scheduler's own bookkeeping (no
model runs: admission is pure bookkeeping), against the fixed slots of max_seq_len positions that the engine
reserved per request before paging (budget // bytes per slot).

shared prefix: chat requests that all start with one long system prompt, run twice through the engine, with
prefix caching on and off: prefill tokens computed, tokens/s, time to first token, and whether the greedy
outputs agree token for token.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import torch

from app.bench.measure import device_name, percentile
from app.bench.workload import SHAPES, NullTokenizer, TASKS, build_models, prompt_files, prompt_tensors, workload
from app.engine.block_manager import BlockManager
from app.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from app.engine.engine import AsyncEngine
from app.engine.kv_cache import KVCache
from app.engine.model import ModelArgs
from app.engine.sampling import SamplingParams
from app.engine.scheduler import Scheduler
from app.engine.sequence import Sequence
from app.engine.task_prompt import TaskPrompt
from prompt_store.format import Task

CPU_KV_CACHE_GB = CPU_KV_CACHE_BYTES / (1 << 30)  # the CPU server's default budget

def model_args(shape: str) -> ModelArgs:
    """A shape's sizes (workload.SHAPES; "default" is the default model's, smollm2-135m), for the KV sizes the
    capacity count needs: no weights are built."""
    from transformers import LlamaConfig

    return ModelArgs.from_hf_config(LlamaConfig(**SHAPES["smollm2-135m" if shape == "default" else shape]))


@dataclass
class CapacityConfig:
    shape: str = "default"
    kv_cache_gb: float = CPU_KV_CACHE_GB
    max_seq_len: int = EngineConfig().max_seq_len
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    n: int = 4096  # requests offered (more than fit)
    lo: int = 32
    hi: int = 256
    new: int = 32
    virtual: int = 20


def run_capacity(cfg: CapacityConfig) -> dict:
    args = model_args(cfg.shape)
    budget = int(cfg.kv_cache_gb * (1 << 30))
    per_token = KVCache.bytes_per_token(args, cfg.dtype)
    slots = budget // (per_token * (cfg.max_seq_len + 1))  # before paging: one slot per request
    blocks = BlockManager(KVCache.blocks_for_budget(args, cfg.block_size, budget, cfg.dtype), cfg.block_size)
    scheduler = Scheduler(blocks, max_batched_tokens=1 << 30, max_num_seqs=1 << 30, eos_ids=frozenset())
    prompts = {t: _placeholder_prompt(t, cfg.virtual) for t in TASKS}
    params = SamplingParams(max_tokens=cfg.new, temperature=0.0, ignore_eos=True)
    for r in workload(cfg.n, args.vocab_size, cfg.lo, cfg.hi, seed=1):
        scheduler.waiting.append(Sequence(prompts[r.task], r.token_ids, Task.GENERATE, params))
    scheduler.schedule()  # admits while blocks last
    admitted = scheduler.running
    mean_positions = sum(s.prefix_len + len(s.prompt_ids) for s in admitted) / max(1, len(admitted))
    # Each admitted request still grows by `new` tokens; the pool must hold that too to run them all at once.
    at_once = _fit_with_growth(admitted, blocks.num_usable, cfg.block_size, cfg.new)
    return dict(shape=cfg.shape, kv_cache_gb=cfg.kv_cache_gb, max_seq_len=cfg.max_seq_len, block_size=cfg.block_size,
                dtype=str(cfg.dtype).split(".")[-1], bytes_per_token=per_token, fixed_slots=slots,
                blocks=blocks.num_usable, admitted_prompts=len(admitted), run_at_once=at_once,
                mean_prompt_positions=mean_positions, ratio=at_once / max(1, slots))


def _placeholder_prompt(name: str, virtual: int) -> TaskPrompt:
    empty = torch.empty(0, 0, virtual, 0)  # only the prefix length matters to the bookkeeping
    return TaskPrompt(name, 1, "prompt", "generate", [], empty, empty)


def _fit_with_growth(seqs: list[Sequence], num_blocks: int, block_size: int, new: int) -> int:
    """How many of seqs (in admission order) fit with their prompt and all `new` tokens."""
    used = 0
    for i, seq in enumerate(seqs):
        used += -(-(seq.prefix_len + len(seq.prompt_ids) + new) // block_size)
        if used > num_blocks:
            return i
    return len(seqs)


def format_capacity(rows: list[dict]) -> str:
    lines = ["| shape | KV budget | dtype | fixed slots (before) | requests at once (paged) | vs before |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['kv_cache_gb']:g} GiB | {r['dtype']} | {r['fixed_slots']:,} | "
                     f"{r['run_at_once']:,} | {r['ratio']:.1f}x |")
    return "\n".join(lines)


# ---- shared system prompt ---------------------------------------------------------------------------

@dataclass
class SharedPrefixConfig:
    shape: str = "default"
    n: int = 256
    system_tokens: int = 1000
    lo: int = 32
    hi: int = 128
    new: int = 64
    virtual: int = 20
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_batched_tokens: int = EngineConfig().max_batched_tokens
    kv_cache_gb: float = CPU_KV_CACHE_GB  # caching decides how many requests fit at once
    seed: int = 1


def shared_prefix_requests(cfg: SharedPrefixConfig, vocab: int) -> list[list[int]]:
    rng = random.Random(cfg.seed)
    system = [rng.randrange(3, vocab) for _ in range(cfg.system_tokens)]
    return [system + [rng.randrange(3, vocab) for _ in range(rng.randint(cfg.lo, cfg.hi))] for _ in range(cfg.n)]


def run_shared_prefix(cfg: SharedPrefixConfig, cache_dir) -> dict:
    models = build_models(cfg.shape, cfg.device, cfg.dtype, cache_dir)
    requests = shared_prefix_requests(cfg, models.args.vocab_size)
    files = prompt_files(models, prompt_tensors(models.args, cfg.virtual))[:1]  # one chat task: "t0"
    runs = {}
    for caching in (True, False):
        config = EngineConfig(max_seq_len=cfg.virtual + cfg.system_tokens + cfg.hi + cfg.new,
                              kv_cache_bytes=int(cfg.kv_cache_gb * (1 << 30)), prefix_caching=caching,
                              max_batched_tokens=cfg.max_batched_tokens, max_num_seqs=cfg.n, max_waiting=cfg.n)
        runs["on" if caching else "off"] = _timed_run(models, files, config, requests, cfg.new)
    on, off = runs["on"], runs["off"]
    return dict(config=dict(shape=cfg.shape, n=cfg.n, system_tokens=cfg.system_tokens, lo=cfg.lo, hi=cfg.hi,
                            new=cfg.new, virtual=cfg.virtual, kv_cache_gb=cfg.kv_cache_gb,
                            device=device_name(torch.device(cfg.device)),
                            dtype=str(cfg.dtype).split(".")[-1]),
                caching_on={k: v for k, v in on.items() if k != "tokens"},
                caching_off={k: v for k, v in off.items() if k != "tokens"},
                prefill_saved=1 - on["prefill_tokens"] / off["prefill_tokens"],
                same_greedy_outputs=sum(a == b for a, b in zip(on["tokens"], off["tokens"])))


def _timed_run(models, files, config: EngineConfig, requests: list[list[int]], new: int) -> dict:
    engine = AsyncEngine(models.ours, NullTokenizer(), config)
    for pf in files:
        engine.load_prompt(pf)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

    async def go():
        engine.start()
        try:
            seqs = [engine.make_sequence(files[0].name, r, Task.GENERATE, params) for r in requests]
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(engine.run_to_end(s) for s in seqs))
            wall = time.perf_counter() - t0
            return seqs, outs, wall, t0
        finally:
            await engine.shutdown(grace_s=0)

    seqs, outs, wall, t0 = asyncio.run(go())
    ttft = [s.first_token_time - s.arrival for s in seqs]
    stats = engine.stats()
    generated = sum(len(o.tokens) for o in outs)
    return dict(wall_s=wall, tok_s=generated / wall, ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
                prefill_tokens=stats.prompt_tokens_total, prefix_cache_queries=stats.prefix_cache_queries,
                prefix_cache_hits=stats.prefix_cache_hits, preemptions=stats.preemptions,
                tokens=[[t.token_id for t in o.tokens] for o in outs])


def format_shared_prefix(r: dict) -> str:
    c, on, off = r["config"], r["caching_on"], r["caching_off"]
    lines = [f"shared system prompt: {c['n']} requests, one {c['system_tokens']}-token system prompt + "
             f"{c['lo']}-{c['hi']} unique tokens each, {c['new']} new; {c['shape']} on {c['device']} ({c['dtype']}), "
             f"{c['kv_cache_gb']:g} GiB of KV", "",
             "| | prefix caching on | off | on vs off |", "|---|---:|---:|---:|",
             f"| prefill tokens computed | {on['prefill_tokens']:,} | {off['prefill_tokens']:,} | "
             f"{100 * r['prefill_saved']:.1f}% fewer |",
             f"| tokens/s | {on['tok_s']:,.1f} | {off['tok_s']:,.1f} | {on['tok_s'] / off['tok_s']:.2f}x |",
             f"| first token p50 (s) | {on['ttft_p50_s']:.2f} | {off['ttft_p50_s']:.2f} | |",
             f"| first token p99 (s) | {on['ttft_p99_s']:.2f} | {off['ttft_p99_s']:.2f} | |",
             f"| wall (s) | {on['wall_s']:.1f} | {off['wall_s']:.1f} | |",
             f"| preemptions | {on['preemptions']} | {off['preemptions']} | |", "",
             f"same greedy outputs both ways: {r['same_greedy_outputs']}/{c['n']} requests"]
    return "\n".join(lines)
