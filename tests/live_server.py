"""Run softserve as a real server process on a free loopback port, for the HTTP tests.

`python -m uvicorn --factory app.server:create_app` by default, `python -m app.cli serve` with cli=True;
settings come from SOFTSERVE_* variables: the model cache from the environment (or ~/.cache/softserve),
a temporary prompt store, no example prompts, a small KV cache.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.config import Settings
from prompt_store.format import embedding_width

REPO = Path(__file__).resolve().parents[1]


def model_cache_dir() -> str:
    return str(Settings().cache_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, store: Path, env: dict[str, str] | None = None, cli: bool = False, port: int | None = None):
        self.store, self.port, self.cli = Path(store), port or free_port(), cli
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
        self.env = {**inherited, "SOFTSERVE_CACHE_DIR": model_cache_dir(), "SOFTSERVE_PROMPT_STORE": str(store),
                    "SOFTSERVE_EXAMPLE_PROMPTS": "false", "SOFTSERVE_KV_CACHE_GB": "0.5",
                    "SOFTSERVE_MAX_SEQ_LEN": "1024", "SOFTSERVE_HOST": "127.0.0.1",
                    "SOFTSERVE_PORT": str(self.port), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.log_path = self.store.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LiveServer:
        if self.cli:
            cmd = [sys.executable, "-m", "app.cli", "serve"]
        else:
            cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.server:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 180) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return self
                if "failed to load" in r.text:
                    raise RuntimeError(f"server failed to load: {r.text}\n{self.output()}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> LiveServer:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_servers(*servers: LiveServer) -> None:
    """Start several at once (they load the model in parallel), then wait for each."""
    for server in servers:
        server.start()
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a Server-Sent Events response, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def make_prompt_bytes(base: dict, name: str, task: str = "generate", kind: str = "prompt", labels=(),
                      num_virtual_tokens: int = 4, seed: int = 0, head: bool = True, scale: float = 0.5) -> bytes:
    """A random but valid softserve prompt file for the server's base (GET /v1/prompts gives `base`)."""
    import torch

    from prompt_store.format import BaseIdentity, PromptFile, dump_prompt

    identity = BaseIdentity.from_dict(base)
    g = torch.Generator().manual_seed(seed)
    width = embedding_width(kind, identity)
    labels = list(labels)
    with_head = task == "tag" or (task == "classify" and head)
    pf = PromptFile(
        name=name, kind=kind, task=task, num_virtual_tokens=num_virtual_tokens, labels=labels,
        description=f"test {task} prompt", base=identity,
        prompt_embeddings=torch.randn(num_virtual_tokens, width, generator=g) * scale,
        head_weight=torch.randn(len(labels), identity.hidden_size, generator=g) * 0.2 if with_head else None,
        head_bias=torch.randn(len(labels), generator=g) * 0.1 if with_head else None,
        source="test",
    )
    return dump_prompt(pf)


def upload(client: httpx.Client, name: str, prompt_bytes: bytes, **kwargs) -> httpx.Response:
    return client.put(f"/v1/prompts/{name}", files={"file": ("prompt.safetensors", io.BytesIO(prompt_bytes))}, **kwargs)
