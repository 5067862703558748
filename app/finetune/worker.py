"""The replica's fine-tuning worker: a thread that claims jobs, runs each in a training process
(app/finetune/child.py), renews their leases, and stores each result as a new prompt version.

Claiming takes the database's write lock, so of several replicas on one store exactly one runs a job, and at
most SOFTSERVE_FINETUNE_MAX_RUNNING run store-wide. The lease is renewed every poll; a renewal that finds the
job no longer ours and active (cancelled, or taken over after we stalled) stops the process. A job whose lease
expired (its replica was killed) is claimed again, by any replica or by the restarted one, and resumes from its
last checkpoint; after SOFTSERVE_FINETUNE_MAX_ATTEMPTS starts it is failed with the reason, never left running.
The thread runs no torch work (storing a result runs in a thread of its own): the server process keeps no
long-lived thread with an OpenMP pool besides the engine's (app/own_thread.py).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.finetune.child import ChildJob, checkpoint_path, run
from app.finetune.database import ACTIVE, FINAL, Database, insert_event, now
from app.finetune.files import RESULTS_PURPOSE, FileStore, StorageFull
from app.own_thread import run_in_own_thread
from prompt_store.format import PromptFormatError, load_prompt_bytes
from prompt_store.registry import PromptExists, PromptRegistry

log = logging.getLogger(__name__)

STOP_GRACE_S = 10  # a training process asked to stop gets this long to finish its step, then is killed


@dataclass
class Running:
    job_id: str
    process: multiprocessing.Process
    stop_event: object  # a multiprocessing Event
    outcome_path: Path
    started_at: float  # the job's first start (the time limit counts from it)
    stopping: str | None = None  # why we asked it to stop: "lost" (not ours any more), "time_limit", "shutdown"


class Worker:
    def __init__(self, settings: Settings, database: Database, files: FileStore, registry: PromptRegistry):
        self.settings, self.database, self.files, self.registry = settings, database, files, registry
        self.directory = settings.finetune_path
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.context = multiprocessing.get_context("spawn")
        self.running: dict[str, Running] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.remove_ended_job_folders()
        self._thread = threading.Thread(target=self._loop, name="softserve-finetune", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the training processes and give their leases back: a restart (or another replica) resumes them
        from their last checkpoints at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for job in self.running.values():
            job.stop_event.set()
        for job in self.running.values():
            self._end_process(job)
            with self.database.transaction() as db:  # a stop is no failed attempt: only kills count
                if db.execute("UPDATE jobs SET lease_expires = 0, attempts = attempts - 1 WHERE id = ? AND lease_owner = ? "
                              f"AND status IN {ACTIVE}", (job.job_id, self.owner)).rowcount:
                    insert_event(db, job.job_id, "The server stopped; the job resumes from its last checkpoint")
        self.running.clear()

    def remove_ended_job_folders(self) -> None:
        """Checkpoints of jobs that ended while their replica was down (cancelled meanwhile, or failed elsewhere)."""
        folders = list((self.directory / "jobs").glob("ftjob-*"))
        if not folders:
            return
        with self.database.transaction() as db:
            ended = {row["id"] for row in db.execute(f"SELECT id FROM jobs WHERE status IN {FINAL}")}
        for folder in folders:
            if folder.name in ended:
                shutil.rmtree(folder, ignore_errors=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.finetune_poll_s):
            try:
                self.step()
            except Exception:  # a database hiccup must not end the worker; the next poll tries again
                log.exception("fine-tuning worker step failed")

    def step(self) -> None:
        self._renew()
        for job in list(self.running.values()):
            if not job.process.is_alive():
                self._finish(job)
            elif job.stopping is None and time.time() - job.started_at > self.settings.finetune_max_job_s:
                job.stopping = "time_limit"
                job.stop_event.set()
        while len(self.running) < self.settings.finetune_max_running and self._claim():
            pass

    def _renew(self) -> None:
        expires = time.time() + self.settings.finetune_lease_s
        for job in self.running.values():
            with self.database.transaction() as db:
                renewed = db.execute(f"UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_owner = ? "
                                     f"AND status IN {ACTIVE}", (expires, job.job_id, self.owner)).rowcount
            if not renewed and job.stopping is None:
                job.stopping = "lost"
                job.stop_event.set()

    def _claim(self) -> bool:
        """Claim the oldest queued job, or one whose lease expired; start its training process."""
        with self.database.transaction(write_first=True) as db:
            active = db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN {ACTIVE} AND lease_expires > ?",
                                (time.time(),)).fetchone()[0]
            if active >= self.settings.finetune_max_running:
                return False
            row = db.execute(f"SELECT * FROM jobs WHERE status = 'queued' OR (status IN {ACTIVE} AND lease_expires <= ?) "
                             f"ORDER BY seq LIMIT 1", (time.time(),)).fetchone()
            if row is None:
                return False
            attempts = row["attempts"] + 1
            if attempts > self.settings.finetune_max_attempts:
                error = {"code": "worker_lost", "param": None,
                         "message": f"the job was started {row['attempts']} times and stopped each time before it "
                                    f"ended (its server was stopped or killed; SOFTSERVE_FINETUNE_MAX_ATTEMPTS)"}
                self._fail(db, row["id"], error)
                return True
            status = row["status"] if row["status"] in ACTIVE else "validating_files"
            db.execute("UPDATE jobs SET status = ?, lease_owner = ?, lease_expires = ?, attempts = ?, "
                       "started_at = COALESCE(started_at, ?) WHERE id = ?",
                       (status, self.owner, time.time() + self.settings.finetune_lease_s, attempts, now(), row["id"]))
            checkpoint = db.execute("SELECT step FROM checkpoints WHERE job_id = ? ORDER BY seq DESC LIMIT 1",
                                    (row["id"],)).fetchone()
        saved = checkpoint_path(self._job_dir(row["id"]) / "checkpoints", checkpoint["step"]) if checkpoint else None
        resume = saved if saved is not None and saved.exists() else None
        if row["status"] in ACTIVE:
            self.database.add_event(row["id"], f"Its server stopped; resuming on {self.owner} "
                                    + (f"from the checkpoint at step {checkpoint['step']}" if resume
                                       else "from the start (no checkpoint yet)"), level="warn")
        else:
            self.database.add_event(row["id"], f"Validating training file {json.loads(row['spec'])['training_file']} "
                                               f"on {self.owner}")
        self._start(row, resume)
        return True

    def _start(self, row, resume: Path | None) -> None:
        spec = json.loads(row["spec"])
        job_dir = self._job_dir(row["id"])
        job_dir.mkdir(parents=True, exist_ok=True)
        outcome_path = job_dir / f"outcome-{row['attempts'] + 1}.json"
        validation = spec["validation_file"]
        child = ChildJob(row["id"], spec["flags"], self.files.path(spec["training_file"]),
                         self.files.path(validation) if validation else None, self.database.path,
                         job_dir / "checkpoints", resume, outcome_path, os.getpid())
        stop_event = self.context.Event()
        process = self.context.Process(target=run, args=(child, self.settings, stop_event), daemon=True,
                                       name=f"softserve-train-{row['id']}")
        process.start()
        started_at = row["started_at"] or time.time()
        self.running[row["id"]] = Running(row["id"], process, stop_event, outcome_path, started_at)

    def _job_dir(self, job_id: str) -> Path:
        return self.directory / "jobs" / job_id

    def _end_process(self, job: Running) -> None:
        job.process.join(STOP_GRACE_S)
        if job.process.is_alive():
            job.process.kill()
            job.process.join()

    def _finish(self, job: Running) -> None:
        """The process has ended: store its result, or record why it failed (unless the job is not ours now)."""
        del self.running[job.job_id]
        self._end_process(job)
        if job.stopping == "lost":  # cancelled (its files go), or run by another replica now (they stay)
            with self.database.transaction() as db:
                status = db.execute("SELECT status FROM jobs WHERE id = ?", (job.job_id,)).fetchone()["status"]
            if status in FINAL:
                shutil.rmtree(job.outcome_path.parent, ignore_errors=True)
            return
        try:
            outcome = json.loads(job.outcome_path.read_text())
        except (OSError, ValueError):
            outcome = {"error": {"code": "training_process_exited", "param": None,
                                 "message": f"the training process exited with code {job.process.exitcode} "
                                            f"before it reported an outcome"}}
        if job.stopping == "time_limit":
            outcome = {"error": {"code": "time_limit", "param": None,
                                 "message": f"the job ran past {self.settings.finetune_max_job_s:g} s "
                                            f"(SOFTSERVE_FINETUNE_MAX_JOB_S) and was stopped"}}
        if "error" in outcome:
            self._end_failed(job.job_id, outcome["error"])
        else:  # reading and storing the prompt runs torch ops: in a thread that ends with them (app/own_thread.py)
            run_in_own_thread(self._succeed, job.job_id, outcome)
        shutil.rmtree(job.outcome_path.parent, ignore_errors=True)  # its checkpoints too: the job has ended

    def _succeed(self, job_id: str, outcome: dict) -> None:
        """The prompt becomes the name's next version through the registry's validated, atomic add (this replica
        serves it at once; others on their next poll), under the database's lock, so a cancel that came first wins.
        The status, the results file and the last events change in that one transaction: a client that sees
        `succeeded` sees them too."""
        results_id, warning = None, None
        try:  # stored first (its own transaction): the job's lock must not be held while another opens
            results_id = self.files.add(results_csv(outcome["history"]), f"{job_id}-results.csv", RESULTS_PURPOSE)["id"]
        except StorageFull as e:
            warning = f"The results file was not stored: {e}"
        if not self._store_result(job_id, outcome, results_id, warning) and results_id:
            self.files.delete(results_id)  # the job was cancelled or failed meanwhile: no orphaned results file

    def _store_result(self, job_id: str, outcome: dict, results_id: str | None, warning: str | None) -> bool:
        with self.database.transaction(write_first=True) as db:
            if not self._ours(db, job_id):
                return False
            try:
                stored = self.registry.add(load_prompt_bytes(Path(outcome["prompt_path"]).read_bytes()))
            except (OSError, PromptFormatError, PromptExists) as e:  # (a 409 of the store's: another writer's version)
                self._fail(db, job_id, {"code": "store_failed", "param": None,
                                        "message": f"the trained prompt could not be stored: {e}"})
                return False
            model = f"{stored.name}@{stored.version}"
            db.execute("UPDATE jobs SET status = 'succeeded', fine_tuned_model = ?, trained_tokens = ?, finished_at = ?, "
                       "result_files = ? WHERE id = ?",
                       (model, outcome["tokens"], now(), json.dumps([results_id] if results_id else []), job_id))
            shown = ", ".join(f"{k}={v:.4f}" for k, v in outcome["metrics"].items() if isinstance(v, float))
            insert_event(db, job_id, f"New fine-tuned model created: {model} (held-out {shown})", type="metrics",
                         data={"fine_tuned_model": model, **outcome["metrics"]})
            if warning:
                insert_event(db, job_id, warning, level="warn")
            insert_event(db, job_id, "The job has successfully completed")
            return True

    def _end_failed(self, job_id: str, error: dict) -> None:
        with self.database.transaction(write_first=True) as db:
            if self._ours(db, job_id):
                self._fail(db, job_id, error)

    @staticmethod
    def _fail(db, job_id: str, error: dict) -> None:
        db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                   (json.dumps(error), now(), job_id))
        insert_event(db, job_id, f"The job failed: {error['message']}", level="error")

    def _ours(self, db, job_id: str) -> bool:
        return db.execute(f"SELECT 1 FROM jobs WHERE id = ? AND lease_owner = ? AND status IN {ACTIVE}",
                          (job_id, self.owner)).fetchone() is not None


def results_csv(history: list[dict]) -> bytes:
    """One row per epoch: step, train_loss and the held-out metrics (OpenAI's results file is a CSV too)."""
    columns = list(dict.fromkeys(key for record in history for key in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue().encode()
