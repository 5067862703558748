"""Scale-out without Docker: two server processes share one prompt folder; a prompt uploaded to one serves
from the other within a few polls, a delete propagates the same way, a delete and re-create converges, and
racing uploads of one name never both succeed silently."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.live_server import LiveServer, make_prompt_bytes, start_servers, upload


WATCH_INTERVAL_S = 0.5


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    store = tmp_path_factory.mktemp("shared") / "store"
    env = {"SOFTSERVE_WATCH_INTERVAL_S": str(WATCH_INTERVAL_S)}
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


def test_delete_and_recreate_converges_on_every_replica(replicas):
    """F7: v1 deleted and re-created with other tensors on A, between two polls of B: B serves the new
    tensors within two watch intervals, not the old ones forever."""
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        base = ca.get("/v1/prompts").json()["base"]
        body = {"model": "flip", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
        assert upload(ca, "flip", make_prompt_bytes(base, "flip", seed=5, scale=2.0)).status_code == 201
        assert poll(lambda: cb.post("/v1/completions", json=body).status_code == 200)
        old_text = cb.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert ca.delete("/v1/prompts/flip").status_code == 200
        recreated = upload(ca, "flip", make_prompt_bytes(base, "flip", seed=6, scale=2.0))
        assert recreated.status_code == 201 and recreated.json()["version"] == 1
        new_text = ca.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert new_text != old_text  # the two prompts answer differently, so B's answer tells which it serves
        checks = 0

        def b_serves_the_new_prompt() -> bool:
            nonlocal checks
            checks += 1
            return (cb.get("/v1/prompts/flip").json().get("digest") == recreated.json()["digest"]
                    and cb.post("/v1/completions", json=body).json()["choices"][0]["text"] == new_text)

        start = time.monotonic()
        assert poll(b_serves_the_new_prompt)
        # Within two watch intervals plus the checks' own time on this machine (each check is two requests to B
        # and poll's 0.2 s pause), not a fixed number of seconds that a slow machine would break.
        check_s = (time.monotonic() - start) / checks
        assert time.monotonic() - start < 2 * WATCH_INTERVAL_S + 2 * check_s + 0.5


def test_simultaneous_uploads_of_one_name_never_both_succeed_silently(replicas):
    """F7: PUTs of one name racing on two replicas: each stored version has one writer (the loser of a race
    gets 409 version_conflict and can retry), and both replicas end on the same version and digest."""
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        base = ca.get("/v1/prompts").json()["base"]
        responses = []
        for round_ in range(6):
            barrier = threading.Barrier(2)

            def put(client, seed):
                data = make_prompt_bytes(base, "raced", seed=seed)
                barrier.wait()
                responses.append(upload(client, "raced", data))

            threads = [threading.Thread(target=put, args=(c, 2 * round_ + i)) for i, c in enumerate((ca, cb))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stored = [r.json() for r in responses if r.status_code in (200, 201)]
        refused = [r.json()["error"] for r in responses if r.status_code == 409]
        assert len(stored) + len(refused) == len(responses) == 12, [r.text for r in responses]
        assert len({s["version"] for s in stored}) == len(stored)  # no version was claimed twice
        assert all(e["code"] == "version_conflict" and "retry" in e["message"] for e in refused)
        digests = lambda: [c.get("/v1/prompts/raced").json()["digest"] for c in (ca, cb)]  # noqa: E731
        assert poll(lambda: len(set(digests())) == 1)  # each sees the other's last write after a poll
        assert digests()[0] in {s["digest"] for s in stored}


def test_put_and_delete_of_one_name_racing_on_two_replicas(replicas):
    """Both replicas PUT and DELETE one name in a loop for a few seconds: a PUT stores (200/201) or meets a
    conflict (409), a DELETE deletes (200) or finds nothing (404), never a 500 and never a 404 for a PUT that
    stored its file; listing answers 200 throughout; the watchers log no failed refresh; afterwards both
    replicas list, and serve, the same final state."""
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        base = ca.get("/v1/prompts").json()["base"]
        answers: list[tuple[str, int, str]] = []
        listings: list[int] = []
        end = time.monotonic() + 4

        def puts(client, seed):
            data = make_prompt_bytes(base, "churn", seed=seed)
            while time.monotonic() < end:
                r = upload(client, "churn", data)
                answers.append(("PUT", r.status_code, r.text))
                listings.append(client.get("/v1/prompts").status_code)

        def deletes(client):  # cheap, so many of them land while the other replica's PUTs write
            while time.monotonic() < end:
                r = client.delete("/v1/prompts/churn")
                answers.append(("DELETE", r.status_code, r.text))
                listings.append(client.get("/v1/prompts").status_code)

        threads = [threading.Thread(target=puts, args=(c, 20 + i)) for i, c in enumerate((ca, cb))]
        threads += [threading.Thread(target=deletes, args=(c,)) for c in (ca, cb)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        allowed = {"PUT": {200, 201, 409}, "DELETE": {200, 404}}
        assert [x for x in answers if x[1] not in allowed[x[0]]] == []
        assert {status for method, status, _ in answers if method == "PUT"} & {200, 201}  # some PUTs stored
        assert set(listings) == {200}

        def state(client):
            listed = {p["name"]: (p["version"], p["digest"], p["serving"]) for p in client.get("/v1/prompts").json()["data"]}
            served = client.post("/v1/completions", json={"model": "churn", "prompt": "Hi", "max_tokens": 1}).status_code
            return listed.get("churn"), served

        assert poll(lambda: state(ca) == state(cb))
        listed, served = state(ca)
        assert served == (404 if listed is None else 200) and (listed is None or listed[2] is True)
    for server in (a, b):
        log = server.log_path.read_text(errors="replace")
        assert "refresh failed" not in log and "ignoring prompt file" not in log and "Traceback" not in log
