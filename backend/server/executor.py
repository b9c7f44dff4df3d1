"""LocalExecutor: one worker thread that runs queued jobs one at a time (FIFO), models kept
loaded between jobs, cancel and finish checked once per optimisation step."""

from __future__ import annotations

import queue
import threading
from typing import Callable

from protocol.events import Done, Failed, ImageSnapshot, MeshSnapshot, Progress, TextureSnapshot
from protocol.messages import SPECS, event_to_message
from backend.jobs.store import JobStore


def run_pipeline(pipeline: str, spec, folder, should_stop: Callable[[], bool], resume: bool):
    """The event generator of one pipeline (imports torch lazily: the server starts fast)."""
    if pipeline == "image2d":
        from backend.pipelines.image2d import run_image2d

        return run_image2d(spec, folder, should_stop=should_stop)
    from backend.pipelines.mesh3d import run_generate, run_refine

    run = run_generate if pipeline == "generate" else run_refine
    return run(spec, folder, should_stop=should_stop, resume=resume)


def save_latest(folder, event) -> None:
    """Keep the latest snapshot in the job folder (latest_mesh.npz, latest_texture.png, latest_image.png)."""
    import io

    import numpy as np

    from backend.files import atomic_write_bytes
    from protocol.png import encode_png

    if isinstance(event, MeshSnapshot):
        buf = io.BytesIO()
        arrays = {"positions": event.positions, "faces": event.faces, "topology_id": np.int64(event.topology_id)}
        if event.uvs is not None:
            arrays["uvs"] = event.uvs
        np.savez(buf, **arrays)
        atomic_write_bytes(folder / "latest_mesh.npz", buf.getvalue())
    else:
        name = "latest_texture.png" if isinstance(event, TextureSnapshot) else "latest_image.png"
        atomic_write_bytes(folder / name, encode_png(np.ascontiguousarray(event.image)))


def load_latest(job_id: str, folder, seq: int, step: int) -> dict:
    """The snapshots ``save_latest`` kept, as event messages by kind (for a client resubscribing after a
    server restart). ``seq``: the job's last exactly-once seq, which snapshots carry; ``step``: its last step."""
    import numpy as np

    from protocol.png import decode_png

    found = {}
    mesh_file = folder / "latest_mesh.npz"
    if mesh_file.is_file():
        with np.load(mesh_file) as z:
            found["mesh"] = event_to_message(job_id, seq, MeshSnapshot(
                step, z["positions"], z["faces"], z["uvs"] if "uvs" in z.files else None, int(z["topology_id"])))
    for kind, cls in (("texture", TextureSnapshot), ("image", ImageSnapshot)):
        png = folder / f"latest_{kind}.png"
        if png.is_file():
            found[kind] = event_to_message(job_id, seq, cls(step, decode_png(png.read_bytes())))
    return found


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
            if row.id in self._cancel:
                self.store.set_state(row.id, "cancelled")
                self._emit_once(row.id, Failed("cancelled", "cancelled before it started"))
                continue
            self._run(row)

    def _emit_once(self, job_id: str, event) -> None:
        body = event_to_message(job_id, 0, event).body
        seq = self.store.append_event(job_id, body)
        self._publish(job_id, seq, event)

    def _run(self, row) -> None:
        job_id = self.current = row.id
        self.store.set_state(job_id, "running")
        spec = SPECS[row.pipeline](**row.spec)
        stop = lambda: job_id in self._cancel or job_id in self._finish or self._stop.is_set()  # noqa: E731
        events = run_pipeline(row.pipeline, spec, self.store.folder(job_id), stop, row.resume)
        snapshot_seq = self.store.last_seq(job_id)
        try:
            for event in events:
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
                    self.store.set_state(job_id, "failed", error={"code": event.code, "message": event.message,
                                                                   "field": event.field})
                self._emit_once(job_id, event)
                snapshot_seq = self.store.last_seq(job_id)
        finally:
            events.close()
            self.current = None
        if self._stop.is_set() and self.store.get(job_id).state == "running":
            self.store.set_state(job_id, "queued", resume=1)  # shut down mid-job: resume on the next start
        elif job_id in self._cancel:
            self.store.set_state(job_id, "cancelled")
            self._emit_once(job_id, Failed("cancelled", "cancelled by the user"))
        self._cancel.discard(job_id)
        self._finish.discard(job_id)
