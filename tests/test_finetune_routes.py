"""The Files and fine-tuning jobs routes' checks, on a replica that runs no jobs (nothing trains here): every bad
field is a 400 naming it, a bad JSONL line a 400 naming the line, limits are 413/429, a queued job cancels at once."""
from __future__ import annotations

import json

import pytest

from tests.live_server import REPO

SERVER_SETTINGS = {"SOFTSERVE_FINETUNE_WORKER": "false", "SOFTSERVE_FINETUNE_MAX_QUEUED": "2",
                   "SOFTSERVE_FINETUNE_MAX_FILE_MB": "0.1", "SOFTSERVE_FINETUNE_MAX_STORAGE_MB": "0.3"}
SPAM = (REPO / "examples/data/spam.train.jsonl").read_text().splitlines()
NER = (REPO / "examples/data/ner.train.jsonl").read_text().splitlines()
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def jsonl(lines) -> bytes:
    return ("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n").encode()


def post_file(client, data: bytes, purpose="fine-tune", name="data.jsonl", **extra):
    return client.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose, **extra})


def error(r) -> tuple[int, str | None, str]:
    body = r.json()["error"]
    return r.status_code, body["param"], body["message"]


@pytest.fixture(scope="module")
def files(client) -> dict:
    ids = {}
    for name, lines in (("spam", SPAM[:20]), ("spam_val", SPAM[20:30]), ("ner", NER[:10])):
        r = post_file(client, jsonl(lines), name=f"{name}.jsonl")
        assert r.status_code == 200, r.text
        ids[name] = r.json()["id"]
    return ids


def test_upload_list_show_download_delete(client):
    data = jsonl(SPAM[:5])
    uploaded = post_file(client, data, name="five.jsonl").json()
    assert uploaded["object"] == "file" and uploaded["purpose"] == "fine-tune" and uploaded["status"] == "processed"
    assert uploaded["bytes"] == len(data) and uploaded["filename"] == "five.jsonl"
    assert client.get(f"/v1/files/{uploaded['id']}").json() == uploaded
    assert client.get(f"/v1/files/{uploaded['id']}/content").content == data
    assert uploaded["id"] in [f["id"] for f in client.get("/v1/files").json()["data"]]
    assert client.delete(f"/v1/files/{uploaded['id']}").json() == {"id": uploaded["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{uploaded['id']}").status_code == 404
    assert client.delete(f"/v1/files/{uploaded['id']}").status_code == 404


def test_file_list_pages(client, files):
    first = client.get("/v1/files", params={"limit": 1}).json()
    assert len(first["data"]) == 1 and first["has_more"] is True
    second = client.get("/v1/files", params={"limit": 1, "after": first["data"][0]["id"]}).json()
    assert second["data"][0]["created_at"] <= first["data"][0]["created_at"]
    assert second["data"][0]["id"] != first["data"][0]["id"]


@pytest.mark.parametrize("lines,message", [
    ([SPAM[0], '{"text": "no label"}'], "data.jsonl:2: missing field 'label'"),
    ([SPAM[0], SPAM[1], "{not json"], "data.jsonl:3: invalid JSON"),
    ([SPAM[0], "[1, 2]"], "data.jsonl:2: expected a JSON object, got list"),
    ([SPAM[0], '{"text": "x", "label": 3}'], "data.jsonl:2: field 'label' must be a str, got int"),
    (['{"text": "Ann went", "entities": [{"start": 0, "end": 99, "label": "PER"}]}'],
     "data.jsonl:1: entity span [0, 99) is out of range"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "data.jsonl:1: the last message must be the assistant's"),
    (['{"question": "what task?"}'], "data.jsonl:1: cannot tell the task"),
    ([], "data.jsonl: no examples"),
])
def test_bad_line_is_a_400_naming_it(client, lines, message):
    r = post_file(client, jsonl(lines))
    status, param, text = error(r)
    assert (status, param) == (400, "file") and text.startswith(message), text


def test_upload_refusals(client):
    assert error(post_file(client, jsonl(SPAM[:3]), purpose="assistants"))[:2] == (400, "purpose")
    assert error(client.post("/v1/files", files={"file": ("a.jsonl", jsonl(SPAM[:3]))}))[:2] == (400, "purpose")
    assert error(post_file(client, jsonl(SPAM[:3]), **{"expires_after[anchor]": "created_at"}))[:2] == \
        (400, "expires_after")
    assert error(client.post("/v1/files", files={"purpose": (None, "fine-tune")}))[:2] == (400, "file")
    assert client.post("/v1/files", data={"purpose": "fine-tune"}).json()["error"]["code"] == "unsupported_content_type"
    assert error(post_file(client, b"\xff\xfe not utf-8"))[:2] == (400, "file")
    assert client.post("/v1/files", json={"purpose": "fine-tune"}).status_code == 400
    too_big = post_file(client, jsonl(SPAM * 1)[: 200_000])
    assert too_big.status_code == 413 and "SOFTSERVE_FINETUNE_MAX_FILE_MB" in too_big.json()["error"]["message"]


def test_storage_limit(client, files):
    chunk = jsonl(SPAM[:400])[:90_000].rsplit(b"\n", 1)[0] + b"\n"  # under the file limit; four pass the storage one
    stored = []
    while (r := post_file(client, chunk)).status_code == 200:
        stored.append(r.json()["id"])
    assert r.status_code == 429 and r.json()["error"]["code"] == "storage_full"
    assert "SOFTSERVE_FINETUNE_MAX_STORAGE_MB" in r.json()["error"]["message"] and stored
    for file_id in stored:
        client.delete(f"/v1/files/{file_id}")
    assert post_file(client, chunk).status_code == 200  # room again
    client.delete(f"/v1/files/{client.get('/v1/files', params={'limit': 1}).json()['data'][0]['id']}")


def job(files, **fields) -> dict:
    return {"model": "base", "training_file": files["spam"], **fields}


@pytest.mark.parametrize("fields,param", [
    ({"model": "gpt-4o-mini"}, "model"),
    ({"training_file": "file-nope"}, "training_file"),
    ({"validation_file": "file-nope"}, "validation_file"),
    ({"validation_file": "ner"}, "validation_file"),  # another task
    ({"suffix": "bad name!"}, "suffix"),
    ({"suffix": "base"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"seed": "x"}, "seed"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"method": {"type": "sft"}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "big"}}}},
     "method.supervised.hyperparameters.batch_size"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 0}}}},
     "method.supervised.hyperparameters.learning_rate_multiplier"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 1}}}},
     "method.supervised.hyperparameters.beta"),
    ({"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": -2}}, "hyperparameters.n_epochs"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"temperature": 1}, "temperature"),
    ({"softserve": {"task": "generate"}}, "softserve.task"),
    ({"softserve": {"task": "summarize"}}, "softserve.task"),
    ({"softserve": {"kind": "lora"}}, "softserve.kind"),
    ({"softserve": {"virtual_tokens": 0}}, "softserve.virtual_tokens"),
    ({"softserve": {"virtual_tokens": 100000}}, "softserve.virtual_tokens"),
    ({"softserve": {"labels": ["spam"]}}, "softserve.labels"),  # leaves out ham
    ({"softserve": {"labels": ["ham,spam"]}}, "softserve.labels.0"),
    ({"softserve": {"max_steps": 0}}, "softserve.max_steps"),
    ({"softserve": {"schedule": "step"}}, "softserve.schedule"),
    ({"softserve": {"heldout_fraction": 1.5}}, "softserve.heldout_fraction"),
    ({"validation_file": "spam_val", "softserve": {"heldout_fraction": 0.2}}, "softserve.heldout_fraction"),
    ({"softserve": {"lora_rank": 8}}, "softserve.lora_rank"),
])
def test_bad_job_field_is_a_400_naming_it(client, files, fields, param):
    for key in ("validation_file",):
        if fields.get(key) in files:
            fields = {**fields, key: files[fields[key]]}
    r = client.post("/v1/fine_tuning/jobs", json=job(files, **fields))
    assert error(r)[:2] == (400, param), r.text


