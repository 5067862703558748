"""Thin helpers over k8s-here.sh (a one-node Kubernetes 1.20 cluster built from Debian's packages, kept in the
shared tools beside the repository) and kubectl, for the Kubernetes deployment tests."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.docker import REPO, run
from tests.kubectl import kubectl_command

K8S_HERE = Path(os.environ.get("SOFTSERVE_K8S_HERE", REPO.parent / "shared" / "tools" / "k8s-here.sh"))
KUBECONFIG = Path(os.environ.get("TMPDIR", "/tmp")) / "k8s-here" / "kubeconfig"  # where k8s-here.sh writes it


def k8s_here(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run("bash", str(K8S_HERE), *args, timeout=timeout, check=False)


def kubectl(*args: str, namespace: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    ns = ["--namespace", namespace] if namespace else []
    return run(kubectl_command(), "--kubeconfig", str(KUBECONFIG), *ns, *args, **kwargs)


def kubectl_json(*args: str, namespace: str | None = None) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json", namespace=namespace, timeout=60).stdout)


def node_ready() -> bool:
    try:
        node = kubectl_json("node", "k8s-here")
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def start_cluster() -> bool:
    """Build (once: ~10 minutes cold on 2 cores, then cached) and start the cluster unless it is already up;
    True if this call started it. Skips, with k8s-here.sh's own words, where it cannot be built or started."""
    if not K8S_HERE.is_file():
        pytest.skip(f"the Kubernetes tests need k8s-here.sh (the shared tools beside the repository): no {K8S_HERE}")
    if node_ready():
        return False
    for step, timeout in (("build", 2400), ("up", 300)):
        out = k8s_here(step, timeout=timeout)
        if out.returncode != 0:
            pytest.skip(f"the Kubernetes test cluster could not {'be built' if step == 'build' else 'start'} "
                        f"(k8s-here.sh {step} exited with {out.returncode}): {(out.stdout + out.stderr).strip()[-600:]}")
    deadline = time.monotonic() + 120
    while not node_ready():
        if time.monotonic() > deadline:
            pytest.skip("the Kubernetes test cluster started but its node is not Ready after 2 minutes")
        time.sleep(2)
    return True


@dataclass
class Pod:
    name: str
    uid: str
    ip: str
    ready: bool
    phase: str
    created: str

    @classmethod
    def from_json(cls, doc: dict) -> Pod:
        status = doc["status"]
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
        return cls(doc["metadata"]["name"], doc["metadata"]["uid"], status.get("podIP", ""), ready,
                   status["phase"], doc["metadata"]["creationTimestamp"])


def pods(namespace: str, selector: str = "app.kubernetes.io/name=softserve") -> list[Pod]:
    """The pods of the Deployment, the terminating ones left out."""
    docs = kubectl_json("pods", "-l", selector, namespace=namespace)["items"]
    return [Pod.from_json(d) for d in docs if not d["metadata"].get("deletionTimestamp")]


def endpoint_ips(namespace: str, service: str) -> set[str]:
    """The pod addresses the Service sends requests to (its ready endpoints)."""
    doc = kubectl_json("endpoints", service, namespace=namespace)
    return {a["ip"] for subset in doc.get("subsets") or [] for a in subset.get("addresses") or []}


def pod_memory_peak(pod_uid: str) -> int | None:
    """The pod's peak memory use in bytes (its cgroup v1 memory.max_usage_in_bytes on this node), if found."""
    for path in Path("/sys/fs/cgroup/memory/kubepods").glob(f"**/pod{pod_uid}/memory.max_usage_in_bytes"):
        return int(path.read_text())
    return None
