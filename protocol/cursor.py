"""The delivery rule for one job's events, written once and used by both clients.

``progress``, ``done`` and ``failed`` carry consecutive sequence numbers per job (1, 2, ...) and
are delivered exactly once, in order: a ``seq`` already delivered is a duplicate from a replay
(dropped), a ``seq`` past the next one is a gap (the client resubscribes with ``after=last``
and the server replays the rest). ``done`` and ``failed`` end the job: nothing follows them.
Snapshots (``image``, ``texture``, ``mesh``) coalesce and carry the ``seq`` of the last stored
event; they are never counted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

EXACTLY_ONCE = ("progress", "done", "failed")  # stored, numbered, delivered once and in order
TERMINAL = ("done", "failed")  # every job ends with exactly one of these
ENDED = ("done", "failed", "cancelled")  # the job states a terminal event leaves a job in
SNAPSHOTS = ("image", "texture", "mesh")  # the latest of each kind; a slow client may miss some


class Verdict(enum.Enum):
    DELIVER = "deliver"  # the next exactly-once event: hand it on
    DUPLICATE = "duplicate"  # seen already (a replay): drop it
    GAP = "gap"  # something before it was lost: drop it and resubscribe from ``last``
    SNAPSHOT = "snapshot"  # a coalescing snapshot: hand it on (the newest wins)
    AFTER_END = "after_end"  # an exactly-once event after the job's terminal one: drop it


@dataclass
class EventCursor:
    """Where a client stands in one job's event stream."""

    last: int = 0  # the last exactly-once seq delivered
    finished: bool = False  # ``done`` or ``failed`` was delivered

    def accept(self, kind: str, seq: int) -> Verdict:
        """Judge one event and advance past it when it is the next one."""
        if kind not in EXACTLY_ONCE:
            return Verdict.SNAPSHOT  # the latest state, also of an ended job (a resubscribe sends it again)
        if self.finished:
            return Verdict.AFTER_END
        if seq <= self.last:
            return Verdict.DUPLICATE
        if seq > self.last + 1:
            return Verdict.GAP
        self.last = seq
        self.finished = kind in TERMINAL
        return Verdict.DELIVER

    def caught_up(self, state: str, last: int) -> bool:
        """From a subscribe reply (the job's ``state`` and its ``last`` stored seq): a job that has ended
        and whose every event this client has seen is finished here too (nothing more will come)."""
        if state in ENDED and self.last >= last:
            self.finished = True
        return self.finished
