"""docker-compose.yml's scale profile, run for real: three replicas behind HAProxy share the prompt store.
An upload through the balancer serves from every replica within the watch interval; a replica killed under
load costs clients only the streams it was sending; a replica that is loading gets no requests."""
from __future__ import annotations

import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import yaml

from tests.deploy.docker import REPO, compose_command, docker, exec_request, run, wait_healthy
from tests.live_server import free_port, sse_events

pytestmark = pytest.mark.deploy

ADMIN = "deploy-test-admin-token"
WATCH_S = 1.0
ADAPTER = REPO / "examples" / "peft" / "concise"


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]
    lb: str
    stats: str

    def replicas(self) -> list[str]:
        ids = run(*self.compose, "ps", "-q", "replica", env=self.env).stdout.split()
        return [docker("inspect", "--format", "{{.Name}}", i).stdout.strip().lstrip("/") for i in ids]

    def servers(self) -> dict[str, dict]:
        """HAProxy's view of each replica slot (server-template replica1..10): its status is UP, DOWN or MAINT."""
        lines = httpx.get(self.stats + "/stats;csv", timeout=5).text.lstrip("# ").splitlines()
        header = lines[0].split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r["pxname"] == "softserve" and r["svname"].startswith("replica")}

    def up(self) -> set[str]:
        return {name for name, row in self.servers().items() if row["status"] == "UP"}


@pytest.fixture(scope="module")
def stack(image, record):
    compose = [*compose_command(), "-p", f"softservedeploy{uuid.uuid4().hex[:6]}", "-f", str(REPO / "docker-compose.yml")]
    lb_port, stats_port = free_port(), free_port()
    env = {**os.environ, "COMPOSE_PROFILES": "scale", "SOFTSERVE_ADMIN_TOKEN": ADMIN,
           "SOFTSERVE_WATCH_INTERVAL_S": str(WATCH_S), "SOFTSERVE_LB_HOST_PORT": str(lb_port),
           "SOFTSERVE_LB_STATS_HOST_PORT": str(stats_port)}
    s = Stack(compose, env, f"http://127.0.0.1:{lb_port}", f"http://127.0.0.1:{stats_port}")
    start = time.monotonic()
    try:
        run(*compose, "up", "-d", "--no-build", "replica", "lb", env=env, timeout=300)
        replicas = s.replicas()
        assert len(replicas) == 3
        for name in replicas:
            wait_healthy(name)
        deadline = time.monotonic() + 60
        while len(s.up()) < 3:
            assert time.monotonic() < deadline, f"HAProxy does not see 3 replicas up: {s.servers()}"
            time.sleep(1)
        record("compose scale-out: 3 replicas healthy and up in HAProxy", f"{time.monotonic() - start:.0f} s")
        yield s
    finally:
        run(*compose, "down", "-v", "--remove-orphans", "-t", "5", env=env, check=False, timeout=300)


