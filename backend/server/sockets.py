"""The server's ROUTER socket: its options, a receive that checks a message's size and frame count
before it holds the frames, and sends that never block and never queue more than a budget of bytes
to one peer.

What libzmq bounds and what it does not (issue 16, item 4):

- ``ZMQ_MAXMSGSIZE`` bounds one *frame* (set here to ``MAX_FRAME_BYTES``). libzmq hands a
  multipart message to the application only once every frame has arrived, so the frames of one
  message sit in libzmq's memory before any check here can run; the number of frames in a message
  has no libzmq option. What this module bounds is what the server itself holds and materialises:
  frames past ``MAX_ARRAYS + 1`` or past ``MAX_MESSAGE_BYTES`` in total are released as they are
  read (never kept, never turned into views), and the message is answered ``message_too_large``.
- ``ZMQ_SNDHWM`` counts messages, not bytes. Each send is tracked (zero-copy frames with a
  ``MessageTracker``: libzmq releases a message once it is written to the connection), so the
  bytes queued to a peer that does not read are known; a send that would take them past
  ``PEER_QUEUE_BYTES`` is dropped. One message is always let through to an idle peer, and messages of
  at most ``SMALL_MESSAGE_BYTES`` (replies, progress) only meet the HWM, so the bound is
  ``PEER_QUEUE_BYTES`` + one message (≤ ``MAX_MESSAGE_BYTES``) + ``SEND_HWM`` small ones (62.5 MiB).

A dropped send is what the protocol already allows: a dropped reply is a request without a reply
(the client's timeout; every request is safe to resend, a submit by its ``key``); a dropped
``progress``/``done``/``failed`` is a gap or a silence, after which the client resubscribes and the
store replays it; a dropped snapshot is replaced by the next one, or the latest on resubscribe.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import zmq

from protocol.wire import (HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, MAX_ARRAYS, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES,
                           MessageTooLargeError)

SEND_HWM = 1000  # messages queued per peer before libzmq refuses more (EAGAIN: dropped)
PEER_QUEUE_BYTES = 16 << 20  # bytes queued to one peer (not yet written to its connection) before sends drop
SMALL_MESSAGE_BYTES = 64 << 10  # never refused by the byte budget (replies, progress): SEND_HWM bounds them
DRAIN_SLICE = 20_000  # frames of a refused message released per call (~50 ms): the loop's other work goes on


def router_socket(ctx: zmq.Context, bind: str, guard=None) -> zmq.Socket:
    """The bound ROUTER with our limits: MANDATORY (an unknown peer is an error, not a silent drop),
    per-frame MAXMSGSIZE, SNDHWM, LINGER 0, ZMTP heartbeats (a dead peer is dropped, so sends to it
    fail fast) and, with ``guard``, CURVE."""
    sock = ctx.socket(zmq.ROUTER)
    if guard is not None:
        guard.apply(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.copy_threshold = 0  # every frame zero-copy, so every send can be tracked
    sock.bind(bind)
    return sock


@dataclass
class Received:
    """One message off the socket: its frames, or (``refused``) why they were not kept."""

    peer: bytes
    frames: list = field(default_factory=list)
    refused: MessageTooLargeError | None = None


class Router:
    """Receive and send on the ROUTER (one thread: the serve loop)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.socket = sock
        self.dropped = 0
        self._queued: dict[bytes, collections.deque] = {}  # peer -> (tracker, bytes) of sends not yet written
        self._draining: Received | None = None  # a refused message whose remaining frames are being released

    # -- receiving -------------------------------------------------------------------------------------
    def recv(self) -> Received | None:
        """The next message, or None when nothing (more) is ready now. A refused message's rest is
        released in slices of ``DRAIN_SLICE`` frames; it is returned (with ``refused``) once drained."""
        if self._draining is not None:
            return self._drain()
        try:
            peer = self.socket.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        got = Received(peer.bytes)
        size, more = 0, peer.more
        while more:
            frame = self.socket.recv(copy=False)
            more = frame.more
            size += len(frame)
            if len(got.frames) >= MAX_ARRAYS + 1 or size > MAX_MESSAGE_BYTES:
                got.frames.clear()  # released now: nothing of it is kept
                what = (f"more than {MAX_ARRAYS + 1} frames (a header and at most {MAX_ARRAYS} arrays)"
                        if size <= MAX_MESSAGE_BYTES else f"more than {MAX_MESSAGE_BYTES} bytes")
                got.refused = MessageTooLargeError(f"message: {what}; nothing of it was kept", field="message")
                if more:
                    self._draining = got
                    return self._drain()
                return got
            got.frames.append(frame)
        return got

    def _drain(self) -> Received | None:
        for _ in range(DRAIN_SLICE):
            if not self.socket.recv(copy=False).more:
                done, self._draining = self._draining, None
                return done
        return None

    @property
    def draining(self) -> bool:
        return self._draining is not None

    # -- sending ---------------------------------------------------------------------------------------
    def queued_bytes(self, peer: bytes) -> int:
        """Bytes of this peer's sends that libzmq has not yet written to its connection."""
        pending = self._queued.get(peer)
        if not pending:
            return 0
        while pending and pending[0][0].done:
            pending.popleft()
        if not pending:
            del self._queued[peer]
            return 0
        return sum(n for _, n in pending)

    def can_send(self, peer: bytes, nbytes: int = SMALL_MESSAGE_BYTES + 1) -> bool:
        """Whether a send of ``nbytes`` to ``peer`` fits its budget: always a small message (the HWM
        bounds those) and any message when nothing is queued."""
        if nbytes <= SMALL_MESSAGE_BYTES:
            return True
        queued = self.queued_bytes(peer)
        return queued == 0 or queued + nbytes <= PEER_QUEUE_BYTES

    def send(self, peer: bytes, frames: list) -> bool:
        """Send without blocking; False (dropped) past the peer's byte budget or its HWM. Raises
        ``zmq.ZMQError`` when the peer is gone (EHOSTUNREACH), so the caller forgets it."""
        nbytes = sum(memoryview(f).nbytes for f in frames)
        if not self.can_send(peer, nbytes):
            self.dropped += 1
            return False
        try:
            tracker = self.socket.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False, track=True)
        except zmq.Again:  # the peer's HWM: dropped
            self.dropped += 1
            return False
        except zmq.ZMQError:
            self.dropped += 1
            self._queued.pop(peer, None)
            raise
        if not tracker.done:
            self._queued.setdefault(peer, collections.deque()).append((tracker, nbytes))
        return True

    def forget(self, peer: bytes) -> None:
        self._queued.pop(peer, None)
