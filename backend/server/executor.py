"""LocalExecutor: one worker thread that runs queued jobs one at a time (FIFO), models kept
loaded between jobs, cancel and finish checked once per optimisation step.

Every job ends with exactly one terminal event (``done`` or ``failed``), stored with the state
it ends in: the worker claims a queued job atomically (``queued`` -> ``running``), so a cancel of a
queued job (made by the server, which emits its ``failed``) and the worker's start never both win.
A terminal state and its terminal event are one transaction (``JobStore.end``). ``JobEvents`` owns
how a job's event stream is written (exactly-once events, coalesced snapshots, the end); the
RayExecutor (``ray_executor.py``) writes its actors' streams through it too.

The worker never dies silently: an exception outside a pipeline (a full disk in ``set_progress``, a
store error) fails the affected job with a named code (``disk_full``, ``storage_error``, ``internal``)
and the loop goes on; when even that cannot be written, it is retried on each turn of the loop.
``health`` is what ``hello`` and ``ping`` report.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterator

from protocol.events import Done, Failed, ImageSnapshot, MeshSnapshot, Progress, TextureSnapshot
from protocol.messages import SPECS, event_to_message
from backend.jobs.store import MIN_FREE_BYTES, JobStore, storage_error
from backend.server.snapshots import save_latest


def run_pipeline(pipeline: str, spec, folder, should_stop: Callable[[], bool], resume: bool):
    """The event generator of one pipeline (imports torch lazily: the server starts fast)."""
    if pipeline == "image2d":
        from backend.pipelines.image2d import run_image2d

        return run_image2d(spec, folder, should_stop=should_stop)
    from backend.pipelines.mesh3d import run_generate, run_refine

    run = run_generate if pipeline == "generate" else run_refine
    return run(spec, folder, should_stop=should_stop, resume=resume)


log = logging.getLogger("psd3d.executor")


def _error(failed: Failed) -> dict:
    """A ``failed`` event as the job's ``error`` (what ``status`` shows)."""
    return {"code": failed.code, "message": failed.message, "field": failed.field}


class JobEvents:
    """The one owner of how a job's event stream becomes its stored history, whichever executor runs it:
    exactly-once events (``progress``, ``done``, ``failed``) get the next sequence number in the store and
    then go on ``outbox``; snapshots coalesce (published with the last exactly-once ``seq``, written as the
    job's latest of their kind); a terminal state and its event are one transaction; nothing follows it.
    The serve process is the only writer: a remote worker ships its events back and this writes them."""

    def __init__(self, store: JobStore, outbox: "queue.Queue", wake: Callable[[], None] = lambda: None) -> None:
        self.store, self.outbox, self.wake = store, outbox, wake

    def end(self, job_id: str, state: str, event, before: tuple[str, ...] | None = None, **fields) -> bool:
        """The job's terminal state and event in one transaction, then published; False when it was not
        in one of the ``before`` states."""
        seq = self.store.end(job_id, state, event_to_message(job_id, 0, event).body, before, **fields)
        if seq is None:
            return False
        self.publish(job_id, seq, event)
        return True

    def fail(self, job_id: str, reason: Failed, before: tuple[str, ...] | None = None, state: str = "failed") -> bool:
        return self.end(job_id, state, reason, before=before, error=_error(reason))

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started, with its terminal event; False when it is no longer queued."""
        return self.fail(job_id, Failed("cancelled", "cancelled before it started"), ("queued",), "cancelled")

    def publish(self, job_id: str, seq: int, event) -> None:
        self.outbox.put((job_id, event_to_message(job_id, seq, event)))
        self.wake()

    def emit_once(self, job_id: str, event) -> None:
        seq = self.store.append_event(job_id, event_to_message(job_id, 0, event).body)
        self.publish(job_id, seq, event)

    def drive(self, job_id: str, events: Iterator, cancelled: Callable[[], bool], stopping: Callable[[], bool]) -> str:
        """Store and publish a running job's events until it ends; returns how it ended: ``ended`` (its own
        ``done`` or ``failed``), ``cancelled``, ``requeued`` (shut down mid-job: it resumes on the next start)
        or ``incomplete`` (a stream that stopped without a result: failed as ``internal``). An exception
        from ``events`` (a worker that died) propagates with nothing written for the job's end."""
        snapshot_seq = self.store.last_seq(job_id)
        ended = False  # the terminal event was emitted: nothing may follow it
        try:
            for event in events:
                if ended:
                    continue  # nothing follows a job's terminal event
                if cancelled() or (stopping() and isinstance(event, Done)):
                    break  # a cancelled or shut-down job's partial result is not its result
                if isinstance(event, (ImageSnapshot, TextureSnapshot, MeshSnapshot)):
                    self.publish(job_id, snapshot_seq, event)  # coalescing: carries the last exactly-once seq
                    save_latest(self.store.folder(job_id), event)
                    continue
                if isinstance(event, Progress):
                    self.store.set_progress(job_id, event.step, event.total)
                if isinstance(event, Done):
                    self.end(job_id, "done", event, final=event.final)
                elif isinstance(event, Failed):
                    self.end(job_id, "failed", event, error=_error(event))
                else:
                    self.emit_once(job_id, event)
                snapshot_seq = self.store.last_seq(job_id)
                ended = isinstance(event, (Done, Failed))
        finally:
            events.close()
        if ended:
            return "ended"  # a cancel or finish that came as the job ended changes nothing
        if cancelled():
            self.fail(job_id, Failed("cancelled", "cancelled by the user"), state="cancelled")
            return "cancelled"
        if stopping():
            self.store.set_state(job_id, "queued", resume=1)  # shut down mid-job: resume on the next start
            return "requeued"
        # a pipeline that stopped without saying how it ended: a bug, but the job still ends once
        self.fail(job_id, Failed("internal", "the pipeline ended without a result"))
        return "incomplete"


