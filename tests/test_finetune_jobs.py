"""Fine-tuning jobs that train, through real server processes: the official openai client end to end, the result
serving with the accuracy training reported, the same held-out metrics as `softserve train` with the same settings
and seed, cancel, a kill -9 mid-job (the restart resumes from the checkpoint, to the same result), two replicas on
one store (one runs the job, both report it), and the time limit. Tiny jobs: 12 short examples, a few steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.live_server import REPO, LiveServer, env_settings, poll, start_servers

FAST = {"SOFTSERVE_FINETUNE_POLL_S": "0.1", "SOFTSERVE_FINETUNE_LEASE_S": "2", "SOFTSERVE_WATCH_INTERVAL_S": "0.2"}
SERVER_SETTINGS = FAST
FINAL = ("succeeded", "failed", "cancelled")


def shortest(label: str, count: int, skip: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "examples/data/spam.train.jsonl").read_text().splitlines()]
    return sorted((r for r in rows if r["label"] == label), key=lambda r: len(r["text"]))[skip:skip + count]


TRAIN = [row for pair in zip(shortest("spam", 6), shortest("ham", 6)) for row in pair]
VALIDATION = shortest("spam", 4, skip=6) + shortest("ham", 4, skip=6)
# the same job for every test that compares results: 2 epochs of 3 steps, a checkpoint after each
HYPER = {"n_epochs": 2, "batch_size": 4}
SOFTSERVE = {"virtual_tokens": 4}
SEED = 3
CLI_FLAGS = ["--task", "classify", "--virtual-tokens", "4", "--epochs", "2", "--batch-size", "4", "--seed", str(SEED)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def openai_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def upload_data(client: openai.OpenAI) -> tuple[str, str]:
    train = client.files.create(file=("spam.train.jsonl", jsonl(TRAIN)), purpose="fine-tune")
    validation = client.files.create(file=("spam.val.jsonl", jsonl(VALIDATION)), purpose="fine-tune")
    return train.id, validation.id


def create_job(client: openai.OpenAI, suffix: str, **overrides):
    train, validation = upload_data(client)
    fields = dict(model="base", training_file=train, validation_file=validation, suffix=suffix, seed=SEED,
                  method={"type": "supervised", "supervised": {"hyperparameters": HYPER}},
                  extra_body={"softserve": SOFTSERVE})
    return client.fine_tuning.jobs.create(**{**fields, **overrides})


def wait_for_end(client: openai.OpenAI, job_id: str):
    return poll(lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in FINAL and job,
                f"job {job_id} ends", timeout=600, interval=0.2)


def events(client: openai.OpenAI, job_id: str) -> list:
    """Oldest first (the API lists newest first, page by page)."""
    return list(client.fine_tuning.jobs.list_events(job_id, limit=7))[::-1]


def held_out(client: openai.OpenAI, job_id: str) -> dict:
    """The metrics the job reported for its result."""
    return next(e.data for e in events(client, job_id) if e.message.startswith("New fine-tuned model created"))


@pytest.fixture(scope="module")
def cli_metrics(tmp_path_factory) -> dict:
    """`softserve train` with the jobs' settings and seed, on the same files."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "train.jsonl").write_bytes(jsonl(TRAIN))
    (folder / "val.jsonl").write_bytes(jsonl(VALIDATION))
    env = {**os.environ, "SOFTSERVE_CACHE_DIR": str(env_settings().cache_dir)}
    subprocess.run([sys.executable, "-m", "app.cli", "train", str(folder / "train.jsonl"), "--name", "spam-cli",
                    "--heldout", str(folder / "val.jsonl"), "--out", str(folder / "cli.safetensors"), "--threads", "1",
                    *CLI_FLAGS], check=True, cwd=REPO, env=env, capture_output=True)
    return json.loads((folder / "cli.metrics.json").read_text())["heldout"]


