"""Scale-out without Docker: two server processes share one prompt folder; a prompt uploaded to one serves
from the other within a few polls, and a delete propagates the same way."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.live_server import LiveServer, make_prompt_bytes, start_servers, upload


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    store = tmp_path_factory.mktemp("shared") / "store"
    env = {"SOFTSERVE_WATCH_INTERVAL_S": "0.5"}
    a, b = LiveServer(store, env), LiveServer(store, env)
    start_servers(a, b)
    yield a, b
    a.stop()
    b.stop()


def poll(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_upload_to_one_serves_from_the_other(replicas):
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        base = ca.get("/v1/prompts").json()["base"]
        assert upload(ca, "shared-gen", make_prompt_bytes(base, "shared-gen", seed=3)).status_code == 201
        assert upload(ca, "shared-cls", make_prompt_bytes(base, "shared-cls", "classify", labels=["a", "b"])).status_code == 201
        body = {"model": "shared-gen", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
        want = ca.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert poll(lambda: cb.post("/v1/completions", json=body).status_code == 200)
        got = cb.post("/v1/completions", json=body)
        assert got.json()["choices"][0]["text"] == want
        cls = {"prompt": "shared-cls", "inputs": "hi"}
        assert poll(lambda: cb.post("/v1/classify", json=cls).status_code == 200)
        assert cb.post("/v1/classify", json=cls).json()["results"][0]["probs"] == pytest.approx(
            ca.post("/v1/classify", json=cls).json()["results"][0]["probs"], abs=1e-5)
        assert {m["id"] for m in cb.get("/v1/models").json()["data"]} >= {"shared-gen", "shared-cls"}

        # a new version and a delete made on B reach A the same way
        assert upload(cb, "shared-gen", make_prompt_bytes(base, "shared-gen", seed=4)).status_code == 200
        assert poll(lambda: ca.get("/v1/prompts/shared-gen").json()["serving"]
                    and ca.get("/v1/prompts/shared-gen").json()["version"] == 2)
        assert cb.delete("/v1/prompts/shared-cls").status_code == 200
        assert poll(lambda: ca.post("/v1/classify", json=cls).status_code == 404)
