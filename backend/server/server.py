"""``psd3d serve``: one ROUTER socket, the job store, admission and the executor.

One poll loop (the zguide's pattern) that does only cheap work per message (well under 100 ms):
requests are answered at once (every request gets a reply, a malformed one an error naming the
field); a submit's slow part (validation, an upload, tokenizers, the store's writes) runs in
:mod:`backend.server.admission`, whose replies the loop sends when they are ready; executor
events are fanned out to the subscribers of their job. Every handler has one contract: it yields
the messages it sends to the requesting peer, its reply first (a submit's reply comes from
admission). Sends never block the loop and never queue more than a budget of bytes to one peer
(:mod:`backend.server.sockets`); a dropped message is harmless for snapshots (they coalesce) and
for exactly-once events too, because a client that sees a gap in sequence numbers (or a silence)
resubscribes with the last one it saw and the store replays the rest. A job's terminal event
(``done`` or ``failed``) ends its subscriptions. The contract is docs/protocol.md.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import zmq

from protocol.cursor import SNAPSHOTS, TERMINAL
from protocol.errors import InvalidInputError, UnauthorizedError, UnknownNameError, UnsupportedEnvironmentError
from protocol.specs import METHODS, REWARDS, is_int
from protocol.messages import REQUESTS, SPECS, TEXTURE_ENCODINGS, limits, ok, png_variant, wants_png
from protocol.wire import PROTOCOL_VERSION, Message, ProtocolError, decode, encode
from backend.jobs.store import DataLock, JobStore, disk_free
from backend.server.admission import Admission, QueueLimits, Tokenizers, error_reply
from backend.server.executor import LocalExecutor
from backend.server.snapshots import LatestSnapshots
from backend.server.sockets import Received, Router, router_socket

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5557"
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
                 keys: str | Path | None = None, executor: "Callable[[JobStore, queue.Queue], object] | None" = None,
                 queue_limits: QueueLimits | None = None) -> None:
        """``executor`` builds the job runner from the store and the outbox it publishes (job id,
        Message) pairs on; default :class:`LocalExecutor` (one worker thread in this process).
        ``queue_limits``: queued jobs per client and in total (default :class:`QueueLimits`)."""
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
        self.guard = None
        self._users: dict[bytes, str | None] = {}  # peer -> the CURVE key it authenticated with (z85), when keys are set
        if keys:
            from backend.server.security import CurveGuard

            self.guard = CurveGuard(self.ctx, keys)
        self.socket = router_socket(self.ctx, bind, self.guard)
        self.router = Router(self.socket)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.outbox: queue.Queue = queue.Queue()
        self.executor = (executor or LocalExecutor)(self.store, self.outbox)
        self.subscribers: dict[str, set[bytes]] = {}
        self.latest = LatestSnapshots(self.store)
        # tokenizers load on a thread: the loop answers pings and hellos meanwhile
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="psd3d-tokenizer")
        self.tokenizers = Tokenizers(self.load_tokenizer, self._loader)
        self.admission = Admission(self.store, presets, self.tokenizers, self.executor.notify, self._admits, queue_limits)
        self._device: Future | None = None  # what jobs run on, learned off the loop (importing torch is slow)
        self.encodings: dict[bytes, str] = {}  # peer -> "raw" | "png" | "auto" for image snapshots
        self._png = ThreadPoolExecutor(1, thread_name_prefix="psd3d-png")
        self._png_cache: dict[int, tuple[Message, Future]] = {}  # id(event) -> (event, its PNG variant): once per event
        self._events: collections.deque = collections.deque()  # (peer, event, PNG future | None) waiting on an encoding
        self._stop = threading.Event()

    @property
    def dropped(self) -> int:
        """Messages not sent (a peer's byte budget or HWM, a vanished peer, an unencodable event)."""
        return self.router.dropped

    # -- sending ---------------------------------------------------------------------------
    def _send(self, peer: bytes, message: Message) -> bool:
        try:
            frames = encode(message)
        except (TypeError, ValueError, OverflowError) as exc:  # a bug: the loop must not die of it
            if message.type not in ("ok", "error"):
                self.router.dropped += 1
                return False
            frames = encode(error_reply(message.id, exc))  # the request still gets its answer
        try:
            return self.router.send(peer, frames)
        except zmq.ZMQError:  # the peer is gone (EHOSTUNREACH): forget it
            self._users.pop(peer, None)
            self._forget(peer)
            return False

    def _send_event(self, peer: bytes, message: Message) -> None:
        """Send an event in the encoding the peer asked for. PNG encoding is slow (0.7 s for a 1024²
        texture), so it runs on the PNG thread, once per event; events wait in one queue behind an
        encoding in progress, so every peer gets its events in the order they were made."""
        png = None
        if wants_png(self.encodings.get(peer, "auto"), message):
            cached = self._png_cache.get(id(message))
            if cached is None or cached[0] is not message:
                cached = self._png_cache[id(message)] = (message, self._png.submit(png_variant, message))
            png = cached[1]
        if png is None and not self._events:
            self._send(peer, message)
            return
        self._events.append((peer, message, png))
        self.send_events()

    def send_events(self) -> None:
        """Send the queued events up to the first whose PNG is still being encoded."""
        while self._events:
            peer, message, png = self._events[0]
            if png is not None and not png.done():
                return
            self._events.popleft()
            if png is not None:
                try:
                    message = png.result()
                except Exception:  # a bug in the encoder: the raw image still goes out
                    log.exception("PNG encoding of a %s event failed", message.body.get("kind"))
            self._send(peer, message)
        self._png_cache.clear()

    # -- requests ----------------------------------------------------------------------------
    def handle(self, peer: bytes, frames: list) -> None:
        """Answer one request: its handler yields what goes to the peer, the reply first; an error
        raised before the reply is the reply (a ProtocolError carries the request's id when it could
        be read)."""
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            self._send(peer, error_reply(exc.request_id, exc))
            return
        replied = False
        try:
            for message in self._dispatch(peer, msg, frames[0]):
                replied = True
                if message.type == "event":
                    self._send_event(peer, message)
                else:
                    self._send(peer, message)
        except Exception as exc:  # every request gets a reply; the loop keeps serving
            if replied:  # a bug after the reply went out: nothing more to tell this client
                log.exception("%s %s failed after its reply", msg.type, msg.id)
            else:
                self._send(peer, error_reply(msg.id, exc))

    def _dispatch(self, peer: bytes, msg: Message, first_frame) -> Iterator[Message]:
        if self.guard is not None:
            self._authorize(peer, first_frame)
        if msg.type not in REQUESTS:
            raise UnknownNameError(f"type: {msg.type!r} is not a request ({', '.join(REQUESTS)})", field="type")
        yield from getattr(self, f"on_{msg.type}")(peer, msg)

    def _refused(self, got: Received) -> None:
        """A message refused before its frames were kept: answered, without an id (none was read)."""
        self._send(got.peer, error_reply("", got.refused))

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

    def _admits(self, peer: bytes) -> bool:
        """Whether ``peer`` may still be served (always, without keys)."""
        return self.guard is None or self.guard.admits(self._users.get(peer))

    def _owner(self, peer: bytes) -> str:
        """Whom the queue limits count a peer's jobs against: its CURVE key, else its connection."""
        return self._users.get(peer) or peer.hex()

    def _forget(self, peer: bytes) -> None:
        for peers in self.subscribers.values():
            peers.discard(peer)
        self.encodings.pop(peer, None)
        self.router.forget(peer)

    def on_ping(self, peer, msg):
        # the jobs this peer is subscribed to: a client that finds one missing (a server restart, or a
        # connection the server dropped) resubscribes it
        held = [job for job, peers in self.subscribers.items() if peer in peers]
        yield ok(msg, {"time": time.time(), "subscribed": held, "worker": self.worker_health()})

    def on_hello(self, peer, msg):
        queue_limits = {"queued_per_client": self.admission.limits.per_client, "queued_total": self.admission.limits.total}
        yield ok(msg, {"protocol": PROTOCOL_VERSION, "server": "psd3d", "version": backend_version(),
                       "device": self._device_name(), "presets": list(self.presets),
                       "methods": list(METHODS), "rewards": list(REWARDS), "pipelines": list(SPECS),
                       "limits": {**limits(), **queue_limits, "prompt_tokens": self.tokenizers.token_limits()},
                       "worker": self.worker_health()})

    def worker_health(self) -> dict:
        """The worker (alive, errors survived, the last one) and the free-space threshold below which
        submits are refused (``disk_full``), with the data folder's free bytes now."""
        return {**self.executor.health(), "free_bytes": disk_free(self.store.root)}

    def on_submit(self, peer, msg):
        """Cheap checks now; the reply comes from admission when the jobs are created (or refused)."""
        self.admission.take(peer, self._owner(peer), msg)
        yield from ()

    def send_admitted(self) -> None:
        """Send the replies of the submits admission has finished."""
        for peer, reply in self.admission.replies():
            self._send(peer, reply)

    def tokenizer(self, preset: str) -> Future:
        """The preset's tokenizer, loading on the loader thread (see :class:`Tokenizers`)."""
        return self.tokenizers.get(preset)

    def _device_name(self) -> str:
        """The executor's workers' devices (Ray), or this process's own (loaded off the loop once)."""
        named = self.executor.device_name()
        if named is not None:
            return named
        if self._device is None:
            from backend.models import describe_device

            self._device = self._loader.submit(describe_device)
        if not self._device.done():
            return "starting"
        return "unknown" if self._device.exception() else self._device.result()

    @staticmethod
    def load_tokenizer(preset: str):
        """The prior's tokenizer alone (without the models); builds the tiny models on first use."""
        from backend.pipelines.presets import get_preset
        from backend.psd.prior import load_tokenizer
        from backend.psd.tiny import ensure_tiny_models

        models = get_preset(preset).models
        if models.build_tiny:
            ensure_tiny_models()
        return load_tokenizer(models.prior)

    def on_status(self, peer, msg):
        row = self.store.get(msg.body.get("job"))
        yield ok(msg, {**row.to_dict(), "worker": self.executor.worker_of(row.id)})

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
        yield ok(msg, {"jobs": [r.to_dict() for r in page], "next": following, "total": len(rows)})

    def on_cancel(self, peer, msg):
        row = self.store.get(msg.body.get("job"))
        if self.executor.cancel_queued(row.id):  # not started: cancelled now, with its terminal event
            yield ok(msg, {"job": row.id, "state": "cancelled"})
            return
        row = self.store.get(row.id)
        if row.state != "running":
            raise InvalidInputError(f"job: {row.id} is {row.state}; only a queued or running job can be cancelled", field="job")
        self.executor.cancel(row.id)  # stops within one optimisation step
        yield ok(msg, {"job": row.id, "state": "running"})

    def on_finish(self, peer, msg):
        row = self.store.get(msg.body.get("job"))
        if row.state == "queued":
            raise InvalidInputError(f"job: {row.id} has not started, so it has no result to keep; cancel it instead",
                                    field="job")
        if row.state != "running":
            raise InvalidInputError(f"job: {row.id} is {row.state}; only a running job can be finished", field="job")
        self.executor.finish(row.id)  # stops within one optimisation step and keeps what it has
        yield ok(msg, {"job": row.id, "state": "running"})

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
        yield reply
        yield from snapshots  # the latest snapshots first: "done" ends a client's watch
        for body in missed:  # then replay what the client missed
            yield Message("event", "", body)

    def on_result(self, peer, msg):
        """The job's files in one reply. A peer that has not read what is queued to it gets nothing
        (no file is read): its request times out and may be sent again once it reads (sockets.py)."""
        import numpy as np

        row = self.store.get(msg.body.get("job"))
        if row.state != "done":
            raise InvalidInputError(f"job: {row.id} is {row.state}, not done", field="job")
        if not self.router.can_send(peer):
            self.router.dropped += 1
            return
        folder = self.store.folder(row.id)
        files = {name: np.frombuffer((folder / name).read_bytes(), np.uint8) for name in RESULT_FILES if (folder / name).is_file()}
        yield ok(msg, {"job": row.id, "final": row.final, "files": list(files)}, files)

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

    def serve_forever(self, poll_ms: int = 50) -> None:
        self.executor.start()
        from backend.pipelines.presets import get_preset

        self._device_name()
        # warm the served presets' tokenizers (a tiny one, which builds models, last): a first submit rarely waits
        for preset in sorted(self.presets, key=lambda name: get_preset(name).models.build_tiny):
            self.tokenizer(preset)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        last_refresh = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.router.draining or dict(poller.poll(poll_ms)).get(self.socket):
                    self.receive()
                self.publish()
                self.send_events()
                self.send_admitted()
                if self.guard is not None and time.monotonic() - last_refresh > 1.0:
                    self.guard.refresh()
                    last_refresh = time.monotonic()
        finally:
            if self.guard is not None:
                self.guard.stop()
            self.admission.stop()
            self._png.shutdown(wait=True, cancel_futures=True)
            self.executor.stop()
            self._loader.shutdown(wait=True, cancel_futures=True)
            self.socket.close(0)
            self.store.close()
            self.data_lock.release()

    def receive(self, budget_s: float = 0.05) -> None:
        """Handle the messages ready now, for at most about ``budget_s`` (then the loop publishes and
        sends admission's replies before it reads on)."""
        until = time.monotonic() + budget_s
        while time.monotonic() < until:
            got = self.router.recv()
            if got is None:
                return
            if got.refused is not None:
                self._refused(got)
            else:
                self.handle(got.peer, got.frames)

    def stop(self) -> None:
        self._stop.set()
