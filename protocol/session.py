"""A non-blocking client for programs with their own event loop (the Blender add-on's timer).

``Client`` blocks until a reply comes; a GUI cannot. ``Session`` sends a request and returns at
once; its reply, and the events of the jobs it follows, are handled by ``poll``, which never
waits longer than it is told. What it guarantees, as ``Client.watch`` does for one job:

- ``progress``/``done``/``failed`` of each followed job are delivered once and in order (a
  duplicate from a replay is dropped; a gap triggers a resubscribe from the last seq seen);
- snapshots coalesce: one ``poll`` returns at most the latest mesh and texture of a job;
- liveness: a ``ping`` every ``heartbeat`` seconds; its reply lists the jobs the server has this
  peer subscribed to, so a server restart or a dropped connection (the server forgets a peer it
  cannot reach) is repaired by resubscribing the missing ones. A request without a reply in its
  time fails alone: the socket stays and ZeroMQ reconnects it;
- nothing is delivered after its caller was told it failed: requests go out only on a live
  connection (``ZMQ_IMMEDIATE``); until one is up they wait in the session's own outbox, and a
  request whose time is up leaves it unsent. A submit carries a ``key`` (made here when the body
  has none): one that reached a busy server and timed out may still be accepted, and resending
  it with the same key (``ConnectionLost.key``) answers with its jobs instead of making new ones.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from protocol.client import ConnectionLost, ServerError, dealer_socket, new_submit_key
from protocol.cursor import EventCursor, Verdict
from protocol.events import Failed, MeshSnapshot
from protocol.messages import message_to_event
from protocol.wire import Message, ProtocolError, decode, encode

OnReply = Callable[[Message], None]
OnError = Callable[[Exception], None]


@dataclass
class _Pending:
    kind: str
    sent: float
    timeout: float
    on_reply: OnReply | None
    on_error: OnError | None
    key: str | None = None  # a submit's idempotency key
    frames: list | None = None  # not sent yet (no live connection): dropped when its time is up


@dataclass
class Followed(EventCursor):
    """What the session knows of one followed job: its place in the event stream (``last``,
    ``finished``: see :class:`protocol.cursor.EventCursor`) and whether the server holds its subscription."""

    job: str = ""
    subscribed: bool = False  # a subscribe reply arrived (cleared when the server turns out to have lost it)


@dataclass
class JobEvent:
    job: str
    seq: int
    event: Any  # a protocol.events dataclass


@dataclass
class SessionState:
    connected: bool = False  # the last ping (or any reply) came back
    last_reply: float = 0.0


class Session:
    def __init__(self, address: str = "tcp://127.0.0.1:5557", curve: tuple[str, str] | None = None,
                 heartbeat: float = 2.0, timeout: float = 10.0, texture_encoding: str = "auto") -> None:
        """``curve``: (this client's ``.key_secret`` file, the server's public ``.key`` file)."""
        self.address, self.curve = address, curve
        self.heartbeat, self.timeout, self.texture_encoding = heartbeat, timeout, texture_encoding
        self.ctx = zmq.Context.instance()
        self.state = SessionState()
        self.jobs: dict[str, Followed] = {}
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._last_ping = 0.0
        self._orphans: list[JobEvent] = []  # failures made up for jobs the server does not know
        # one socket for the session's life: ZeroMQ reconnects it and the ping repairs subscriptions
        self.socket: zmq.Socket | None = dealer_socket(self.ctx, address, curve)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        for pending in self._pending.values():
            if pending.on_error is not None:
                pending.on_error(ConnectionLost(f"{pending.kind}: the session was closed"))
        self._pending.clear()

    @property
    def closed(self) -> bool:
        return self.socket is None

    @property
    def busy(self) -> bool:
        """Jobs still followed, or replies still awaited (other than a heartbeat)."""
        return any(not f.finished for f in self.jobs.values()) or any(p.kind != "ping" for p in self._pending.values())

    # -- requests --------------------------------------------------------------------------------
    def request(self, kind: str, body: dict | None = None, arrays: dict | None = None,
                on_reply: OnReply | None = None, on_error: OnError | None = None,
                timeout: float | None = None) -> str:
        """Send a request now; ``on_reply(message)`` or ``on_error(exception)`` runs inside a later ``poll``."""
        if self.socket is None:
            raise ConnectionLost(f"{kind}: the session is closed", sent=False)
        rid = f"s{next(self._ids)}"
        body = dict(body or {})
        if kind == "submit":
            body.setdefault("key", new_submit_key())
        pending = self._pending[rid] = _Pending(kind, time.monotonic(), self.timeout if timeout is None else timeout,
                                                on_reply, on_error, body.get("key") if kind == "submit" else None,
                                                encode(Message(kind, rid, body, arrays or {})))
        self._flush()
        if pending.frames is not None:  # it waits: copy the arrays, the caller may reuse them
            pending.frames = [bytes(frame) for frame in pending.frames]
        return rid

    def _flush(self) -> None:
        """Send what waits in the outbox, oldest first, while the connection takes it."""
        for pending in self._pending.values():
            if pending.frames is None:
                continue
            try:
                self.socket.send_multipart(pending.frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:  # no live connection: it waits here, not in ZeroMQ's queue
                return
            pending.frames = None

    def follow(self, job: str, after: int = 0) -> None:
        """Follow a job's events from after ``after`` (the last seq this client already applied)."""
        if job not in self.jobs:
            self.jobs[job] = Followed(job=job, last=after)
        self._subscribe(self.jobs[job])

    def unfollow(self, job: str) -> None:
        self.jobs.pop(job, None)

    def _subscribe(self, followed: Followed) -> None:
        def ok(msg: Message) -> None:
            followed.subscribed = True
            followed.caught_up(msg.body.get("state", ""), msg.body.get("last", followed.last + 1))

        def failed(exc: Exception) -> None:
            if isinstance(exc, ServerError) and exc.code == "unknown_job":  # the server has no such job
                followed.finished = True
                self._orphans.append(JobEvent(followed.job, followed.last + 1,
                                              Failed("unknown_job", exc.message, "job")))

        self.request("subscribe", {"job": followed.job, "after": followed.last, "texture_encoding": self.texture_encoding},
                     on_reply=ok, on_error=failed)

    # -- the pump --------------------------------------------------------------------------------
    def poll(self, budget: float = 0.005) -> list[JobEvent]:
        """Handle what has arrived (replies run their callbacks) and return the followed jobs' new
        events in order, snapshots coalesced. Waits at most ``budget`` seconds for the first message."""
        self._orphans = []
        out: list[JobEvent] = []
        latest: dict[tuple[str, str], int] = {}  # (job, snapshot kind) -> index in out
        wait_ms = int(budget * 1000)
        now = time.monotonic()
        self._check_timeouts(now)
        self._heartbeat(now)
        if self.socket is not None:
            self._flush()
        while self.socket is not None and self.socket.poll(wait_ms):
            wait_ms = 0
            try:
                msg = decode(self.socket.recv_multipart(copy=False))
            except ProtocolError:
                continue  # a malformed message from the server: nothing to attribute it to
            self.state.connected, self.state.last_reply = True, time.monotonic()
            if msg.type == "event":
                self._on_event(msg, out, latest)
            elif msg.id in self._pending:
                pending = self._pending.pop(msg.id)
                try:
                    if msg.type == "error":
                        if pending.on_error is not None:
                            b = msg.body
                            pending.on_error(ServerError(b.get("code", "internal"), b.get("message", ""), b.get("field")))
                    elif pending.on_reply is not None:
                        pending.on_reply(msg)
                except Exception as exc:  # a callback's bug must not stop the pump
                    if pending.on_error is not None:
                        pending.on_error(exc)
        out.extend(self._orphans)
        return [e for e in out if e is not None]

    def _on_event(self, msg: Message, out: list, latest: dict) -> None:
        try:
            job, seq, event = message_to_event(msg)
        except (ProtocolError, KeyError, TypeError):
            return
        followed = self.jobs.get(job)
        if followed is None:
            return
        kind = msg.body["kind"]
        verdict = followed.accept(kind, seq)
        if verdict is Verdict.GAP:  # ask for the rest
            self._subscribe(followed)
        if verdict is Verdict.DELIVER:
            out.append(JobEvent(job, seq, event))
        if verdict is not Verdict.SNAPSHOT:
            return
        key = (job, kind)
        if key in latest:  # coalesce: keep only the newest snapshot of this kind, at its newest place
            out[latest[key]] = None
        if isinstance(event, MeshSnapshot):
            latest.pop((job, "texture"), None)  # a texture after a new mesh must come after it
        latest[key] = len(out)
        out.append(JobEvent(job, seq, event))

    def _check_timeouts(self, now: float) -> None:
        """Fail the requests whose time is up; one still in the outbox is dropped unsent. The socket
        stays: ZeroMQ reconnects by itself, and the next ping reply says which subscriptions the server lost."""
        expired = [rid for rid, p in self._pending.items() if now - p.sent > p.timeout]
        for rid in expired:
            pending = self._pending.pop(rid)
            if pending.kind == "ping":
                self.state.connected = False
            if pending.on_error is None:
                continue
            if pending.frames is not None:
                exc = ConnectionLost(f"{pending.kind} not sent: no connection to {self.address} within {pending.timeout:g} s",
                                     sent=False, key=pending.key)
            else:
                exc = ConnectionLost(f"no reply to {pending.kind} from {self.address} within {pending.timeout:g} s"
                                     + (f"; it may still be accepted: resend it with key {pending.key!r} to find out"
                                        if pending.key else ""), key=pending.key)
            pending.on_error(exc)

    def _heartbeat(self, now: float) -> None:
        if now - self._last_ping < self.heartbeat or any(p.kind == "ping" for p in self._pending.values()):
            return
        self._last_ping = now

        def check(msg: Message) -> None:
            held = set(msg.body.get("subscribed", ()))
            for followed in self.jobs.values():
                if not followed.finished and followed.subscribed and followed.job not in held:
                    followed.subscribed = False  # the server restarted or forgot this peer
                    self._subscribe(followed)

        self.request("ping", {}, on_reply=check, timeout=max(self.heartbeat * 2, 3.0))
