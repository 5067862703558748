"""Runs the workload through softserve's engine and the peer, checks they agree, and reports.

One table (tokens/s and the ratio, requests/s, latency and time-to-first-token percentiles, peak memory),
the decode bound from measured copy bandwidth, the per-prompt memory, and the same as JSON.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app.bench.measure import (PeakMemory, copy_bandwidth, decode_bound, device_memory_total, device_name,
                               flops_per_token, matmul_flops, model_bytes, percentile, workload_flops)
from app.bench.ours import StepTimer, engine_config, run_ours
from app.bench.peer import RequestResult, run_peer
from app.bench.workload import NullTokenizer, TASK_KINDS, build_models, prompt_files, prompt_tensors, workload
from app.engine.config import DEFAULT_CACHE_DIR, EngineConfig
from app.engine.engine import AsyncEngine
from app.engine.kv_cache import KVCache
from app.engine.weights import resolve_device, resolve_dtype
from app.own_thread import run_in_own_thread

log = logging.getLogger("softserve.bench")

AGREE_K = 4  # the first tokens every greedy request must share between the two sides


@dataclass
class BenchConfig:
    shape: str = "default"
    n: int = 24
    new: int = 32
    batch: int = 64  # the peer's generate() batch per task group
    lo: int = 32
    hi: int = 256
    virtual: int = 20
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1
    skip_peer: bool = False
    max_batched_tokens: int = EngineConfig().max_batched_tokens
    cuda_graphs: bool = True  # the engine's default on CUDA; no effect on CPU
    decode_attention: str = "auto"  # auto | triton | native | sdpa (app/engine/config.py)
    linear_kernel: str = EngineConfig().linear_kernel  # auto | native | onednn | torch (app/engine/linear_kernels.py)
    layer_ops: str = EngineConfig().layer_ops  # auto | native | torch (app/engine/native_layer_ops.py)
    cache_dir: Path = DEFAULT_CACHE_DIR
    progress: bool = True
    warmup: bool = True

    def __post_init__(self):
        if self.n < 1 or self.new < 1 or self.batch < 1 or self.virtual < 1:
            raise ValueError("--n, --new, --batch and --virtual must be at least 1")
        if not 1 <= self.lo <= self.hi:
            raise ValueError("need 1 <= --lo <= --hi")

    def resolved_device(self) -> torch.device:
        return torch.device(resolve_device(self.device))

    def resolved_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, str(self.resolved_device()))


def summarize(results: list[RequestResult], wall: float, peak: PeakMemory | None) -> dict:
    lat = [r.latency_s for r in results]
    ttft = [r.ttft_s for r in results]
    tokens = sum(len(r.tokens) for r in results)
    out = dict(wall_s=wall, requests=len(results), generated_tokens=tokens, tok_s=tokens / wall,
               req_s=len(results) / wall,
               latency_p50_s=percentile(lat, 50), latency_p90_s=percentile(lat, 90), latency_p99_s=percentile(lat, 99),
               ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
               peak_memory_bytes=peak.peak_bytes if peak else None, peak_memory_method=peak.method if peak else None)
    times = [r.token_times for r in results]
    if all(times):  # the window where every request is decoding: all have a first token, none finished
        start, end = max(ttft), min(lat)
        count = sum(1 for ts in times for t in ts if start < t <= end)
        out["decode_window_tok_s"] = count / (end - start) if end > start and count else None
    return out


def agreement(ours: list[RequestResult], peer: list[RequestResult], k: int) -> dict:
    k = min(k, min((len(r.tokens) for r in ours + peer), default=0))
    common = []
    for a, b in zip(ours, peer):
        n = 0
        for x, y in zip(a.tokens, b.tokens):
            if x != y:
                break
            n += 1
        common.append(n)
    same_k = sum(n >= k for n in common)
    same_all = sum(a.tokens == b.tokens for a, b in zip(ours, peer))
    return dict(k=k, requests=len(common), agree_first_k=same_k, agree_first_k_fraction=same_k / max(1, len(common)),
                agree_all=same_all, mean_common_prefix=sum(common) / max(1, len(common)),
                mismatched_requests=[i for i, n in enumerate(common) if n < k])


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, mininterval=2.0, leave=True)
    return bar, bar.update


def run_bench(cfg: BenchConfig) -> dict:
    """The workload through softserve's engine, then through the peer, then the decode bound and memory."""
    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    load_before = os.getloadavg()
    log.info("building %s on %s (%s)", cfg.shape, device, dtype)
    models = run_in_own_thread(build_models, cfg.shape, str(device), dtype, cfg.cache_dir)
    args = models.args
    reqs = workload(cfg.n, args.vocab_size, cfg.lo, cfg.hi, cfg.seed)
    warm = workload(min(6, cfg.n), args.vocab_size, cfg.lo, cfg.hi, cfg.seed + 1000)
    tensors = run_in_own_thread(prompt_tensors, args, cfg.virtual)

    # softserve's side in a thread that ends, as the server loads and builds its engine there, so that while it
    # runs no other thread of this process keeps an OpenMP pool (app/own_thread.py says why).
    ours, ours_results, per_prompt, prompt_load_s = run_in_own_thread(_run_softserve, cfg, models, tensors, reqs,
                                                                      warm, device)
    _free(device)  # the peer runs without our KV cache beside it
    peer, agree = None, None
    if not cfg.skip_peer:
        peer, peer_results = _run_peer(cfg, models, tensors, reqs, warm, device, dtype)
        agree = agreement(ours_results, peer_results, AGREE_K)
    bound, memory = _bound_and_memory(cfg, models, device, dtype, ours, peer, per_prompt)

    result = dict(
        config={**asdict(cfg), "cache_dir": str(cfg.cache_dir), "device": str(device), "dtype": str(dtype).split(".")[-1]},
        machine=dict(device=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
                     loadavg_1m_before=load_before[0], loadavg_1m_after=os.getloadavg()[0]),
        model=dict(name=models.name, shape=cfg.shape, fingerprint=models.fingerprint,
                   weight_bytes=memory["weight_bytes"]),
        workload=dict(tasks={t: TASK_KINDS[t] for t in tensors}, prompt_tokens=sum(len(r.token_ids) for r in reqs),
                      mean_prompt_len=sum(len(r.token_ids) for r in reqs) / len(reqs), prompt_load_s=prompt_load_s),
        softserve=ours, peer=peer,
        ratio=None if peer is None else ours["tok_s"] / peer["tok_s"],
        agreement=agree, bound=bound, memory=memory,
    )
    del models
    _free(device)
    return result


