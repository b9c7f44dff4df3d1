"""RayExecutor (``psd3d serve --executor ray``): one Ray actor per GPU, jobs spread over every GPU of a
Ray cluster. Only this module imports Ray, and only ``--executor ray`` imports this module.

- Actors: one :class:`JobWorker` per GPU (``num_gpus=1``), a long-lived process, so the models a job
  loads stay cached for the next one (a Ray *task* would default to ``max_calls=1`` and reload SD 2.1 and
  the reward every job). The actor is threaded (``max_concurrency=2``): ``stop`` reaches it while ``run``
  streams, and the pipeline polls it once per step (cancel and finish within one step).
- A job is ``JobWorker.run``, a streaming generator of the pipeline's events. The serve process owns the
  actors and is the only writer of the store: one lane thread per actor claims the oldest queued job
  (FIFO over all lanes), reads the stream and writes it through :class:`JobEvents`, the same owner of the
  exactly-once rule the LocalExecutor uses, so replay, coalescing and ``done``-once are unchanged.
- Files: the data folder must be mounted at the same path on every node (a shared filesystem). The actor
  writes checkpoints and results straight into the server's job folder (atomically, as locally), so they
  survive the node. Each actor proves it sees the folder (``SHARE_PROBE``) before it gets a job.
- Faults, handled on purpose: a worker killed mid-job surfaces first as ``ActorUnavailableError`` (then
  ``ActorDiedError``). The lane makes sure the process that ran the job is gone (a restarted actor answers
  from a new pid; one that still answers from the old pid is killed, so a job never runs twice), then puts
  the job back in the queue with ``resume`` and it continues from its last checkpoint on whichever actor is
  free first. ``max_restarts`` restarts the process with no state (models reload on its next job); an actor
  not back within ``restart_wait_s`` (its node left) is replaced by a fresh one. The actors are not
  detached: they die with the serve process, and a restarted serve requeues its running jobs
  (``JobStore.recover``) onto new actors.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from protocol.errors import UnsupportedEnvironmentError
from protocol.events import Failed
from protocol.messages import SPECS
from backend.files import atomic_write_bytes
from backend.jobs.store import MIN_FREE_BYTES, JobRow, JobStore, storage_error
from backend.server.executor import JobEvents, run_pipeline

log = logging.getLogger("psd3d.ray")

SHARE_PROBE = ".psd3d-ray-share"  # written by the server in its data folder; each actor must read it back
FORWARDED_ENV = ("PSD3D_HOME", "HF_HOME", "HF_HUB_OFFLINE", "MKL_DYNAMIC", "OMP_DYNAMIC")  # to the actors


@dataclass
class RayConfig:
    """How ``psd3d serve --executor ray`` reaches its cluster and sizes its actors."""

    address: str | None = None  # None: a Ray instance of this process's own; "auto" or "HOST:PORT": join a cluster
    workers: int | None = None  # actors; None: one per GPU of the cluster
    gpus_per_worker: float = 1.0
    threads: int | None = None  # torch threads per actor (None: torch's default)
    init_kwargs: dict = field(default_factory=dict)  # more ray.init arguments (a local test cluster's sizes)
    ready_timeout_s: float = 900.0  # a new actor must start (be placed, import torch) within this
    restart_wait_s: float = 30.0  # a failed actor not back within this is replaced by a fresh one


class SharedFolderError(UnsupportedEnvironmentError):
    """An actor does not see the server's data folder at the same path."""


