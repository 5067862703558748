"""HTTP mode: a client-concurrency sweep against a live server (POST /v1/completions, stream=true), and,
when the server was spawned here, the same sweep against an in-process engine built exactly as the
server builds it, so the API's overhead over the bare engine shows in one table.

Only loopback addresses are accepted. --http-spawn starts `softserve serve` on a free loopback port with
an empty temporary prompt store (SOFTSERVE_EXAMPLE_PROMPTS=false), uses model "base", and stops it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from app.bench.measure import percentile
from app.engine.weights import resolve_device

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            body = dict(model=model, prompt=text, max_tokens=new, temperature=0, ignore_eos=True, stream=True)
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
                        if "usage" in chunk:
                            counts[0] += chunk["usage"]["completion_tokens"]
                            counts[1] += chunk["usage"]["prompt_tokens"]
                lat.append(time.perf_counter() - t)
                ttft.append(first if first is not None else lat[-1])

        start = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return _summary(lat, ttft, counts[0], counts[1], time.perf_counter() - start)


async def sweep_engine(engine, ids: list[list[int]], new: int, concurrency: int) -> dict:
    from app.engine.sampling import SamplingParams
    from app.engine.sequence import Mode

    sem = asyncio.Semaphore(concurrency)
    lat, ttft, counts = [], [], [0, 0]

    async def one(tokens: list[int]):
        async with sem:
            t = time.perf_counter()
            seq = engine.make_sequence(None, tokens, Mode.GENERATE,
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


class SpawnedServer:
    """`softserve serve` on a free loopback port, no example prompts, and the given prompt store (default: an
    empty temporary one)."""

    def __init__(self, cache_dir: Path, device: str, dtype: str, startup_timeout_s: float = 600,
                 store: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = tempfile.TemporaryDirectory(prefix="softserve-bench-store-") if store is None else None
        store_dir = str(store) if store is not None else self.store.name
        env = dict(os.environ, SOFTSERVE_PROMPT_STORE=store_dir, SOFTSERVE_EXAMPLE_PROMPTS="false",
                   SOFTSERVE_CACHE_DIR=str(cache_dir), SOFTSERVE_DEVICE=device, SOFTSERVE_DTYPE=dtype)
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.startup_timeout_s = startup_timeout_s

    def wait_ready(self) -> dict:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"softserve serve exited ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"softserve serve was not ready within {self.startup_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.store is not None:
            self.store.cleanup()


def _local_tokenizer(cache_dir: Path):
    """The default model's tokenizer when it is already in the cache (never downloads here)."""
    from app.engine.tokenizer import Tokenizer
    from app.engine.weights import DEFAULT_GGUF

    directory = cache_dir / "converted" / Path(DEFAULT_GGUF).stem
    return Tokenizer(directory) if (directory / "tokenizer_config.json").exists() else None


def run_sweep(url: str | None, spawn: bool, levels: list[int], n: int, new: int, lo: int, hi: int, seed: int,
              cache_dir: Path, device: str = "auto", dtype: str = "auto") -> dict:
    """Per concurrency level, max(n, level) requests. With spawn, the bare engine runs the same sweep after
    the server is stopped (so the two never share the CPU)."""
    from app.bench.measure import device_name

    import torch

    if not levels or min(levels) < 1:
        raise ValueError("--concurrency needs positive integers, e.g. 1,4,16,64")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    tokenizer = _local_tokenizer(cache_dir)
    texts = prompt_texts(max([n] + levels), lo, hi, seed, tokenizer)
    server = SpawnedServer(cache_dir, device, dtype) if spawn else None
    try:
        if server is not None:
            url = server.url
            log.info("starting softserve serve on %s", url)
        url = check_loopback(url)
        health = server.wait_ready() if server is not None else _health(url)
        rows = _sweep_server(url, texts, levels, n, new)
    finally:
        if server is not None:
            server.stop()
    if spawn and tokenizer is not None:
        _sweep_bare_engine(rows, texts, new, cache_dir, device, dtype)
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


def _sweep_bare_engine(rows: list[dict], texts: list[str], new: int, cache_dir: Path, device: str,
                       dtype: str) -> None:
    """The same rows through the engine the server loads, without HTTP: adds `engine` to each row."""
    from app.config import Settings
    from app.services import load_services

    services = load_services(Settings(cache_dir=cache_dir, device=device, dtype=dtype, example_prompts=False))
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

    asyncio.run(engine_sweep())


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
