"""softserve as a child process on a free loopback port: what `softserve bench --http-spawn`/`--stored-prompts`
and the HTTP tests start.

The child's settings are SOFTSERVE_* variables: `settings_env(settings)` writes a `Settings` object as the
variables that rebuild it in the child; any other variable of this process is inherited, no SOFTSERVE_* one
is. Its output (stdout and stderr) goes to a log file, whose tail is in every error.

    with ServerProcess(settings_env(settings), tmp / "server.log") as server:
        httpx.get(server.url + "/v1/models")
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from app.config import Settings

HOST = "127.0.0.1"
ENV_PREFIX = Settings.model_config["env_prefix"]  # SOFTSERVE_


def free_port() -> int:
    """A loopback port nothing listens on now (another process may still take it before the server does)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """The SOFTSERVE_* variables from which a child process builds these same settings (unset ones: absent)."""
    return {f"{ENV_PREFIX}{field.upper()}": json.dumps(value) if isinstance(value, bool) else str(value)
            for field, value in settings.model_dump(mode="json").items() if value is not None}


class ServerProcess:
    """One server: `python -m app.cli serve` (factory=False), or `python -m uvicorn --factory
    app.server:create_app --http app.http_protocol:HTTPProtocol` (factory=True, the other documented way to
    run it), on 127.0.0.1:port.

    env: the child's SOFTSERVE_* variables (and any other to add); SOFTSERVE_HOST and SOFTSERVE_PORT are
    set to the address it listens on. log_path: where its output goes. cwd: its working directory (default:
    this process's, so relative paths in the settings mean the same)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, port: int | None = None, factory: bool = False,
                 cwd: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.factory, self.cwd, self.log_path = factory, cwd, Path(log_path)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self.env = {**inherited, **env,
                    f"{ENV_PREFIX}HOST": HOST, f"{ENV_PREFIX}PORT": str(self.port)}
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        if self.factory:
            return [sys.executable, "-m", "uvicorn", "--factory", "app.server:create_app", "--http",
                    "app.http_protocol:HTTPProtocol", "--host", HOST, "--port", str(self.port)]
        return [sys.executable, "-m", "app.cli", "serve"]  # host and port from the environment

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 180) -> dict:
        """/health's JSON once it answers 200. Raises RuntimeError (with the log's tail) if the process exits
        or reports that loading failed, TimeoutError if it is not ready within timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
                if "failed to load" in r.text:
                    raise RuntimeError(f"server failed to load: {r.text}\n{self.output()}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.output()}")

    def output(self, chars: int = 5000) -> str:
        """The last `chars` characters of its output."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (the server drains, then exits), killed if still running after timeout seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