def _run_softserve(cfg: BenchConfig, models, tensors, reqs, warm, device):
    """A warm-up, then the workload through one engine; (summary, per-request results, bytes per prompt,
    prompt load seconds)."""
    from app.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(models.directory) if models.directory is not None else NullTokenizer()
    max_seq_len = cfg.virtual + cfg.hi + cfg.new
    econf = engine_config(models.ours, cfg.n, max_seq_len, max_batched_tokens=cfg.max_batched_tokens,
                          static_decode=None if cfg.cuda_graphs else False, decode_attention=cfg.decode_attention,
                          linear_kernel=cfg.linear_kernel, layer_ops=cfg.layer_ops)
    t = time.perf_counter()  # built in threads that end, as the server builds it (app/own_thread.py)
    engine = run_in_own_thread(AsyncEngine, models.ours, tokenizer, econf)
    engine_setup_s = time.perf_counter() - t  # the KV cache, and on CUDA the decode graphs' capture
    t = time.perf_counter()
    task_prompts = run_in_own_thread(lambda: {pf.name: engine.load_prompt(pf) for pf in prompt_files(models, tensors)})
    prompt_load_s = time.perf_counter() - t
    timer = StepTimer(engine)
    peak = PeakMemory(device)
    phases = ([(warm, 4)] if cfg.warmup else []) + [(reqs, cfg.new)]
    bars = []

    def before(i):
        if i == len(phases) - 1:  # the workload itself, after the warm-up
            bars.append(_progress(cfg.n, "softserve", cfg.progress)[0])
            timer.reset()
            peak.__enter__()

    runs = run_ours(engine, phases, lambda k: bars[-1] and bars[-1].update(k), before)
    peak.__exit__(None, None, None)
    ours_results, ours_wall = runs[-1]
    if bars[-1]:
        bars[-1].close()
    ours = summarize(ours_results, ours_wall, peak)
    ours["steps"] = dict(timer.stats)
    stats = engine.stats()
    ours["kv_cache_blocks"] = stats.kv_blocks_total
    ours["prefix_cache"] = dict(queries=stats.prefix_cache_queries, hits=stats.prefix_cache_hits,
                                preemptions=stats.preemptions)
    ours["kv_cache_bytes"] = engine.core.cache.k.numel() * engine.core.cache.k.element_size() * 2
    ours["engine_setup_s"] = engine_setup_s
    static = engine.core.runner.static
    ours["decode_graphs"] = len(static.graphs) if static is not None else 0
    ours["kernels"] = engine.core.kernels  # linear layers, layer ops, decode attention
    per_prompt = {name: tp.nbytes for name, tp in task_prompts.items()}
    log.info("softserve: %.1f tokens/s in %.1f s", ours["tok_s"], ours_wall)
    return ours, ours_results, per_prompt, prompt_load_s


