"""One job's training, in a process of its own (multiprocessing spawn), so that serving never waits for it.

It runs at the lowest CPU priority with few torch threads (SOFTSERVE_FINETUNE_THREADS): the server's engine
threads come first on the CPU, and no training thread or OpenMP pool lives in the server process
(app/own_thread.py says why that matters). On CUDA it uses the server's device within
SOFTSERVE_FINETUNE_GPU_MEMORY_FRACTION of its memory.

It does what `softserve train` does, with the CLI's own functions: the job's flags parsed by the CLI's parser,
split_data, tokenize_data, train_config, train. It writes the events and a checkpoint per epoch to the job
database as it goes, and its outcome (the prompt file and metrics, or the error) to a JSON file that the
worker reads when the process has ended. It stops at the next step when the worker asks, or when the server
that started it is gone (a killed server's job is resumed by a restart, not finished by an orphan).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.finetune.database import Database, now

log = logging.getLogger(__name__)


@dataclass
class ChildJob:
    job_id: str
    flags: list[str]  # `softserve train` flags, without the data files
    train_path: Path
    validation_path: Path | None
    database_path: Path
    checkpoint_dir: Path
    resume_path: Path | None  # the last checkpoint of an earlier attempt
    outcome_path: Path
    parent_pid: int


def train_args(job: ChildJob) -> argparse.Namespace:
    from app.train.cli import add_train_command

    parser = argparse.ArgumentParser(prog="softserve")
    add_train_command(parser.add_subparsers(dest="command"))
    heldout = ["--heldout", str(job.validation_path)] if job.validation_path else []
    return parser.parse_args(["train", str(job.train_path), *job.flags, *heldout])


def run(job: ChildJob, settings: Settings, stop_event) -> None:
    """The process's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us itself
    os.nice(19)
    import torch

    torch.set_num_threads(settings.finetune_threads)
    database = Database(job.database_path)
    try:
        outcome = train_job(job, settings, database, lambda: stop_event.is_set() or os.getppid() != job.parent_pid)
    except Exception as e:  # every failure becomes the job's error
        outcome = {"error": describe_failure(e, job)}
    write_atomically(job.outcome_path, json.dumps(outcome).encode())


def describe_failure(e: Exception, job: ChildJob) -> dict:
    from app.train.data import DataError
    from app.train.trainer import TrainingStopped

    if isinstance(e, TrainingStopped):
        return {"code": "stopped", "message": str(e), "param": None}
    if isinstance(e, DataError):
        in_validation = job.validation_path is not None and str(job.validation_path) in str(e)
        return {"code": "invalid_file", "message": str(e),
                "param": "validation_file" if in_validation else "training_file"}
    log.exception("fine-tuning job %s failed", job.job_id)
    return {"code": "training_error", "message": f"{type(e).__name__}: {e}", "param": None}


def train_job(job: ChildJob, settings: Settings, database: Database, stop) -> dict:
    import dataclasses

    import torch

    from app.engine.tokenizer import Tokenizer
    from app.engine.weights import load_model
    from app.train.cli import split_data, tokenize_data, train_config
    from app.train.trainer import TrainHooks, TrainingStopped, to_prompt_file, train
    from prompt_store.format import dump_prompt

    args = train_args(job)
    task, rows, heldout_rows, labels = split_data(args)
    device = settings.resolved_device()
    if device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(settings.finetune_gpu_memory_fraction, torch.device(device))
    loaded = load_model(settings.model, settings.resolved_dtype(), device, settings.cache_dir)
    train_set, heldout = tokenize_data(args, task, labels, Tokenizer(loaded.directory), rows, heldout_rows)
    with database.transaction() as db:
        db.execute("UPDATE jobs SET status = 'running' WHERE id = ? AND status = 'validating_files'", (job.job_id,))
    resume = torch.load(job.resume_path, weights_only=True) if job.resume_path else None  # no pickled code
    database.add_event(job.job_id, f"Files validated: {len(train_set)} training examples, {len(heldout)} held out; "
                       + (f"resuming after step {resume['step']}" if resume else "fine-tuning started"))

    def on_step(step: int, total: int, loss: float, tokens: int) -> None:
        database.add_event(job.job_id, f"Step {step}/{total}: training loss={loss:.4f}", type="metrics",
                           data={"step": step, "total_steps": total, "train_loss": loss, "tokens": tokens})

    def on_epoch(record: dict, checkpoint: dict) -> None:
        if stop():  # an orphan (its server killed) must not write over the checkpoint the job resumes from
            raise TrainingStopped(f"stopped after step {checkpoint['step']}")
        save_checkpoint(job, database, record, checkpoint)

    config = dataclasses.replace(train_config(args, task), progress=False)
    result = train(loaded, config, labels, train_set, heldout, TrainHooks(on_step, on_epoch, stop, resume))
    data = dump_prompt(to_prompt_file(loaded, result.prompt, args.name, labels, args.description))
    prompt_path = job.outcome_path.with_suffix(".safetensors")
    write_atomically(prompt_path, data)
    return {"prompt_path": str(prompt_path), "metrics": result.metrics, "history": result.history,
            "steps": result.steps, "tokens": result.tokens}


def save_checkpoint(job: ChildJob, database: Database, record: dict, checkpoint: dict) -> None:
    """The epoch's checkpoint file and row; the job's earlier checkpoint files go (their rows stay, as history)."""
    import torch

    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(job.checkpoint_dir, checkpoint["step"])
    temp = path.with_suffix(".tmp")
    torch.save(checkpoint, temp)
    os.replace(temp, path)
    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    with database.transaction() as db:
        db.execute("INSERT INTO checkpoints (job_id, created_at, step, metrics) VALUES (?, ?, ?, ?)",
                   (job.job_id, now(), checkpoint["step"], json.dumps(metrics)))
    for old in job.checkpoint_dir.glob("step-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    database.add_event(job.job_id, f"Epoch {record['epoch']} (step {checkpoint['step']}): {shown}; checkpoint saved",
                       type="metrics", data=metrics)


def checkpoint_path(checkpoint_dir: Path, step: int) -> Path:
    """Found by job and step, not by a path in the database: replicas may mount the shared store elsewhere."""
    return checkpoint_dir / f"step-{step}.pt"


def write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
