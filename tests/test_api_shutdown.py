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
from tests.live_server import LiveServer, make_prompt_bytes, poll, upload

GRACE_S = 2


def streamed_completion(client: httpx.Client, body: dict) -> tuple[threading.Thread, list[str], threading.Event]:
    """A thread, not started, that streams a completion: the thread, the stream's data events as they come, and
    an event set at the first."""
    events, first = [], threading.Event()

    def read() -> None:
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    return threading.Thread(target=read), events, first


def test_sigterm_ends_streams_cleanly_and_keeps_the_store(tmp_path):
    server = LiveServer(tmp_path / "store", {"SOFTSERVE_SHUTDOWN_GRACE_S": str(GRACE_S),
                                              "SOFTSERVE_MAX_SEQ_LEN": "2048"}, cli=True)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        base = client.get("/v1/prompts").json()["base"]
        assert upload(client, "keeper", make_prompt_bytes(base, "keeper")).status_code == 201
        reader, events, first_chunk = streamed_completion(client, {
            "model": "keeper", "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True,
            "stream_options": {"include_usage": True}})
        reader.start()
        assert first_chunk.wait(60), server.output()
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # a new connection for each request: still listening
        with httpx.Client(base_url=server.url, timeout=5, headers={"connection": "close"}) as fresh:
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


DRAIN_GRACE_S = 5  # long enough for the requests below to be answered while the server drains
COMPLETION = {"prompt": "Hi", "max_tokens": 1}


def closes(r: httpx.Response) -> bool:
    """The response is its connection's last (`Connection: close`)."""
    return r.headers.get("connection", "").lower() == "close"


def connection_of(r: httpx.Response):
    """The connection a response came on (httpcore's stream object: a new connection is a new object)."""
    return r.extensions["network_stream"]


def assert_refused_while_draining(r: httpx.Response) -> None:
    """A request that came while the server drains: 503 shutting_down, Retry-After, and the connection closed
    after it, so the client's retry opens a new connection (to another replica, behind a load balancer)."""
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert closes(r) and r.headers["retry-after"] == "1", r.headers


