"""The client the CLI and the Blender add-on use (DEALER; no torch).

Request-reply with a timeout; events that arrive while waiting for a reply are buffered.
A request is sent only on a connection that is up (``ZMQ_IMMEDIATE``), and a request that
times out is dropped with its socket (``LINGER`` 0), so nothing a caller was told failed is
delivered later to a server that comes up afterwards. A submit carries a client-made ``key``:
a submit that timed out after it reached a busy server may still be accepted, and sending it
again with the same key answers which jobs it made (the server creates them once).
``watch`` follows one job: it delivers each exactly-once event once and in order (dropping
duplicates by sequence number) and, after a silence longer than ``heartbeat`` or a gap in
the sequence, reconnects with back-off and resubscribes from the last sequence it saw
(the zguide's Lazy Pirate / Paranoid Pirate patterns).
"""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from typing import Iterator

import zmq
import zmq.auth

from protocol.errors import Psd3dError
from protocol.cursor import EventCursor, Verdict
from protocol.messages import message_to_event
from protocol.wire import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, MAX_MESSAGE_BYTES, Message, decode, encode


class ServerError(Psd3dError):
    """An error reply from the server; ``code`` and ``field`` are the server's."""

    def __init__(self, code: str, message: str, field: str | None) -> None:
        super().__init__(message, field=field)
        self.code = code


class ConnectionLost(Psd3dError):
    """No reply in time. ``sent`` is False when the request never left this client (no connection);
    ``key`` is a submit's idempotency key (resend the submit with it to learn whether it was accepted)."""

    code = "connection_lost"

    def __init__(self, message: str, *, sent: bool = True, key: str | None = None) -> None:
        super().__init__(message)
        self.sent, self.key = sent, key


def new_submit_key() -> str:
    """A fresh idempotency key for a submit (the server creates a key's jobs once)."""
    return uuid.uuid4().hex


