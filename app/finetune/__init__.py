"""Prompt training as a service: OpenAI's Files and fine-tuning jobs APIs over `softserve train`.

files.py (uploaded JSONL, checked as the trainer reads it), database.py (jobs, events, checkpoints, leases in
SQLite beside the store), jobs.py (requests and OpenAI's shapes), worker.py (claims and runs jobs, stores
results as prompt versions), child.py (the training process).
"""
from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.finetune.database import Database
from app.finetune.files import FileStore
from app.finetune.jobs import JobManager
from app.finetune.worker import Worker
from prompt_store.registry import PromptRegistry


@dataclass
class FineTuning:
    files: FileStore
    jobs: JobManager
    worker: Worker | None  # None: this replica only accepts and reports jobs (SOFTSERVE_FINETUNE_WORKER=false)


def open_fine_tuning(settings: Settings, registry: PromptRegistry) -> FineTuning:
    directory = settings.finetune_path
    database = Database(directory / "jobs.sqlite")
    files = FileStore(directory / "files", database, int(settings.finetune_max_storage_mb * (1 << 20)))
    jobs = JobManager(database, files, settings.max_virtual_tokens, settings.finetune_max_queued)
    worker = Worker(settings, database, files, registry) if settings.finetune_worker else None
    return FineTuning(files, jobs, worker)