def test_queued_job_shape_queue_limit_and_cancel(client, files):
    body = job(files, model=HUB_ID, validation_file=files["spam_val"], suffix="spam-ft", seed=7,
               hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5},
               metadata={"team": "mail"}, softserve={"virtual_tokens": 8, "labels": ["ham", "spam"], "max_steps": 3})
    created = client.post("/v1/fine_tuning/jobs", json=body).json()
    assert created["object"] == "fine_tuning.job" and created["status"] == "queued" and created["model"] == HUB_ID
    assert created["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}
    assert created["method"] == {"type": "supervised", "supervised": {"hyperparameters": created["hyperparameters"]}}
    assert (created["seed"], created["user_provided_suffix"], created["metadata"]) == (7, "spam-ft", {"team": "mail"})
    assert created["softserve"]["task"] == "classify" and created["softserve"]["virtual_tokens"] == 8
    assert created["fine_tuned_model"] is None and created["error"] is None and created["result_files"] == []
    assert client.get(f"/v1/fine_tuning/jobs/{created['id']}").json() == created
    first_event = client.get(f"/v1/fine_tuning/jobs/{created['id']}/events").json()["data"][-1]
    assert "--lr 0.015 --head-lr 0.0005" in first_event["message"]  # the multiplier scales both default rates

    auto = client.post("/v1/fine_tuning/jobs", json=job(files)).json()  # every default
    assert auto["seed"] >= 0 and auto["user_provided_suffix"].startswith("ft-")
    assert auto["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    full = client.post("/v1/fine_tuning/jobs", json=job(files))
    assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_jobs"

    listed = client.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in listed["data"]] == [auto["id"]] and listed["has_more"]
    after = client.get("/v1/fine_tuning/jobs", params={"after": auto["id"]}).json()["data"]
    assert after[0]["id"] == created["id"]

    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "mail"}).json()["data"]] == \
        [created["id"]]
    assert client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "web"}).json()["data"] == []
    assert error(client.get("/v1/fine_tuning/jobs", params={"order": "asc"}))[:2] == (400, "order")
    assert error(client.get(f"/v1/fine_tuning/jobs/{auto['id']}/events", params={"page": 2}))[:2] == (400, "page")
    assert error(client.get("/v1/files", params={"sort": "bytes"}))[:2] == (400, "sort")

    in_use = client.delete(f"/v1/files/{files['spam_val']}")
    assert in_use.status_code == 409 and created["id"] in in_use.json()["error"]["message"]
    for j in (created, auto):
        cancelled = client.post(f"/v1/fine_tuning/jobs/{j['id']}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert client.post(f"/v1/fine_tuning/jobs/{auto['id']}/cancel").status_code == 409
    assert client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope/events").status_code == 404
    assert error(client.get(f"/v1/fine_tuning/jobs/{auto['id']}/events", params={"after": "x"}))[:2] == (400, "after")
    assert client.get(f"/v1/fine_tuning/jobs/{auto['id']}/checkpoints").json() == \
        {"object": "list", "data": [], "has_more": False}
