"""deploy/kubernetes: both overlays render with kustomize and pass the Kubernetes API schemas (offline, from
the kubernetes-validate package), and carry what the server needs to start, drain and share prompts."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.kubectl import kubectl_command

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")

OVERLAYS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "overlays"
UVICORN_CLOSE_S = 5  # app/cli.py: uvicorn's graceful shutdown is the drain + 5 s


def render(overlay: str) -> dict[str, dict]:
    out = subprocess.run([kubectl_command(), "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out.stdout)}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def manifests(request) -> tuple[str, dict[str, dict]]:
    return request.param, render(request.param)


def test_every_resource_passes_the_api_schema(manifests):
    _, docs = manifests
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, "1.30", strict=True)  # raises ValidationError with the path at fault


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_probes_drain_and_shared_prompt_store(manifests):
    overlay, docs = manifests
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    # /health is 503 while loading and draining: startup and readiness use it, liveness must not
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "tcpSocket" in container["livenessProbe"]
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])  # sleep N
    stop_s = pre_stop_s + float(env["SOFTSERVE_SHUTDOWN_GRACE_S"]) + UVICORN_CLOSE_S
    assert stop_s < pod["terminationGracePeriodSeconds"]

    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (volume,) = [v for v in pod["volumes"] if v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert env["SOFTSERVE_PROMPT_STORE"].startswith(mount["mountPath"] + "/")

    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert "cpu" in container["resources"]["requests"]  # the autoscaler's utilization target needs it

    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["SOFTSERVE_DEVICE"] == "cuda" and container["image"].endswith(":gpu")
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert container["image"].endswith(":cpu")
