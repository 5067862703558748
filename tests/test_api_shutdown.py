"""Graceful shutdown: SIGTERM during a long stream keeps the server listening while it drains (/health and
new requests answer 503), ends the stream cleanly (a final chunk with a finish reason, then [DONE]), the
process exits within the grace period, and the prompt store is intact."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from prompt_store.format import load_prompt_file
from prompt_store.registry import LOCK_FILE
from tests.live_server import LiveServer, make_prompt_bytes, upload

GRACE_S = 2


def test_sigterm_ends_streams_cleanly_and_keeps_the_store(tmp_path):
    server = LiveServer(tmp_path / "store", {"SOFTSERVE_SHUTDOWN_GRACE_S": str(GRACE_S),
                                              "SOFTSERVE_MAX_SEQ_LEN": "2048"}, cli=True)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        base = client.get("/v1/prompts").json()["base"]
        assert upload(client, "keeper", make_prompt_bytes(base, "keeper")).status_code == 201
        events, first_chunk = [], threading.Event()

        def stream():
            body = {"model": "keeper", "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60), server.output()
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=server.url, timeout=5) as fresh:  # a new connection: still listening
            health = fresh.get("/health")
            while health.status_code == 200 and time.monotonic() - start < GRACE_S:  # until the signal lands
                time.sleep(0.02)
                health = fresh.get("/health")
            refused = fresh.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert time.monotonic() - start < GRACE_S  # asked while the stream was still draining
        assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
        reader.join(GRACE_S + 30)
        assert not reader.is_alive()
        server.proc.wait(GRACE_S + 30)
        elapsed = time.monotonic() - start
        # uvicorn (>= 0.29) re-raises the signal it stopped for once it has shut down
        assert server.proc.returncode == -signal.SIGTERM, server.output()
        assert elapsed < GRACE_S + 10, elapsed

    assert events[-1] == "[DONE]", events[-3:]
    last, usage = json.loads(events[-3]), json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "cancelled"  # ignore_eos, no stop strings: only the grace deadline ends it
    assert usage["choices"] == [] and 0 < usage["usage"]["completion_tokens"] < 2000  # it was cut at the deadline, not run to the end
    files = sorted((tmp_path / "store").rglob("*.safetensors"))
    assert [f.relative_to(tmp_path / "store").as_posix() for f in files] == ["keeper/v1.safetensors"]
    assert load_prompt_file(files[0]).name == "keeper"
    assert not [p for p in (tmp_path / "store").rglob(".*") if p.name != LOCK_FILE]  # no temp files left behind
