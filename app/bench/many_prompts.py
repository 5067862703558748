"""Start-up with thousands of stored prompts: time to healthy, the server's memory, a cold prompt's first use.

Writes a prompt store of N prompts for the default model (half shallow, half deep, 20 virtual tokens each),
starts `softserve serve` on it and on an empty store, and measures on each: seconds from start to a healthy
/health, the server's resident memory once healthy, and the latency of a one-token completion on a prompt
never used before (file read and prefix computed on first use) and on the same prompt again.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
import torch

from app.bench.http import spawn_settings
from app.config import Settings
from app.engine.weights import DEFAULT_MODEL, base_identity, load_model
from app.server_process import ServerProcess, settings_env
from prompt_store.format import Kind, PromptFile, Task, dump_prompt, embedding_width

VIRTUAL = 20


def write_store(directory: Path, base, n: int) -> None:
    """n prompts named p0..p{n-1}, each as v1 (written directly: the registry's fsync per file is not what
    this measures)."""
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        kind = Kind.PROMPT if i % 2 == 0 else Kind.PREFIX
        pf = PromptFile(name=f"p{i}", kind=kind.value, task=Task.GENERATE.value, num_virtual_tokens=VIRTUAL, labels=[],
                        description="bench", base=base, source="softserve-bench", version=1,
                        prompt_embeddings=torch.randn(VIRTUAL, embedding_width(kind, base), generator=g) * 0.02)
        folder = directory / pf.name
        folder.mkdir(parents=True)
        (folder / "v1.safetensors").write_bytes(dump_prompt(pf))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _completion_s(url: str, model: str) -> float:
    t = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1,
                                                  "temperature": 0}, timeout=120)
    r.raise_for_status()
    return time.perf_counter() - t


def measure(store: Path, settings: Settings, n: int, startup_timeout_s: float = 600) -> dict:
    served = spawn_settings(settings, "cpu", "float32", store).model_copy(update={"model": DEFAULT_MODEL})
    start = time.perf_counter()
    server = ServerProcess(settings_env(served), store.parent / f"server-{n}.log").start()
    try:
        health = server.wait_ready(startup_timeout_s)
        healthy_s = time.perf_counter() - start
        rss = rss_bytes(server.proc.pid)
        row = dict(prompts=n, healthy_s=healthy_s, rss_bytes=rss, prompts_registered=health.get("prompts"))
        if n:
            cold_name = f"p{n // 2 + 1}"  # a deep prompt, never used
            row["cold_first_use_s"] = _completion_s(server.url, cold_name)
            row["warm_use_s"] = _completion_s(server.url, cold_name)
            row["rss_after_use_bytes"] = rss_bytes(server.proc.pid)
        return row
    finally:
        server.stop()


def run_many_prompts(n: int, settings: Settings) -> dict:
    """The default model on CPU in float32, with `settings` otherwise (the model cache, the engine's sizes)."""
    loaded = load_model(DEFAULT_MODEL, torch.float32, "cpu", settings.cache_dir)
    base = base_identity(loaded)
    del loaded
    rows = []
    for count in (0, n):
        with tempfile.TemporaryDirectory(prefix="softserve-bench-prompts-") as tmp:
            t = time.perf_counter()
            write_store(Path(tmp) / "store", base, count)
            written_s = time.perf_counter() - t
            rows.append(measure(Path(tmp) / "store", settings, count) | dict(store_written_s=written_s))
    return dict(rows=rows, rss_added_bytes=rows[1]["rss_bytes"] - rows[0]["rss_bytes"])


def format_many_prompts(r: dict) -> str:
    lines = ["| stored prompts | healthy after (s) | server RSS (MiB) | cold prompt, first use (s) | same prompt again (s) |",
             "|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        cold = f"{row['cold_first_use_s']:.2f}" if "cold_first_use_s" in row else "-"
        warm = f"{row['warm_use_s']:.2f}" if "warm_use_s" in row else "-"
        lines.append(f"| {row['prompts']:,} | {row['healthy_s']:.1f} | {row['rss_bytes'] / (1 << 20):,.0f} | {cold} | "
                     f"{warm} |")
    lines.append(f"\nmemory added by the stored prompts: {r['rss_added_bytes'] / (1 << 20):,.0f} MiB")
    return "\n".join(lines)
