"""The fine-tuning database: files, jobs, their events and checkpoints, in one SQLite file that every replica
sharing the store opens.

Every change is one transaction; those that read before they write (claiming a job, the queue limit, the
storage limit, a cancel meeting a finish) take the write lock first (BEGIN IMMEDIATE), so two replicas never
both claim one job. A rollback journal, not WAL: WAL's shared memory does not reach across hosts.
A running job holds a lease (owner, expiry) that its replica renews; an expired lease means the replica is gone.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    task TEXT, labels TEXT, examples INTEGER  -- what validation found (training files)
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
    spec TEXT NOT NULL,  -- JSON: the job's fields as created (app/finetune/jobs.py)
    created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,
    fine_tuned_model TEXT, trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]', error TEXT,
    lease_owner TEXT, lease_expires REAL, attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, type TEXT NOT NULL, data TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL,
    metrics TEXT NOT NULL  -- its file: <finetune dir>/jobs/<job>/checkpoints/step-<step>.pt, the latest only
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""

ACTIVE = ("validating_files", "running")  # a replica holds the job's lease
FINAL = ("succeeded", "failed", "cancelled")


def now() -> int:
    return int(time.time())


class Database:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.executescript(SCHEMA)  # (its own transaction)
        finally:
            db.close()

    @contextmanager
    def transaction(self, write_first: bool = False) -> Iterator[sqlite3.Connection]:
        """One connection per transaction (any thread or process may call): committed at the end, rolled back
        on an exception. write_first: BEGIN IMMEDIATE, for a read that decides a write."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE" if write_first else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict | None = None) -> None:
        with self.transaction() as db:
            insert_event(db, job_id, message, level, type, data)

    def page(self, table: str, where: str, args: tuple, after: int | None, limit: int,
             newest_first: bool = True) -> tuple[list[sqlite3.Row], bool]:
        """Rows of `table` matching `where` that follow the row numbered `after` (its seq) in the listing's
        order (OpenAI's cursor), at most `limit`; and whether more follow."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        if after is not None:
            where, args = f"({where}) AND seq {compare} ?", (*args, after)
        with self.transaction() as db:
            rows = db.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY seq {order} LIMIT ?",
                              (*args, limit + 1)).fetchall()
        return rows[:limit], len(rows) > limit

    def seq_of(self, table: str, id: str) -> int | None:
        """The row number of a file or job id (a listing's `after`), None when there is none."""
        with self.transaction() as db:
            row = db.execute(f"SELECT seq FROM {table} WHERE id = ?", (id,)).fetchone()
        return None if row is None else row["seq"]


def insert_event(db: sqlite3.Connection, job_id: str, message: str, level: str = "info", type: str = "message",
                 data: dict | None = None) -> None:
    """An event, in a transaction already open (one holding the write lock must not open another)."""
    db.execute("INSERT INTO events (job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?)",
               (job_id, now(), level, message, type, None if data is None else json.dumps(data)))
