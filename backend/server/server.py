"""``psd3d serve``: one ROUTER socket, the job store, and the LocalExecutor.

One poll loop (the zguide's pattern): requests are answered at once (every request gets a
reply, a malformed one an error naming the field); executor events are fanned out to the
subscribers of their job. Sends never block the loop: ROUTER_MANDATORY + NOBLOCK, and a
message to a full or vanished peer is dropped — harmless for snapshots (they coalesce) and
for exactly-once events too, because a client that sees a gap in sequence numbers
resubscribes with the last one it saw and the store replays the rest. A job's terminal event
(``done`` or ``failed``) ends its subscriptions. The contract is docs/protocol.md.
"""

from __future__ import annotations

import ipaddress
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import zmq

from protocol.cursor import SNAPSHOTS, TERMINAL
from protocol.errors import (InvalidInputError, Psd3dError, UnauthorizedError, UnknownNameError,
                             UnsupportedEnvironmentError)
from protocol.specs import METHODS, REWARDS, BatchSpec, is_int
from protocol.messages import (REQUESTS, SPECS, TEXTURE_ENCODINGS, UPLOADED_MESH_FIELD, check_mesh_arrays, error,
                               in_body, limits, ok, png_variant, spec_from_body, spec_path, validate_spec, wants_png)
from protocol.wire import MAX_ID_CHARS, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Message, ProtocolError, decode, encode
from backend.jobs.store import DataLock, JobStore, disk_free
from backend.server.executor import LocalExecutor
from backend.server.snapshots import LatestSnapshots

DEFAULT_BIND = "tcp://127.0.0.1:5557"
HEARTBEAT_MS = 2000
SEND_HWM = 1000  # messages queued per peer before sends to it are dropped
MIN_LIBZMQ = (4, 3, 2)  # CVE-2019-13132
MAX_SEQ = 2**63 - 1  # sequence numbers (and list offsets) are SQLite integers
LIST_LIMIT = 200  # jobs per ``list`` page (the default and the largest)
RESULT_FILES = ("out.glb", "preview.png", "image.png", "metrics.json", "reward_curve.png", "negative_embedding.pt")


def backend_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("psd3d")
    except PackageNotFoundError:  # run from a source tree without an install
        return "unknown"


def error_reply(request_id: str, exc: Exception) -> Message:
    """A raised error as the reply: ours as they are (code, field, message); anything else is a bug,
    answered as ``internal`` so the client is not left waiting."""
    if isinstance(exc, Psd3dError):
        return error(request_id, exc)
    return error(request_id, Psd3dError(f"internal error: {type(exc).__name__}: {exc}"))


@dataclass
class _Parked:
    """A valid submit waiting for its presets' tokenizers (loaded off the loop) before it is acknowledged."""

    peer: bytes
    msg: Message
    specs: list
    batch: bool
    tokenizers: dict[str, Future]  # preset -> its load, as it was when the submit came

    @property
    def ready(self) -> bool:
        return all(loading.done() for loading in self.tokenizers.values())


def check_bind(address: str, keys: Path | None) -> None:
    """Refuse a non-loopback bind without CURVE keys."""
    if address.startswith("ipc://") or address.startswith("inproc://") or keys is not None:
        return
    host = urlparse(address).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise InvalidInputError(f"bind: {address} is not loopback; remote use needs CURVE keys (--keys DIR, "
                                f"see `psd3d keys new`)", field="bind")


def check_libzmq() -> None:
    """Refuse a libzmq older than MIN_LIBZMQ (a psd3d error, which the CLI prints, not a traceback)."""
    if tuple(zmq.zmq_version_info()) < MIN_LIBZMQ:
        raise UnsupportedEnvironmentError(
            f"libzmq: {zmq.zmq_version()} is older than {'.'.join(map(str, MIN_LIBZMQ))} (CVE-2019-13132); "
            f"upgrade pyzmq (`pip install -U pyzmq`, whose wheels bundle a current libzmq)", field="libzmq")