def test_openai_client_end_to_end(server, cli_metrics):
    client = openai_client(server)
    job = create_job(client, "spam-ft")
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    job = wait_for_end(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "spam-ft@1" and job.finished_at >= job.created_at and job.trained_tokens > 0
    log = events(client, job.id)
    steps = [e.data["step"] for e in log if e.type == "metrics" and "total_steps" in e.data]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e.message for e in log][-1] == "The job has successfully completed"
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 3]
    assert {"full_valid_loss", "full_valid_accuracy", "train_loss"} <= set(checkpoints[0].metrics.model_dump(exclude_none=True))
    results = client.files.content(job.result_files[0]).text.splitlines()
    assert results[0].split(",")[:3] == ["epoch", "steps", "train_loss"] and len(results) == 3

    reported = held_out(client, job.id)
    # the same trainer as the CLI: the same held-out metrics with the same settings and seed
    assert reported["accuracy"] == cli_metrics["accuracy"]
    assert reported["loss"] == pytest.approx(cli_metrics["loss"], rel=1e-5)
    # and it serves at once, with the accuracy training reported
    answer = httpx.post(server.url + "/v1/classify", json={"prompt": job.fine_tuned_model,
                                                           "inputs": [row["text"] for row in VALIDATION]}, timeout=60)
    labels = [result["label"] for result in answer.json()["results"]]
    served_accuracy = sum(label == row["label"] for label, row in zip(labels, VALIDATION)) / len(VALIDATION)
    assert served_accuracy == reported["accuracy"]
    assert "spam-ft" in [m.id for m in client.models.list()]


def test_cancel_stops_a_running_job(server):
    client = openai_client(server)
    job = create_job(client, "spam-cancelled", method={"type": "supervised",
                                                       "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}})
    poll(lambda: any("total_steps" in (e.data or {}) for e in events(client, job.id)), "a training step", timeout=300)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    job_folder = server.store / "_finetune" / "jobs" / job.id
    poll(lambda: not job_folder.exists(), "the worker stops the training process and removes its files", timeout=60)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert "spam-cancelled" not in [m.id for m in client.models.list()]


def test_kill_9_mid_job_resumes_from_the_checkpoint(tmp_path, cli_metrics):
    store = tmp_path / "store"
    first = LiveServer(store, FAST).start()
    first.wait_ready()
    client = openai_client(first)
    job = create_job(client, "spam-resumed")
    poll(lambda: any(e.message.startswith("Epoch 1 ") for e in events(client, job.id)), "the first checkpoint",
         timeout=300, interval=0.02)
    first.proc.kill()  # kill -9: no drain, no lease given back
    first.stop()
    with LiveServer(store, FAST) as second:
        client = openai_client(second)
        job = wait_for_end(client, job.id)
        assert job.status == "succeeded", job.error
        assert any("resuming on" in e.message and "from the checkpoint at step 3" in e.message
                   for e in events(client, job.id))
        reported = held_out(client, job.id)
        assert reported["accuracy"] == cli_metrics["accuracy"]  # resumed, the run ends where an unbroken one does
        assert reported["loss"] == pytest.approx(cli_metrics["loss"], rel=1e-5)
        answer = httpx.post(second.url + "/v1/classify", json={"prompt": job.fine_tuned_model, "inputs": ["hi"]})
        assert answer.status_code == 200


def test_two_replicas_one_store(tmp_path):
    store = tmp_path / "store"
    replicas = (LiveServer(store, FAST), LiveServer(store, FAST))
    start_servers(*replicas)
    try:
        a, b = (openai_client(server) for server in replicas)
        job = create_job(a, "spam-shared", method={"type": "supervised",
                                                   "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
        assert b.fine_tuning.jobs.retrieve(job.id).status in ("queued", "validating_files", "running")
        done = wait_for_end(b, job.id)
        assert done.status == "succeeded", done.error
        assert a.fine_tuning.jobs.retrieve(job.id) == done
        starts = [e.message for e in events(a, job.id) if e.message.startswith("Validating training file")]
        assert len(starts) == 1
        runner = int(starts[0].rsplit(" on ", 1)[1].split(":")[1])
        assert runner in (replicas[0].proc.pid, replicas[1].proc.pid)
        for server in replicas:  # the result serves on both
            poll(lambda server=server: httpx.post(server.url + "/v1/classify", json={
                "prompt": done.fine_tuned_model, "inputs": ["hi"]}).status_code == 200, "the prompt on both replicas")
    finally:
        for server in replicas:
            server.stop()


def test_time_limit_fails_the_job_with_the_reason(tmp_path):
    with LiveServer(tmp_path / "store", {**FAST, "SOFTSERVE_FINETUNE_MAX_JOB_S": "0.5"}) as server:
        client = openai_client(server)
        job = wait_for_end(client, create_job(client, "spam-slow").id)
        assert job.status == "failed" and job.error.code == "time_limit"
        assert "SOFTSERVE_FINETUNE_MAX_JOB_S" in job.error.message and job.fine_tuned_model is None
