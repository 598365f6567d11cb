"""The job store: every accepted job and its result in SQLite, so that none is lost when the process dies.

A job is committed before the client hears that it was accepted, and its state changes are single transactions.
SQLite's write-ahead log keeps committed transactions through a killed process (synchronous=NORMAL loses at most the
last transactions on a power cut, not on a crash). `recover()` runs at start-up: jobs that were waiting are queued
again; jobs that were running are queued again until they have been interrupted `max_attempts` times, then failed
with that reason. Image files are written atomically (`fluxkit.imageio.save_image`) before the job is marked done,
and half-written temp files from a crash are removed at start-up.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TERMINAL = ("succeeded", "failed", "canceled")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- 'prediction' or 'openai'
    model TEXT NOT NULL,
    input TEXT NOT NULL,           -- the input as the client sent it (JSON)
    request TEXT NOT NULL,         -- the validated JobRequest (JSON)
    status TEXT NOT NULL,          -- starting, processing, succeeded, failed, canceled
    output TEXT,                   -- JSON list of file names in the output folder
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""


@dataclass
class JobRecord:
    id: str
    kind: str
    model: str
    input: dict
    request: dict
    status: str
    output: list[str] | None
    error: str | None
    attempts: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    step: int | None = None  # steps done, while the job is live (not stored)


class JobStore:
    """Thread-safe: one connection behind a lock (every call is a few milliseconds)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, rows: list[tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add(self, job_id: str, kind: str, model: str, input: dict, request: dict) -> None:
        row = (job_id, kind, model, json.dumps(input), json.dumps(request), "starting", time.time())
        self._write(
            "INSERT INTO jobs (id, kind, model, input, request, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [row],
        )

    def start(self, job_ids: list[str]) -> None:
        now = time.time()
        self._write(
            "UPDATE jobs SET status='processing', started_at=?, attempts=attempts+1 WHERE id=? AND status='starting'",
            [(now, i) for i in job_ids],
        )

    def finish(self, job_id: str, outputs: list[str]) -> None:
        self._end(job_id, "succeeded", json.dumps(outputs), None)

    def fail(self, job_id: str, error: str) -> None:
        self._end(job_id, "failed", None, error)

    def cancel(self, job_id: str) -> None:
        self._end(job_id, "canceled", None, None)

    def _end(self, job_id: str, status: str, output: str | None, error: str | None) -> None:
        # A job reaches one terminal state only: a cancel racing a finish keeps whichever came first.
        self._write(
            "UPDATE jobs SET status=?, output=?, error=?, completed_at=? WHERE id=? AND status NOT IN "
            "('succeeded', 'failed', 'canceled')",
            [(status, output, error, time.time(), job_id)],
        )

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _record(row) if row else None

    def recent(self, limit: int = 100) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return dict(rows)

    def recover(self, max_attempts: int) -> list[JobRecord]:
        """After a restart: fail jobs interrupted too often, requeue the rest; -> the jobs to run, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('starting', 'processing') ORDER BY created_at, rowid"
            ).fetchall()
        pending = [_record(r) for r in rows]
        again = []
        for rec in pending:
            if rec.status == "processing" and rec.attempts >= max_attempts:
                self.fail(rec.id, f"the server stopped {rec.attempts} times while running this job; not retried")
            else:
                again.append(rec)
        self._write("UPDATE jobs SET status='starting' WHERE id=? AND status='processing'", [(r.id,) for r in again])
        for rec in again:
            rec.status = "starting"
        return again


_COLUMNS = "id, kind, model, input, request, status, output, error, attempts, created_at, started_at, completed_at"


def _record(row) -> JobRecord:
    (job_id, kind, model, inp, req, status, output, error, attempts, created, started, completed) = row
    return JobRecord(
        job_id, kind, model, json.loads(inp), json.loads(req), status,
        json.loads(output) if output else None, error, attempts, created, started, completed,
    )


def remove_partial_files(folder: Path) -> int:
    """Delete temp files that a killed `save_image` left behind (`.NAME.*.tmp`); -> how many."""
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
