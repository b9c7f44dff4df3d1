"""The contract of docs/protocol.md, checked as a client written from that page would: a raw DEALER
socket, msgpack headers by hand, replies matched by id. Errors: every reply carries the request's id
when it could be read, one code rule, one form of field name. Jobs: each request's effect in each
state, and exactly one terminal event per job."""

from __future__ import annotations

import threading
import time
from pathlib import Path

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


# -- issue 16, item 5: validated before acknowledged, one named error per bad input -------------

def _only_reply(raw: Raw, rid: str) -> dict:
    """The one reply to ``rid``; a second message with the same id within a moment fails the test."""
    reply = raw.reply(rid)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if raw.sock.poll(50):
            msg = msgpack.unpackb(raw.sock.recv_multipart()[0], raw=False)
            assert msg.get("id") != rid or msg["type"] == "event", f"a second reply to {rid}: {msg}"
    return reply


@pytest.mark.parametrize("spec,field", [
    ({"seed": True}, "spec.seed"),
    ({"seed": 1.5}, "spec.seed"),
    ({"steps": True}, "spec.steps"),
    ({"negative_prompt": 0}, "spec.negative_prompt"),
    ({"negative_prompt": {}}, "spec.negative_prompt"),
    ({"negative_prompt": [1]}, "spec.negative_prompt"),
    ({"negative_embedding": 5}, "spec.negative_embedding"),
    ({"negative_embedding": "a\0b"}, "spec.negative_embedding"),
    ({"negative_embedding": {}}, "spec.negative_embedding"),
    ({"method": ["psd"]}, "spec.method"),
    ({"reward": {}}, "spec.reward"),
    ({"preset": ["tiny"]}, "spec.preset"),
    ({"guidance_scale": True}, "spec.guidance_scale"),
    ({"reward_scale": "1"}, "spec.reward_scale"),
    ({"interval": True}, "spec.interval"),
    ({"interval": 2.0}, "spec.interval"),
    ({"prompt": 7}, "spec.prompt"),
])
def test_a_spec_field_of_the_wrong_type_is_refused_at_submit(raw, spec, field):
    rid = raw.send("submit", {"pipeline": "image2d", "spec": {"prompt": "a cup", "steps": 1, **spec}})
    code, got = _error(_only_reply(raw, rid))
    assert (code in ("invalid_input", "unknown_name"), got) == (True, field)
    assert raw.ask("list", {})["body"]["jobs"] == []  # refused, not acknowledged then failed


@pytest.mark.parametrize("spec,field", [
    ({"cameras": {"orbit": {"elevation": [0, True]}}}, "spec.cameras.orbit.elevation"),
    ({"cameras": {"matrices": [[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, True]], "fov_y": [40]}}, "spec.cameras.matrices[0]"),
    ({"cameras": {"orbit": {"elevation": [0, 10]}, "matrices": []}}, "spec.cameras"),
    ({"cameras": {"orbit": {"elevation": [0, 10]}, "fov": 1}}, "spec.cameras"),
    ({"cameras": {"matrices": [[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]], "fov_y": [40], "x": 1}}, "spec.cameras"),
    ({"rasterizer": ["torch"]}, "spec.rasterizer"),
    ({"recipe": {}}, "spec.recipe"),
    ({"init_mesh": 3}, "spec.init_mesh"),
])
def test_a_generate_spec_field_of_the_wrong_type_is_refused_at_submit(raw, spec, field):
    rid = raw.send("submit", {"pipeline": "generate", "spec": {"prompt": "a cup", "steps": 1, **spec}})
    code, got = _error(_only_reply(raw, rid))
    assert code in ("invalid_input", "unknown_name") and got == field
    assert raw.ask("list", {})["body"]["jobs"] == []


@pytest.mark.parametrize("body,field", [
    ({"pipeline": {"a": 1}, "spec": {"prompt": "a cup"}}, "pipeline"),
    ({"pipeline": ["image2d"], "spec": {"prompt": "a cup"}}, "pipeline"),
    ({"pipeline": ["image2d"], "spec": {}, "prompts": ["a cup"]}, "pipeline"),
    ({"pipeline": "image2d", "spec": {}, "prompts": "a cup"}, "prompts"),
    ({"pipeline": "image2d", "spec": {}, "prompts": [3]}, "prompts[0]"),
    ({"pipeline": "image2d", "spec": {"prompt": "a cup"}, "key": 5}, "key"),
])
def test_a_submit_body_of_the_wrong_type_gets_one_named_error(raw, body, field):
    rid = raw.send("submit", body)
    code, got = _error(_only_reply(raw, rid))
    assert code in ("invalid_input", "unknown_name") and got == field


def test_an_array_shape_whose_product_overflows_is_a_named_wire_error(raw):
    # 2**32 * 2**32 wraps to 0 in int64: the frame length check must not be fooled into an empty array
    shape = [1 << 26, 1 << 26, 1 << 12]
    raw.send_frames([header(id="ov", type="submit", body={"pipeline": "refine", "spec": {"prompt": "a cup"}},
                            arrays=[{"name": "positions", "dtype": "float32", "shape": shape, "frame": 1}]), b""])
    code, field = _error(_only_reply(raw, "ov"))
    assert (code, field) == ("bad_message", "arrays[0].shape")


