"""The worker's claims on the job database, without training: the store-wide running limit, and a job whose
replica kept dying is failed with the reason rather than claimed forever."""
from __future__ import annotations

import json
import time

from app.config import Settings
from app.finetune import open_fine_tuning
from app.finetune.database import now


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
