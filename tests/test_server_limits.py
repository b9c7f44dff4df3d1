"""Issue 16, item 4: memory stays bounded and the loop stays responsive whatever clients do.
Real loopback sockets; each test names the limit it holds the server to."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from protocol import messages, wire
from protocol.client import Client, ServerError
from protocol.wire import Message, decode, encode
from backend.server.server import Server

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serving(tmp_path, **kwargs):
    srv = Server(tmp_path / "data", bind="tcp://127.0.0.1:*", presets=("tiny",), **kwargs)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop()
        thread.join(15)


def _triangle(texture_side: int | None = None) -> dict:
    mesh = {"positions": np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32),
            "faces": np.array([[0, 1, 2]], np.int32), "uvs": np.zeros((1, 3, 2), np.float32)}
    if texture_side:
        mesh["texture"] = np.zeros((texture_side, texture_side, 4), np.uint8)
    return mesh


def test_the_documented_texture_side_fits_the_wire_limits():
    side = messages.MAX_TEXTURE_SIDE
    assert side * side * 4 <= wire.MAX_ARRAY_ELEMENTS and side * side * 4 <= wire.MAX_FRAME_BYTES
    assert messages.MAX_FACES * 3 * 2 <= wire.MAX_ARRAY_ELEMENTS  # per-corner uvs of the largest mesh


def test_a_texture_within_the_side_limit_is_accepted_and_one_past_it_named(tmp_path, tiny):
    """A 4100² RGBA texture (over 2^26 elements) was refused by the array cap although the texture
    side limit is 8192."""
    with serving(tmp_path) as srv, Client(srv.endpoint, timeout=60) as client:
        (job,) = client.submit("refine", {"prompt": "a cup", "steps": 1}, mesh=_triangle(4100))
        assert client.status(job)["state"] in ("queued", "running", "done")
        mesh = _triangle()
        mesh["texture"] = np.zeros((8, messages.MAX_TEXTURE_SIDE + 1, 4), np.uint8)
        with pytest.raises(ServerError) as err:
            client.submit("refine", {"prompt": "a cup", "steps": 1}, mesh=mesh)
        assert err.value.code == "invalid_input" and err.value.field == "arrays[3]"


class IdleExecutor:
    """An executor that never starts a job: what is queued stays queued (the queue-limit tests)."""

    def __init__(self, store, outbox) -> None:
        self.store = store

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def notify(self) -> None: ...
    def cancel(self, job_id) -> None: ...
    def finish(self, job_id) -> None: ...

    def health(self) -> dict:
        return {"executor": "idle", "alive": True, "errors": 0, "last_error": None, "min_free_bytes": 0}

    def worker_of(self, job_id):
        return None

    def device_name(self) -> None:
        return None

    def cancel_queued(self, job_id) -> bool:
        return False


def _dealer(srv) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    return sock


def _reply(sock, rid: str, timeout_s: float = 60) -> Message:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = decode(sock.recv_multipart())
            if msg.id == rid:
                return msg
    raise AssertionError(f"no reply to {rid} within {timeout_s} s")


def _ping_latency(srv) -> float:
    sock = _dealer(srv)
    try:
        t0 = time.monotonic()
        sock.send_multipart(encode(Message("ping", "p")))
        _reply(sock, "p")
        return time.monotonic() - t0
    finally:
        sock.close(0)


def test_a_message_of_too_many_frames_is_refused_by_name_and_the_server_serves_on(tmp_path, tiny):
    """1M empty frames once took the loop 9.2 s (each materialised before the array count was
    checked); now the frames past a header and MAX_ARRAYS arrays are released as they are read."""
    with serving(tmp_path, executor=IdleExecutor) as srv:
        sock = _dealer(srv)
        header = encode(Message("ping", "many"))[0]
        sock.send_multipart([header] + [b""] * 200_000)
        assert sock.poll(60_000)
        reply = decode(sock.recv_multipart())
        assert reply.type == "error" and reply.body["code"] == "message_too_large", reply.body
        assert f"{wire.MAX_ARRAYS + 1} frames" in reply.body["message"]
        sock.close(0)
        assert _ping_latency(srv) < 5


def test_a_message_over_the_byte_limit_is_refused_before_it_is_held(tmp_path, tiny, monkeypatch):
    from backend.server import sockets

    monkeypatch.setattr(sockets, "MAX_MESSAGE_BYTES", 1 << 20)  # a small limit: the same rule, cheaply
    with serving(tmp_path, executor=IdleExecutor) as srv:
        sock = _dealer(srv)
        frames = encode(Message("submit", "big", {"pipeline": "refine", "spec": {"prompt": "a cup"}},
                                {"positions": np.zeros((3 << 15, 3), np.float32)}))  # 1.1 MiB of arrays
        sock.send_multipart(frames)
        assert sock.poll(30_000)
        reply = decode(sock.recv_multipart())
        assert reply.body["code"] == "message_too_large" and str(1 << 20) in reply.body["message"]
        sock.close(0)


def test_queued_jobs_are_limited_per_client_and_in_total_and_hello_states_it(tmp_path, tiny):
    from backend.server.admission import QueueLimits

    with serving(tmp_path, executor=IdleExecutor, queue_limits=QueueLimits(per_client=3, total=5)) as srv, \
            Client(srv.endpoint, timeout=60) as alice, Client(srv.endpoint, timeout=60) as bob:
        limits = alice.hello()["limits"]
        assert limits["queued_per_client"] == 3 and limits["queued_total"] == 5
        first = alice.submit("image2d", {"steps": 1}, prompts=["a cup", "a pot", "a pan"], key="k1")
        with pytest.raises(ServerError) as err:
            alice.submit("image2d", {"prompt": "a lid", "steps": 1})
        assert err.value.code == "queue_full" and "per client" in str(err.value)
        # a resent submit is still answered with its jobs (exactly once), full queue or not
        assert alice.submit("image2d", {"steps": 1}, prompts=["a cup", "a pot", "a pan"], key="k1") == first
        assert alice.request("submit", {"key": "k1"}).body["jobs"] == first  # by its key alone
        bob.submit("image2d", {"steps": 1}, prompts=["a cup", "a pot"])
        with pytest.raises(ServerError) as err:
            bob.submit("image2d", {"prompt": "a lid", "steps": 1})
        assert err.value.code == "queue_full" and "queued_total" in str(err.value)
        assert len(alice.request("list").body["jobs"]) == 5


def _ping_while(srv, sock, rid: str, timeout_s: float = 120) -> tuple[float, Message, bool]:
    """Ping on another connection while ``sock``'s request ``rid`` is handled: the ping's latency, the
    request's reply, and whether the ping was answered first."""
    pinger = _dealer(srv)
    try:
        t0 = time.monotonic()
        pinger.send_multipart(encode(Message("ping", "p")))
        _reply(pinger, "p")
        latency = time.monotonic() - t0
        first = not sock.poll(0)
        return latency, _reply(sock, rid, timeout_s), first
    finally:
        pinger.close(0)