def dealer_socket(ctx: zmq.Context, address: str, curve: tuple[str, str] | None) -> zmq.Socket:
    """A connected DEALER with our limits, ZMTP heartbeats and, when ``curve`` names
    (this client's ``.key_secret``, the server's public ``.key``), CURVE encryption."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)  # closing drops what was not sent
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: nothing waits for a later server
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)  # ZMTP pings: a dead server is noticed by libzmq too
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    if curve is not None:
        public, secret = zmq.auth.load_certificate(curve[0])
        server_key, _ = zmq.auth.load_certificate(curve[1])
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_key
    sock.connect(address)
    return sock


class Client:
    def __init__(self, address: str = "tcp://127.0.0.1:5557", timeout: float = 10.0,
                 curve: tuple[str, str] | None = None) -> None:
        """``curve``: (this client's ``.key_secret`` file, the server's public ``.key`` file)."""
        self.address, self.timeout, self.curve = address, timeout, curve
        self.ctx = zmq.Context.instance()
        self._ids = itertools.count(1)
        self._events: collections.deque = collections.deque()
        self.socket = None
        self._connect()

    def _connect(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
        self.socket = dealer_socket(self.ctx, self.address, self.curve)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- request / reply -------------------------------------------------------------------------
    def request(self, kind: str, body: dict | None = None, timeout: float | None = None,
                arrays: dict | None = None) -> Message:
        """Send one request and return its "ok" reply; raise ServerError on an error reply."""
        rid = str(next(self._ids))
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        key = (body or {}).get("key") if kind == "submit" else None
        frames = encode(Message(kind, rid, body or {}, arrays or {}))
        try:  # only on a live connection, so an unsent request cannot go out later
            if not self.socket.poll(int(wait * 1000), zmq.POLLOUT):
                raise zmq.Again()
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._connect()
            raise ConnectionLost(f"{kind} not sent: no connection to {self.address} within {wait:g} s",
                                 sent=False, key=key) from None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000)):
                self._connect()  # Lazy Pirate: a fresh socket, the old reply (if any) is abandoned
                raise ConnectionLost(f"no reply to {kind} from {self.address} within {wait:g} s"
                                     + (f"; it may still be accepted: resend it with key {key!r} to find out" if key else ""),
                                     key=key)
            msg = decode(self.socket.recv_multipart(copy=False))
            if msg.type == "event":
                self._events.append(msg)
            elif msg.id == rid:
                if msg.type == "error":
                    raise ServerError(msg.body.get("code", "internal"), msg.body.get("message", ""), msg.body.get("field"))
                return msg

    def hello(self) -> dict:
        return self.request("hello").body

    def submit(self, pipeline: str, spec: dict, prompts: list[str] | None = None, mesh: dict | None = None,
               key: str | None = None) -> list[str]:
        """Queue a job (or a batch, one job per prompt). ``mesh``: arrays of a mesh to upload —
        positions (V,3) float32, faces (F,3) int32, optional uvs (F,3,2) float32 and texture
        (H,W,4) uint8 — for refine (the mesh to texture) or generate (the block-out). ``key``: the
        idempotency key (a fresh one when None; pass a timed-out submit's ``ConnectionLost.key`` to
        learn its jobs without making new ones)."""
        body = {"pipeline": pipeline, "spec": spec, "key": key or new_submit_key()}
        if prompts is not None:
            body["prompts"] = prompts
        return self.request("submit", body, arrays=mesh, timeout=max(self.timeout, 60) if mesh else None).body["jobs"]

    def status(self, job: str) -> dict:
        return self.request("status", {"job": job}).body

    def cancel(self, job: str) -> None:
        self.request("cancel", {"job": job})

    def finish(self, job: str) -> None:
        self.request("finish", {"job": job})

    def result(self, job: str) -> tuple[dict, dict[str, bytes]]:
        msg = self.request("result", {"job": job}, timeout=max(self.timeout, 60))
        return msg.body, {name: arr.tobytes() for name, arr in msg.arrays.items()}

    # -- events ------------------------------------------------------------------------------------
    def watch(self, job: str, after: int = 0, heartbeat: float = 5.0, retries: int = 5,
              texture_encoding: str = "auto") -> Iterator:
        """Yield (seq, event) for one job until it is done or failed. Snapshots may skip.
        ``texture_encoding``: "raw", "png" (smaller, for slow links) or "auto" (PNG above 256 KiB)."""
        cursor = EventCursor(last=after)
        sub = lambda: {"job": job, "after": cursor.last, "texture_encoding": texture_encoding}  # noqa: E731
        reply = self.request("subscribe", sub()).body
        if cursor.caught_up(reply.get("state", ""), reply.get("last", after + 1)):
            return  # the job has ended and this client has seen all of it
        quiet_since, failures = time.monotonic(), 0
        while True:
            msg = self._next_event(0.2)
            if msg is None:
                if time.monotonic() - quiet_since > heartbeat:
                    try:  # silence: is the server alive? resubscribe from what we have
                        self._connect()
                        self.request("subscribe", sub(), timeout=heartbeat)
                        failures = 0
                    except ConnectionLost:
                        failures += 1
                        if failures > retries:
                            raise
                        time.sleep(min(2 ** failures * 0.1, 2.0))
                    quiet_since = time.monotonic()
                continue
            quiet_since = time.monotonic()
            job_id, seq, event = message_to_event(msg)
            if job_id != job:
                continue
            verdict = cursor.accept(msg.body["kind"], seq)
            if verdict is Verdict.GAP:  # something was dropped: ask for the rest
                self.request("subscribe", sub())
            elif verdict in (Verdict.DELIVER, Verdict.SNAPSHOT):
                yield seq, event
                if cursor.finished:
                    return

    def _next_event(self, timeout: float):
        if self._events:
            return self._events.popleft()
        if not self.socket.poll(int(timeout * 1000)):
            return None
        msg = decode(self.socket.recv_multipart(copy=False))
        return msg if msg.type == "event" else None
