"""The job store: SQLite (WAL) for job state and the exactly-once events, one folder per job.

A submit is written (spec file, then the row, ``synchronous=FULL``) before it is acknowledged,
so an acknowledged job survives a crash (the zguide's Titanic pattern). A submit's idempotency
key is stored in the transaction that creates its jobs, so a resent submit finds exactly them.
State changes that race (the server cancelling a queued job, the worker starting it) go through
``transition``, which moves a job only from the states it names. Job ids are uuid4 hex
strings and are checked before any path is built from them, so no request reaches outside
the data directory.

One owner per data folder: a server holds ``DataLock`` (an exclusive ``flock`` on ``server.lock``,
its pid inside) for its whole life. A store that is emptied, unreadable or missing while job
folders exist is refused (``StoreDamagedError``) rather than silently served empty; ``rebuild``
(``psd3d jobs recover``) makes a new store from the job folders, which hold every acknowledged
spec. A job's terminal state and its terminal event are written in one transaction (``end``).
Submits are refused while the data folder's disk has less than ``MIN_FREE_BYTES`` free.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import (DataFolderInUseError, DiskFullError, InvalidInputError, Psd3dError, StorageError,
                             StoreDamagedError)
from backend.files import atomic_write_json

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
STATES = ("queued", "running", "done", "failed", "cancelled")
STORE_FILE = "jobs.sqlite3"
LOCK_FILE = "server.lock"
SPEC_FILE = "job.json"  # written (atomically) before the job's row: what was acknowledged
MIN_FREE_BYTES = 256 * 2**20  # submits are refused while the data folder's disk has less free
SQLITE_HEADER = b"SQLite format 3\x00"
RESULT_MARKER = "negative_embedding.pt"  # the last file a finished pipeline writes (after metrics.json)
RESULT_FILES = {"image2d": ("image.png", "metrics.json", "reward_curve.png"),
                "generate": ("out.glb", "preview.png", "metrics.json", "reward_curve.png"),
                "refine": ("out.glb", "preview.png", "metrics.json", "reward_curve.png")}


def disk_free(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (one place, so tests can make a disk look full)."""
    return shutil.disk_usage(path).free


def storage_error(exc: BaseException) -> Psd3dError:
    """An I/O or SQLite failure as a named error: ``disk_full`` for a full disk, else ``storage_error``."""
    if isinstance(exc, Psd3dError):
        return exc
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc))
    if full:
        return DiskFullError(f"disk full: {exc}")
    if isinstance(exc, (OSError, sqlite3.Error)):
        return StorageError(f"storage: {type(exc).__name__}: {exc}")
    return Psd3dError(f"internal error outside the pipeline: {type(exc).__name__}: {exc}")