class LocalExecutor:
    """Runs jobs from the store; publishes (job id, Message) pairs on ``outbox`` for the server."""

    def __init__(self, store: JobStore, outbox: "queue.Queue", wake: Callable[[], None] = lambda: None) -> None:
        self.store, self.outbox, self.wake = store, outbox, wake
        self.jobs = JobEvents(store, outbox, wake)
        self._stop = threading.Event()
        self._new_work = threading.Event()
        self._cancel: set[str] = set()
        self._finish: set[str] = set()
        self.current: str | None = None
        self.errors = 0  # exceptions outside a pipeline that the worker survived
        self.last_error: dict | None = None
        self._unended: dict[str, Failed] = {}  # jobs whose failure could not be written yet: retried
        self._thread = threading.Thread(target=self._loop, name="psd3d-executor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._new_work.set()
        self._thread.join(timeout)

    def notify(self) -> None:
        self._new_work.set()

    def cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    def finish(self, job_id: str) -> None:
        self._finish.add(job_id)

    def health(self) -> dict:
        """The worker as ``hello`` and ``ping`` report it."""
        return {"executor": "local", "alive": self._thread.is_alive(), "errors": self.errors,
                "last_error": self.last_error, "min_free_bytes": MIN_FREE_BYTES}

    def device_name(self) -> str | None:
        """What jobs run on, for ``hello``: None, the serve process's own device (the server describes it)."""
        return None

    def worker_of(self, job_id: str) -> str | None:
        """The worker running ``job_id`` (what ``status`` shows), None when it is not running here."""
        return "local" if self.current == job_id else None

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started, with its terminal event; False when it is no longer queued."""
        return self.jobs.cancel_queued(job_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id = None
            try:
                self._end_unended()
                row = self.store.next_queued()
                if row is None:
                    self._new_work.wait(0.5)
                    self._new_work.clear()
                    continue
                job_id = row.id
                if self.store.transition(row.id, ("queued",), "running"):  # else cancelled meanwhile
                    self._run(row)
            except Exception as exc:  # outside a pipeline: fail the job it hit, keep the worker
                self._survive(job_id, exc)

    def _survive(self, job_id: str | None, exc: Exception) -> None:
        err = storage_error(exc)
        self.errors += 1
        self.last_error = {"code": err.code, "message": err.message, "job": job_id, "time": time.time()}
        log.error("worker: %s (job %s); the worker goes on", err.message, job_id, exc_info=exc)
        self._cancel.discard(job_id)
        self._finish.discard(job_id)
        if job_id is None:
            self._stop.wait(1.0)  # the store itself failed: do not spin
            return
        self._unended[job_id] = Failed(err.code, err.message)
        self._end_unended()

    def _end_unended(self) -> None:
        """Fail the jobs an error outside their pipeline hit (once it can be written)."""
        for job_id, reason in list(self._unended.items()):
            try:
                self.jobs.fail(job_id, reason, before=("running",))
            except Exception as exc:  # still cannot write (a full disk): next turn
                log.warning("worker: job %s stays running until its failure can be written: %s", job_id, exc)
                self._stop.wait(1.0)
                return
            del self._unended[job_id]

    def _run(self, row) -> None:
        job_id = self.current = row.id
        spec = SPECS[row.pipeline](**row.spec)
        stop = lambda: job_id in self._cancel or job_id in self._finish or self._stop.is_set()  # noqa: E731
        events = run_pipeline(row.pipeline, spec, self.store.folder(job_id), stop, row.resume)
        try:
            self.jobs.drive(job_id, events, lambda: job_id in self._cancel, self._stop.is_set)
        finally:
            self.current = None
        self._cancel.discard(job_id)
        self._finish.discard(job_id)
