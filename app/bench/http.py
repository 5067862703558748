"""HTTP mode: a client-concurrency sweep against a live server (POST /v1/completions, stream=true), and,
when the server was spawned here, the same sweep against an in-process engine built exactly as the
server builds it, so the API's overhead over the bare engine shows in one table.

Only loopback addresses are accepted. --http-spawn starts `softserve serve` (app/server_process.py) on a free
loopback port with the bench's settings, its --device and --dtype, an empty temporary prompt store and no
example prompts, uses model "base", and stops it; the bare engine is loaded with those same settings.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from app.bench.measure import percentile
from app.config import Settings
from app.engine.weights import model_directory, resolve_device
from app.server_process import ServerProcess, settings_env

log = logging.getLogger("softserve.bench")

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--http only targets loopback addresses (127.0.0.1, ::1, localhost), not {host!r}")
    return url.rstrip("/")


def prompt_texts(n: int, lo: int, hi: int, seed: int, tokenizer) -> list[str]:
    """Random text of about lo..hi tokens: decoded random token ids when the tokenizer is known, else words."""
    rng = random.Random(seed)
    if tokenizer is None:
        return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi) // 2)) for _ in range(n)]
    vocab = len(tokenizer.hf)
    texts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        texts.append(tokenizer.hf.decode(tokenizer.hf.encode(tokenizer.decode(ids), add_special_tokens=False)[:length]))
    return texts


def _summary(lat: list[float], ttft: list[float], tokens: int, prompt_tokens: int, wall: float) -> dict:
    return dict(requests=len(lat), wall_s=wall, req_s=len(lat) / wall, tok_s=tokens / wall,
                generated_tokens=tokens, mean_prompt_tokens=prompt_tokens / max(1, len(lat)),
                latency_p50_s=percentile(lat, 50), latency_p99_s=percentile(lat, 99),
                ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99))


async def sweep_http(url: str, texts: list[str], new: int, concurrency: int, model: str = "base") -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat, ttft, counts = [], [], [0, 0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def one(text: str):
            body = dict(model=model, prompt=text, max_tokens=new, temperature=0, ignore_eos=True, stream=True,
                        stream_options={"include_usage": True})  # the token counts come in the usage chunk
            async with sem:
                t = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        raise RuntimeError(f"POST /v1/completions: {resp.status_code} {(await resp.aread())[:300]!r}")
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if first is None:
                            first = time.perf_counter() - t
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):  # null on every chunk but the last (OpenAI's include_usage)
                            counts[0] += chunk["usage"]["completion_tokens"]
                            counts[1] += chunk["usage"]["prompt_tokens"]
                lat.append(time.perf_counter() - t)
                ttft.append(first if first is not None else lat[-1])

        start = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return _summary(lat, ttft, counts[0], counts[1], time.perf_counter() - start)


async def sweep_engine(engine, ids: list[list[int]], new: int, concurrency: int) -> dict:
    from app.engine.sampling import SamplingParams
    from prompt_store.format import Task

    sem = asyncio.Semaphore(concurrency)
    lat, ttft, counts = [], [], [0, 0]

    async def one(tokens: list[int]):
        async with sem:
            t = time.perf_counter()
            seq = engine.make_sequence(None, tokens, Task.GENERATE,
                                       SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
            first = None
            async for out in engine.stream(seq):
                if first is None and out.tokens:
                    first = time.perf_counter() - t
                counts[0] += len(out.tokens)
            counts[1] += len(tokens)
            lat.append(time.perf_counter() - t)
            ttft.append(first if first is not None else lat[-1])

    start = time.perf_counter()
    await asyncio.gather(*(one(t) for t in ids))
    return _summary(lat, ttft, counts[0], counts[1], time.perf_counter() - start)


def spawn_settings(settings: Settings, device: str, dtype: str, store: Path) -> Settings:
    """The bench's settings for a server it starts: the bench's device and dtype, the given prompt store, no
    example prompts, warnings only in its log (one line per request would be measured too)."""
    return settings.model_copy(update={"device": device, "dtype": dtype, "prompt_store": store,
                                       "example_prompts": False, "log_level": "warning"})


def model_tokenizer(settings: Settings):
    """The tokenizer of the configured model (SOFTSERVE_MODEL: the one a spawned server serves), which sizes
    the prompts in its tokens; None when its folder has none (prompts are then sized in words)."""
    from app.engine.tokenizer import Tokenizer

    directory, _ = model_directory(settings.model, settings.cache_dir)
    return Tokenizer(directory) if (directory / "tokenizer_config.json").exists() else None


def run_sweep(url: str | None, spawn: bool, levels: list[int], n: int, new: int, lo: int, hi: int, seed: int,
              settings: Settings, device: str = "auto", dtype: str = "auto", startup_timeout_s: float = 600) -> dict:
    """Per concurrency level, max(n, level) requests. With spawn, a server with `settings` (and the bench's
    device and dtype, an empty temporary prompt store) is started and stopped here, and the bare engine runs
    the same sweep after it (so the two never share the CPU)."""
    from app.bench.measure import device_name

    import torch

    if not levels or min(levels) < 1:
        raise ValueError("--concurrency needs positive integers, e.g. 1,4,16,64")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    tokenizer = model_tokenizer(settings)
    texts = prompt_texts(max([n] + levels), lo, hi, seed, tokenizer)
    if spawn:
        with tempfile.TemporaryDirectory(prefix="softserve-bench-") as tmp:
            served = spawn_settings(settings, device, dtype, Path(tmp) / "store")
            server = ServerProcess(settings_env(served), Path(tmp) / "server.log").start()
            try:
                url = server.url
                log.info("starting softserve serve on %s", url)
                health = server.wait_ready(startup_timeout_s)
                rows = _sweep_server(url, texts, levels, n, new)
            finally:
                server.stop()
            if tokenizer is not None:
                _sweep_bare_engine(rows, texts, new, served)  # the same settings, the same (empty) store
    else:
        url = check_loopback(url)
        health = _health(url)
        rows = _sweep_server(url, texts, levels, n, new)
    dev = torch.device(resolve_device(device))
    return dict(mode="http", url=url, spawned=spawn, server=health, new=new, lo=lo, hi=hi,
                machine=dict(device=device_name(dev) if spawn else "see server", torch=torch.__version__),
                levels=rows)


def _health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=10).json()


def _sweep_server(url: str, texts: list[str], levels: list[int], n: int, new: int) -> list[dict]:
    """A warm-up, then one row per concurrency level: {concurrency, requests, api: measurements}."""
    rows = []
    asyncio.run(sweep_http(url, texts[:2], 2, 1))  # warm-up
    for c in levels:
        m = max(n, c)
        log.info("HTTP: %d requests, %d concurrent", m, c)
        rows.append(dict(concurrency=c, requests=m, api=asyncio.run(sweep_http(url, texts[:m], new, c))))
    return rows


def _sweep_bare_engine(rows: list[dict], texts: list[str], new: int, settings: Settings) -> None:
    """The same rows through the engine a server with these settings loads, without HTTP: adds `engine` to
    each row."""
    from app.services import load_services

    services = load_services(settings)
    engine = services.engine
    ids = [services.tokenizer.encode(t) for t in texts]

    async def engine_sweep():
        engine.start()
        try:
            await sweep_engine(engine, ids[:2], 2, 1)  # warm-up
            for row in rows:
                log.info("engine: %d requests, %d concurrent", row["requests"], row["concurrency"])
                row["engine"] = await sweep_engine(engine, ids[:row["requests"]], new, row["concurrency"])
        finally:
            await engine.shutdown(grace_s=0)

    try:
        asyncio.run(engine_sweep())
    finally:
        services.registry.stop_watching()


def format_sweep(r: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"softserve bench --http: {r['url']} (model {r['server'].get('model')}, "
             f"{r['server'].get('device')}), {r['new']} new tokens per request, stream=true, greedy, ignore_eos",
             "",
             "| clients | requests | API req/s | engine req/s | API tok/s | engine tok/s | API latency p50 / p99 (s) "
             "| engine latency p50 / p99 (s) | API first token p50 / p99 (s) | engine first token p50 / p99 (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["levels"]:
        a, e = row["api"], row.get("engine") or {}
        lines.append(f"| {row['concurrency']} | {row['requests']} | {a['req_s']:.3f} | "
                     f"{'-' if not e else format(e['req_s'], '.3f')} | {a['tok_s']:.1f} | "
                     f"{'-' if not e else format(e['tok_s'], '.1f')} | {f(a['latency_p50_s'])} / {f(a['latency_p99_s'])} | "
                     f"{f(e.get('latency_p50_s'))} / {f(e.get('latency_p99_s'))} | "
                     f"{f(a['ttft_p50_s'])} / {f(a['ttft_p99_s'])} | {f(e.get('ttft_p50_s'))} / {f(e.get('ttft_p99_s'))} |")
    mean = r["levels"][0]["api"]["mean_prompt_tokens"] if r["levels"] else 0
    lines.append("")
    lines.append(f"mean prompt: {mean:.0f} tokens (random text of {r['lo']}-{r['hi']} tokens, as the server counts them)")
    return "\n".join(lines)