def test_a_1000_prompt_batch_does_not_stall_another_clients_ping(tmp_path, tiny):
    """The batch (validation, tokenizing, a thousand job folders written with fsync) runs on the
    admission thread; the loop answers a ping meanwhile (it waited seconds behind it)."""
    with serving(tmp_path, executor=IdleExecutor) as srv:
        assert _ping_latency(srv) < 30
        with Client(srv.endpoint) as warm:  # the tokenizer has loaded
            warm.submit("image2d", {"prompt": "a cup", "steps": 1})
        sock = _dealer(srv)
        sock.send_multipart(encode(Message("submit", "batch", {"pipeline": "image2d", "spec": {"steps": 1},
                                                               "prompts": [f"a cup number {i}" for i in range(1000)]})))
        time.sleep(0.05)
        latency, reply, first = _ping_while(srv, sock, "batch")
        assert reply.type == "ok" and len(reply.body["jobs"]) == 1000
        sock.close(0)
        assert first and latency < 2, f"a ping waited {latency:.2f} s behind the batch"


def test_an_upload_does_not_stall_another_clients_ping(tmp_path, tiny):
    rng = np.random.default_rng(0)
    faces = 400_000
    mesh = {"positions": rng.random((faces, 3), np.float32), "faces": rng.integers(0, faces, (faces, 3), dtype=np.int32),
            "uvs": rng.random((faces, 3, 2), np.float32), "texture": np.zeros((2048, 2048, 4), np.uint8)}
    with serving(tmp_path, executor=IdleExecutor) as srv:
        assert _ping_latency(srv) < 30
        sock = _dealer(srv)
        sock.send_multipart(encode(Message("submit", "up", {"pipeline": "refine", "spec": {"prompt": "a cup", "steps": 1}},
                                           mesh)))
        time.sleep(0.3)  # the message has arrived; its mesh is being converted and written
        latency, reply, first = _ping_while(srv, sock, "up")
        assert reply.type == "ok", reply.body
        sock.close(0)
        assert first and latency < 2, f"a ping waited {latency:.2f} s behind an upload"


