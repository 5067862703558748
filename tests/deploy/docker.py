"""Thin helpers over the docker and compose command lines, for the deployment tests."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "softserve:cpu"  # the tag docker-compose.yml runs


def run(*cmd: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run("docker", *args, **kwargs)


def require_docker() -> None:
    """Skip (not fail) where no Docker engine answers, e.g. CI machines without one."""
    if shutil.which("docker") is None:
        pytest.skip("deployment tests need a Docker engine: no `docker` command here")
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("deployment tests need a Docker engine: `docker info` did not answer in 20 s")
    if info.returncode != 0:
        pytest.skip(f"deployment tests need a Docker engine: `docker info` failed: {info.stderr.strip()[:200]}")


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where installed, else v1 (`docker-compose`)."""
    if run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("the compose tests need Docker Compose (`docker compose` or `docker-compose`)")


def health(container: str) -> str:
    try:
        return docker("inspect", "--format", "{{.State.Health.Status}}", container, timeout=30).stdout.strip()
    except subprocess.TimeoutExpired:  # dockerd answers slowly on an overloaded machine; ask again
        return "no answer from dockerd"


def wait_healthy(container: str, timeout: float = 300) -> float:
    """Seconds until Docker's HEALTHCHECK (the image's, on /health) reports the container healthy. An
    `unhealthy` on the way is not final: on an overloaded machine the check itself can time out a few times."""
    start = time.monotonic()
    while (status := health(container)) != "healthy":
        if time.monotonic() - start > timeout:
            logs = docker("logs", "--tail", "40", container, check=False)
            raise AssertionError(f"{container} is {status} after {time.monotonic() - start:.0f} s:\n{logs.stdout}{logs.stderr}")
        time.sleep(1)
    return time.monotonic() - start


def exec_request(container: str, method: str, path: str, body: dict | None = None) -> int:
    """HTTP status of a request made inside the container to its own server (reaches that replica only)."""
    script = ("import json, sys, urllib.request, urllib.error\n"
              "data = json.dumps(json.loads(sys.argv[3])).encode() if sys.argv[3] != 'null' else None\n"
              "req = urllib.request.Request('http://127.0.0.1:8000' + sys.argv[2], data=data, method=sys.argv[1],"
              " headers={'content-type': 'application/json'})\n"
              "try:\n    print(urllib.request.urlopen(req, timeout=60).status)\n"
              "except urllib.error.HTTPError as e:\n    print(e.code)\n")
    out = docker("exec", container, "python", "-c", script, method, path, json.dumps(body))
    return int(out.stdout.strip())
