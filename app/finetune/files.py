"""Uploaded files (OpenAI's Files API, purpose "fine-tune"): checked at upload as `softserve train` reads them,
kept whole on disk, described in the database.

A training file is parsed and tokenized line by line with app/train/data.py, the trainer's own reader, so a
file that is stored is one training can read; a bad line is refused naming its number and what is wrong.
Content is written to a temp file, fsynced and renamed, then recorded, so a listed file is always complete.
The results a job writes (purpose "fine-tune-results") are stored here too, unchecked.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from app.finetune.database import ACTIVE, Database, now
from app.train.cli import infer_task
from app.train.data import MAX_LENGTH, DataError, entity_types, infer_labels, load_examples, parse_jsonl
from prompt_store.format import Task

PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 300  # a temp file this old was left by a killed upload


class FileNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class StorageFull(Exception):
    """The new file would take the files past SOFTSERVE_FINETUNE_MAX_STORAGE_MB."""


class FileInUse(Exception):
    """A job that has not ended reads the file."""


@dataclass(frozen=True)
class DataSummary:
    task: str
    labels: list[str]  # classify: the labels; tag: the entity types; generate: none
    examples: int


def check_training_data(data: bytes, filename: str, tokenizer) -> DataSummary:
    """What `softserve train` would read from this file, or DataError naming the line and the problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{filename}: not UTF-8 text (byte {e.start})") from e
    path = Path(filename)
    rows = parse_jsonl(text, path)
    task = infer_task(rows[0][1], path, rows[0][0])
    labels = infer_labels(task, rows, path)
    load_examples(path, task, tokenizer, labels, MAX_LENGTH, rows=rows)
    return DataSummary(task, entity_types(labels) if task == Task.TAG else labels, len(rows))


class FileStore:
    def __init__(self, directory: Path, database: Database, max_storage_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.database, self.max_storage_bytes = database, max_storage_bytes
        self._remove_stale_temp_files()

    def add(self, data: bytes, filename: str, purpose: str, summary: DataSummary | None = None) -> dict:
        """Store the content, then record it; StorageFull (nothing kept) past the storage limit."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        temp = self.directory / f"{TEMP_PREFIX}{file_id}"
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            with self.database.transaction(write_first=True) as db:
                used = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files").fetchone()[0]
                if used + len(data) > self.max_storage_bytes:
                    raise StorageFull(f"storing this file ({len(data)} bytes) would take the files to {used + len(data)} "
                                      f"bytes, past the limit of {self.max_storage_bytes} (SOFTSERVE_FINETUNE_MAX_STORAGE_MB); "
                                      f"delete files no longer needed")
                os.replace(temp, self.path(file_id))
                described = (summary.task, json.dumps(summary.labels), summary.examples) if summary else (None,) * 3
                db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at, task, labels, examples) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (file_id, filename, purpose, len(data), now(), *described))
        finally:
            temp.unlink(missing_ok=True)
        return self.get(file_id)

    def path(self, file_id: str) -> Path:
        return self.directory / f"{file_id}.data"

    def get(self, file_id: str) -> dict:
        with self.database.transaction() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise FileNotFound(f"no file with id {file_id!r}")
        return dict(row)

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        try:
            return self.path(file_id).read_bytes()
        except FileNotFoundError:  # deleted by another replica since
            raise FileNotFound(f"no file with id {file_id!r}") from None

    def list(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> tuple[list[dict], bool]:
        after_seq = None if after is None else self.database.seq_of("files", after)
        if after is not None and after_seq is None:
            raise FileNotFound(f"no file with id {after!r} (after)")
        where, args = ("purpose = ?", (purpose,)) if purpose else ("1", ())
        rows, more = self.database.page("files", where, args, after_seq, limit, newest_first)
        return [dict(row) for row in rows], more

    def delete(self, file_id: str) -> None:
        """FileInUse while a job that has not ended reads it."""
        with self.database.transaction(write_first=True) as db:
            if db.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone() is None:
                raise FileNotFound(f"no file with id {file_id!r}")
            for job in db.execute("SELECT id, status, spec FROM jobs WHERE status IN (?, ?, ?)", ("queued", *ACTIVE)):
                spec = json.loads(job["spec"])
                if file_id in (spec["training_file"], spec["validation_file"]):
                    raise FileInUse(f"file {file_id!r} is read by fine-tuning job {job['id']} ({job['status']}); "
                                    f"delete it once the job has ended, or cancel the job")
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.path(file_id).unlink(missing_ok=True)

    def _remove_stale_temp_files(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        for temp in self.directory.glob(f"{TEMP_PREFIX}*"):
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
            except FileNotFoundError:  # another replica cleaned it meanwhile
                pass