def test_a_client_that_never_reads_cannot_grow_the_server(tmp_path, tiny):
    """Results requested by a peer that reads nothing queue at most PEER_QUEUE_BYTES (+ one reply)
    to it, not SNDHWM replies; the dropped ones are requests without a reply (resent on timeout)."""
    from backend.server import sockets

    with serving(tmp_path, executor=IdleExecutor) as srv:
        job = srv.store.create("image2d", {"prompt": "a cup"})
        srv.store.set_state(job, "done")
        (srv.store.folder(job) / "image.png").write_bytes(np.random.default_rng(0).bytes(8 << 20))
        sock = _dealer(srv)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 1 << 16)
        sent = 40  # 320 MiB if every reply were queued
        for i in range(sent):
            sock.send_multipart(encode(Message("result", str(i), {"job": job})))
        deadline = time.monotonic() + 60
        while srv.dropped < sent // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        queued = srv.router.queued_bytes(sock.getsockopt(zmq.ROUTING_ID) or next(iter(srv.router._queued), b""))
        assert srv.dropped >= sent // 2, srv.dropped
        assert sum(srv.router.queued_bytes(p) for p in list(srv.router._queued)) <= sockets.PEER_QUEUE_BYTES + (9 << 20), queued
        assert _ping_latency(srv) < 5
        sock.close(0)


def test_a_texture_sent_as_png_does_not_stall_another_clients_ping(tmp_path, tiny):
    """PNG encoding (seconds for a 4096² texture of noise) runs off the loop; the subscriber still gets
    the texture before the event that followed it."""
    with serving(tmp_path, executor=IdleExecutor) as srv:
        assert _ping_latency(srv) < 30
        watcher = zmq.Context.instance().socket(zmq.DEALER)
        watcher.setsockopt(zmq.LINGER, 0)
        watcher.setsockopt(zmq.ROUTING_ID, b"watcher")
        watcher.connect(srv.endpoint)
        watcher.send_multipart(encode(Message("ping", "w")))
        _reply(watcher, "w")
        job = "b" * 32
        srv.subscribers.setdefault(job, set()).add(b"watcher")  # "auto": a 2048² texture travels as PNG
        image = np.random.default_rng(0).integers(0, 255, (4096, 4096, 4), dtype=np.uint8)
        srv.outbox.put((job, Message("event", "", {"job": job, "seq": 1, "kind": "texture", "step": 1}, {"image": image})))
        srv.outbox.put((job, Message("event", "", {"job": job, "seq": 2, "kind": "progress", "step": 2, "total": 2,
                                                   "stage": "texture", "metrics": {}})))
        time.sleep(0.2)
        latency = _ping_latency(srv)
        kinds = []
        while len(kinds) < 2:
            assert watcher.poll(120_000), kinds
            msg = decode(watcher.recv_multipart())
            kinds.append((msg.body["kind"], msg.body.get("encoding")))
        assert kinds == [("texture", "png"), ("progress", None)], kinds
        assert latency < 1.5, f"a ping waited {latency:.2f} s behind a PNG encoding"
        watcher.close(0)


def test_the_upload_writer_ends_when_its_server_is_killed(tmp_path):
    """admission's spawned writer process must not outlive a server killed with SIGKILL."""
    script = (
        "import os, sys, multiprocessing\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from backend.server.admission import exit_with_parent\n"
        "pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                           initializer=exit_with_parent, initargs=(os.getpid(), 0.1))\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    writer = int(server.stdout.readline())
    server.kill()  # SIGKILL: no atexit, no pool shutdown
    server.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{writer}").exists():
        time.sleep(0.1)
    alive = Path(f"/proc/{writer}").exists() and "Z" not in Path(f"/proc/{writer}/stat").read_text().split()[2]
    if alive:
        os.kill(writer, signal.SIGKILL)
    assert not alive, "the writer process outlived its server"