def test_every_profile_is_valid_and_stops_after_the_drain():
    """The gpu profile cannot run here (no GPU); Compose must still accept it."""
    env = {**os.environ, "COMPOSE_PROFILES": "gpu,scale"}
    config = yaml.safe_load(run(*compose_command(), "-f", str(REPO / "docker-compose.yml"), "config", env=env).stdout)
    services = config["services"]
    assert set(services) == {"softserve", "softserve-gpu", "replica", "lb"}
    (device,) = services["softserve-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    for name in ("softserve", "softserve-gpu", "replica"):
        drain_s = float(services[name]["environment"]["SOFTSERVE_SHUTDOWN_GRACE_S"]) + 5  # + uvicorn's close
        grace = services[name]["stop_grace_period"]
        assert re.fullmatch(r"\d+s", grace) and int(grace[:-1]) > drain_s, (name, grace)


def test_upload_through_the_balancer_serves_from_every_replica(stack, record):
    files = {"adapter_config": ("adapter_config.json", (ADAPTER / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (ADAPTER / "adapter_model.safetensors").read_bytes())}
    body = {"model": "concise", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=stack.lb, timeout=120) as client:
        r = client.put("/v1/prompts/concise", files=files, headers={"authorization": f"Bearer {ADMIN}"})
        uploaded = time.monotonic()
        assert r.status_code == 201, r.text

        def served_after(name: str) -> float:  # each replica asked directly, from inside its container
            while exec_request(name, "POST", "/v1/completions", body) != 200:
                assert time.monotonic() - uploaded < WATCH_S + 10, f"{name} does not serve the upload"
                time.sleep(0.2)
            return time.monotonic() - uploaded

        with ThreadPoolExecutor() as pool:
            slowest = max(pool.map(served_after, stack.replicas()))
        record(f"upload through the balancer served by all 3 replicas (watch interval {WATCH_S:.0f} s)",
               f"{slowest:.1f} s (each check is a docker exec: 0.5-2 s of it)")
        served_by = set()
        for _ in range(6):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            served_by.add(r.headers["x-served-by"])
        assert len(served_by) == 3  # round-robin: every replica served it through the balancer too


@dataclass
class Outcome:
    stream: bool
    started: float
    ended: float
    ok: bool
    served_by: str | None
    error: str = ""


def client_loop(lb: str, stream: bool, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """Requests back to back until told to stop; a stream counts as ok only if it ended with [DONE]."""
    with httpx.Client(base_url=lb, timeout=60) as client:
        while not stop.is_set():
            started, served_by = time.monotonic(), None
            body = {"model": "chat", "prompt": "Once upon a time", "max_tokens": 48 if stream else 6,
                    "ignore_eos": True, "temperature": 0, "stream": stream}
            try:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    served_by = r.headers.get("x-served-by")
                    if stream:
                        ok = r.status_code == 200 and sse_events(r)[-1:] == ["[DONE]"]
                    else:
                        ok = r.status_code == 200 and bool(r.read())
                outcomes.append(Outcome(stream, started, time.monotonic(), ok, served_by,
                                        "" if ok else f"status {r.status_code}"))
            except httpx.HTTPError as e:
                outcomes.append(Outcome(stream, started, time.monotonic(), False, served_by, f"{type(e).__name__}: {e}"))


def slot_of(stack: Stack, container: str) -> str:
    """Which HAProxy server slot reaches this container: send requests until its log shows one of them."""
    with httpx.Client(base_url=stack.lb, timeout=60) as client:
        for _ in range(12):
            rid = f"slot-{uuid.uuid4().hex}"
            r = client.get("/v1/models", headers={"x-request-id": rid})
            if rid in docker("logs", container).stdout + docker("logs", container).stderr:
                return r.headers["x-served-by"]
    raise AssertionError(f"no request through the balancer reached {container}")


def test_a_replica_killed_under_load(stack, record):
    victim = stack.replicas()[0]
    victim_slot = slot_of(stack, victim)
    stop, outcomes = threading.Event(), []
    clients = [threading.Thread(target=client_loop, args=(stack.lb, stream, stop, outcomes))
               for stream in (False, False, False, True, True, True)]
    for t in clients:
        t.start()
    time.sleep(6)  # load on all three
    killed = time.monotonic()
    docker("kill", victim)
    while victim_slot in stack.up():
        time.sleep(0.2)
    marked_down = time.monotonic() - killed

    # bring it back (Docker's restart policy may already have): while it loads it must get no requests
    time.sleep(3)
    if docker("inspect", "--format", "{{.State.Running}}", victim).stdout.strip() != "true":
        docker("start", victim)
    restarted_at = docker("inspect", "--format", "{{.State.StartedAt}}", victim).stdout.strip()
    wait_healthy(victim)
    deadline = time.monotonic() + 30
    while len(stack.up()) < 3:
        assert time.monotonic() < deadline, stack.servers()
        time.sleep(0.5)
    time.sleep(6)  # load on all three again
    stop.set()
    for t in clients:
        t.join(90)

    log = docker("logs", "--since", restarted_at, victim)
    lines = (log.stdout + log.stderr).splitlines()
    ready = next(i for i, line in enumerate(lines) if "event=ready" in line)
    requests_before_ready = [line for line in lines[:ready] if "softserve.access" in line]
    assert requests_before_ready, "no health check reached the restarted replica while it loaded"
    assert all("route=/health" in line for line in requests_before_ready), requests_before_ready
    assert any(re.search(r"route=/v1/\S+ status=200", line) for line in lines[ready:]), "not back in rotation"

    failed = [o for o in outcomes if not o.ok]
    plain, streams = [o for o in outcomes if not o.stream], [o for o in outcomes if o.stream]
    record("replica killed under load: HAProxy marked it down after", f"{marked_down:.1f} s")
    record("replica killed under load: non-streaming requests",
           f"{len(plain)} sent, {sum(not o.ok for o in plain)} failed")
    on_victim = [o for o in streams if o.served_by == victim_slot and o.started < killed < o.ended]
    record("replica killed under load: streams", f"{len(streams)} sent, {len(on_victim)} of them running on the "
           f"killed replica when it died, {sum(not o.ok for o in streams)} cut "
           f"({', '.join(sorted({o.error for o in failed})) or 'none'})")
    record("restarted replica while loading", f"{len(requests_before_ready)} requests reached it, all /health checks")
    assert len(plain) >= 10 and len(streams) >= 4
    # what the balancer promises: requests are re-sent unless a response had started. So the only failures
    # allowed are streams the victim was already sending when it was killed.
    for o in failed:
        assert o.stream and o.served_by == victim_slot and o.started < killed, o
