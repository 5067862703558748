"""Traffic splits over HTTP against one live server: the /traffic routes and their errors, requests for the bare
name shared by weight and sticky per `user`, pinned requests never split, the per-version metrics, and a split
written by another replica of the store followed by this one."""
from __future__ import annotations

import dataclasses
from collections import Counter

import httpx
import pytest
import torch

from prompt_store import BaseIdentity, PromptRegistry, dump_prompt, load_prompt_bytes
from prompt_store.traffic import TrafficSplit
from tests.live_server import make_prompt_bytes, poll, upload
from tests.test_api import error_of, scrape

SERVER_SETTINGS = {"SOFTSERVE_WATCH_INTERVAL_S": "0.2"}
LABELS = ["ham", "spam"]
ANSWER = {1: "ham", 2: "spam"}  # what each version of `cls` answers, whatever the input


def classify_bytes(base: dict, answer: str) -> bytes:
    """A classify prompt whose head always picks `answer`: its version shows in every answer."""
    pf = load_prompt_bytes(make_prompt_bytes(base, "cls", "classify", labels=LABELS))
    bias = torch.tensor([8.0, -8.0] if answer == "ham" else [-8.0, 8.0])
    return dump_prompt(dataclasses.replace(pf, head_weight=torch.zeros_like(pf.head_weight), head_bias=bias))


@pytest.fixture(scope="module")
def prompts(client, base):
    """`cls` v1 (answers ham) and v2 (answers spam); `gen` v1 and v2."""
    for version, answer in ANSWER.items():
        assert upload(client, "cls", classify_bytes(base, answer)).json()["version"] == version
    for seed in (1, 2):
        assert upload(client, "gen", make_prompt_bytes(base, "gen", seed=seed)).status_code in (200, 201)


@pytest.fixture
def split(client, prompts):
    """Sets a split (name, {version: percent}) for one test; cleared after it."""
    names = []

    def set_split(name: str, versions: dict[int, int]) -> dict:
        r = client.put(f"/v1/prompts/{name}/traffic", json={"versions": {str(v): p for v, p in versions.items()}})
        assert r.status_code == 200, r.text
        names.append(name)
        return r.json()

    yield set_split
    for name in names:
        client.delete(f"/v1/prompts/{name}/traffic")


def classify(client: httpx.Client, prompt: str = "cls", **fields) -> int:
    """The version that answered (x-prompt-version), checked against what every input was answered."""
    r = client.post("/v1/classify", json={"prompt": prompt, "inputs": ["a", "b"], **fields})
    assert r.status_code == 200, r.text
    version = int(r.headers["x-prompt-version"])
    assert [result["label"] for result in r.json()["results"]] == [ANSWER[version]] * 2  # one version per request
    return version


def grew(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, *sorted(labels.items()))
    return after.get(key, 0) - before.get(key, 0)


def test_set_show_and_clear(client, prompts):
    message = error_of(client.get("/v1/prompts/cls/traffic"), 404, "traffic_split_not_found")
    assert "current version serves every request" in message
    assert client.get("/v1/prompts/cls").json()["traffic"] is None

    r = client.put("/v1/prompts/cls/traffic", json={"versions": {"2": 10, "1": 90}})
    assert r.status_code == 200, r.text
    shown = r.json()
    assert shown["name"] == "cls" and shown["versions"] == {"1": 90, "2": 10} and shown["updated_at"]
    assert client.get("/v1/prompts/cls/traffic").json() == shown
    traffic = {"versions": shown["versions"], "updated_at": shown["updated_at"]}
    assert client.get("/v1/prompts/cls").json()["traffic"] == traffic
    listed = {p["name"]: p["traffic"] for p in client.get("/v1/prompts").json()["data"]}
    assert listed == {"cls": traffic, "gen": None}

    r = client.delete("/v1/prompts/cls/traffic")
    assert r.status_code == 200 and r.json() == {"name": "cls", "object": "traffic_split", "deleted": True}
    error_of(client.get("/v1/prompts/cls/traffic"), 404, "traffic_split_not_found")
    error_of(client.delete("/v1/prompts/cls/traffic"), 404, "traffic_split_not_found")
    assert client.get("/v1/prompts/cls").json()["traffic"] is None


@pytest.mark.parametrize("body, status, code, param, message", [
    ({"versions": {"1": 90, "2": 9}}, 400, "invalid_traffic_split", "versions", "sum to 99, not 100"),
    ({"versions": {"1": 100, "2": 0}}, 400, "invalid_traffic_split", "versions", "versions.2: 0 is not a whole"),
    ({"versions": {}}, 400, "invalid_traffic_split", "versions", "at least one version"),
    ({"versions": {"01": 100}}, 400, "invalid_traffic_split", "versions", "'01' is not a version number"),
    ({"versions": {"1": 90.5, "2": 9.5}}, 400, "validation_error", "versions", "valid integer"),
    ({"versions": {"1": "100"}}, 400, "validation_error", "versions", "valid integer"),
    ({"versions": [1, 2]}, 400, "validation_error", "versions", "valid dictionary"),
    ({"versions": {"1": 100}, "weights": {}}, 400, "unknown_field", "weights", "unknown field"),
    ({}, 400, "validation_error", "versions", "Field required"),
    ({"versions": {"1": 50, "7": 50}}, 404, "prompt_not_found", None, "prompt 'cls' has no version 7 (versions: 1, 2)"),
])
def test_bad_splits_are_refused_and_change_nothing(client, split, body, status, code, param, message):
    split("cls", {1: 90, 2: 10})
    before = client.get("/v1/prompts/cls/traffic").json()
    assert message in error_of(client.put("/v1/prompts/cls/traffic", json=body), status, code, param)
    assert client.get("/v1/prompts/cls/traffic").json() == before


