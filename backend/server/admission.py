"""Admission: a submit, from its message to its acknowledged jobs or its one error reply.

The serve loop calls :meth:`Admission.take` with the cheap checks only (the key's form, the
pipeline's name, the batch's shape); everything slow runs on the admission thread, one submit at a
time, in this order:

1. a resent submit (a known ``key``) is answered with the jobs it made, whatever else it carries;
2. the disk's free space, then the queue limits (per client and in total: ``queue_full``);
3. an uploaded mesh is checked and written as a GLB under the data folder (path policy: every
   file a spec names must lie inside the data folder);
4. every spec is built and validated, then its prompts are measured by the preset's tokenizer
   (waiting for its load, which runs on the loader thread);
5. a client whose CURVE key was revoked meanwhile is refused; otherwise the jobs are created, all
   or none, with the key, and the executor is told.

One thread makes the order a total one: a submit sees every earlier submit's jobs (the limits) and
key (exactly once). Replies go back to the loop through :meth:`replies`, which sends them.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from protocol.errors import InvalidInputError, Psd3dError, QueueFullError, UnauthorizedError
from protocol.messages import (UPLOADED_MESH_FIELD, check_mesh_arrays, check_pipeline, error, in_body, ok,
                               spec_from_body, spec_path, validate_spec)
from protocol.specs import BatchSpec
from protocol.wire import MAX_ID_CHARS, Message
from backend.jobs.store import JobStore, storage_error


@dataclass(frozen=True)
class QueueLimits:
    """Queued jobs the server holds: per client (its CURVE key; without keys, its connection) and in
    total. A submit that would pass either is refused whole with ``queue_full``."""

    per_client: int = 1000  # one full batch (specs.MAX_BATCH)
    total: int = 10_000

    def __post_init__(self) -> None:
        if not (isinstance(self.per_client, int) and isinstance(self.total, int) and 1 <= self.per_client <= self.total):
            raise InvalidInputError(f"queue limits: need 1 <= per client ({self.per_client}) <= total ({self.total})",
                                    field="queue")


def error_reply(request_id: str, exc: Exception) -> Message:
    """A raised error as the reply: ours as they are (code, field, message); anything else is a bug,
    answered as ``internal`` so the client is not left waiting."""
    if isinstance(exc, Psd3dError):
        return error(request_id, exc)
    return error(request_id, Psd3dError(f"internal error: {type(exc).__name__}: {exc}"))


def exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """The writer process's initializer: a daemon thread ends the process once ``parent`` is gone
    (its parent pid changes). A pool worker otherwise outlives a server killed with SIGKILL, holding
    its ~0.5 GiB of imports until the machine restarts."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def write_upload(parts: dict[str, tuple[str, str, tuple]], path: str) -> None:
    """An uploaded mesh (checked by ``check_mesh_arrays``), handed over as raw files (name -> file,
    dtype, shape), written as a GLB at ``path`` in the writer process; the raw files are removed."""
    import torch

    from backend.geometry.mesh import Mesh, save_glb

    try:
        arrays = {name: np.fromfile(file, dtype).reshape(shape) for name, (file, dtype, shape) in parts.items()}
        save_glb(Mesh(torch.from_numpy(arrays["positions"]), torch.from_numpy(arrays["faces"].astype(np.int64)),
                      torch.from_numpy(arrays["uvs"]) if "uvs" in arrays else None, arrays.get("texture")), path)
    finally:
        for file, _, _ in parts.values():
            Path(file).unlink(missing_ok=True)


def check_body(msg: Message) -> None:
    """The submit's shape, cheap to check: its pipeline's name, a batch's prompts, arrays only with a mesh pipeline."""
    pipeline = check_pipeline(msg.body.get("pipeline"))
    if msg.body.get("prompts") is not None:
        BatchSpec(prompts=msg.body["prompts"], pipeline=pipeline).validate()
    if msg.arrays and pipeline not in UPLOADED_MESH_FIELD:
        raise InvalidInputError("arrays: only refine and generate take an uploaded mesh", field="arrays")


