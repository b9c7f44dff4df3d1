"""The contract of docs/protocol.md, checked as a client written from that page would: a raw DEALER
socket, msgpack headers by hand, replies matched by id. Errors: every reply carries the request's id
when it could be read, one code rule, one form of field name. Jobs: each request's effect in each
state, and exactly one terminal event per job."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from backend.server.server import Server


@pytest.fixture()
def server(tmp_path, tiny):
    srv = Server(tmp_path / "data", bind="tcp://127.0.0.1:*", presets=("tiny",))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(15)


class Raw:
    """A DEALER socket speaking the documented frames: header = msgpack map, then raw array frames."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.events: list[dict] = []
        self._n = 0

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def send(self, type_: str, body: dict, arrays: dict | None = None, rid: str | None = None) -> str:
        self._n += 1
        rid = rid or f"q{self._n}"
        descriptors, frames = [], []
        for k, (name, arr) in enumerate((arrays or {}).items(), start=1):
            arr = np.ascontiguousarray(arr)
            descriptors.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "frame": k})
            frames.append(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        header = {"v": 1, "type": type_, "id": rid, "body": body, "arrays": descriptors}
        self.send_frames([msgpack.packb(header, use_bin_type=True), *frames])
        return rid

    def next(self, timeout: float = 30.0) -> dict:
        assert self.sock.poll(int(timeout * 1000)), "no message came"
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[0], raw=False)

    def reply(self, rid: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.1, deadline - time.monotonic()))
            if msg["type"] == "event":
                self.events.append(msg["body"])
            elif msg["id"] == rid:
                return msg
            assert time.monotonic() < deadline, f"no reply to {rid}"

    def ask(self, type_: str, body: dict, arrays: dict | None = None) -> dict:
        return self.reply(self.send(type_, body, arrays))

    def events_of(self, job: str, until, timeout: float = 120.0) -> list[dict]:
        """Collect this job's events until ``until(events)`` holds."""
        deadline = time.monotonic() + timeout
        while not until([e for e in self.events if e["job"] == job]):
            assert time.monotonic() < deadline, "the expected events never came"
            if self.sock.poll(200):
                msg = msgpack.unpackb(self.sock.recv_multipart()[0], raw=False)
                if msg["type"] == "event":
                    self.events.append(msg["body"])
        return [e for e in self.events if e["job"] == job]

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture()
def raw(server):
    r = Raw(server.endpoint)
    yield r
    r.close()


def header(**kw) -> bytes:
    base = {"v": 1, "type": "ping", "id": "w", "body": {}, "arrays": []}
    base.update(kw)
    return msgpack.packb(base, use_bin_type=True)


@pytest.mark.parametrize("frames,field", [
    ([header(id="w1", v=99)], "v"),
    ([header(id="w2", body=[1])], "body"),
    ([header(id="w3", type=5)], "type"),
    ([header(id="w4", arrays=[{"name": "a", "dtype": "complex64", "shape": [2], "frame": 1}]), b"\0" * 16], "arrays[0].dtype"),
    ([header(id="w5", arrays=[{"name": "a", "dtype": "float32", "shape": [-1], "frame": 1}]), b""], "arrays[0].shape"),
    ([header(id="w6", arrays=[{"name": "a", "dtype": "float32", "shape": [3], "frame": 1}]), b"\0" * 8], "arrays[0].frame"),
])
def test_a_wire_error_after_a_readable_header_carries_the_request_id(raw, frames, field):
    raw.send_frames(frames)
    msg = raw.next()
    rid = msgpack.unpackb(frames[0], raw=False)["id"]
    assert (msg["type"], msg["id"], msg["body"]["code"], msg["body"]["field"]) == ("error", rid, "bad_message", field)


def test_an_unreadable_header_is_answered_with_an_empty_id(raw):
    raw.send_frames([b"\xc1\xc1"])
    msg = raw.next()
    assert (msg["type"], msg["id"], msg["body"]["code"], msg["body"]["field"]) == ("error", "", "bad_message", "header")


def _error(reply: dict) -> tuple[str, str]:
    assert reply["type"] == "error", reply
    return reply["body"]["code"], reply["body"]["field"]