def test_unknown_names_are_404(client, prompts):
    for r in (client.put("/v1/prompts/nope/traffic", json={"versions": {"1": 100}}),
              client.get("/v1/prompts/nope/traffic"), client.delete("/v1/prompts/nope/traffic")):
        assert "no prompt named 'nope'" in error_of(r, 404, "prompt_not_found")


def test_split_shares_requests_by_weight_and_counts_them_per_version(client, split):
    split("cls", {1: 50, 2: 50})
    before = scrape(client)[1]
    served = Counter(classify(client) for _ in range(24))
    # 24 fair draws all alike: a probability of 1e-7 (the proportions: tests/test_traffic_split.py, seeded)
    assert set(served) == {1, 2} and served.total() == 24, served
    after = scrape(client)[1]
    for version, count in served.items():
        labels = dict(prompt="cls", version=str(version))
        assert grew(before, after, "softserve_prompt_version_requests_total", route="/v1/classify", status="200",
                    **labels) == count
        assert grew(before, after, "softserve_prompt_version_request_duration_seconds_count", route="/v1/classify",
                    **labels) == count
        answers = {label: grew(before, after, "softserve_prompt_version_labels_total", label=label, **labels)
                   for label in LABELS}
        assert answers == {ANSWER[version]: 2 * count, ANSWER[3 - version]: 0}


def test_a_user_always_gets_the_same_version(client, split):
    split("cls", {1: 50, 2: 50})
    users = [f"user-{i}" for i in range(8)]
    expected = {user: TrafficSplit.parse({"1": 50, "2": 50}).choose("cls", user) for user in users}
    assert set(expected.values()) == {1, 2}  # (a hash: the same users every run)
    for _ in range(2):
        assert {user: classify(client, user=user) for user in users} == expected


def test_openai_routes_split_by_user_and_count_finish_reasons(client, split):
    split("gen", {1: 30, 2: 70})
    users = [f"u{i}" for i in range(6)]
    expected = {user: TrafficSplit.parse({"1": 30, "2": 70}).choose("gen", user) for user in users}
    assert set(expected.values()) == {1, 2}
    before = scrape(client)[1]
    for user in users:
        r = client.post("/v1/completions", json={"model": "gen", "prompt": "Hi", "max_tokens": 1, "ignore_eos": True,
                                                 "user": user})
        assert r.status_code == 200, r.text
        assert int(r.headers["x-prompt-version"]) == expected[user] and r.json()["model"] == "gen"
        r = client.post("/v1/chat/completions", json={"model": "gen", "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 1, "ignore_eos": True, "user": user})
        assert int(r.headers["x-prompt-version"]) == expected[user] and r.json()["model"] == "gen"
    after = scrape(client)[1]
    for version, count in Counter(expected.values()).items():
        assert grew(before, after, "softserve_prompt_version_finish_reasons_total", prompt="gen",
                    version=str(version), finish_reason="length") == 2 * count
        assert grew(before, after, "softserve_prompt_version_requests_total", route="/v1/chat/completions",
                    status="200", prompt="gen", version=str(version)) == count


def test_pinned_requests_are_never_split(client, split):
    split("cls", {2: 100})
    assert {classify(client, "cls@1") for _ in range(3)} == {1}
    assert {classify(client) for _ in range(2)} == {2}
    split("cls", {1: 100})  # a rollback: the older version serves the bare name, the newest stays stored
    assert {classify(client, user=f"u{i}") for i in range(2)} == {1}
    assert {classify(client, "cls@2") for _ in range(2)} == {2}
    r = client.post("/v1/completions", json={"model": "gen@1", "prompt": "Hi", "max_tokens": 1})
    assert r.headers["x-prompt-version"] == "1"


def test_without_a_split_the_current_version_serves_and_the_base_has_no_version(client, prompts):
    assert {classify(client) for _ in range(3)} == {2}
    r = client.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and "x-prompt-version" not in r.headers


def test_a_split_written_by_another_replica_is_followed(client, server, base, split):
    replica = PromptRegistry(server.store, BaseIdentity.from_dict(base))
    replica.set_traffic("cls", TrafficSplit.parse({"1": 100}))
    poll(lambda: client.get("/v1/prompts/cls/traffic").status_code == 200, "the server sees the split")
    assert {classify(client) for _ in range(3)} == {1}
    split("cls", {2: 100})  # and the other way round
    replica.refresh()
    assert replica.traffic("cls").weights == {2: 100}
    replica.clear_traffic("cls")
    poll(lambda: client.get("/v1/prompts/cls/traffic").status_code == 404, "the server sees the split cleared")
    assert classify(client) == 2
