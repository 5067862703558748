"""The deployment suite: builds the image once per session (`make deploy-test`, pytest -m deploy) and
prints what it measured at the end of the run."""
from __future__ import annotations

import os
import time

import pytest

from tests.deploy.docker import IMAGE, docker, require_docker

MEASURED: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def record():
    """record(what, value): a measurement for the summary at the end of the run."""
    return lambda what, value: MEASURED.append((what, value))


@pytest.fixture(scope="session")
def image(record) -> str:
    """Build the image from the working tree. SOFTSERVE_TORCH_INDEX overrides the Dockerfile's TORCH_INDEX
    (e.g. a local index on machines that reach PyPI but not PyTorch's); --network host lets it be on loopback."""
    require_docker()
    args = ["build", "--network", "host", "-t", IMAGE, "."]
    if index := os.environ.get("SOFTSERVE_TORCH_INDEX"):
        args[1:1] = ["--build-arg", f"TORCH_INDEX={index}"]
    start = time.monotonic()
    try:
        docker(*args, timeout=1800)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\nwhere PyTorch's index is out of reach, point SOFTSERVE_TORCH_INDEX at one that "
                           f"has torch (README: Deploy)") from None
    record("image build (cached layers reused when unchanged)", f"{time.monotonic() - start:.0f} s")
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    record(f"image size ({IMAGE})", f"{size / 1e9:.2f} GB")
    return IMAGE


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("deployment measurements")
        for what, value in MEASURED:
            terminalreporter.write_line(f"{what}: {value}")