def test_draining_ends_kept_alive_connections(tmp_path):
    """A client that keeps its connection (httpx, requests' Session, the openai client) is not kept on a
    draining server answering 503 after 503: once the drain starts, an idle kept-alive connection is closed
    (the client's next request opens a new one), a response in progress is its connection's last, and every
    response written while draining says `Connection: close`, refusals with `Retry-After`. A client sending
    back to back sees at most one connection closed under a request it was sending when the drain started,
    never a 503 on a connection that stays open. The stream running meanwhile ends cleanly."""
    server = LiveServer(tmp_path / "store", {"SOFTSERVE_SHUTDOWN_GRACE_S": str(DRAIN_GRACE_S),
                                              "SOFTSERVE_MAX_SEQ_LEN": "2048"})
    one_connection = httpx.Limits(max_connections=1)
    stop_hammer = threading.Event()
    with server, httpx.Client(base_url=server.url, timeout=60) as streamer, \
            httpx.Client(base_url=server.url, timeout=60, limits=one_connection) as busy, \
            httpx.Client(base_url=server.url, timeout=60, limits=one_connection) as kept:

        def fresh(method: str, path: str, **kwargs) -> httpx.Response:  # a request on a connection of its own
            with httpx.Client(base_url=server.url, timeout=60) as client:
                return client.request(method, path, **kwargs)

        # a long stream, running when the drain starts
        streaming, events, first_chunk = streamed_completion(
            streamer, {"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True})

        # a non-streaming request on a kept-alive connection, running (its answer not begun) when the drain starts
        busy_answer: list[httpx.Response] = []

        def long_request():
            body = {"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True}
            busy_answer.append(busy.post("/v1/completions", json=body))

        # a client sending short requests back to back on one kept-alive connection, across the drain's start
        hammered: list[httpx.Response | httpx.TransportError] = []

        def hammer():
            with httpx.Client(base_url=server.url, timeout=60, limits=one_connection) as client:
                while not stop_hammer.is_set() and sum(
                        isinstance(r, httpx.Response) and r.status_code == 503 for r in hammered) < 3:
                    try:
                        hammered.append(client.post("/v1/completions", json=COMPLETION))
                    except httpx.ConnectError as e:  # not listening: the drain is over
                        hammered.append(e)
                        return
                    except httpx.TransportError as e:
                        hammered.append(e)

        threads = [streaming, threading.Thread(target=long_request),
                   threading.Thread(target=hammer, daemon=True)]
        try:
            threads[0].start()
            assert first_chunk.wait(60), server.output()
            threads[1].start()
            poll(lambda: fresh("GET", "/health").json()["running"] == 2, "the long request runs beside the stream")
            before = [kept.post("/v1/completions", json=COMPLETION) for _ in range(3)]
            assert [r.status_code for r in before] == [200] * 3 and not any(closes(r) for r in before)
            kept_connection = connection_of(before[0])
            assert all(connection_of(r) is kept_connection for r in before)  # one connection, kept alive
            threads[2].start()
            poll(lambda: len(hammered) >= 3, "the back-to-back client is answered")

            server.proc.send_signal(signal.SIGTERM)
            health = poll(lambda: (lambda r: r if r.status_code == 503 else None)(fresh("GET", "/health")),
                          "the server drains")
            assert_refused_while_draining(health)
            assert_refused_while_draining(fresh("POST", "/v1/completions", json=COMPLETION))

            # the kept-alive connection was idle when the drain started: closed, so the next request opens a
            # new connection, and each answer closes the connection it came on
            refused = [kept.post("/v1/completions", json=COMPLETION) for _ in range(2)]
            for r in refused:
                assert_refused_while_draining(r)
            connections = [kept_connection] + [connection_of(r) for r in refused]
            assert len({id(c) for c in connections}) == 3, "a connection was used again after the drain started"

            threads[2].join(60)
            assert not threads[2].is_alive(), hammered[-3:]
        finally:
            stop_hammer.set()
        threads[1].join(DRAIN_GRACE_S + 60)
        threads[0].join(DRAIN_GRACE_S + 60)
        assert not threads[0].is_alive() and not threads[1].is_alive()
        server.proc.wait(DRAIN_GRACE_S + 30)
        assert server.proc.returncode == -signal.SIGTERM, server.output()

    # the request running when the drain started finished or was cut at the deadline; either way its answer
    # was its connection's last
    (answer,) = busy_answer
    assert answer.status_code == 200 or answer.json()["error"]["code"] == "cancelled", answer.text
    assert closes(answer), answer.headers

    # the back-to-back client: 200s on one kept-alive connection, then the drain: the connection's last answer
    # says `Connection: close` (or, idle at that instant, it was closed under the request then being sent),
    # and from then on every answer is a refusal on a new connection that it closes
    kept_alive = []
    for r in hammered:
        if not (isinstance(r, httpx.Response) and r.status_code == 200 and not closes(r)):
            break
        kept_alive.append(r)
    assert len(kept_alive) >= 3 and len({id(connection_of(r)) for r in kept_alive}) == 1, hammered[:5]
    first, *after = hammered[len(kept_alive):]
    if isinstance(first, httpx.Response):
        assert closes(first), first.headers
        if first.status_code != 200:  # (a 200: admitted just before the drain started)
            assert_refused_while_draining(first)
    else:
        assert not isinstance(first, httpx.ConnectError), first  # the server still listened
    assert after and all(isinstance(r, httpx.Response) for r in after), after
    for r in after:
        assert_refused_while_draining(r)
    last_connections = [connection_of(r) for r in [kept_alive[-1], *after]]
    assert len({id(c) for c in last_connections}) == len(last_connections)  # each answer: a new connection

    # the stream running through the drain still ended cleanly: a final chunk with its finish reason, [DONE]
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("cancelled", "length")