def test_one_code_rule_and_one_field_form(raw):
    """bad_message only for the frames; a name not offered is unknown_name; every other bad field is
    invalid_input; fields are paths in the body (``spec.steps``, ``prompts[1]``), arrays by index."""
    one = {"pipeline": "image2d", "spec": {"prompt": "a cup"}}
    batch = {"pipeline": "image2d", "spec": {}, "prompts": ["a cup", "a hat"]}
    cases = [
        ("launch", {}, None, ("unknown_name", "type")),
        ("submit", {**one, "pipeline": "sculpt"}, None, ("unknown_name", "pipeline")),
        ("submit", {**batch, "pipeline": "sculpt"}, None, ("unknown_name", "pipeline")),
        ("submit", {**one, "spec": {"prompt": "a cup", "method": "magic"}}, None, ("unknown_name", "spec.method")),
        ("submit", {**batch, "spec": {"preset": "huge"}}, None, ("unknown_name", "spec.preset")),
        ("submit", {**one, "spec": {"steps": 3}}, None, ("invalid_input", "spec.prompt")),
        ("submit", {**one, "spec": {"prompt": "a cup", "colour": "red"}}, None, ("invalid_input", "spec.colour")),
        ("submit", {**one, "spec": [1]}, None, ("invalid_input", "spec")),
        ("submit", {**one, "spec": {"prompt": ""}}, None, ("invalid_input", "spec.prompt")),
        ("submit", {**one, "spec": {"prompt": "x" * 5000}}, None, ("invalid_input", "spec.prompt")),
        ("submit", {**one, "spec": {"prompt": "a cup", "steps": 0}}, None, ("invalid_input", "spec.steps")),
        ("submit", {**one, "spec": {"prompt": "a cup", "seed": -1}}, None, ("invalid_input", "spec.seed")),
        ("submit", {**batch, "spec": {"steps": 0}}, None, ("invalid_input", "spec.steps")),
        ("submit", {**batch, "prompts": ["a cup", "x" * 5000]}, None, ("invalid_input", "prompts[1]")),
        ("submit", {**batch, "prompts": ["a cup", "a hat " * 40]}, None, ("invalid_input", "prompts[1]")),
        ("submit", {**batch, "spec": {"prompt": "a cup"}}, None, ("invalid_input", "spec.prompt")),
        ("submit", {"pipeline": "generate", "spec": {"prompt": "a cup", "cameras": {"orbit": {"elevation": [0, 200]}}}}, None,
         ("invalid_input", "spec.cameras.orbit.elevation")),
        ("submit", {"pipeline": "refine", "spec": {"prompt": "a cup"}},
         {"positions": np.zeros((3, 3), np.float32), "faces": np.array([[0, 1, 7]], np.int32)}, ("invalid_input", "arrays[1]")),
        ("submit", {"pipeline": "refine", "spec": {"prompt": "a cup"}},
         {"positions": np.zeros((3, 2), np.float32), "faces": np.array([[0, 1, 2]], np.int32)}, ("invalid_input", "arrays[0]")),
        ("status", {"job": "../x"}, None, ("invalid_input", "job")),
        ("status", {"job": "0" * 32}, None, ("unknown_job", "job")),
        ("subscribe", {"job": "0" * 32, "after": -1}, None, ("invalid_input", "after")),
        ("subscribe", {"job": "0" * 32, "texture_encoding": "jpeg"}, None, ("unknown_name", "texture_encoding")),
    ]
    for type_, body, arrays, expected in cases:
        reply = raw.ask(type_, body, arrays)
        assert _error(reply) == expected, (type_, body)
        assert reply["body"]["message"].startswith(expected[1] + ":"), reply["body"]["message"]
    assert raw.ask("list", {})["body"]["jobs"] == []  # nothing refused was queued


def test_hello_states_every_limit_from_the_constants_that_enforce_them(raw):
    from protocol import messages, specs, wire

    limits = raw.ask("hello", {})["body"]["limits"]
    assert limits["prompt_chars"] == specs.MAX_PROMPT_CHARS and limits["steps"] == specs.MAX_STEPS
    assert limits["seed"] == specs.MAX_SEED and limits["batch_prompts"] == specs.MAX_BATCH
    assert limits["vertices"] == messages.MAX_VERTICES and limits["texture_side"] == messages.MAX_TEXTURE_SIDE
    assert limits["message_bytes"] == wire.MAX_MESSAGE_BYTES and limits["id_chars"] == wire.MAX_ID_CHARS
    raw.ask("submit", {"pipeline": "image2d", "spec": {"prompt": "a cup", "steps": 1}})  # the tokenizer is loaded now
    assert raw.ask("hello", {})["body"]["limits"]["prompt_tokens"] == {"tiny": 77}