class DataLock:
    """An exclusive lock on a data folder, held while this object is open: ``flock`` on ``server.lock``
    (released by the kernel when the process dies, however it dies), with the holder's pid written in."""

    def __init__(self, data_dir: str | Path) -> None:
        root = Path(data_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise DataFolderInUseError(f"data: {root} is in use by another psd3d server (pid {holder}); stop it, "
                                       f"or give this one its own --data folder", field="data") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


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
    def __init__(self, data_dir: str | Path, *, check: bool = True) -> None:
        """Open (or create) the store; ``check`` refuses a damaged one (see ``check_store``)."""
        self.root = Path(data_dir).resolve()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        path = self.root / STORE_FILE
        folders = job_folders(self.root)
        if check and folders and not path.exists():
            raise _damaged(self.root, f"the store {path} is missing while {len(folders)} job folder(s) exist")
        if check and path.exists() and path.stat().st_size >= len(SQLITE_HEADER):
            with open(path, "rb") as fh:
                if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise _damaged(self.root, f"the store {path} does not begin with SQLite's header")
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if check and folders and not self._has_jobs():
                self._db.close()
                raise _damaged(self.root, f"the store {path} holds no jobs (emptied?) while {len(folders)} job "
                                          f"folder(s) exist")
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
        except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            if not check:
                raise
            raise _damaged(self.root, f"the store {path} cannot be read ({exc})") from None

    def _has_jobs(self) -> bool:
        """Whether the store holds at least one job (a new store in WAL mode may be a 0-byte file whose rows
        are still in its -wal file: what counts is what SQLite reads)."""
        (table,) = self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'jobs'").fetchone()
        return bool(table) and self._db.execute("SELECT 1 FROM jobs LIMIT 1").fetchone() is not None

    def clean_temp(self) -> list[Path]:
        """Delete the temp files an interrupted atomic write left (``.NAME.*.tmp``); only a data folder's
        owner (the server holding its ``DataLock``) may call this, at start."""
        left = [*self.root.glob("jobs/*/.*.tmp"), *self.root.glob("uploads/.*.tmp"), *self.root.glob(".*.tmp")]
        for path in left:
            path.unlink(missing_ok=True)
        return left

    def check_space(self) -> None:
        """Refuse new work while the data folder's disk has less than ``MIN_FREE_BYTES`` free."""
        free = disk_free(self.root)
        if free < MIN_FREE_BYTES:
            raise DiskFullError(f"disk: {free / 2**20:.0f} MiB free in the server's data folder, below the "
                                f"{MIN_FREE_BYTES / 2**20:.0f} MiB needed to accept jobs; free space and submit again")

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
        self.check_space()
        ids = [uuid.uuid4().hex for _ in specs]
        for job_id, spec in zip(ids, specs):
            folder = self.folder(job_id)
            folder.mkdir(parents=True)
            atomic_write_json(folder / SPEC_FILE, {"id": job_id, "pipeline": pipeline, "spec": spec, "batch": batch,
                                                   "key": key})
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

    def queued(self, among: list[str] | None = None) -> list[str]:
        """The ids of the queued jobs (of ``among`` only, when given): what the queue limits count."""
        with self._lock:
            if among is None:
                return [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE state = 'queued'")]
            found: list[str] = []
            for i in range(0, len(among), 500):  # within SQLite's bound on parameters
                part = among[i:i + 500]
                found += [r[0] for r in self._db.execute(
                    f"SELECT id FROM jobs WHERE state = 'queued' AND id IN ({','.join('?' * len(part))})", part)]
            return found

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

    def end(self, job_id: str, state: str, event_body: dict, before: tuple[str, ...] | None = None,
            **fields) -> int | None:
        """A job's terminal state and its terminal event in ONE transaction (a crash between two commits
        would leave a job ended with no event, and every watcher waiting). With ``before``, only from those
        states; returns the event's sequence number, or None when the job was not in them."""
        if state not in STATES:
            raise ValueError(f"state {state!r} is not one of {STATES}")
        cols = {"state": state, **{k: json.dumps(v) if k in ("final", "error") else v for k, v in fields.items()}}
        where, args = ("id = ?", (job_id,)) if before is None else \
            (f"id = ? AND state IN ({', '.join('?' for _ in before)})", (job_id, *before))
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in cols)} WHERE {where}",
                                       (*cols.values(), *args))
                if cur.rowcount != 1:
                    return None
                return self._insert_event(job_id, event_body)

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
            return self._insert_event(job_id, body)

    def _insert_event(self, job_id: str, body: dict) -> int:
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


def job_folders(root: Path) -> list[Path]:
    """The job folders under a data folder that hold an acknowledged-or-about-to-be spec (``job.json``)."""
    jobs = Path(root) / "jobs"
    if not jobs.is_dir():
        return []
    return [d for d in jobs.iterdir() if JOB_ID.match(d.name) and (d / SPEC_FILE).is_file()]


