"""softserve as a real server process on a free loopback port, for the HTTP tests: app/server_process.py's
ServerProcess with the tests' settings.

`python -m uvicorn --factory app.server:create_app` by default, `python -m app.cli serve` with cli=True;
settings come from SOFTSERVE_* variables: the model cache from this environment's settings (env_settings()),
a temporary prompt store, no example prompts, a small KV cache; `env` adds or overrides variables.
"""
from __future__ import annotations

import io
import time
from functools import cache
from pathlib import Path

import httpx

from app.config import Settings
from app.server_process import ServerProcess, free_port
from prompt_store.format import embedding_width

REPO = Path(__file__).resolve().parents[1]


def poll(condition, what: str, timeout: float = 60, interval: float = 0.05):
    """condition() until it returns something truthy (that value), else fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(interval)


@cache
def env_settings() -> Settings:
    """This environment's settings (SOFTSERVE_*, else the defaults), read once for all the tests: where the
    model cache is (tests/conftest.py's cache_dir fixture, the servers started here)."""
    return Settings()


def model_cache_dir() -> str:
    return str(env_settings().cache_dir)


class LiveServer(ServerProcess):
    def __init__(self, store: Path, env: dict[str, str] | None = None, cli: bool = False, port: int | None = None):
        self.store, self.cli = Path(store), cli
        port = port or free_port()
        defaults = {"SOFTSERVE_CACHE_DIR": model_cache_dir(), "SOFTSERVE_PROMPT_STORE": str(store),
                    "SOFTSERVE_EXAMPLE_PROMPTS": "false", "SOFTSERVE_KV_CACHE_GB": "0.5", "SOFTSERVE_MAX_SEQ_LEN": "1024",
                    "TOKENIZERS_PARALLELISM": "false"}
        super().__init__({**defaults, **(env or {})}, self.store.parent / f"server-{port}.log", port=port,
                         factory=not cli, cwd=REPO)

    def wait_ready(self, timeout: float = 180) -> LiveServer:
        super().wait_ready(timeout)
        return self


def start_servers(*servers: LiveServer) -> None:
    """Start several at once (they load the model in parallel), then wait for each; if one fails, all are
    stopped."""
    try:
        for server in servers:
            server.start()
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