def _terminal(events: list[dict]) -> list[dict]:
    return [e for e in events if e["kind"] in ("done", "failed")]


def test_each_request_in_each_job_state_and_exactly_one_terminal_event(raw):
    submit = lambda steps: raw.ask("submit", {"pipeline": "image2d", "spec": {"prompt": "a cup", "steps": steps}})["body"]["jobs"][0]  # noqa: E731
    running = submit(400)
    queued = submit(2)
    assert raw.ask("subscribe", {"job": running})["type"] == "ok"
    raw.events_of(running, lambda ev: any(e["kind"] == "progress" for e in ev))
    # queued: finish is refused (nothing to keep), cancel ends it at once with one failed event
    assert raw.ask("subscribe", {"job": queued})["body"]["state"] == "queued"
    assert _error(raw.ask("finish", {"job": queued})) == ("invalid_input", "job")
    assert raw.ask("cancel", {"job": queued})["body"] == {"job": queued, "state": "cancelled"}
    events = raw.events_of(queued, _terminal, timeout=10)
    assert [(e["kind"], e["code"], e["seq"]) for e in events] == [("failed", "cancelled", 1)]
    status = raw.ask("status", {"job": queued})["body"]
    assert status["state"] == "cancelled" and status["error"]["code"] == "cancelled"
    assert queued not in raw.ask("ping", {})["body"]["subscribed"]  # the subscription ended with the job
    # ended: cancel and finish are refused and change nothing
    assert _error(raw.ask("cancel", {"job": queued})) == ("invalid_input", "job")
    assert _error(raw.ask("finish", {"job": queued})) == ("invalid_input", "job")
    # running: cancel stops it with one failed event, and status says why
    assert raw.ask("cancel", {"job": running})["body"] == {"job": running, "state": "running"}
    events = raw.events_of(running, _terminal)
    assert [(e["kind"], e["code"]) for e in _terminal(events)] == [("failed", "cancelled")]
    status = raw.ask("status", {"job": running})["body"]
    assert status["state"] == "cancelled" and status["error"]["code"] == "cancelled"
    seqs = [e["seq"] for e in events if e["kind"] in ("progress", "done", "failed")]
    assert seqs == list(range(1, len(seqs) + 1))
    # finish a running job: it ends done, once
    third = submit(400)
    assert raw.ask("subscribe", {"job": third})["type"] == "ok"
    raw.events_of(third, lambda ev: any(e["kind"] == "progress" for e in ev))
    assert raw.ask("finish", {"job": third})["body"] == {"job": third, "state": "running"}
    assert [e["kind"] for e in _terminal(raw.events_of(third, _terminal))] == ["done"]
    assert _error(raw.ask("cancel", {"job": third})) == ("invalid_input", "job")
    time.sleep(0.5)  # nothing follows a terminal event
    for job in (queued, running, third):
        assert len(_terminal(raw.events_of(job, lambda ev: True))) == 1
        # a late subscriber gets the stored events, the terminal one last, and is not kept subscribed
        raw.events = [e for e in raw.events if e["job"] != job]
        assert raw.ask("subscribe", {"job": job})["type"] == "ok"
        replay = raw.events_of(job, _terminal, timeout=10)
        assert replay[-1]["kind"] in ("done", "failed")
    assert raw.ask("ping", {})["body"]["subscribed"] == []


def test_the_event_cursor_delivers_once_in_order_and_nothing_after_the_end():
    from protocol.cursor import EventCursor, Verdict

    cursor = EventCursor(last=1)
    verdicts = [cursor.accept(kind, seq) for kind, seq in
                [("progress", 1), ("mesh", 1), ("progress", 3), ("progress", 2), ("texture", 2), ("done", 3), ("progress", 4),
                 ("texture", 3)]]
    assert verdicts == [Verdict.DUPLICATE, Verdict.SNAPSHOT, Verdict.GAP, Verdict.DELIVER, Verdict.SNAPSHOT,
                        Verdict.DELIVER, Verdict.AFTER_END, Verdict.SNAPSHOT]
    assert (cursor.last, cursor.finished) == (3, True)
    late = EventCursor(last=3)  # a client that saw all of an ended job, told so by a subscribe reply
    assert late.caught_up("done", 3) and not EventCursor(last=2).caught_up("done", 3)
    assert not EventCursor(last=3).caught_up("running", 3)