class JobWorker:
    """A Ray actor on one GPU: runs one job at a time as a streaming generator of its events."""

    def __init__(self, threads: int | None) -> None:
        if threads:
            import torch  # on the worker only; the serve process never needs torch for this

            torch.set_num_threads(threads)
        self._stop: set[str] = set()
        self.jobs_run = 0

    def ready(self, data_root: str) -> dict:
        """Where this actor runs, its device, and the server's share probe as this node reads it (None: not
        mounted)."""
        from backend.models import describe_device  # torch, on the worker only

        probe = Path(data_root) / SHARE_PROBE
        return {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "device": describe_device(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "probe": probe.read_text() if probe.is_file() else None,
                "jobs_run": self.jobs_run}

    def run(self, pipeline: str, spec: dict, folder: str, resume: bool) -> Iterator:
        job_id = Path(folder).name
        self.jobs_run += 1
        events = run_pipeline(pipeline, SPECS[pipeline](**spec), Path(folder), lambda: job_id in self._stop, resume)
        try:
            yield from events
        finally:
            events.close()
            self._stop.discard(job_id)

    def stop(self, job_id: str) -> None:
        """Cancel, finish or shut down: the running job stops at its next step (a stop that comes before
        ``run`` starts stops it at its first)."""
        self._stop.add(job_id)


@dataclass
class _Lane:
    """One actor and the serve-side thread that feeds it."""

    name: str
    handle: object | None = None
    info: dict = field(default_factory=dict)
    state: str = "starting"  # starting | idle | busy | restarting | unusable
    job: str | None = None
    error: str | None = None
    suspect: bool = False  # the actor failed while a job was stopping: confirm it before the next job


class RayExecutor:
    """The executor of ``--executor ray``; the same methods as :class:`LocalExecutor`."""

    def __init__(self, store: JobStore, outbox: "queue.Queue", wake: Callable[[], None] = lambda: None,
                 config: RayConfig | None = None) -> None:
        self.store, self.config = store, config or RayConfig()
        self.jobs = JobEvents(store, outbox, wake)
        self._stop = threading.Event()
        self._new_work = threading.Condition()
        self._claim = threading.Lock()  # one lane at a time takes the oldest queued job
        self._cancel: set[str] = set()
        self._finish: set[str] = set()
        self.lanes: list[_Lane] = []
        self._threads: list[threading.Thread] = []
        self._owns_ray = False
        self._probe = secrets.token_hex(16)
        self.gpus = 0.0
        self.errors = 0
        self.last_error: dict | None = None

    # -- the server's interface ------------------------------------------------------------
    def start(self) -> None:
        """Connect to Ray (or start a local instance) and start one lane per worker; the actors are created
        by their lanes, so the server answers while they start."""
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            log.warning("ray: RAY_AUTH_MODE=disabled: anyone who reaches the cluster's ports can run code on every "
                        "node; use token authentication (README 'Several GPUs')")
        if not ray.is_initialized():
            try:
                ray.init(address=self.config.address, log_to_driver=False, **self.config.init_kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.config.address or "a new local instance"
                raise UnsupportedEnvironmentError(f"ray: cannot reach the cluster at {where}: {exc}",
                                                  field="ray-address") from exc
            self._owns_ray = True
        self.gpus = float(ray.cluster_resources().get("GPU", 0))
        workers = self.config.workers or int(self.gpus // self.config.gpus_per_worker)
        if workers < 1:
            raise UnsupportedEnvironmentError("ray: the cluster has no GPU (ray status shows its resources); start "
                                              "nodes with GPUs, or give --ray-workers", field="ray-address")
        atomic_write_bytes(self.store.root / SHARE_PROBE, self._probe.encode())
        self.lanes = [_Lane(f"ray-{i}") for i in range(workers)]
        for lane in self.lanes:
            thread = threading.Thread(target=self._lane_loop, args=(lane,), name=f"psd3d-{lane.name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 20.0) -> None:
        """Shut down: running jobs stop at their next step and go back to the queue (resume on the next
        start); the actors are killed; a Ray instance this process started is shut down."""
        self._stop.set()
        for lane in self.lanes:
            if lane.job is not None and lane.handle is not None:
                lane.handle.stop.remote(lane.job)
        self.notify()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for lane in self.lanes:
            if lane.handle is not None:
                ray.kill(lane.handle, no_restart=True)
        if self._owns_ray:
            ray.shutdown()

    def notify(self) -> None:
        with self._new_work:
            self._new_work.notify_all()

    def cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)
        self._tell_stop(job_id)

    def finish(self, job_id: str) -> None:
        self._finish.add(job_id)
        self._tell_stop(job_id)

    def cancel_queued(self, job_id: str) -> bool:
        return self.jobs.cancel_queued(job_id)

    def health(self) -> dict:
        """The executor as ``hello`` and ``ping`` report it: every worker, where it runs and what it does."""
        workers = [{"name": lane.name, "state": lane.state, "job": lane.job, "host": lane.info.get("host"),
                    "node": lane.info.get("node"), "pid": lane.info.get("pid"), "gpus": lane.info.get("gpus", []),
                    "error": lane.error} for lane in self.lanes]
        alive = any(t.is_alive() for t in self._threads) and any(w["state"] in ("idle", "busy") for w in workers)
        return {"executor": "ray", "alive": alive, "errors": self.errors, "last_error": self.last_error,
                "min_free_bytes": MIN_FREE_BYTES, "workers": workers, "gpus": self.gpus,
                "address": self.config.address or "local"}

    def device_name(self) -> str:
        """What jobs run on, for ``hello``: each started worker's device and host, alike ones counted
        ("ray: cuda:0 (NVIDIA H100 80GB HBM3) on gpu-a x2, ..."); "starting" before the first is up."""
        named = Counter(f"{lane.info['device']} on {lane.info['host']}" for lane in self.lanes if lane.info.get("device"))
        if not named:
            return "starting"
        return "ray: " + ", ".join(name if count == 1 else f"{name} x{count}" for name, count in named.items())

    def worker_of(self, job_id: str) -> str | None:
        for lane in self.lanes:
            if lane.job == job_id:
                return f"{lane.name}@{lane.info.get('host', '?')}"
        return None

    # -- lanes -------------------------------------------------------------------------------
    def _tell_stop(self, job_id: str) -> None:
        for lane in self.lanes:
            if lane.job == job_id and lane.handle is not None:
                lane.handle.stop.remote(job_id)

    def _lane_loop(self, lane: _Lane) -> None:
        while not self._stop.is_set():
            job_id = None
            try:
                if lane.handle is None or lane.suspect:
                    if not self._make_ready(lane):  # tried again later (a node without the folder: rarely)
                        self._stop.wait(30.0 if lane.state == "unusable" else 5.0)
                        continue
                row = self._claim_next()
                if row is None:
                    with self._new_work:
                        self._new_work.wait(0.5)
                    continue
                job_id = row.id
                self._run(lane, row)
            except Exception as exc:  # outside a pipeline: fail the job it hit, keep the lane
                self._survive(lane, job_id, exc)

    def _claim_next(self) -> JobRow | None:
        with self._claim:
            while (row := self.store.next_queued()) is not None:
                if self.store.transition(row.id, ("queued",), "running"):
                    return row
        return None

    def _spawn(self, lane: _Lane) -> None:
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        actor = ray.remote(JobWorker).options(num_gpus=self.config.gpus_per_worker, num_cpus=0, max_restarts=-1,
                                              max_task_retries=0, max_concurrency=2,
                                              runtime_env={"env_vars": env} if env else None)
        lane.handle = actor.remote(self.config.threads)

    def _make_ready(self, lane: _Lane) -> bool:
        """Start (or confirm) the lane's actor and check it sees the data folder; False when it cannot."""
        if lane.handle is None:
            lane.state = "starting"
            self._spawn(lane)
        try:
            info = ray.get(lane.handle.ready.remote(str(self.store.root)), timeout=self.config.ready_timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            lane.error = f"the actor did not start: {type(exc).__name__}: {exc}"
            self._replace(lane)
            return False
        lane.info, lane.suspect = info, False
        if info["probe"] != self._probe:
            lane.state = "unusable"
            lane.error = str(SharedFolderError(
                f"ray: node {info['host']} does not see the data folder {self.store.root} (mount it at the same path "
                f"on every node; see README 'Several GPUs')", field="data"))
            log.error("%s: %s", lane.name, lane.error)
            self._replace(lane)
            return False
        lane.state, lane.error = "idle", None
        return True

    def _replace(self, lane: _Lane) -> None:
        if lane.handle is not None:
            ray.kill(lane.handle, no_restart=True)
        lane.handle = None

    def _run(self, lane: _Lane, row: JobRow) -> None:
        lane.job, lane.state = row.id, "busy"
        pid = lane.info.get("pid")
        try:
            self.jobs.drive(row.id, self._stream(lane, row), lambda: row.id in self._cancel, self._stop.is_set)
        except RayActorError as exc:  # the worker died mid-job (kill -9, OOM, its node left)
            lane.state = "restarting"
            log.warning("%s: worker lost during job %s (%s); the job resumes from its checkpoint", lane.name, row.id,
                        type(exc).__name__)
            self._confirm_gone(lane, pid)
            self._requeue(row.id)
        finally:
            lane.job = None
            if lane.state == "busy":
                lane.state = "idle"
            self._cancel.discard(row.id)
            self._finish.discard(row.id)

    def _stream(self, lane: _Lane, row: JobRow) -> Iterator:
        """The job's events as the actor yields them. Closed early (a cancel, a shutdown), the actor's job
        is stopped and its stream read to the end, so the actor is free before the lane's next job."""
        gen = lane.handle.run.options(num_returns="streaming").remote(row.pipeline, row.spec,
                                                                      str(self.store.folder(row.id)), row.resume)
        if row.id in self._cancel or row.id in self._finish:  # asked while the lane was taking the job
            lane.handle.stop.remote(row.id)
        complete = False
        try:
            for ref in gen:
                yield ray.get(ref)
            complete = True
        finally:
            if not complete:
                try:
                    lane.handle.stop.remote(row.id)
                    for ref in gen:
                        ray.get(ref)
                except RayActorError:
                    lane.suspect = True  # died while stopping: confirmed before the next job

    def _confirm_gone(self, lane: _Lane, old_pid: int | None) -> None:
        """Return once the process that ran the job cannot write to its folder any more: the restarted actor
        answers from a new process, or the old one is killed; one not back in time is replaced."""
        deadline = time.monotonic() + self.config.restart_wait_s
        killed = False
        while time.monotonic() < deadline:
            try:
                info = ray.get(lane.handle.ready.remote(str(self.store.root)), timeout=5.0)
            except ActorDiedError:
                break
            except (ActorUnavailableError, GetTimeoutError):
                time.sleep(0.2)
                continue
            if info["pid"] != old_pid:
                lane.info, lane.state = info, "idle"
                lane.suspect = True  # restarted, maybe on another node: its view of the data folder is checked again
                return
            if not killed:  # it answers from the old process (a network blip): end that process first
                ray.kill(lane.handle, no_restart=False)
                killed = True
        self._replace(lane)

    def _requeue(self, job_id: str) -> None:
        """The job back in the queue to resume from its checkpoint (cancelled instead when a cancel came);
        a temp file the dead process left half-written goes first."""
        folder = self.store.folder(job_id)
        for path in [*folder.glob(".*.tmp"), *folder.glob("checkpoints/.*.tmp")]:
            path.unlink(missing_ok=True)
        if job_id in self._cancel:
            self.jobs.fail(job_id, Failed("cancelled", "cancelled by the user"), before=("running",), state="cancelled")
        elif self.store.transition(job_id, ("running",), "queued", resume=1):
            self.notify()

    def _survive(self, lane: _Lane, job_id: str | None, exc: Exception) -> None:
        err = storage_error(exc)
        self.errors += 1
        self.last_error = {"code": err.code, "message": err.message, "job": job_id, "worker": lane.name,
                           "time": time.time()}
        log.error("%s: %s (job %s); the lane goes on", lane.name, err.message, job_id, exc_info=exc)
        if job_id is None:
            self._stop.wait(1.0)
            return
        try:
            self.jobs.fail(job_id, Failed(err.code, err.message), before=("running",))
        except Exception as again:  # the store cannot be written either: the job resumes on the next start
            log.error("%s: job %s stays running until the next start: %s", lane.name, job_id, again)
