"""Submits that end tracked or never delivered (no ghost jobs). Each submit carries its submission
token, saved on its job items, as the idempotency key: the server makes a key's jobs once and
answers any later submit with that key with the same jobs. So

- a submit whose reply was lost (no reply in time, the connection dropped, the session replaced)
  stays "submitting" and is sent again, with the same key, by the pump's next tick: the session
  holds it until the connection is back, and the reply tracks the jobs it made, never a copy;
- one that never left Blender (no connection within its time) failed: it was never delivered;
- an item still "submitting" whose request this Blender no longer holds (the file was reopened,
  Blender restarted) is asked about by its key alone: the server answers with its jobs, which are
  then tracked, or refuses the empty submit, which then never reached it (lost: submit again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import bpy

from protocol.client import ConnectionLost
from protocol.session import Session

from ..core import text
from . import jobs, notices, scene

SUBMIT_TIMEOUT = 180.0  # a backend's first submit loads its tokenizer; the pump never waits on it
LOOKUP_TIMEOUT = 10.0  # a key-only submit is answered before any loading
RESENDING = "no reply yet (connection lost?): sending it again with the same key"


@dataclass
class _Held:
    """A submit this Blender still holds: its request, to send again until an answer comes."""

    kind: str
    body: dict
    arrays: dict | None
    on_jobs: Callable | None
    batch: str
    delivered: bool = False  # it may have reached the server: from now on only an answer ends it
    resend: bool = False  # the pump's next tick sends it again


_held: dict[str, _Held] = {}  # submission token (= key) -> its request, until answered
_asked: set[str] = set()  # tokens being looked up by key alone


def submit(session: Session, kind: str, body: dict, arrays: dict | None, submission: str, on_jobs=None,
           batch: str = "") -> None:
    """Send a submit for the items listed under ``submission`` (``jobs.new_submission``), keyed by it.
    When the reply arrives (in the pump) they get their job ids (in the order of their ``index``) and
    ``on_jobs(items)`` runs; a refusal marks them failed with the reason. ``batch``: the batch the
    items belong to when the add-on sends a batch as one submit per prop (else the server's id)."""
    _held[submission] = _Held(kind, {**body, "key": submission}, arrays, on_jobs, batch)
    _send(session, submission)


def _send(session: Session, token: str) -> None:
    held = _held[token]

    def ok(msg) -> None:
        if _held.pop(token, None) is not None:
            acknowledge(token, msg.body["jobs"], held.batch or msg.body.get("batch") or "", held.on_jobs)

    def failed(exc: Exception) -> None:
        if token not in _held:
            return
        if isinstance(exc, ConnectionLost) and (exc.sent or held.delivered):
            held.delivered = held.resend = True  # the pump sends it again on the session it holds then
            for item in jobs.submission_items(token):
                item.message = RESENDING
            return
        del _held[token]
        items = jobs.end_submission(token)
        for item in items:
            item.state, item.message = "failed", f"[submit] {text.without_paths(str(exc))}"
        if items:
            notices.post(f"{held.kind} refused: {exc}")

    session.request("submit", held.body, arrays=held.arrays, on_reply=ok, on_error=failed, timeout=SUBMIT_TIMEOUT)


def acknowledge(token: str, ids: list, batch: str, on_jobs=None) -> list:
    """The submission's items get their jobs (by position: ``index`` order) and are queued."""
    items = list(zip(jobs.end_submission(token), ids))
    for item, job in items:
        item.job_id, item.batch, item.state, item.message = job, batch, "queued", ""
    items = [item for item, _ in items]
    if on_jobs is not None:
        on_jobs(items)
    return items


def resume(session: Session) -> None:
    """Each tick: send again the submits whose reply was lost, and ask by key about the items still
    "submitting" whose request this Blender no longer holds."""
    for token, held in list(_held.items()):
        if held.resend:
            held.resend = False
            if not jobs.submission_items(token):  # the artist removed them meanwhile
                del _held[token]
                jobs.end_submission(token)
                continue
            _send(session, token)
    tokens = {item.submission for item in jobs.unanswered()} - _asked - set(_held)
    for token in tokens:
        _look_up(session, token)


def _look_up(session: Session, token: str) -> None:
    _asked.add(token)
    jobs.resume_submission(token)
    for item in jobs.submission_items(token):
        item.message = "asking the backend whether it received this submit"

    def ok(msg) -> None:
        _asked.discard(token)
        recovered(acknowledge(token, msg.body["jobs"], msg.body.get("batch") or ""))

    def failed(exc: Exception) -> None:
        _asked.discard(token)
        if isinstance(exc, ConnectionLost):  # no answer: still unknown, asked again next tick
            jobs.forget_submission(token)
            return
        for item in jobs.end_submission(token):  # the key is unknown: it never reached this backend
            item.state, item.message = "lost", "the backend never received this submit; submit again"

    # a submit with its key alone: answered with the key's jobs when the server made them; without a
    # pipeline it can make none (docs/protocol.md: any later submit with the key gets the same jobs)
    session.request("submit", {"key": token}, on_reply=ok, on_error=failed, timeout=LOOKUP_TIMEOUT)


def recovered(items: list) -> None:
    """What an operator's acknowledgement does, from the items alone (its request is gone): a batch
    prop's library .blend, a refine's image on its object (shown with the UV map it was sent with)."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for item in items:
        if item.batch and not item.library:
            folder = Path(bpy.path.abspath(item.id_data.psd3d.library_dir))
            item.library = str(folder / f"psd3d_{stamp}_{item.batch[:8]}.blend")
        if item.pipeline == "refine":
            target = bpy.data.objects.get(item.target)
            if target is not None and target.type == "MESH":
                scene.attach_refine_image(target, item.job_id, 1024, 1024, uv_map=item.uv_map or None)


def waiting() -> bool:
    """Whether a submit waits to be sent again."""
    return any(held.resend for held in _held.values())


def forget() -> None:
    """Drop what this Blender holds (unregistering the add-on): its items are looked up by key later."""
    _held.clear()
    _asked.clear()
