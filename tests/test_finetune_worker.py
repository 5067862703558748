"""The worker's claims on the job database, without training: the store-wide running limit, a job whose
replica kept dying is failed with the reason rather than claimed forever, and a finished job's result stored
all at once (never seen half-done)."""
from __future__ import annotations

import contextlib
import json
import time

from app.config import Settings
from app.finetune import open_fine_tuning
from app.finetune.database import now
from prompt_store import PromptRegistry
from prompt_store.format import dump_prompt
from tests.test_prompt_store import BASE, make_prompt


def add_job(database, job_id: str, status: str, lease_owner=None, lease_expires=None, attempts=0) -> None:
    spec = {"training_file": "file-x", "validation_file": None, "flags": [], "model": "base", "suffix": "x",
            "seed": 0, "hyperparameters": {}, "metadata": None, "softserve": {}}
    with database.transaction() as db:
        db.execute("INSERT INTO jobs (id, status, spec, created_at, lease_owner, lease_expires, attempts) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (job_id, status, json.dumps(spec), now(), lease_owner,
                                                     lease_expires, attempts))


def job_row(database, job_id: str) -> dict:
    with database.transaction() as db:
        return dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def test_running_limit_is_store_wide_and_a_job_that_kept_losing_its_replica_fails(tmp_path):
    settings = Settings(prompt_store=tmp_path / "store", finetune_max_running=1, finetune_max_attempts=2)
    fine_tuning = open_fine_tuning(settings, registry=None)
    worker, database = fine_tuning.worker, fine_tuning.jobs.database
    add_job(database, "ftjob-elsewhere", "running", "other-replica", time.time() + 60)
    add_job(database, "ftjob-queued", "queued")
    assert worker._claim() is False  # another replica's live lease fills the store's one running slot
    assert job_row(database, "ftjob-queued")["status"] == "queued"

    with database.transaction() as db:  # that replica was killed twice already: its lease expired again
        db.execute("UPDATE jobs SET lease_expires = ?, attempts = 2 WHERE id = 'ftjob-elsewhere'", (time.time() - 1,))
    assert worker._claim() is True
    failed = job_row(database, "ftjob-elsewhere")
    assert failed["status"] == "failed" and failed["finished_at"] is not None
    error = json.loads(failed["error"])
    assert error["code"] == "worker_lost" and "started 2 times" in error["message"]
    assert "SOFTSERVE_FINETUNE_MAX_ATTEMPTS" in error["message"]
    events, _ = database.page("events", "job_id = ?", ("ftjob-elsewhere",), None, 10)
    assert events[0]["level"] == "error" and events[0]["message"].startswith("The job failed")
    assert job_row(database, "ftjob-queued")["status"] == "queued" and not worker.running


def test_checkpoints_of_jobs_that_ended_while_their_replica_was_down_are_removed(tmp_path):
    settings = Settings(prompt_store=tmp_path / "store")
    fine_tuning = open_fine_tuning(settings, registry=None)
    worker, database = fine_tuning.worker, fine_tuning.jobs.database
    add_job(database, "ftjob-cancelled", "cancelled")
    add_job(database, "ftjob-running", "running", "other-replica", time.time() + 60)
    for job_id in ("ftjob-cancelled", "ftjob-running"):
        (settings.finetune_path / "jobs" / job_id / "checkpoints").mkdir(parents=True)
    worker.remove_ended_job_folders()
    assert sorted(p.name for p in (settings.finetune_path / "jobs").iterdir()) == ["ftjob-running"]


def finished_training(settings, job_id: str) -> dict:
    """What a training process leaves when it succeeds: the prompt file and the outcome the worker reads."""
    prompt_path = settings.finetune_path / "jobs" / job_id / "prompt.safetensors"
    prompt_path.parent.mkdir(parents=True)
    prompt_path.write_bytes(dump_prompt(make_prompt(name="spam-ft", task="classify", labels=("ham", "spam"), head=True)))
    return {"prompt_path": str(prompt_path), "tokens": 1234, "metrics": {"accuracy": 0.75, "loss": 0.5},
            "history": [{"epoch": 1, "steps": 3, "train_loss": 0.7}, {"epoch": 2, "steps": 6, "train_loss": 0.5}]}


def test_a_job_is_never_seen_succeeded_without_its_model_results_file_and_last_event(tmp_path):
    settings = Settings(prompt_store=tmp_path / "store")
    fine_tuning = open_fine_tuning(settings, registry=PromptRegistry(tmp_path / "prompts", BASE))
    worker, database = fine_tuning.worker, fine_tuning.jobs.database
    add_job(database, "ftjob-done", "running", worker.owner, time.time() + 60)
    seen = []  # the job as every committed transaction left it (what a client polling at that moment reads)
    opened = database.transaction

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        with opened(*args, **kwargs) as db:
            yield db
        with opened() as db:
            job = dict(db.execute("SELECT * FROM jobs WHERE id = 'ftjob-done'").fetchone())
            events = db.execute("SELECT message FROM events WHERE job_id = 'ftjob-done' ORDER BY seq").fetchall()
        seen.append((job, [e["message"] for e in events]))

    database.transaction = watched
    worker._succeed("ftjob-done", finished_training(settings, "ftjob-done"))
    succeeded = [(job, events) for job, events in seen if job["status"] == "succeeded"]
    assert succeeded
    for job, events in succeeded:
        assert job["fine_tuned_model"] == "spam-ft@1" and job["trained_tokens"] == 1234
        assert len(json.loads(job["result_files"])) == 1
        assert events[-1] == "The job has successfully completed"
        assert events[-2].startswith("New fine-tuned model created: spam-ft@1")
    results = fine_tuning.files.content(json.loads(succeeded[-1][0]["result_files"])[0]).decode().splitlines()
    assert results == ["epoch,steps,train_loss", "1,3,0.7", "2,6,0.5"]


def test_a_job_cancelled_before_its_result_is_stored_leaves_no_model_and_no_results_file(tmp_path):
    settings = Settings(prompt_store=tmp_path / "store")
    registry = PromptRegistry(tmp_path / "prompts", BASE)
    fine_tuning = open_fine_tuning(settings, registry=registry)
    worker, database = fine_tuning.worker, fine_tuning.jobs.database
    add_job(database, "ftjob-cancelled", "cancelled", worker.owner, time.time() + 60)
    worker._succeed("ftjob-cancelled", finished_training(settings, "ftjob-cancelled"))
    assert job_row(database, "ftjob-cancelled")["status"] == "cancelled"
    assert registry.list() == [] and fine_tuning.files.list(None, None, 10, newest_first=True) == ([], False)