def _damaged(root: Path, what: str) -> StoreDamagedError:
    return StoreDamagedError(f"store: {what}; nothing was served, so no job is lost: every acknowledged job's "
                             f"spec is in its folder. Stop any server on it, then run `psd3d jobs recover --data "
                             f"{root}` to rebuild the store from the job folders (the damaged file is kept aside)",
                             field="data")


OUTPUT_NAMES = {"out.glb": "glb", "preview.png": "preview", "image.png": "image", "metrics.json": "metrics",
                "reward_curve.png": "reward_curve", RESULT_MARKER: "negative_embedding"}


def _result(folder: Path, pipeline: str) -> tuple[dict, dict] | None:
    """A finished job's (outputs, final) read from its folder, or None when its result is not complete."""
    names = (*RESULT_FILES.get(pipeline, ("metrics.json",)), RESULT_MARKER)
    if not all((folder / name).is_file() for name in names):
        return None
    try:
        final = json.loads((folder / "metrics.json").read_text())["final"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {OUTPUT_NAMES[name]: str(folder / name) for name in names}, final


def rebuild(data_dir: str | Path) -> dict:
    """``psd3d jobs recover``: a new store from the job folders (each holds its spec, written before the
    ack). The damaged store files are renamed aside (``jobs.sqlite3.damaged-TIME``). A job whose result
    is complete becomes ``done`` (with its ``done`` event); every other one ``queued`` with ``resume`` set,
    so it continues from its last checkpoint. The caller holds the data folder's ``DataLock``."""
    from protocol.events import Done
    from protocol.messages import event_to_message

    root = Path(data_dir).resolve()
    try:
        JobStore(root).close()
    except StoreDamagedError:
        pass
    else:  # a healthy store holds more than the folders do (failed and cancelled states, every event)
        raise InvalidInputError(f"data: the job store in {root} is not damaged; nothing to recover", field="data")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = []
    for suffix in ("", "-wal", "-shm"):
        path = root / f"{STORE_FILE}{suffix}"
        if path.exists():
            path.rename(root / f"{STORE_FILE}{suffix}.damaged-{stamp}")
            aside.append(str(root / f"{STORE_FILE}{suffix}.damaged-{stamp}"))
    store = JobStore(root, check=False)
    done, queued, skipped = [], [], []
    submits: dict[str, tuple[list[str], str | None, float]] = {}
    try:
        for folder in sorted(job_folders(root), key=lambda d: (d / SPEC_FILE).stat().st_mtime):
            try:
                saved = json.loads((folder / SPEC_FILE).read_text())
                pipeline, spec = saved["pipeline"], saved["spec"]
            except (OSError, ValueError, KeyError, TypeError):
                skipped.append(folder.name)
                continue
            created = (folder / SPEC_FILE).stat().st_mtime
            result = _result(folder, pipeline)
            with store._lock, store._db:
                store._db.execute("BEGIN IMMEDIATE")
                store._db.execute("INSERT INTO jobs (id, pipeline, spec, state, created, batch, final, resume) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (folder.name, pipeline, json.dumps(spec), "done" if result else "queued", created,
                                   saved.get("batch"), json.dumps(result[1]) if result else None, 0 if result else 1))
                if result:
                    store._insert_event(folder.name, event_to_message(folder.name, 0, Done(*result)).body)
            (done if result else queued).append(folder.name)
            if saved.get("key"):
                submits.setdefault(saved["key"], ([], saved.get("batch"), created))[0].append(folder.name)
        with store._lock, store._db:
            store._db.execute("BEGIN IMMEDIATE")
            store._db.executemany("INSERT INTO submits (key, jobs, batch, created) VALUES (?, ?, ?, ?)",
                                  [(key, json.dumps(ids), batch, created) for key, (ids, batch, created) in submits.items()])
    finally:
        store.close()
    return {"done": done, "queued": queued, "skipped": skipped, "aside": aside}


def _row(r) -> JobRow:
    return JobRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7],
                  json.loads(r[8]) if r[8] else None, json.loads(r[9]) if r[9] else None, bool(r[10]))
