"""requirements.lock against pyproject.toml. Every install reads the lock as pip constraints (Makefile,
Dockerfile, so .ci/run too), and scripts/lock.sh writes it; a requirement added or changed in pyproject.toml
without a new lock would install unpinned, or not at all."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOT_LOCKED = {"torch", "softserve"}  # torch's build is scripts/install_torch.sh's choice; the project itself


def locked() -> dict[str, str]:
    """{name: version} of requirements.lock, every entry an exact pin."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            (spec,) = Requirement(line).specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(Requirement(line).name)] = spec.version
    return pins


def project_requirements() -> list[Requirement]:
    """The runtime dependencies and the dev extra, whatever their markers (the lock is made on Linux x86_64,
    where every one of them applies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_requirement_is_locked_at_a_version_it_allows():
    pins = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name in NOT_LOCKED:
            continue
        assert name in pins, f"{req} is not in requirements.lock: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock has {name}=={pins[name]}, which {req} does not allow: run scripts/lock.sh"


def test_the_lock_leaves_out_torch_and_the_project():
    assert NOT_LOCKED.isdisjoint(locked())
