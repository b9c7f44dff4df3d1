"""LocalExecutor: one worker thread that runs queued jobs one at a time (FIFO), models kept
loaded between jobs, cancel and finish checked once per optimisation step.

Every job ends with exactly one terminal event (``done`` or ``failed``), stored with the state
it ends in: the worker claims a queued job atomically (``queued`` -> ``running``), so a cancel of a
queued job (made by the server, which emits its ``failed``) and the worker's start never both win.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from protocol.events import Done, Failed, ImageSnapshot, MeshSnapshot, Progress, TextureSnapshot
from protocol.messages import SPECS, event_to_message
from backend.jobs.store import JobStore
from backend.server.snapshots import save_latest


def run_pipeline(pipeline: str, spec, folder, should_stop: Callable[[], bool], resume: bool):
    """The event generator of one pipeline (imports torch lazily: the server starts fast)."""
    if pipeline == "image2d":
        from backend.pipelines.image2d import run_image2d

        return run_image2d(spec, folder, should_stop=should_stop)
    from backend.pipelines.mesh3d import run_generate, run_refine

    run = run_generate if pipeline == "generate" else run_refine
    return run(spec, folder, should_stop=should_stop, resume=resume)


def _error(failed: Failed) -> dict:
    """A ``failed`` event as the job's ``error`` (what ``status`` shows)."""
    return {"code": failed.code, "message": failed.message, "field": failed.field}


class LocalExecutor:
    """Runs jobs from the store; publishes (job id, Message) pairs on ``outbox`` for the server."""

    def __init__(self, store: JobStore, outbox: "queue.Queue", wake: Callable[[], None] = lambda: None) -> None:
        self.store, self.outbox, self.wake = store, outbox, wake
        self._stop = threading.Event()
        self._new_work = threading.Event()
        self._cancel: set[str] = set()
        self._finish: set[str] = set()
        self.current: str | None = None
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

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started, with its terminal event; False when it is no longer queued."""
        reason = Failed("cancelled", "cancelled before it started")
        if not self.store.transition(job_id, ("queued",), "cancelled", error=_error(reason)):
            return False
        self._emit_once(job_id, reason)
        return True

    def _publish(self, job_id: str, seq: int, event) -> None:
        self.outbox.put((job_id, event_to_message(job_id, seq, event)))
        self.wake()

    def _loop(self) -> None:
        while not self._stop.is_set():
            row = self.store.next_queued()
            if row is None:
                self._new_work.wait(0.5)
                self._new_work.clear()
                continue
            if self.store.transition(row.id, ("queued",), "running"):  # else cancelled meanwhile
                self._run(row)

    def _emit_once(self, job_id: str, event) -> None:
        body = event_to_message(job_id, 0, event).body
        seq = self.store.append_event(job_id, body)
        self._publish(job_id, seq, event)

    def _run(self, row) -> None:
        job_id = self.current = row.id
        spec = SPECS[row.pipeline](**row.spec)
        stop = lambda: job_id in self._cancel or job_id in self._finish or self._stop.is_set()  # noqa: E731
        events = run_pipeline(row.pipeline, spec, self.store.folder(job_id), stop, row.resume)
        snapshot_seq = self.store.last_seq(job_id)
        ended = False  # the terminal event was emitted: nothing may follow it
        try:
            for event in events:
                if ended:
                    continue  # nothing follows a job's terminal event
                if job_id in self._cancel or (self._stop.is_set() and isinstance(event, Done)):
                    break  # a cancelled or shut-down job's partial result is not its result
                if isinstance(event, (ImageSnapshot, TextureSnapshot, MeshSnapshot)):
                    self._publish(job_id, snapshot_seq, event)  # coalescing: carries the last exactly-once seq
                    save_latest(self.store.folder(job_id), event)
                    continue
                if isinstance(event, Progress):
                    self.store.set_progress(job_id, event.step, event.total)
                if isinstance(event, Done):
                    self.store.set_state(job_id, "done", final=event.final)
                elif isinstance(event, Failed):
                    self.store.set_state(job_id, "failed", error=_error(event))
                self._emit_once(job_id, event)
                snapshot_seq = self.store.last_seq(job_id)
                ended = isinstance(event, (Done, Failed))
        finally:
            events.close()
            self.current = None
        if ended:
            pass  # a cancel or finish that came as the job ended changes nothing
        elif job_id in self._cancel:
            reason = Failed("cancelled", "cancelled by the user")
            self.store.set_state(job_id, "cancelled", error=_error(reason))
            self._emit_once(job_id, reason)
        elif self._stop.is_set():
            self.store.set_state(job_id, "queued", resume=1)  # shut down mid-job: resume on the next start
        else:  # a pipeline that stopped without saying how it ended: a bug, but the job still ends once
            reason = Failed("internal", "the pipeline ended without a result")
            self.store.set_state(job_id, "failed", error=_error(reason))
            self._emit_once(job_id, reason)
        self._cancel.discard(job_id)
        self._finish.discard(job_id)