def test_subscribe_with_a_huge_after_gets_one_named_error(raw):
    job = raw.ask("submit", {"pipeline": "image2d", "spec": {"prompt": "a cup", "steps": 1}})["body"]["jobs"][0]
    for after in (2**63, 2**64 - 1, 2**63 - 1):
        rid = raw.send("subscribe", {"job": job, "after": after})
        reply = _only_reply(raw, rid)
        if after == 2**63 - 1:  # the largest allowed: no event can follow it
            assert reply["type"] == "ok"
        else:
            assert _error(reply) == ("invalid_input", "after")


@pytest.mark.parametrize("body,field", [
    ({"job": 5}, "job"), ({"job": {}}, "job"), ({"job": "0" * 32, "after": True}, "after"),
    ({"job": "0" * 32, "after": 1.5}, "after"), ({"job": "0" * 32, "texture_encoding": []}, "texture_encoding"),
])
def test_subscribe_fields_of_the_wrong_type_get_one_named_error(raw, body, field):
    rid = raw.send("subscribe", body)
    assert _error(_only_reply(raw, rid))[1] == field


def test_list_pages_through_a_300_job_batch(raw, server):
    prompts = [f"a cup {i}" for i in range(300)]
    body = raw.ask("submit", {"pipeline": "image2d", "spec": {"steps": 100000}, "prompts": prompts})["body"]
    batch, ids = body["batch"], body["jobs"]
    seen, offset = [], 0
    while True:
        page = raw.ask("list", {"batch": batch, "offset": offset, "limit": 120})["body"]
        seen += [job["id"] for job in page["jobs"]]
        assert page["total"] == 300
        if page["next"] is None:
            break
        offset = page["next"]
    assert sorted(seen) == sorted(ids) and len(seen) == 300
    first = raw.ask("list", {"batch": batch})["body"]  # default page: 200, and where the next one starts
    assert len(first["jobs"]) == 200 and first["next"] == 200
    for bad, field in (({"limit": 0}, "limit"), ({"limit": 10**6}, "limit"), ({"offset": -1}, "offset"),
                       ({"offset": True}, "offset"), ({"batch": 3}, "batch")):
        assert _error(raw.ask("list", bad)) == ("invalid_input", field)
    for job in ids:
        raw.ask("cancel", {"job": job})


def test_an_old_libzmq_is_refused_with_a_psd3d_error(tmp_path, monkeypatch):
    from protocol.errors import Psd3dError

    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 1))
    monkeypatch.setattr(zmq, "zmq_version", lambda: "4.3.1")
    with pytest.raises(Psd3dError) as caught:
        Server(tmp_path / "data", bind="tcp://127.0.0.1:*")
    assert "4.3.2" in str(caught.value) and caught.value.code != "internal"


def test_each_limit_hello_states_is_the_one_enforced():
    """At each limit ``hello`` states a spec passes; one past it is refused, naming the field."""
    from protocol.errors import Psd3dError
    from protocol.messages import limits, spec_from_body
    from protocol.specs import BatchSpec

    lim = limits()  # what hello sends (pinned to hello above)

    def validate(**fields):
        spec_from_body("image2d", {"prompt": "a cup", **fields}).validate(("tiny",))

    for field, at, past in (("steps", lim["steps"], lim["steps"] + 1), ("seed", lim["seed"], lim["seed"] + 1),
                            ("prompt", "x" * lim["prompt_chars"], "x" * (lim["prompt_chars"] + 1))):
        validate(**{field: at})
        with pytest.raises(Psd3dError) as refused:
            validate(**{field: past})
        assert refused.value.field.endswith(field)
    BatchSpec(prompts=["x"] * lim["batch_prompts"], pipeline="image2d").validate()
    with pytest.raises(Psd3dError):
        BatchSpec(prompts=["x"] * (lim["batch_prompts"] + 1), pipeline="image2d").validate()


def test_a_protocol_limit_is_written_once_in_the_repository():
    """Issue 12 item 13: every limit protocol/ owns (specs, messages, wire) is imported elsewhere, never typed again."""
    import ast

    from protocol import messages, specs, wire

    root = Path(__file__).resolve().parents[1]
    owners = {Path(m.__file__).resolve() for m in (specs, messages, wire)}
    owned = {v for m in (specs, messages, wire) for k, v in vars(m).items()
             if k.startswith("MAX_") and isinstance(v, int) and v > 256}  # small numbers collide by chance
    problems = []
    for path in [*root.glob("backend/**/*.py"), *root.glob("blender_addon/**/*.py"), *root.glob("protocol/*.py")]:
        if path.resolve() in owners:
            continue
        for node in ast.parse(path.read_text()).body:  # module level
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                    not isinstance(node.value.value, bool) and node.value.value in owned:
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if any("MAX" in n or "LIMIT" in n for n in names):
                    problems.append(f"{path.relative_to(root)}:{node.lineno} {names} = {node.value.value}")
    assert not problems, "\n".join(problems)