def _run_peer(cfg: BenchConfig, models, tensors, reqs, warm, device, dtype):
    """A warm-up, then the workload through HF generate() per task group; (summary, per-request results)."""
    peer_prompts = {t: x.to(device, dtype) for t, x in tensors.items()}
    if cfg.warmup:
        run_peer(models.hf, peer_prompts, warm, 4, cfg.batch)
    bar, update = _progress(cfg.n, "peer", cfg.progress)
    with PeakMemory(device) as peer_peak:
        peer_results, peer_wall, split = run_peer(models.hf, peer_prompts, reqs, cfg.new, cfg.batch, update)
    if bar:
        bar.close()
    peer = summarize(peer_results, peer_wall, peer_peak)
    peer["split"] = split
    log.info("peer: %.1f tokens/s in %.1f s", peer["tok_s"], peer_wall)
    return peer, peer_results


def _bound_and_memory(cfg: BenchConfig, models, device, dtype, ours: dict, peer: dict | None,
                      per_prompt: dict) -> tuple[dict, dict]:
    """The decode bound from measured copy bandwidth and the best matmul (and each side's share of it); the
    memory per prompt."""
    bandwidth = copy_bandwidth(device)
    weights = model_bytes(models.ours)
    kv_per_token = KVCache.bytes_per_token(models.args, dtype)
    mean_context = cfg.virtual + (cfg.lo + cfg.hi) / 2 + cfg.new / 2
    flops, kernel = matmul_flops(device, dtype)
    bound = decode_bound(bandwidth, weights, kv_per_token, cfg.n, mean_context, flops,
                         flops_per_token(models.ours, mean_context), kernel)
    bound["share_overall"] = ours["tok_s"] / bound["bound_tok_s"]
    if peer is not None:
        bound["peer_share_overall"] = peer["tok_s"] / bound["bound_tok_s"]
    if ours.get("decode_window_tok_s"):
        bound["share_decode_window"] = ours["decode_window_tok_s"] / bound["bound_tok_s"]
    # The whole workload (prefill too) at the matmul peak: the ceiling if every step ran at the best GEMM's speed.
    forward, generated = ours["steps"]["prefill_tokens"] + ours["steps"]["decode_tokens"], ours["generated_tokens"]
    work = workload_flops(models.ours, forward, generated, mean_context)
    bound.update(workload_tflop=work / 1e12, workload_forward_tokens=forward,
                 workload_bound_tok_s=flops * generated / work)
    bound["share_of_peak"] = ours["tok_s"] / bound["workload_bound_tok_s"]
    if peer is not None:
        bound["peer_share_of_peak"] = peer["tok_s"] / bound["workload_bound_tok_s"]
    total = device_memory_total(device)
    room = total - weights - ours["kv_cache_bytes"]
    memory = dict(device_total_bytes=total, weight_bytes=weights, kv_cache_bytes=ours["kv_cache_bytes"],
                  bytes_per_prompt={f"{n} ({TASK_KINDS[n]})": b for n, b in per_prompt.items()},
                  prompts_fit=max(0, room) // max(per_prompt.values()))
    return bound, memory


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(x, unit="", digits=2) -> str:
    if x is None:
        return "-"
    if unit == "MiB":
        return f"{x / (1 << 20):,.0f}"
    return f"{x:,.{digits}f}"


def format_table(r: dict) -> str:
    """The result as the table softserve bench prints: a header, softserve vs peer, then notes."""
    return "\n".join([_header(r), "", *_comparison(r), "", *_notes(r), _bound_line(r), _peak_line(r),
                      _memory_line(r)])


def _header(r: dict) -> str:
    c = r["config"]
    return (f"softserve bench: {r['model']['name']} ({c['shape']}), {r['machine']['device']}, {c['dtype']}; "
            f"{c['n']} requests over {len(r['workload']['tasks'])} tasks "
            f"({', '.join(f'{t}={k}' for t, k in r['workload']['tasks'].items())}, {c['virtual']} virtual tokens), "
            f"prompts {c['lo']}-{c['hi']} tokens (mean {r['workload']['mean_prompt_len']:.0f}), {c['new']} new each")


def _comparison(r: dict) -> list[str]:
    ours, peer = r["softserve"], r["peer"] or {}
    ratio = lambda a, b, inv=False: "-" if not a or not b else f"{(b / a if inv else a / b):.2f}x"  # noqa: E731
    rows = [
        ("tokens/s", "tok_s", 1, False),
        ("requests/s", "req_s", 3, False),
        ("latency p50 (s)", "latency_p50_s", 2, True),
        ("latency p90 (s)", "latency_p90_s", 2, True),
        ("latency p99 (s)", "latency_p99_s", 2, True),
        ("first token p50 (s)", "ttft_p50_s", 2, True),
        ("first token p99 (s)", "ttft_p99_s", 2, True),
        ("wall (s)", "wall_s", 2, True),
    ]
    lines = ["| metric | softserve | peer (HF generate per task) | softserve vs peer |",
             "|---|---:|---:|---:|"]
    for label, key, digits, lower_better in rows:
        lines.append(f"| {label} | {_fmt(ours.get(key), digits=digits)} | {_fmt(peer.get(key), digits=digits)} | "
                     f"{ratio(ours.get(key), peer.get(key), inv=lower_better)} |")
    lines.append(f"| peak memory (MiB) | {_fmt(ours.get('peak_memory_bytes'), 'MiB')} | "
                 f"{_fmt(peer.get('peak_memory_bytes'), 'MiB')} | |")
    lines.append(f"| generated tokens | {ours['generated_tokens']} | {peer.get('generated_tokens', '-')} | |")
    return lines


def _notes(r: dict) -> list[str]:
    """Machine load, the ratio and greedy agreement, CUDA graphs, the split of steps on both sides."""
    ours, peer, c, mach = r["softserve"], r["peer"], r["config"], r["machine"]
    lines = [f"machine load (1-min average) before / after: {mach['loadavg_1m_before']:.1f} / "
             f"{mach['loadavg_1m_after']:.1f} on {os.cpu_count()} CPUs"]
    if r["ratio"] is not None:
        lines.append(f"ratio (tokens/s): {r['ratio']:.2f}x")
        a = r["agreement"]
        lines.append(f"greedy agreement: {a['agree_first_k']}/{a['requests']} requests share the first {a['k']} "
                     f"tokens, {a['agree_all']}/{a['requests']} all {c['new']}; mean common prefix "
                     f"{a['mean_common_prefix']:.1f}")
    if ours["decode_graphs"]:
        lines.append(f"softserve decode steps replay {ours['decode_graphs']} CUDA graphs captured at engine start "
                     f"({ours['engine_setup_s']:.1f} s)")
    elif c["device"].startswith("cuda"):
        lines.append("softserve ran without CUDA graphs (--no-cuda-graphs)")
    lines.append(f"softserve kernels: {ours['kernels']} (the peer: stock transformers, F.linear and SDPA)")
    pc = ours["prefix_cache"]
    lines.append(f"softserve KV: {ours['kv_cache_blocks']:,} blocks; prefix cache: {pc['hits']:,} of {pc['queries']:,} "
                 f"prompt tokens reused; {pc['preemptions']} preemptions")
    s = ours["steps"]
    lines.append(f"softserve steps: {s['prefill_steps']} with prefill ({s['prefill_tokens']} tokens, "
                 f"{s['prefill_s']:.2f} s), {s['decode_steps']} decode-only ({s['decode_tokens']} tokens, "
                 f"{s['decode_s']:.2f} s)")
    if peer:
        p = peer["split"]
        lines.append(f"peer: {p['batches']} generate() batches; first step (prefill) {p['prefill_s']:.2f} s, "
                     f"decode {p['decode_s']:.2f} s")
    return lines


def _bound_line(r: dict) -> str:
    ours, b = r["softserve"], r["bound"]
    compute = (f"; compute: {b['matmul_tflops'] * 1e3:,.0f} GFLOP/s matmul ({b['matmul_kernel']}, the best "
               f"measured here) / {b['flops_per_token'] / 1e6:,.1f} MFLOP "
               f"per token = {b['compute_bound_tok_s']:,.0f} tokens/s" if "compute_bound_tok_s" in b else "")
    return (f"decode bound: memory: copy bandwidth {b['bandwidth_gb_s']:.1f} GB/s / {b['step_bytes'] / 1e6:,.0f} MB "
            f"per step (weights + KV of {b['batch']} rows at mean context {b['mean_context']:.0f}) x "
            f"{b['batch']} = {b['memory_bound_tok_s']:,.0f} tokens/s{compute}; bound {b['bound_tok_s']:,.0f} "
            f"tokens/s ({b['limited_by']}); softserve reaches {100 * b['share_overall']:.1f}% "
            f"overall" + (f", {100 * b['share_decode_window']:.1f}% while all rows decode "
                          f"({ours['decode_window_tok_s']:,.0f} tokens/s)" if 'share_decode_window' in b else "")
            + (f"; the peer {100 * b['peer_share_overall']:.1f}% overall" if 'peer_share_overall' in b else ""))


def _peak_line(r: dict) -> str:
    b, generated = r["bound"], r["softserve"]["generated_tokens"]
    return (f"whole workload at the matmul peak: {b['workload_tflop'] * 1e3:,.1f} GFLOP "
            f"({b['workload_forward_tokens']:,} tokens through the layers, {generated:,} through the LM head) "
            f"at {b['matmul_tflops'] * 1e3:,.0f} GFLOP/s = {b['workload_bound_tok_s']:,.0f} tokens/s; "
            f"softserve reaches {100 * b['share_of_peak']:.1f}%"
            + (f", the peer {100 * b['peer_share_of_peak']:.1f}%" if "peer_share_of_peak" in b else ""))


def _memory_line(r: dict) -> str:
    m = r["memory"]
    per = ", ".join(f"{k}: {v / 1024:,.0f} KiB" for k, v in m["bytes_per_prompt"].items())
    return (f"memory per registered prompt: {per}; beside the model ({m['weight_bytes'] / (1 << 20):,.0f} MiB) "
            f"and the KV cache ({m['kv_cache_bytes'] / (1 << 20):,.0f} MiB), "
            f"{m['device_total_bytes'] / (1 << 30):,.1f} GiB holds {m['prompts_fit']:,} prompts")


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
