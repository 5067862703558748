"""softserve's side: every request submitted at once to one AsyncEngine, any task mix per batch.

It drives the engine's loop itself rather than through app/llm.py's LLM: it times every streamed token
(engine.stream; first-token and per-token latencies), and LLM's calls only return finished outputs."""
from __future__ import annotations

import asyncio
import time

from app.bench.peer import RequestResult, sync
from app.bench.workload import Request
from app.engine.config import EngineConfig
from app.engine.engine import AsyncEngine
from app.engine.kv_cache import KVCache
from app.engine.model import Transformer
from app.engine.sampling import SamplingParams
from prompt_store.format import Task


def engine_config(model: Transformer, num_seqs: int, max_seq_len: int, **knobs) -> EngineConfig:
    """A KV cache that holds num_seqs sequences of max_seq_len positions at once (and the scratch block);
    knobs: EngineConfig's others (max_batched_tokens, static_decode, ...)."""
    config = EngineConfig(max_seq_len=max_seq_len, max_num_seqs=num_seqs, max_waiting=max(256, num_seqs), **knobs)
    blocks = num_seqs * -(-max_seq_len // config.block_size) + 1
    per_block = KVCache.bytes_per_token(model.args, model.embed_tokens.weight.dtype) * config.block_size
    return config.model_copy(update={"kv_cache_bytes": per_block * blocks})


async def _run(engine: AsyncEngine, reqs: list[Request], new: int, progress) -> tuple[list[RequestResult], float]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    seqs = [engine.make_sequence(r.task, r.token_ids, Task.GENERATE, params) for r in reqs]
    sync(engine.core.runner.device)
    t0 = time.perf_counter()

    async def one(seq) -> RequestResult:
        tokens, times, first = [], [], None
        async for out in engine.stream(seq):
            if out.error:
                raise RuntimeError(f"request {seq.request_id} failed: {out.error}")
            now = time.perf_counter() - t0
            if out.tokens and first is None:
                first = now
            tokens += [c.token_id for c in out.tokens]
            times += [now] * len(out.tokens)
        if progress is not None:
            progress(1)
        return RequestResult(tokens, first if first is not None else time.perf_counter() - t0,
                             time.perf_counter() - t0, times)

    results = await asyncio.gather(*(one(s) for s in seqs))
    return list(results), time.perf_counter() - t0


def run_ours(engine: AsyncEngine, phases: list[tuple[list[Request], int]], progress=None, before_phase=None
             ) -> list[tuple[list[RequestResult], float]]:
    """Starts the engine loop, runs each phase (requests, new tokens) in turn, e.g. a warm-up then the
    workload, and stops the loop; per phase: per-request results and the wall time. progress is fed by
    the last phase only; before_phase(i) runs before phase i."""
    async def main():
        engine.start()
        try:
            out = []
            for i, (reqs, new) in enumerate(phases):
                if before_phase is not None:
                    before_phase(i)
                out.append(await _run(engine, reqs, new, progress if i == len(phases) - 1 else None))
            return out
        finally:
            await engine.shutdown(grace_s=0)

    return asyncio.run(main())


class StepTimer:
    """Wraps engine.core.runner.run (the engine is not modified) to split the engine's time into steps that
    carry prefill tokens and decode-only steps. run() ends in a host sync (sampling's .tolist())."""

    def __init__(self, engine: AsyncEngine):
        self.stats = dict(prefill_steps=0, prefill_s=0.0, prefill_tokens=0, decode_steps=0, decode_s=0.0,
                          decode_tokens=0)
        inner = engine.core.runner.run

        def timed(step):
            t = time.perf_counter()
            result = inner(step)
            dt = time.perf_counter() - t
            key = "prefill" if step.prefill else "decode"
            self.stats[f"{key}_steps"] += 1
            self.stats[f"{key}_s"] += dt
            self.stats[f"{key}_tokens"] += result.num_tokens
            return result

        engine.core.runner.run = timed

    def reset(self) -> None:
        for k in self.stats:
            self.stats[k] = 0 if isinstance(self.stats[k], int) else 0.0