class Tokenizers:
    """Each preset's tokenizer, loaded once on the loader thread (again after a failed load: the model
    files may have been fixed since). Used by the loop (``hello``) and the admission thread."""

    def __init__(self, load: Callable[[str], object], pool: ThreadPoolExecutor) -> None:
        self._load, self._pool = load, pool
        self._loads: dict[str, Future] = {}
        self._lock = threading.Lock()

    def get(self, preset: str) -> Future:
        with self._lock:
            loading = self._loads.get(preset)
            if loading is None or (loading.done() and loading.exception() is not None):
                loading = self._loads[preset] = self._pool.submit(self._load, preset)
            return loading

    def token_limits(self) -> dict[str, int]:
        """preset -> its tokenizer's length, for the presets loaded so far."""
        with self._lock:
            loads = dict(self._loads)
        return {preset: loading.result().model_max_length for preset, loading in loads.items()
                if loading.done() and loading.exception() is None}


@dataclass
class _Submit:
    peer: bytes
    owner: str  # whom the queue limit counts it against
    msg: Message
    batch: bool = field(init=False)

    def __post_init__(self) -> None:
        self.batch = self.msg.body.get("prompts") is not None


class Admission:
    def __init__(self, store: JobStore, presets: tuple[str, ...], tokenizers: Tokenizers, notify: Callable[[], None],
                 admits: Callable[[bytes], bool], limits: QueueLimits | None = None) -> None:
        """``notify`` tells the executor that jobs were queued; ``admits(peer)`` is False for a peer
        whose CURVE key was revoked (always True without keys)."""
        self.store, self.presets, self.tokenizers = store, presets, tokenizers
        self.notify, self.admits = notify, admits
        self.limits = limits or QueueLimits()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="psd3d-admission")
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._queued_by: dict[str, list[str]] = {}  # owner -> its jobs that may still be queued (admission thread only)
        self._uploads: ProcessPoolExecutor | None = None  # writes uploaded meshes (started on the first upload)

    # -- on the loop -------------------------------------------------------------------------------------
    def take(self, peer: bytes, owner: str, msg: Message) -> None:
        """Check what is cheap now (raising the error to answer at once); the rest on the admission thread."""
        body = msg.body
        key = body.get("key")
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_ID_CHARS):
            raise InvalidInputError(f"key: must be a string of 1..{MAX_ID_CHARS} characters, got {key!r}", field="key")
        if key is None:  # a keyed submit may be a resend, answered by its key alone (on the admission thread)
            check_body(msg)
        self._thread.submit(self._run, _Submit(peer, owner, msg))

    def replies(self) -> list[tuple[bytes, Message]]:
        """The (peer, reply) of every submit admitted or refused since the last call."""
        out = []
        while True:
            try:
                out.append(self._replies.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        if self._uploads is not None:
            self._uploads.shutdown(wait=True, cancel_futures=True)

    # -- on the admission thread -------------------------------------------------------------------------
    def _run(self, sub: _Submit) -> None:
        try:
            reply = self._admit(sub)
        except Exception as exc:  # every submit gets a reply
            reply = error_reply(sub.msg.id, exc)
        self._replies.put((sub.peer, reply))

    def _admit(self, sub: _Submit) -> Message:
        body = sub.msg.body
        key = body.get("key")
        if key is not None and (made := self.store.submitted(key)) is not None:
            return ok(sub.msg, {"jobs": made[0], "batch": made[1]})  # a resent submit: the jobs it made, once
        check_body(sub.msg)
        pipeline, prompts = body["pipeline"], body.get("prompts")
        self.store.check_space()  # a (nearly) full disk: refused before anything is written
        count = len(prompts) if prompts is not None else 1
        self._check_queue(sub.owner, count)
        spec_fields = body.get("spec", {})
        if sub.msg.arrays:  # an uploaded mesh: the artist's selection (refine) or block-out (generate)
            spec_fields = self._store_upload(pipeline, spec_fields, sub.msg.arrays)
        specs = self._specs(pipeline, spec_fields, prompts)
        self._check_tokens(specs, sub.batch)
        if not self.admits(sub.peer):
            raise UnauthorizedError("request: this connection's CURVE key was removed from the server's "
                                    "allow-list while its submit waited; nothing was created")
        batch = uuid.uuid4().hex if sub.batch else None
        ids = self.store.create_jobs(pipeline, [spec.to_dict() for spec in specs], batch, key)
        self._queued_by.setdefault(sub.owner, []).extend(ids)
        self.notify()
        return ok(sub.msg, {"jobs": ids, "batch": batch})

    def _check_queue(self, owner: str, count: int) -> None:
        mine = self._queued_by[owner] = self.store.queued(self._queued_by.get(owner, []))
        if len(mine) + count > self.limits.per_client:
            raise QueueFullError(f"queue: this client has {len(mine)} queued jobs and this submit adds {count}; at most "
                                 f"{self.limits.per_client} per client (hello.limits.queued_per_client): submit again "
                                 f"once some have started")
        total = len(self.store.queued())
        if total + count > self.limits.total:
            raise QueueFullError(f"queue: the server has {total} queued jobs and this submit adds {count}; at most "
                                 f"{self.limits.total} (hello.limits.queued_total): submit again once some have started")

    def _specs(self, pipeline: str, spec_fields, prompts: list | None) -> list:
        """The submit's specs, each validated (every field's type first), the files they name inside the data folder."""
        if prompts is not None:  # batch: one job per prompt, one batch id
            if not isinstance(spec_fields, dict):
                raise InvalidInputError("spec: must be a map of the pipeline's fields", field="spec")
            if "prompt" in spec_fields:
                raise InvalidInputError("spec.prompt: a batch takes its prompts from prompts, not from spec", field="spec.prompt")
            specs = [spec_from_body(pipeline, {**spec_fields, "prompt": p}) for p in prompts]
        else:
            specs = [spec_from_body(pipeline, spec_fields)]
        for i, spec in enumerate(specs):
            validate_spec(spec, self.presets, i if prompts is not None else None)
            ne = getattr(spec, "negative_embedding", None)
            if ne and self.store.is_job_id(ne):  # a finished job's learned n, by id
                spec.negative_embedding = str(self.store.folder(ne) / "negative_embedding.pt")
            self._check_files(spec)
        return specs

    def _check_tokens(self, specs: list, batch: bool) -> None:
        """Each prompt within its preset's tokenizer (waiting for the load; a failed load explains itself)."""
        from backend.psd.prior import check_prompt_tokens

        loads = {spec.preset: self.tokenizers.get(spec.preset) for spec in specs}
        for i, spec in enumerate(specs):
            try:
                tokenizer = loads[spec.preset].result()
            except Psd3dError as exc:
                raise in_body(exc, "spec.preset") from None
            check_prompt_tokens(tokenizer, spec.prompt, spec_path("prompt", i if batch else None))
            if spec.negative_prompt:
                check_prompt_tokens(tokenizer, spec.negative_prompt, "spec.negative_prompt")

    def _store_upload(self, pipeline: str, spec_fields, arrays: dict) -> dict:
        """Check an uploaded mesh, write it as a GLB under the data folder (in the writer process:
        the conversion holds the GIL for seconds on a large mesh, which would stall the loop), and
        point the spec at it."""
        if not isinstance(spec_fields, dict):
            raise InvalidInputError("spec: must be a map of the pipeline's fields", field="spec")
        check_mesh_arrays(arrays)
        name = uuid.uuid4().hex
        path = self.store.root / "uploads" / f"{name}.glb"
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = {}  # handed over as raw files: pickling them to the writer would hold the GIL (0.3 s for 2M faces)
        try:
            for key, array in arrays.items():
                part = path.parent / f".{name}.{key}.tmp"  # a crash leaves a temp file, cleaned at start
                parts[key] = (str(part), array.dtype.str, array.shape)
                array.tofile(part)
        except BaseException as exc:
            for file, _, _ in parts.values():
                Path(file).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise storage_error(exc) from exc  # disk_full or storage_error, named
            raise
        self._writer().submit(write_upload, parts, str(path)).result()
        return {**spec_fields, UPLOADED_MESH_FIELD[pipeline]: str(path)}

    def _writer(self) -> ProcessPoolExecutor:
        if self._uploads is None:  # spawned (never forked: this process has threads and sockets)
            self._uploads = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=exit_with_parent, initargs=(os.getpid(),))
        return self._uploads

    def _check_files(self, spec) -> None:
        """Files a spec names must be inside the data folder (an upload, a finished job's n)."""
        for name in (*UPLOADED_MESH_FIELD.values(), "negative_embedding"):
            value = getattr(spec, name, None)
            if value:
                path = Path(value).resolve()
                if not path.is_relative_to(self.store.root.resolve()) or not path.is_file():
                    raise InvalidInputError(f"spec.{name}: {value} is not a file in the server's data folder; upload "
                                            f"the mesh with the submit, or name a finished job for a negative embedding",
                                            field=f"spec.{name}")
