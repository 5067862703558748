"""deploy/kubernetes's cpu overlay on a real (one-node, 1.20) Kubernetes cluster: k8s-here.sh builds and starts
it, the image built from the working tree is loaded into it, and the overlay is applied through
tests/deploy/kubernetes-1.20 (only what 1.20 and a one-node test cluster lack: two apiVersions, a hostPath
volume for the ReadWriteMany claim, a NodePort). Two replicas get Ready, serve through the Service, take an
upload with the admin token and serve the same prompt file from both; a rolling restart under load fails no
request, and a pod deleted at once (no grace period) under load costs only what the test measures and states."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.cluster import (KUBECONFIG, endpoint_ips, k8s_here, kubectl, kubectl_command,
                                  kubectl_json, pod_memory_peak, pods, start_cluster)
from tests.deploy.docker import REPO, require_docker
from tests.deploy.test_image import docs_example
from tests.live_server import sse_events

pytestmark = pytest.mark.deploy

OVERLAY = REPO / "tests" / "deploy" / "kubernetes-1.20"
NAMESPACE = "softserve-deploytest"  # the test overlay's
STORE = Path("/var/tmp/softserve-deploytest/prompts")  # the hostPath of its PersistentVolume (prompts-pv.yaml)
PV = "softserve-deploytest-prompts"
ADMIN = "deploy-test-admin-token"
REPLICAS = 2  # the HorizontalPodAutoscaler's minReplicas; with no metrics-server here it stays there
WATCH_S = 2   # SOFTSERVE_WATCH_INTERVAL_S in deploy/kubernetes/base
ADAPTER = REPO / "examples" / "peft" / "concise"


@pytest.fixture(scope="session")  # before the image (session-scoped too): no build where no cluster can run
def cluster():
    require_docker()  # k8s-here.sh imports its pause image through Docker, and `load` copies ours from it
    started = start_cluster()
    yield
    if started:
        k8s_here("down", timeout=300)


def remove_deployment() -> None:
    kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=180s", check=False, timeout=240)
    kubectl("delete", "pv", PV, "--ignore-not-found", check=False, timeout=60)
    shutil.rmtree(STORE.parent, ignore_errors=True)


def ready_pods() -> list:
    return [p for p in pods(NAMESPACE) if p.ready]


def wait_for(what: str, condition, timeout: float, every: float = 1.0) -> float:
    """Seconds until condition() is true; fails after timeout seconds with what and the pods' state."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            state = kubectl("get", "pods,endpoints,events", "-o", "wide", namespace=NAMESPACE, check=False).stdout
            raise AssertionError(f"{what}: not after {timeout:.0f} s\n{state[-4000:]}")
        time.sleep(every)
    return time.monotonic() - start


@dataclass
class Deployed:
    url: str  # the Service, through its NodePort on 127.0.0.1

    @staticmethod
    def pod_url(pod) -> str:  # one pod, on its address in the cluster's pod network (routed from the node)
        return f"http://{pod.ip}:8000"


