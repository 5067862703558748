"""The server's states seen over HTTP, each against a real server process: a full queue (429 with Retry-After,
the admitted requests still complete), a model that is loading and one that failed to load (503 naming
which, on /health and on the routes, the process staying up), a weights read that stalls (the server still
answers and stops; past SOFTSERVE_WEIGHTS_READ_TIMEOUT_S the load fails), and requests that run past
SOFTSERVE_REQUEST_TIMEOUT_S (504, nothing left running)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import LiveServer, poll, sse_events


def error_of(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    return error["message"]





def metric_samples(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


# ---- a full queue ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    """One sequence runs at a time, one request may wait."""
    with LiveServer(tmp_path_factory.mktemp("queue") / "store",
                    {"SOFTSERVE_MAX_NUM_SEQS": "1", "SOFTSERVE_MAX_WAITING": "1"}) as s:
        yield s


def test_full_queue_is_429_with_retry_after_and_admitted_requests_complete(small_queue):
    long_tokens, queued_tokens = 128, 4  # the long one must outlast the four refusals by far
    with httpx.Client(base_url=small_queue.url, timeout=120) as client:
        running, streamed, first_chunk = {}, [], threading.Event()

        def run_long():  # occupies the one running slot; its first chunk means it runs
            body = {"prompt": "Tell me a long story.", "max_tokens": long_tokens, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/completions", json=body) as r:
                running["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        streamed.append(line[len("data: "):])
                        first_chunk.set()

        queued = {}

        def run_queued():  # admitted, waits in the queue behind the long one
            queued["r"] = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": queued_tokens,
                                                                "ignore_eos": True})

        long_thread = threading.Thread(target=run_long)
        long_thread.start()
        assert first_chunk.wait(60), small_queue.output()
        queued_thread = threading.Thread(target=run_queued)
        queued_thread.start()
        poll(lambda: client.get("/health").json()["waiting"] == 1, "the second request waits")
        health = client.get("/health").json()
        assert (health["running"], health["waiting"]) == (1, 1)

        # the queue is full: every route refuses before running anything, a stream included (before its 200)
        refused = [client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
                   client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 2}),
                   client.post("/v1/generate", json={"inputs": ["Hi", "Yo"], "max_tokens": 2})]
        with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True}) as r:
            r.read()
            refused.append(r)
        for r in refused:
            message = error_of(r, 429, "overloaded")
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "overloaded_error"
            assert "at capacity (1 requests waiting)" in message, message

        long_thread.join(120)
        queued_thread.join(120)
        assert not long_thread.is_alive() and not queued_thread.is_alive()
        # the admitted requests were not cut short by the refusals
        assert running["status"] == 200 and streamed[-1] == "[DONE]"
        chunks = [json.loads(e) for e in streamed[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == long_tokens
        r = queued["r"]
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == queued_tokens
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert int(r.headers["x-queue-time"]) > 0  # it did wait for the long one

        # and the server takes new work again
        health = client.get("/health").json()
        assert (health["running"], health["waiting"]) == (0, 0)
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        samples = metric_samples(client)
        assert samples['softserve_requests_total{prompt="base",route="/v1/completions",status="429"}'] == 2
        assert samples['softserve_requests_total{prompt="base",route="/v1/generate",status="429"}'] == 1


# ---- loading, and a failed load -------------------------------------------------------------------------

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 49152, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}


def _fds_open_on(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (Linux /proc)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) == str(path):
                return True
        except OSError:  # closed meanwhile
            pass
    return False


def test_loading_then_failed_load_are_503_naming_the_state(tmp_path):
    """SOFTSERVE_MODEL is a directory whose shard index is a FIFO this test holds open: the loader opens it
    and blocks reading it (in Python's read, so the event loop keeps answering) until the test writes.
    What it then writes is not JSON, so the load fails."""
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    index = model / "model.safetensors.index.json"
    os.mkfifo(index)
    writer = os.open(index, os.O_RDWR)  # a writer exists, so the loader's open returns and its read blocks
    server = LiveServer(tmp_path / "store", {"SOFTSERVE_MODEL": str(model)})
    try:
        server.start()
        poll(lambda: server.proc.poll() is None and _fds_open_on(server.proc.pid, index),
             "the loader opens the shard index", timeout=120)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            message = error_of(client.get("/health"), 503, "not_ready")
            assert "loading" in message
            error_of(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503, "not_ready")
            error_of(client.get("/v1/prompts"), 503, "not_ready")
            error_of(client.post("/v1/generate", json={"inputs": "Hi"}), 503, "not_ready")
            assert "softserve_ready 0.0" in client.get("/metrics").text
            assert _fds_open_on(server.proc.pid, index)  # still blocked: the answers above were given meanwhile

            os.write(writer, b"this is not JSON")
            os.close(writer)
            writer = None
            failed = poll(lambda: (r := client.get("/health")).json()["error"]["code"] != "not_ready" and r,
                          "the load fails")
            message = error_of(failed, 503, "load_failed")
            assert message.startswith("the model failed to load:"), message
            assert len(message) > len("the model failed to load: ")  # it says why
            assert error_of(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503,
                            "load_failed") == message
            assert error_of(client.get("/v1/prompts"), 503, "load_failed") == message
            assert error_of(client.post("/v1/generate", json={"inputs": "Hi"}), 503, "load_failed") == message
            assert "softserve_ready 0.0" in client.get("/metrics").text
            # the process stays up to say why
            assert server.proc.poll() is None
            error_of(client.get("/health"), 503, "load_failed")
    finally:
        if writer is not None:
            os.close(writer)  # the loader reads EOF and fails, so the server can stop
        server.stop()


def _reader_of(pid: int, path: Path) -> int | None:
    """The child process of `pid` whose command line names `path` (the weights reader), if there is one."""
    for task in Path(f"/proc/{pid}/task").iterdir():  # each thread's children: the loading thread started it
        try:
            for child in (task / "children").read_text().split():
                if str(path).encode() in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                    return int(child)
        except OSError:  # ended meanwhile
            pass
    return None


def _ended(pid: int) -> bool:
    """Whether process `pid` is gone or a zombie (ended, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _tiny_model_with_fifo_weights(tmp_path: Path) -> Path:
    """A model folder whose model.safetensors is a FIFO nobody writes: opening it blocks for ever."""
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    os.mkfifo(model / "model.safetensors")
    return model


def test_a_stalled_weights_read_keeps_health_answering_and_sigterm_stopping(tmp_path):
    """Opening the FIFO blocks the weights reader, a child process: in safetensors' own reader it would block
    holding the GIL and freeze the server. Meanwhile /health answers 503 `loading`, and SIGTERM stops the
    server, the blocked reader with it."""
    model = _tiny_model_with_fifo_weights(tmp_path)
    server = LiveServer(tmp_path / "store", {"SOFTSERVE_MODEL": str(model), "SOFTSERVE_WEIGHTS_READ_TIMEOUT_S": "3600"})
    try:
        server.start()
        reader = poll(lambda: server.proc.poll() is None and _reader_of(server.proc.pid, model / "model.safetensors"),
                      "the weights reader opens model.safetensors", timeout=120)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            poll(lambda: _health(client), "the server listens")
            for _ in range(3):
                assert "loading" in error_of(client.get("/health"), 503, "not_ready")
            assert "softserve_ready 0.0" in client.get("/metrics").text
        assert _reader_of(server.proc.pid, model / "model.safetensors") == reader  # still blocked meanwhile

        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
        assert server.proc.returncode == -signal.SIGTERM, server.output()  # uvicorn ends by the signal it got
        poll(lambda: _ended(reader), "the blocked reader ends with the server")
    finally:
        server.stop()


def test_a_weights_read_past_its_timeout_fails_the_load_naming_it(tmp_path):
    model = _tiny_model_with_fifo_weights(tmp_path)
    server = LiveServer(tmp_path / "store", {"SOFTSERVE_MODEL": str(model), "SOFTSERVE_WEIGHTS_READ_TIMEOUT_S": "1"})
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            failed = poll(lambda: (r := _health(client)) and r.json()["error"]["code"] != "not_ready" and r,
                          "the load fails", timeout=120)
            message = error_of(failed, 503, "load_failed")
            assert message == (f"the model failed to load: reading {model / 'model.safetensors'} stalled: "
                               f"no data for 1 s (a FIFO nobody writes, a hung disk?)")
            assert message.removeprefix("the model failed to load: ") in server.output()  # and in the log
            assert server.proc.poll() is None  # the process stays up to say why
    finally:
        server.stop()


def _health(client: httpx.Client) -> httpx.Response | None:
    """/health's answer, None while the server does not listen yet."""
    try:
        return client.get("/health")
    except httpx.TransportError:
        return None


# ---- request timeout ------------------------------------------------------------------------------------

TIMEOUT_S = 2


@pytest.fixture(scope="module")
def short_timeout(tmp_path_factory):
    with LiveServer(tmp_path_factory.mktemp("timeout") / "store",
                    {"SOFTSERVE_REQUEST_TIMEOUT_S": str(TIMEOUT_S), "SOFTSERVE_MAX_SEQ_LEN": "4096"}) as s:
        yield s


LONG = {"max_tokens": 4000, "ignore_eos": True}  # far more than even a fast GPU makes in TIMEOUT_S


def test_requests_past_the_timeout_are_504_and_free_their_slots(short_timeout):
    with httpx.Client(base_url=short_timeout.url, timeout=120) as client:
        for route, body in (("/v1/completions", {"prompt": "Tell me a long story.", **LONG}),
                            ("/v1/generate", {"inputs": ["Tell me a long story.", "And another."], **LONG})):
            start = time.monotonic()
            r = client.post(route, json=body)
            elapsed = time.monotonic() - start
            message = error_of(r, 504, "timeout")
            assert r.json()["error"]["type"] == "timeout_error"
            assert "timed out" in message, message
            assert TIMEOUT_S <= elapsed < TIMEOUT_S + 10, (route, elapsed)  # not cut early, not run to the end

        # a stream has already sent its 200: the timeout is its last chunk's finish reason
        with client.stream("POST", "/v1/completions", json={"prompt": "Tell me a long story.", **LONG,
                                                            "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        last, usage = json.loads(events[-3]), json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "timeout"
        assert 0 < usage["usage"]["completion_tokens"] < LONG["max_tokens"]

        # nothing is left running or holding KV blocks, and new requests are served
        def idle():
            health = client.get("/health").json()
            return (health["running"], health["waiting"]) == (0, 0)

        poll(idle, "/health shows nothing running or waiting")  # freed, not leaked (a bound in seconds would flake)
        samples = metric_samples(client)
        assert samples["softserve_running_requests"] == 0 and samples["softserve_kv_blocks_used"] == 0
        assert samples['softserve_requests_total{prompt="base",route="/v1/completions",status="504"}'] == 1
        assert samples['softserve_requests_total{prompt="base",route="/v1/generate",status="504"}'] == 1
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
