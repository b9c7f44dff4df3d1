"""The job store: SQLite (WAL) for job state and the exactly-once events, one folder per job.

A submit is written (spec file, then the row, ``synchronous=FULL``) before it is acknowledged,
so an acknowledged job survives a crash (the zguide's Titanic pattern). A submit's idempotency
key is stored in the transaction that creates its jobs, so a resent submit finds exactly them.
State changes that race (the server cancelling a queued job, the worker starting it) go through
``transition``, which moves a job only from the states it names. Job ids are uuid4 hex
strings and are checked before any path is built from them, so no request reaches outside
the data directory.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import InvalidInputError, Psd3dError
from backend.files import atomic_write_json

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
STATES = ("queued", "running", "done", "failed", "cancelled")


class UnknownJobError(Psd3dError):
    code = "unknown_job"


@dataclass
class JobRow:
    id: str
    pipeline: str
    spec: dict
    state: str
    step: int
    total: int
    created: float
    batch: str | None
    final: dict | None
    error: dict | None
    resume: bool

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("id", "pipeline", "spec", "state", "step", "total", "created", "batch",
                                              "final", "error")}


class JobStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir).resolve()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
                step INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
                batch TEXT, final TEXT, error TEXT, resume INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS events (
                job TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (job, seq));
            CREATE TABLE IF NOT EXISTS submits (
                key TEXT PRIMARY KEY, jobs TEXT NOT NULL, batch TEXT, created REAL NOT NULL);
        """)

    # -- paths ---------------------------------------------------------------------------
    @staticmethod
    def is_job_id(value) -> bool:
        return isinstance(value, str) and bool(JOB_ID.match(value))

    def folder(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise InvalidInputError(f"job: {job_id!r} is not a job id (32 hex characters)", field="job")
        return self.root / "jobs" / job_id

    # -- writes --------------------------------------------------------------------------
    def create(self, pipeline: str, spec: dict, batch: str | None = None) -> str:
        return self.create_jobs(pipeline, [spec], batch, None)[0]

    def create_jobs(self, pipeline: str, specs: list[dict], batch: str | None, key: str | None) -> list[str]:
        """Create one job per spec, all or none, remembering the submit's idempotency ``key`` in the same
        transaction (so a resent submit finds exactly the jobs it made, even across a crash)."""
        ids = [uuid.uuid4().hex for _ in specs]
        for job_id, spec in zip(ids, specs):
            folder = self.folder(job_id)
            folder.mkdir(parents=True)
            atomic_write_json(folder / "job.json", {"id": job_id, "pipeline": pipeline, "spec": spec, "batch": batch})
        now = time.time()
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO jobs (id, pipeline, spec, state, created, batch) VALUES (?, ?, ?, 'queued', ?, ?)",
                                     [(job_id, pipeline, json.dumps(spec), now, batch) for job_id, spec in zip(ids, specs)])
                if key is not None:
                    self._db.execute("INSERT INTO submits (key, jobs, batch, created) VALUES (?, ?, ?, ?)",
                                     (key, json.dumps(ids), batch, now))
        return ids

    def submitted(self, key: str) -> tuple[list[str], str | None] | None:
        """The jobs and batch a submit with this idempotency key made, or None."""
        with self._lock:
            row = self._db.execute("SELECT jobs, batch FROM submits WHERE key = ?", (key,)).fetchone()
        return None if row is None else (json.loads(row[0]), row[1])

    def set_state(self, job_id: str, state: str, **fields) -> None:
        if state not in STATES:
            raise ValueError(f"state {state!r} is not one of {STATES}")
        cols = {"state": state, **{k: json.dumps(v) if k in ("final", "error") else v for k, v in fields.items()}}
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?", (*cols.values(), job_id))

    def transition(self, job_id: str, before: tuple[str, ...], state: str, **fields) -> bool:
        """Move a job to ``state`` only if it is in one of the ``before`` states, atomically (the server
        and the executor race for a queued job); returns whether it moved."""
        if state not in STATES:
            raise ValueError(f"state {state!r} is not one of {STATES}")
        cols = {"state": state, **{k: json.dumps(v) if k in ("final", "error") else v for k, v in fields.items()}}
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ? AND state IN "
                                   f"({', '.join('?' for _ in before)})", (*cols.values(), job_id, *before))
        return cur.rowcount == 1

    def last_event(self, job_id: str) -> dict | None:
        """The job's newest stored event (a ``done`` or ``failed`` one once it has ended)."""
        with self._lock:
            row = self._db.execute("SELECT body FROM events WHERE job = ? ORDER BY seq DESC LIMIT 1", (job_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET step = ?, total = ? WHERE id = ?", (step, total, job_id))

    def append_event(self, job_id: str, body: dict) -> int:
        """Store an exactly-once event; returns its sequence number (1, 2, ...)."""
        with self._lock:
            (last,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job = ?", (job_id,)).fetchone()
            seq = last + 1
            self._db.execute("INSERT INTO events (job, seq, body) VALUES (?, ?, ?)", (job_id, seq, json.dumps({**body, "seq": seq})))
        return seq

    def last_seq(self, job_id: str) -> int:
        with self._lock:
            (last,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job = ?", (job_id,)).fetchone()
        return last

    def recover(self) -> list[str]:
        """After a restart: running jobs go back to the queue, to resume from their checkpoints."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()
            self._db.execute("UPDATE jobs SET state = 'queued', resume = 1 WHERE state = 'running'")
        return [r[0] for r in rows]

    def prune(self, older_than_days: float) -> list[str]:
        """Delete finished jobs (done, failed, cancelled) older than the given age, folders included."""
        import shutil

        cutoff = time.time() - older_than_days * 86400
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND created < ?",
                                    (cutoff,)).fetchall()
            ids = [r[0] for r in rows]
            self._db.execute("DELETE FROM submits WHERE created < ?", (cutoff,))
            for job_id in ids:
                self._db.execute("DELETE FROM events WHERE job = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        for job_id in ids:
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
        return ids

    # -- reads ---------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRow:
        self.folder(job_id)
        with self._lock:
            row = self._db.execute("SELECT id, pipeline, spec, state, step, total, created, batch, final, error, resume "
                                   "FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"job: no job {job_id}", field="job")
        return _row(row)

    def list(self, limit: int = 200) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute("SELECT id, pipeline, spec, state, step, total, created, batch, final, error, resume "
                                    "FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def next_queued(self) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT id, pipeline, spec, state, step, total, created, batch, final, error, resume "
                                   "FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
        return None if row is None else _row(row)

    def events_after(self, job_id: str, seq: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM events WHERE job = ? AND seq > ? ORDER BY seq", (job_id, seq)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        self._db.close()


def _row(r) -> JobRow:
    return JobRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7],
                  json.loads(r[8]) if r[8] else None, json.loads(r[9]) if r[9] else None, bool(r[10]))