@pytest.fixture(scope="module")
def deployed(cluster, image, record):
    start = time.monotonic()
    out = k8s_here("load", image, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    record("image copied into the cluster (k8s-here.sh load)", f"{time.monotonic() - start:.0f} s")

    remove_deployment()  # what an interrupted run left
    STORE.mkdir(parents=True)  # root's, 0755: what a new volume looks like; store-owner gives it to uid 10001
    STORE.chmod(0o755)
    manifests = kubectl("kustomize", str(OVERLAY)).stdout
    start = time.monotonic()
    try:
        kubectl("apply", "-f", str(OVERLAY / "namespace.yaml"))
        # as the README says: the admin token comes from a Secret made by hand (before the pods start)
        kubectl("create", "secret", "generic", "softserve-secrets", f"--from-literal=admin-token={ADMIN}",
                namespace=NAMESPACE)
        kubectl("apply", "-f", "-", input=manifests)
        wait_for(f"{REPLICAS} pods Ready", lambda: len(ready_pods()) == REPLICAS, timeout=600, every=2)
        record(f"kubectl apply to {REPLICAS} pods Ready (1 from the Deployment, 1 more from the HPA's minReplicas; "
               "model load on the node's cores)", f"{time.monotonic() - start:.0f} s")
        service = kubectl_json("service", "softserve", namespace=NAMESPACE)
        yield Deployed(f"http://127.0.0.1:{service['spec']['ports'][0]['nodePort']}")
    finally:
        remove_deployment()


def test_two_replicas_ready_with_the_store_given_to_the_server_user(deployed, record):
    ready = ready_pods()
    assert len(ready) == REPLICAS
    for pod in kubectl_json("pods", namespace=NAMESPACE)["items"]:
        (init,) = pod["status"]["initContainerStatuses"]
        assert init["name"] == "store-owner" and init["state"]["terminated"]["exitCode"] == 0, init
    # the volume's folder was root's: the init container gave it to the server's uid, which wrote the store in it
    assert STORE.stat().st_uid == 10001 and (STORE / "prompts").stat().st_uid == 10001

    node = kubectl_json("node", "k8s-here")["status"]["allocatable"]
    requests = kubectl_json("deployment", "softserve", namespace=NAMESPACE)["spec"]["template"]["spec"][
        "containers"][0]["resources"]["requests"]
    record("node (allocatable) and one replica's requests (cpu overlay)",
           f"cpu {node['cpu']}, memory {int(node['memory'].removesuffix('Ki')) / 2**20:.1f} GiB; "
           f"requests cpu {requests['cpu']}, memory {requests['memory']}")


def test_health_and_the_docs_classify_example_through_the_service(deployed):
    with httpx.Client(base_url=deployed.url, timeout=120) as client:
        assert client.get("/health").json()["status"] == "ok"
        body = docs_example("README.md", "/v1/classify")
        r = client.post("/v1/classify", json=body)
        assert [res["label"] for res in r.json()["results"]] == ["spam", "ham"], r.text


def test_upload_needs_the_token_and_both_pods_serve_the_same_prompt(deployed, record):
    files = {"adapter_config": ("adapter_config.json", (ADAPTER / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (ADAPTER / "adapter_model.safetensors").read_bytes())}
    with httpx.Client(base_url=deployed.url, timeout=120) as client:
        assert client.put("/v1/prompts/concise", files=files).status_code == 401
        assert client.put("/v1/prompts/concise", files=files,
                          headers={"authorization": "Bearer wrong"}).status_code == 403
        r = client.put("/v1/prompts/concise", files=files, headers={"authorization": f"Bearer {ADMIN}"})
        uploaded = time.monotonic()
        assert r.status_code == 201 and r.json()["serving"], r.text
        digest = r.json()["digest"]

    body = {"model": "concise", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    slowest = 0.0
    for pod in ready_pods():  # each pod asked directly: both must serve this very file
        with httpx.Client(base_url=Deployed.pod_url(pod), timeout=60) as client:
            def serves() -> bool:
                info = client.get("/v1/prompts/concise")
                return info.status_code == 200 and info.json()["digest"] == digest and info.json()["serving"]

            wait_for(f"{pod.name} serves the upload (digest {digest[:12]})", serves, timeout=WATCH_S + 15, every=0.2)
            slowest = max(slowest, time.monotonic() - uploaded)
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    record(f"upload through the Service served, same digest, by both pods (watch interval {WATCH_S} s)",
           f"{slowest:.1f} s")


@dataclass
class Outcome:
    client: int
    rid: str
    stream: bool
    keep_alive: bool
    started: float
    ended: float
    ok: bool
    error: str = ""


def client_loop(url: str, client_id: int, stream: bool, keep_alive: bool, stop: threading.Event,
                outcomes: list[Outcome]) -> None:
    """Requests back to back through the Service until told to stop, each with its own x-request-id (found
    again in the access log of the pod that answered). keep_alive: one connection for all of them, as HTTP
    client libraries keep (the openai client, httpx, requests' Session); else a new connection for each
    (`Connection: close`), as curl does. A stream counts as ok only if it ended with [DONE]."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            rid, started = f"k8s-{uuid.uuid4().hex}", time.monotonic()
            body = {"model": "chat", "prompt": "Once upon a time", "max_tokens": 32 if stream else 6,
                    "ignore_eos": True, "temperature": 0, "stream": stream}
            headers = {"x-request-id": rid, **({} if keep_alive else {"connection": "close"})}
            try:
                with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                    if stream:
                        ok = r.status_code == 200 and sse_events(r)[-1:] == ["[DONE]"]
                    else:
                        ok = r.status_code == 200 and bool(r.read())
                    error = "" if ok else f"{r.status_code} {r.read().decode(errors='replace')}"
            except httpx.HTTPError as e:
                ok, error = False, f"{type(e).__name__}: {e}"
            outcomes.append(Outcome(client_id, rid, stream, keep_alive, started, time.monotonic(), ok, error))


class Load:
    """A steady load through the Service: one thread per client, (stream, keep_alive) each."""

    def __init__(self, url: str, clients: list[tuple[bool, bool]]):
        self.stop, self.outcomes = threading.Event(), []
        self.threads = [threading.Thread(target=client_loop, args=(url, i, stream, keep_alive, self.stop, self.outcomes))
                        for i, (stream, keep_alive) in enumerate(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def of(self, stream: bool, keep_alive: bool) -> list[Outcome]:
        return [o for o in self.outcomes if o.stream == stream and o.keep_alive == keep_alive]

    def summary(self, stream: bool, keep_alive: bool) -> str:
        sent = self.of(stream, keep_alive)
        failed = [o for o in sent if not o.ok]
        if not failed:
            return f"{len(sent)} sent, 0 failed"
        errors = "; ".join(sorted({o.error[:70] for o in failed}))
        spans = ", ".join(f"{s:.1f}" for s in self.failure_spans(failed))
        return f"{len(sent)} sent, {len(failed)} failed ({errors}), back to back within spans of {spans} s"

    def failure_spans(self, failed: list[Outcome]) -> list[float]:
        """Seconds from the first to the end of the last of each client's run of consecutive failures: how
        long a client kept failing (a client sends its next request as soon as one fails, so the count of
        failures says less than this)."""
        spans, failed_ids = [], {o.rid for o in failed}
        for client in sorted({o.client for o in failed}):
            run: list[Outcome] = []
            for o in sorted((o for o in self.outcomes if o.client == client), key=lambda o: o.started) + [None]:
                if o is not None and o.rid in failed_ids:
                    run.append(o)
                elif run:
                    spans.append(run[-1].ended - run[0].started)
                    run = []
        return spans


SHUTTING_DOWN = '503 {"error":{"message":"the server is shutting down"'
# a kept-alive connection the draining server closed, idle, just as the client sent its next request on it
CLOSED_UNDER_REQUEST = ("RemoteProtocolError: Server disconnected", "ReadError: ")
KUBE_PROXY_SYNC_S = 2  # from an endpoint change to the node's iptables rules (kube-proxy's min sync period: 1 s)


def access_log_statuses(log: str) -> dict[str, str]:
    """request_id -> status of every access-log line in a pod's log."""
    ids = {}
    for line in log.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "request_id" in fields and "status" in fields:
            ids[fields["request_id"]] = fields["status"]
    return ids


def access_log_ids(pod_name: str) -> dict[str, str]:
    """request_id -> status of every request the pod answered (`kubectl logs`)."""
    return access_log_statuses(kubectl("logs", pod_name, "-c", "softserve", namespace=NAMESPACE, timeout=60).stdout)


def test_a_rolling_restart_under_load(deployed, record):
    """`kubectl rollout restart` while clients send requests back to back. A pod that goes is first taken out
    of the Service's endpoints (its preStop pause), then drains. A client that opens a connection per request
    is sent to the remaining pods: none of its requests may fail. A client that keeps its connection stays on
    the old pod (a Service balances connections, not requests) until the server starts draining and ends the
    connection; only a request that meets that end may fail (503 shutting_down, or the connection closed under
    it): measured, and no other failure allowed."""
    before = {p.name for p in ready_pods()}
    most_pods, pending_since, longest_pending = 0, {}, 0.0

    def watch_pods() -> None:  # how many pods at once, and how long any waited for room on the node
        nonlocal most_pods, longest_pending
        now = pods(NAMESPACE)
        most_pods = max(most_pods, len(now))
        for p in now:
            if p.phase == "Pending" and not p.ip:  # not scheduled yet (a scheduled pod gets an address at once)
                pending_since.setdefault(p.name, time.monotonic())
                longest_pending = max(longest_pending, time.monotonic() - pending_since[p.name])

    clients = [(False, False), (False, False), (True, False), (False, True), (True, True)]  # (stream, keep_alive)
    with Load(deployed.url, clients) as load:
        time.sleep(5)
        start = time.monotonic()
        kubectl("rollout", "restart", "deployment/softserve", namespace=NAMESPACE)
        status = subprocess.Popen([kubectl_command(), "--kubeconfig", str(KUBECONFIG), "-n", NAMESPACE, "rollout",
                                   "status", "deployment/softserve", "--timeout=600s"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while status.poll() is None:
            watch_pods()
            assert time.monotonic() - start < 620, "the rollout did not end"
            time.sleep(1)
        rollout_s = time.monotonic() - start
        assert status.returncode == 0, status.stdout.read()
        wait_for("the Service sends to the new pods only",
                 lambda: endpoint_ips(NAMESPACE, "softserve") == {p.ip for p in ready_pods()} and
                 len(ready_pods()) == REPLICAS, timeout=120)
        time.sleep(5)  # load on the new pods

    after = {p.name for p in ready_pods()}
    record("rolling restart under load: rollout", f"{rollout_s:.0f} s, at most {most_pods} pods at once "
           f"(terminating ones left out), a pod waited for room on the node for at most {longest_pending:.0f} s")
    for keep_alive in (False, True):
        for stream in (False, True):
            record(f"rolling restart under load: {'streams' if stream else 'non-streaming requests'}, "
                   f"{'one kept-alive connection' if keep_alive else 'a connection per request'}",
                   load.summary(stream, keep_alive))
    assert not before & after and len(after) == REPLICAS
    assert most_pods == REPLICAS + 1 and longest_pending < 10, "the surge pod waited for room on the node"
    assert len(load.of(False, False)) >= 20 and len(load.of(True, False)) >= 3
    per_request = load.of(False, False) + load.of(True, False)
    assert not [o for o in per_request if not o.ok], [o for o in per_request if not o.ok][:5]
    kept = [o for o in load.of(False, True) + load.of(True, True) if not o.ok]
    assert all(o.error.startswith((SHUTTING_DOWN, *CLOSED_UNDER_REQUEST)) for o in kept), kept[:5]
    peaks = [pod_memory_peak(p.uid) for p in ready_pods()]
    if all(peaks):
        record("peak memory of a pod (its cgroup) after this load", ", ".join(f"{b / 2**30:.2f} GiB" for b in peaks))


def test_a_pod_deleted_at_once_under_load(deployed, record):
    """`kubectl delete pod --grace-period=0 --force`: the pod leaves the Service's endpoints at once and the
    kubelet stops its container within its minimum grace period (2 s), cutting the preStop pause short, so the
    server gets SIGTERM about a second after the delete. Non-streaming clients, half with a connection per
    request, half keeping theirs. No surviving pod may fail a request; a client with a connection per request
    may lose only a request sent before the Service stopped sending to the deleted pod (measured: none so far);
    a client that keeps its connection to the deleted pod gets its 503 shutting_down (measured, and precisely
    those) or has the connection cut."""
    victim, survivor = ready_pods()
    clients = [(False, False), (False, False), (False, True), (False, True)]  # (stream, keep_alive)
    with tempfile.TemporaryFile("w+") as victim_log, Load(deployed.url, clients) as load:
        # what the victim answered, read while it lives: its log goes with it
        follower = subprocess.Popen([kubectl_command(), "--kubeconfig", str(KUBECONFIG), "-n", NAMESPACE, "logs",
                                     "-f", victim.name, "-c", "softserve"], stdout=victim_log, stderr=subprocess.DEVNULL)
        time.sleep(6)
        killed = time.monotonic()
        kubectl("delete", "pod", victim.name, "--grace-period=0", "--force", "--wait=false", namespace=NAMESPACE)
        out_of_service_s = wait_for("the deleted pod leaves the Service's endpoints",
                                    lambda: victim.ip not in endpoint_ips(NAMESPACE, "softserve"), timeout=60, every=0.2)
        replaced_s = wait_for("a new pod is Ready", lambda: len(ready_pods()) == REPLICAS, timeout=300, every=2)
        time.sleep(5)  # load on the new pod too
        follower.terminate()
        follower.wait(10)
        victim_log.seek(0)
        victim_answered = access_log_statuses(victim_log.read())

    (replacement,) = [p for p in ready_pods() if p.name != survivor.name]
    survivors = {**access_log_ids(survivor.name), **access_log_ids(replacement.name)}
    record("pod deleted at once under load: out of the Service's endpoints after", f"{out_of_service_s:.1f} s")
    record("pod deleted at once under load: replacement Ready after", f"{out_of_service_s + replaced_s:.0f} s")
    for keep_alive in (False, True):
        failed = [o for o in load.of(False, keep_alive) if not o.ok]
        timing = sorted({f"{o.started - killed:+.1f} s" for o in failed})
        record(f"pod deleted at once under load: {'one kept-alive connection' if keep_alive else 'a connection per request'}",
               load.summary(False, keep_alive) + (f"; sent at {', '.join(timing)} from the delete" if failed else ""))
    assert len(load.outcomes) >= 20
    # every answered request is in the access log of the pod that answered it; the new pod took its share
    for o in load.outcomes:
        if o.ok:
            assert survivors.get(o.rid) == "200" or victim_answered.get(o.rid) == "200", o
    assert any(o.ok and o.rid in survivors for o in load.outcomes if o.started > killed + out_of_service_s)
    for o in load.outcomes:
        if o.ok:
            continue
        assert o.rid not in survivors, f"a surviving pod failed a request: {o}"
        if o.error.startswith(SHUTTING_DOWN):  # the deleted pod's own refusal, on a connection kept to it
            assert o.keep_alive and victim_answered.get(o.rid) == "503", o
        else:  # cut or refused by the deleted pod: no pod answered it
            assert o.rid not in victim_answered, o
            assert o.keep_alive or o.started < killed + out_of_service_s + KUBE_PROXY_SYNC_S, o