class Server:
    def __init__(self, data_dir: str | Path, bind: str = DEFAULT_BIND, presets: tuple[str, ...] = (),
                 keys: str | Path | None = None, executor: "Callable[[JobStore, queue.Queue], object] | None" = None) -> None:
        """``executor`` builds the job runner from the store and the outbox it publishes (job id,
        Message) pairs on; default :class:`LocalExecutor` (one worker thread in this process)."""
        check_libzmq()
        check_bind(bind, Path(keys) if keys else None)
        self.data_lock = DataLock(data_dir)  # one server per data folder, for this server's life
        try:
            self.store = JobStore(data_dir)
        except BaseException:
            self.data_lock.release()
            raise
        self.store.clean_temp()
        self.store.recover()
        self.presets = presets
        self.ctx = zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.guard = None
        self._users: dict[bytes, str | None] = {}  # peer -> the CURVE key it authenticated with (z85), when keys are set
        if keys:
            from backend.server.security import CurveGuard

            self.guard = CurveGuard(self.ctx, keys)
            self.guard.apply(self.socket)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        # ZMTP heartbeats: libzmq pings idle peers and drops dead ones, so sends to them fail fast
        # (EHOSTUNREACH) and their subscriptions are forgotten
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.outbox: queue.Queue = queue.Queue()
        self.executor = (executor or LocalExecutor)(self.store, self.outbox)
        self.subscribers: dict[str, set[bytes]] = {}
        self.latest = LatestSnapshots(self.store)
        self.dropped = 0
        # preset -> its tokenizer, loaded on a thread: the loop answers pings and hellos meanwhile
        self._tokenizers: dict[str, Future] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="psd3d-tokenizer")
        self._parked: list[_Parked] = []
        self._device: Future | None = None  # what jobs run on, learned off the loop (importing torch is slow)
        self.encodings: dict[bytes, str] = {}  # peer -> "raw" | "png" | "auto" for image snapshots
        self._png_cache: dict[int, Message] = {}
        self._stop = threading.Event()

    # -- sending ---------------------------------------------------------------------------
    def _send(self, peer: bytes, message: Message) -> bool:
        try:
            frames = encode(message)
        except (TypeError, ValueError, OverflowError) as exc:  # a bug: the loop must not die of it
            if message.type not in ("ok", "error"):
                self.dropped += 1
                return False
            frames = encode(error_reply(message.id, exc))  # the request still gets its answer
        try:
            self.socket.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # the peer's queue is full: drop (see the module docstring)
            self.dropped += 1
            return False
        except zmq.ZMQError:  # the peer is gone (EHOSTUNREACH): forget its subscriptions
            self.dropped += 1
            self._users.pop(peer, None)
            for peers in self.subscribers.values():
                peers.discard(peer)
            return False

    def _send_event(self, peer: bytes, message: Message) -> bool:
        """Send an event in the encoding the peer asked for (PNG images are encoded once per event)."""
        if wants_png(self.encodings.get(peer, "auto"), message):
            key = id(message)
            if key not in self._png_cache:
                self._png_cache[key] = png_variant(message)
            message = self._png_cache[key]
        return self._send(peer, message)

    # -- requests ----------------------------------------------------------------------------
    def handle(self, peer: bytes, frames: list) -> None:
        request_id = ""
        try:
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                request_id = exc.request_id  # the reply carries the request's id whenever it could be read
                raise
            request_id = msg.id
            if self.guard is not None:
                self._authorize(peer, frames[0])
            if msg.type not in REQUESTS:
                raise UnknownNameError(f"type: {msg.type!r} is not a request ({', '.join(REQUESTS)})", field="type")
            reply = getattr(self, f"on_{msg.type}")(peer, msg)
        except Exception as exc:  # every request gets a reply; the loop keeps serving
            reply = error_reply(request_id, exc)
        if reply is not None:
            self._send(peer, reply)

    def _authorize(self, peer: bytes, frame) -> None:
        """Revocation: CurveZMQ authenticates a connection only at its handshake, so every request's
        authenticated key (the ZAP ``User-Id`` libzmq attaches to each message) is checked against the
        current allow-list; a removed client is refused from its next request on, and its
        subscriptions end."""
        try:
            user = frame.get("User-Id")
        except (AttributeError, zmq.ZMQError):  # no metadata: not a message from an authenticated connection
            user = None
        self._users[peer] = user
        if not self.guard.admits(user):
            self._forget(peer)
            raise UnauthorizedError("request: this connection's CURVE key is not (or no longer) on the server's "
                                    "allow-list (its clients/ folder); ask the server's operator to add it")

    def _forget(self, peer: bytes) -> None:
        for peers in self.subscribers.values():
            peers.discard(peer)
        self.encodings.pop(peer, None)

    def on_ping(self, peer, msg):
        # the jobs this peer is subscribed to: a client that finds one missing (a server restart, or a
        # connection the server dropped) resubscribes it
        held = [job for job, peers in self.subscribers.items() if peer in peers]
        return ok(msg, {"time": time.time(), "subscribed": held, "worker": self.worker_health()})

    def on_hello(self, peer, msg):
        tokens = {preset: loading.result().model_max_length for preset, loading in self._tokenizers.items()
                  if loading.done() and loading.exception() is None}
        return ok(msg, {"protocol": PROTOCOL_VERSION, "server": "psd3d", "version": backend_version(),
                        "device": self._device_name(), "presets": list(self.presets),
                        "methods": list(METHODS), "rewards": list(REWARDS), "pipelines": list(SPECS),
                        "limits": {**limits(), "prompt_tokens": tokens}, "worker": self.worker_health()})

    def worker_health(self) -> dict:
        """The worker (alive, errors survived, the last one) and the free-space threshold below which
        submits are refused (``disk_full``), with the data folder's free bytes now."""
        return {**self.executor.health(), "free_bytes": disk_free(self.store.root)}

    def on_submit(self, peer, msg):
        body = msg.body
        key = body.get("key")
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_ID_CHARS):
            raise InvalidInputError(f"key: must be a string of 1..{MAX_ID_CHARS} characters, got {key!r}", field="key")
        if key is not None and (made := self.store.submitted(key)) is not None:
            return ok(msg, {"jobs": made[0], "batch": made[1]})  # a resent submit: the jobs it made, once
        self.store.check_space()  # a (nearly) full disk: refused before anything is written
        prompts = body.get("prompts")
        spec_fields = body.get("spec", {})
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, str) or pipeline not in SPECS:
            raise UnknownNameError(f"pipeline: {pipeline!r} is not one of {', '.join(SPECS)}", field="pipeline")
        if msg.arrays:  # an uploaded mesh: the artist's selection (refine) or block-out (generate)
            spec_fields = self._store_upload(body.get("pipeline"), spec_fields, msg.arrays)
        if prompts is not None:  # batch: one job per prompt, one batch id
            BatchSpec(prompts=prompts, pipeline=body.get("pipeline")).validate()
            if not isinstance(spec_fields, dict):
                raise InvalidInputError("spec: must be a map of the pipeline's fields", field="spec")
            if "prompt" in spec_fields:
                raise InvalidInputError("spec.prompt: a batch takes its prompts from prompts, not from spec", field="spec.prompt")
            specs = [spec_from_body(body.get("pipeline"), {**spec_fields, "prompt": p}) for p in prompts]
        else:
            specs = [spec_from_body(body.get("pipeline"), spec_fields)]
        for i, spec in enumerate(specs):  # validate everything (every field's type first) before acknowledging anything
            validate_spec(spec, self.presets, i if prompts is not None else None)
            ne = getattr(spec, "negative_embedding", None)
            if ne and self.store.is_job_id(ne):  # a finished job's learned n, by id
                spec.negative_embedding = str(self.store.folder(ne) / "negative_embedding.pt")
            self._check_files(spec)
        parked = _Parked(peer, msg, specs, prompts is not None, {spec.preset: self.tokenizer(spec.preset) for spec in specs})
        if not parked.ready:
            self._parked.append(parked)  # acknowledged by ``resume_parked`` once they are loaded
            return None
        return self._accept(parked)

    def _accept(self, parked: _Parked) -> Message:
        """Check the prompts' token lengths and create the jobs (all or none)."""
        from backend.psd.prior import check_prompt_tokens

        for i, spec in enumerate(parked.specs):
            try:
                tokenizer = parked.tokenizers[spec.preset].result()  # a failed load raises its explanation
            except Psd3dError as exc:
                raise in_body(exc, "spec.preset") from None
            check_prompt_tokens(tokenizer, spec.prompt, spec_path("prompt", i if parked.batch else None))
            if spec.negative_prompt:
                check_prompt_tokens(tokenizer, spec.negative_prompt, "spec.negative_prompt")
        key = parked.msg.body.get("key")
        if key is not None and (made := self.store.submitted(key)) is not None:
            return ok(parked.msg, {"jobs": made[0], "batch": made[1]})  # the same submit, parked twice
        batch = uuid.uuid4().hex if parked.batch else None
        pipeline = parked.msg.body["pipeline"]
        ids = self.store.create_jobs(pipeline, [spec.to_dict() for spec in parked.specs], batch, key)
        self.executor.notify()
        return ok(parked.msg, {"jobs": ids, "batch": batch})

    def resume_parked(self) -> None:
        """Acknowledge (or refuse) the parked submits whose tokenizers are now loaded."""
        waiting = []
        for parked in self._parked:
            if not parked.ready:
                waiting.append(parked)
                continue
            try:
                if self.guard is not None and not self.guard.admits(self._users.get(parked.peer)):
                    raise UnauthorizedError("request: this connection's CURVE key was removed from the server's "
                                            "allow-list while its submit waited; nothing was created")
                reply = self._accept(parked)
            except Exception as exc:
                reply = error_reply(parked.msg.id, exc)
            self._send(parked.peer, reply)
        self._parked = waiting

    def _device_name(self) -> str:
        if self._device is None:
            from backend.models import describe_device

            self._device = self._loader.submit(describe_device)
        if not self._device.done():
            return "starting"
        return "unknown" if self._device.exception() else self._device.result()

    def tokenizer(self, preset: str) -> Future:
        """The preset's tokenizer, loading on the loader thread: once, or again after a failed load
        (the model files may have been fixed since)."""
        loading = self._tokenizers.get(preset)
        if loading is None or (loading.done() and loading.exception() is not None):
            loading = self._tokenizers[preset] = self._loader.submit(self.load_tokenizer, preset)
        return loading

    @staticmethod
    def load_tokenizer(preset: str):
        """The prior's tokenizer alone (without the models); builds the tiny models on first use."""
        from backend.presets import get_preset
        from backend.psd.prior import load_tokenizer
        from backend.psd.tiny import ensure_tiny_models

        models = get_preset(preset).models
        if models.build_tiny:
            ensure_tiny_models()
        return load_tokenizer(models.prior)

    def _store_upload(self, pipeline, spec_fields, arrays) -> dict:
        """Check an uploaded mesh, write it as a GLB under the data folder, and point the spec at it."""
        import torch

        from backend.geometry.mesh import Mesh, save_glb

        if pipeline not in UPLOADED_MESH_FIELD or not isinstance(spec_fields, dict):
            raise InvalidInputError("arrays: only refine and generate take an uploaded mesh", field="arrays")
        check_mesh_arrays(arrays)
        mesh = Mesh(torch.from_numpy(arrays["positions"].copy()), torch.from_numpy(arrays["faces"].astype(np.int64)),
                    torch.from_numpy(arrays["uvs"].copy()) if "uvs" in arrays else None,
                    arrays["texture"].copy() if "texture" in arrays else None)
        path = save_glb(mesh, self.store.root / "uploads" / f"{uuid.uuid4().hex}.glb")
        return {**spec_fields, UPLOADED_MESH_FIELD[pipeline]: str(path)}

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

    def on_status(self, peer, msg):
        row = self.store.get(msg.body.get("job"))
        return ok(msg, {**row.to_dict(), "worker": self.executor.worker_of(row.id)})

    def on_list(self, peer, msg):
        """A page of jobs, newest first: ``offset`` (default 0) and ``limit`` (1..LIST_LIMIT, default
        LIST_LIMIT); the reply's ``next`` is the offset of the next page, null after the last, and
        ``total`` counts every job that matched."""
        body = msg.body
        batch = body.get("batch")  # follow one batch together
        if batch is not None and not self.store.is_job_id(batch):
            raise InvalidInputError(f"batch: {batch!r} is not a batch id (32 hex characters)", field="batch")
        offset, limit = body.get("offset", 0), body.get("limit", LIST_LIMIT)
        if not is_int(offset) or not 0 <= offset <= MAX_SEQ:
            raise InvalidInputError(f"offset: must be a non-negative integer, got {offset!r}", field="offset")
        if not is_int(limit) or not 1 <= limit <= LIST_LIMIT:
            raise InvalidInputError(f"limit: must be an integer in 1..{LIST_LIMIT}, got {limit!r}", field="limit")
        rows = [r for r in self.store.list(limit=-1) if batch is None or r.batch == batch]  # -1: SQLite's no limit
        page = rows[offset:offset + limit]
        following = offset + len(page) if offset + len(page) < len(rows) else None
        return ok(msg, {"jobs": [r.to_dict() for r in page], "next": following, "total": len(rows)})

    def on_cancel(self, peer, msg):
        row = self.store.get(msg.body.get("job"))
        if self.executor.cancel_queued(row.id):  # not started: cancelled now, with its terminal event
            return ok(msg, {"job": row.id, "state": "cancelled"})
        row = self.store.get(row.id)
        if row.state != "running":
            raise InvalidInputError(f"job: {row.id} is {row.state}; only a queued or running job can be cancelled", field="job")
        self.executor.cancel(row.id)  # stops within one optimisation step
        return ok(msg, {"job": row.id, "state": "running"})

    def on_finish(self, peer, msg):
        row = self.store.get(msg.body.get("job"))
        if row.state == "queued":
            raise InvalidInputError(f"job: {row.id} has not started, so it has no result to keep; cancel it instead",
                                    field="job")
        if row.state != "running":
            raise InvalidInputError(f"job: {row.id} is {row.state}; only a running job can be finished", field="job")
        self.executor.finish(row.id)  # stops within one optimisation step and keeps what it has
        return ok(msg, {"job": row.id, "state": "running"})

    def on_subscribe(self, peer, msg):
        job = msg.body.get("job")
        after = msg.body.get("after", 0)
        if not is_int(after) or not 0 <= after <= MAX_SEQ:
            raise InvalidInputError(f"after: must be an integer in 0..{MAX_SEQ} (the last sequence number seen), "
                                    f"got {after!r}", field="after")
        encoding = msg.body.get("texture_encoding", "auto")
        if encoding not in TEXTURE_ENCODINGS:
            raise UnknownNameError(f"texture_encoding: {encoding!r} is not one of {', '.join(TEXTURE_ENCODINGS)}",
                                   field="texture_encoding")
        row = self.store.get(job)
        # read everything before the reply goes out: a failure here is the one (error) reply, never a second
        last = self.store.last_event(row.id)
        reply = ok(msg, {"job": row.id, "state": row.state, "last": self.store.last_seq(row.id)})
        snapshots = list(self.latest.of(row))
        missed = self.store.events_after(row.id, after)
        self.encodings[peer] = encoding
        ended = last is not None and last["kind"] in TERMINAL
        if not ended:  # a job that has ended sends nothing more: no subscription to keep
            self.subscribers.setdefault(row.id, set()).add(peer)
        self._send(peer, reply)
        for snap in snapshots:  # the latest snapshots first: "done" ends a client's watch
            self._send_event(peer, snap)
        for body in missed:  # then replay what the client missed
            self._send(peer, Message("event", "", body))
        return None

    def on_result(self, peer, msg):
        import numpy as np

        row = self.store.get(msg.body.get("job"))
        if row.state != "done":
            raise InvalidInputError(f"job: {row.id} is {row.state}, not done", field="job")
        folder = self.store.folder(row.id)
        files = {name: np.frombuffer((folder / name).read_bytes(), np.uint8) for name in RESULT_FILES if (folder / name).is_file()}
        return ok(msg, {"job": row.id, "final": row.final, "files": list(files)}, files)

    # -- the loop ----------------------------------------------------------------------------
    def publish(self) -> None:
        while True:
            try:
                job, message = self.outbox.get_nowait()
            except queue.Empty:
                return
            kind = message.body.get("kind")
            if kind in SNAPSHOTS:
                self.latest.keep(job, message)
            for peer in list(self.subscribers.get(job, ())):
                if self.guard is not None and not self.guard.admits(self._users.get(peer)):
                    self._forget(peer)  # revoked since it subscribed: nothing more goes to it
                    continue
                self._send_event(peer, message)
            if kind in TERMINAL:  # the job has ended: its subscriptions are done
                self.subscribers.pop(job, None)
            self._png_cache.clear()

    def serve_forever(self, poll_ms: int = 50) -> None:
        self.executor.start()
        from backend.presets import get_preset

        self._device_name()
        # warm the served presets' tokenizers (a tiny one, which builds models, last): a first submit rarely waits
        for preset in sorted(self.presets, key=lambda name: get_preset(name).models.build_tiny):
            self.tokenizer(preset)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        last_refresh = time.monotonic()
        try:
            while not self._stop.is_set():
                if dict(poller.poll(poll_ms)).get(self.socket):
                    while True:
                        try:
                            peer, *frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(peer.bytes, frames)
                self.publish()
                if self._parked:
                    self.resume_parked()
                if self.guard is not None and time.monotonic() - last_refresh > 1.0:
                    self.guard.refresh()
                    last_refresh = time.monotonic()
        finally:
            if self.guard is not None:
                self.guard.stop()
            self.executor.stop()
            self._loader.shutdown(wait=True, cancel_futures=True)
            self.socket.close(0)
            self.store.close()
            self.data_lock.release()

    def stop(self) -> None:
        self._stop.set()
