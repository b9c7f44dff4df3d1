"""The service over real loopback sockets (ephemeral ports): submit -> events -> result,
resubscribe after a drop, cancel, and malformed traffic while the server keeps serving."""

import contextlib
import random
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from protocol.client import Client, ServerError
from protocol.events import Done, Failed, ImageSnapshot, Progress
from backend.pipelines.presets import PRESETS
from backend.server.server import Server, check_bind
from protocol.errors import InvalidInputError
from protocol.wire import Message, decode, encode


def _rss_mib() -> float:
    """Resident memory of this process (the server runs in a thread of it)."""
    import os

    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture()
def server(tmp_path, tiny):
    srv = Server(tmp_path / "data", bind="tcp://127.0.0.1:*", presets=tuple(PRESETS))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(15)


def test_submit_watch_result_end_to_end(server, tmp_path):
    with Client(server.endpoint) as client:
        hello = client.hello()
        assert hello["protocol"] == 1 and "tiny" in hello["presets"] and "generate" in hello["pipelines"]
        (job,) = client.submit("image2d", {"prompt": "a red teapot", "steps": 3})
        events = list(client.watch(job))
        kinds = [type(e).__name__ for _, e in events]
        progress = [e.step for _, e in events if isinstance(e, Progress)]
        assert progress == [1, 2, 3] and kinds[-1] == "Done"
        seqs = [s for s, e in events if not isinstance(e, ImageSnapshot)]
        assert seqs == list(range(1, len(seqs) + 1))  # exactly once, in order
        assert client.status(job)["state"] == "done"
        body, files = client.result(job)
        assert {"image.png", "metrics.json", "reward_curve.png"} <= set(files)
        assert files["image.png"][:8] == b"\x89PNG\r\n\x1a\n"
        # a client that reconnects and resubscribes from seq 2 gets the rest once
        replay = list(client.watch(job, after=2, texture_encoding="png"))
        assert [s for s, e in replay if not isinstance(e, ImageSnapshot)] == list(range(3, len(seqs) + 1))
        pngs = [e for _, e in replay if isinstance(e, ImageSnapshot)]  # the latest snapshot, sent as PNG
        assert pngs and pngs[-1].image.shape == (128, 128, 4) and pngs[-1].image.dtype == np.uint8


def test_a_reply_that_cannot_be_encoded_is_answered_and_the_loop_lives(server, monkeypatch):
    """A bug that puts an unsendable value in a reply (CI once saw a tokenizer's 1e30 length in
    hello) gets an ``internal`` error, not a dead serve loop and a client left waiting."""
    real = server.worker_health
    monkeypatch.setattr(server, "worker_health", lambda: {**real(), "free_bytes": 10**30})
    with Client(server.endpoint, timeout=10) as client:
        with pytest.raises(ServerError) as err:
            client.hello()
        assert err.value.code == "internal" and "OverflowError" in str(err.value)
        monkeypatch.setattr(server, "worker_health", real)
        assert client.hello()["protocol"] == 1


def test_bad_requests_get_named_errors_and_the_server_keeps_serving(server):
    with Client(server.endpoint, timeout=5) as client:
        with pytest.raises(ServerError) as err:
            client.submit("image2d", {"prompt": ""})
        assert err.value.field == "spec.prompt"
        with pytest.raises(ServerError) as err:  # too long for the tokenizer: refused before it is queued
            client.submit("image2d", {"prompt": "a very long prompt " * 30})
        assert err.value.field == "spec.prompt" and "tokens" in str(err.value)
        assert client.request("list").body["jobs"] == []
        with pytest.raises(ServerError) as err:
            client.submit("image2d", {"prompt": "a cat", "colour": "red"})
        assert err.value.field == "spec.colour"
        with pytest.raises(ServerError) as err:
            client.submit("refine", {"prompt": "a cat", "mesh": "/nonexistent/cat.glb"})
        assert err.value.field == "spec.mesh"
        with pytest.raises(ServerError) as err:  # no path outside the data folder, even an existing one
            client.submit("image2d", {"prompt": "a cat", "negative_embedding": "/etc/hostname"})
        assert err.value.field == "spec.negative_embedding"
        with pytest.raises(ServerError) as err:
            client.submit("sculpt", {"prompt": "a cat"})
        assert err.value.field == "pipeline"
        with pytest.raises(ServerError) as err:
            client.status("../../etc/passwd")
        assert err.value.field == "job"
        with pytest.raises(ServerError) as err:
            client.request("launch_missiles")
        assert err.value.field == "type"
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.endpoint)
    rng = random.Random(1)
    sent = 10_000
    rss_before = _rss_mib()
    for i in range(sent):
        if i % 2:
            frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))]
        else:
            frames = [msgpack.packb({"v": 1, "type": rng.choice(["submit", "status", "subscribe", "x"]), "id": str(i),
                                     "body": rng.choice([{}, {"job": 5}, {"pipeline": "image2d", "spec": [1]}, {"after": -1}]),
                                     "arrays": rng.choice([[], [{"name": "a", "dtype": "uint8", "shape": [9], "frame": 1}]])})]
        raw.send_multipart(frames)
    replies = 0
    deadline = time.monotonic() + 30
    while replies < sent and time.monotonic() < deadline:
        if raw.poll(1000):
            raw.recv_multipart()
            replies += 1
    raw.close(0)
    assert replies == sent  # every message answered (errors), none crashed the server
    growth = _rss_mib() - rss_before
    assert growth < 50, f"resident memory grew by {growth:.1f} MiB over {sent} malformed messages"
    print(f"fuzz: {sent} malformed messages answered, RSS growth {growth:.1f} MiB")
    with Client(server.endpoint, timeout=5) as client:
        assert client.request("ping").type == "ok"


def test_cancel_a_queued_job_and_finish_a_running_one(server):
    with Client(server.endpoint) as client:
        (first,) = client.submit("image2d", {"prompt": "a chair", "steps": 200})
        (second,) = client.submit("image2d", {"prompt": "a lamp", "steps": 3})
        client.cancel(second)
        for _, event in client.watch(first):
            if isinstance(event, Progress) and event.step == 2:
                client.finish(first)
            if isinstance(event, (Done, Failed)):
                break
        assert isinstance(event, Done) and event.final["steps_done"] < 200
        assert client.status(first)["state"] == "done"
        assert client.status(second)["state"] == "cancelled"


def test_non_loopback_bind_without_keys_is_refused():
    with pytest.raises(InvalidInputError) as err:
        check_bind("tcp://0.0.0.0:5557", None)
    assert err.value.field == "bind"
    check_bind("tcp://127.0.0.1:5557", None)
    check_bind("ipc:///tmp/psd3d.sock", None)


def test_kill_9_mid_job_then_restart_finishes_with_the_same_result(tmp_path, tiny, psd3d_home, serve_process):
    """The CLI server is killed hard mid-job; on restart the job resumes from its checkpoint and its
    texture equals an uninterrupted run's, byte for byte."""
    import os
    import signal

    from backend.geometry.mesh import Mesh, load_mesh, save_glb
    from backend.geometry.primitives import uv_sphere
    from backend.pipelines.mesh3d import run_refine
    from protocol.specs import RefineSpec

    v, f, uv = uv_sphere(16, 8, radius=0.4)
    tex = np.full((16, 16, 4), 180, np.uint8)
    save_glb(Mesh(v, f.long(), uv, tex), tmp_path / "ball.glb")
    spec = {"prompt": "a leather ball", "steps": 8, "seed": 5}
    reference = list(run_refine(RefineSpec(mesh=str(tmp_path / "ball.glb"), **spec), tmp_path / "reference", models=tiny))[-1]
    ball = load_mesh(tmp_path / "ball.glb")
    upload = {"positions": ball.positions.numpy(), "faces": ball.faces.numpy().astype(np.int32),
              "uvs": ball.uvs.numpy(), "texture": ball.texture}
    assert isinstance(reference, Done)
    env = dict(os.environ, PSD3D_HOME=psd3d_home, MKL_DYNAMIC="FALSE", OMP_DYNAMIC="FALSE")
    proc, endpoint = serve_process(tmp_path / "data", env=env)
    try:
        with Client(endpoint, timeout=60) as client:
            (job,) = client.submit("refine", spec, mesh=upload)
            for _, event in client.watch(job):
                if isinstance(event, Progress) and event.step >= 6:
                    break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc, endpoint = serve_process(tmp_path / "data", env=env)
        with Client(endpoint, timeout=60) as client:
            steps = [e.step for _, e in client.watch(job) if isinstance(e, Progress)]
            assert client.status(job)["state"] == "done"
            _, files = client.result(job)
        assert steps and steps[-1] == 8
        (tmp_path / "got.glb").write_bytes(files["out.glb"])
        assert np.array_equal(load_mesh(tmp_path / "got.glb").texture, load_mesh(tmp_path / "reference" / "out.glb").texture)
    finally:
        proc.kill()
        proc.wait(10)


def test_curve_allows_listed_clients_and_denies_others(tmp_path, tiny):
    import shutil

    from backend.server.security import new_certificate

    keys = tmp_path / "keys"
    new_certificate(keys, "server")
    alice_pub, alice_secret = new_certificate(tmp_path / "alice", "alice")
    _, mallory_secret = new_certificate(tmp_path / "mallory", "mallory")
    (keys / "clients").mkdir()
    shutil.copy(alice_pub, keys / "clients" / "alice.key")
    srv = Server(tmp_path / "data", bind="tcp://127.0.0.1:*", presets=tuple(PRESETS), keys=keys)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with Client(srv.endpoint, timeout=5, curve=(str(alice_secret), str(keys / "server.key"))) as alice:
            assert alice.request("ping").type == "ok"
        from protocol.client import ConnectionLost

        with Client(srv.endpoint, timeout=2, curve=(str(mallory_secret), str(keys / "server.key"))) as mallory:
            with pytest.raises(ConnectionLost):
                mallory.request("ping")
        with Client(srv.endpoint, timeout=2) as plain:  # no CURVE at all
            with pytest.raises(ConnectionLost):
                plain.request("ping")
        bob_pub, bob_secret = new_certificate(tmp_path / "bob", "bob")
        shutil.copy(bob_pub, keys / "clients" / "bob.key")  # the allow-list is reloaded while serving
        time.sleep(1.5)
        with Client(srv.endpoint, timeout=5, curve=(str(bob_secret), str(keys / "server.key"))) as bob:
            assert bob.request("ping").type == "ok"
    finally:
        srv.stop()
        thread.join(15)
    check_bind("tcp://0.0.0.0:5557", keys)  # with keys a public bind is allowed


def test_a_client_that_reconnects_mid_stream_gets_each_event_once_and_the_latest_snapshot(server):
    with Client(server.endpoint) as first:
        (job,) = first.submit("image2d", {"prompt": "a lamp", "steps": 12})
        seen = []
        for seq, event in first.watch(job):
            if not isinstance(event, ImageSnapshot):
                seen.append(seq)
            if len(seen) == 4:
                break  # the client goes away mid-stream
    time.sleep(1.0)
    with Client(server.endpoint) as second:
        rest, snapshots = [], []
        for seq, event in second.watch(job, after=seen[-1]):
            (snapshots if isinstance(event, ImageSnapshot) else rest).append(seq)
    assert seen + rest == list(range(1, len(seen) + len(rest) + 1))  # every event once, in order
    assert snapshots  # the latest snapshot is resent on resubscribe


def test_prune_removes_finished_jobs_and_their_folders(tmp_path):
    from backend.jobs.store import JobStore

    store = JobStore(tmp_path)
    done, queued = store.create("image2d", {"prompt": "a"}), store.create("image2d", {"prompt": "b"})
    store.set_state(done, "done", final={})
    assert store.prune(0) == [done]
    assert not store.folder(done).exists() and store.folder(queued).exists()
    assert [r.id for r in store.list()] == [queued]


def test_refine_an_uploaded_mesh(server):
    from backend.geometry.primitives import uv_sphere

    v, f, uv = uv_sphere(12, 6, radius=0.4)
    tex = np.full((16, 16, 4), 90, np.uint8)
    mesh = {"positions": (v.numpy() + 5).astype(np.float32), "faces": f.numpy().astype(np.int32),
            "uvs": uv.numpy().astype(np.float32), "texture": tex}
    with Client(server.endpoint, timeout=30) as client:
        (job,) = client.submit("refine", {"prompt": "a ball", "steps": 2}, mesh=mesh)
        last = list(client.watch(job))[-1][1]
        assert isinstance(last, Done), last
        # the learned n of that job, named by its id, seeds another job
        (second,) = client.submit("image2d", {"prompt": "a ball", "steps": 1, "negative_embedding": job})
        assert isinstance(list(client.watch(second))[-1][1], Done)
        with pytest.raises(ServerError) as err:
            client.submit("refine", {"prompt": "a ball"}, mesh={**mesh, "faces": mesh["faces"] + 1000})
        assert err.value.field == "arrays[1]" and "faces" in str(err.value)
        with pytest.raises(ServerError) as err:
            client.submit("refine", {"prompt": "a ball"}, mesh={**mesh, "texture": np.zeros((4, 4, 3), np.uint8)})
        assert err.value.field == "arrays[3]" and "texture" in str(err.value)


@pytest.mark.parametrize("with_texture", [True, False], ids=["own-image", "no-image"])
def test_refine_keeps_the_uploaded_uvs_with_or_without_a_texture(server, tmp_path, with_texture):
    """The uploaded UVs reach the job unchanged: out.glb's UVs equal them, corner by corner."""
    from backend.geometry.mesh import load_mesh
    from backend.geometry.primitives import uv_sphere

    v, f, uv = uv_sphere(12, 6, radius=0.4)
    uv = uv * 0.5 + 0.25  # not what xatlas would make
    mesh = {"positions": v.numpy().astype(np.float32), "faces": f.numpy().astype(np.int32), "uvs": uv.numpy().astype(np.float32)}
    if with_texture:
        mesh["texture"] = np.full((16, 16, 4), 90, np.uint8)
    with Client(server.endpoint, timeout=30) as client:
        (job,) = client.submit("refine", {"prompt": "a ball", "steps": 1}, mesh=mesh)
        assert isinstance(list(client.watch(job))[-1][1], Done)
        _, files = client.result(job)
    (tmp_path / "out.glb").write_bytes(files["out.glb"])
    out = load_mesh(tmp_path / "out.glb")
    assert out.faces.shape == f.shape
    np.testing.assert_allclose(out.uvs.numpy(), mesh["uvs"], rtol=0, atol=1e-6)  # float32 rounding of glTF's v flip
    assert not (server.store.root / "jobs" / job / "unwrap.json").exists()  # never unwrapped again


def test_a_batch_becomes_one_job_per_prompt(server):
    with Client(server.endpoint) as client:
        reply = client.request("submit", {"pipeline": "image2d", "spec": {"steps": 1}, "prompts": ["a cup", "a hat", "a key"]})
        jobs, batch = reply.body["jobs"], reply.body["batch"]
        assert len(jobs) == 3 and batch
        for job in jobs:
            assert isinstance(list(client.watch(job))[-1][1], Done)
        listed = client.request("list", {"batch": batch}).body["jobs"]
        assert sorted(r["id"] for r in listed) == sorted(jobs) and {r["spec"]["prompt"] for r in listed} == {"a cup", "a hat", "a key"}
        with pytest.raises(ServerError) as err:
            client.request("submit", {"pipeline": "image2d", "spec": {}, "prompts": ["a cup", ""]})
        assert err.value.field == "prompts[1]"


@contextlib.contextmanager
def serving_with_dealer(server_class, tmp_path):
    """A server of ``server_class`` on its own thread and a raw DEALER socket to it (requests by hand,
    replies in the order they come)."""
    srv = server_class(tmp_path / "data", bind="tcp://127.0.0.1:*", presets=("tiny",))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(srv.endpoint)
    try:
        yield srv, sock
    finally:
        sock.close(0)
        srv.stop()
        thread.join(15)


def send(sock, kind: str, rid: str, body: dict) -> None:
    sock.send_multipart(encode(Message(kind, rid, body)))


def replies(sock, n: int, what: str) -> dict:
    """The next ``n`` replies by request id."""
    out = {}
    while len(out) < n:
        assert sock.poll(30000), f"{what} never answered"
        msg = decode(sock.recv_multipart())
        out[msg.id] = msg
    return out


def gated_server() -> type[Server]:
    """A Server class whose tokenizer loads only when the test opens its own ``gate``."""
    gate = threading.Event()

    class Gated(Server):
        @staticmethod
        def load_tokenizer(preset):
            gate.wait(60)
            return Server.load_tokenizer(preset)

    Gated.gate = gate
    return Gated


GatedServer = gated_server()


def test_a_submit_waiting_for_its_tokenizer_does_not_stall_the_loop(tmp_path, tiny):
    with serving_with_dealer(GatedServer, tmp_path) as (srv, sock):
        send(sock, "submit", "a", {"pipeline": "image2d", "spec": {"prompt": "a cup", "steps": 2}})
        send(sock, "submit", "b", {"pipeline": "image2d", "spec": {"prompt": "x " * 200}})
        send(sock, "ping", "c", {})
        assert sock.poll(5000), "the ping got no answer while the tokenizer loads"
        first = decode(sock.recv_multipart())
        assert first.id == "c" and first.type == "ok"  # answered while both submits wait
        assert not sock.poll(300)
        GatedServer.gate.set()
        got = replies(sock, 2, "the parked submits were")
        assert got["a"].type == "ok" and len(got["a"].body["jobs"]) == 1
        assert got["b"].type == "error" and got["b"].body["field"] == "spec.prompt"  # too long, still refused


class FlakyServer(Server):
    """A server whose tokenizer loads fail (model files missing) until the test fixes them; loads wait
    for the gate, so several submits can be parked on one failing load."""

    missing = True
    gate = threading.Event()

    @staticmethod
    def load_tokenizer(preset):
        FlakyServer.gate.wait(60)
        if FlakyServer.missing:
            raise InvalidInputError("preset.prior: tokenizer files missing", field="preset")
        return Server.load_tokenizer(preset)


def test_a_failed_tokenizer_load_is_explained_to_every_waiting_submit_and_retried(tmp_path, tiny):
    with serving_with_dealer(FlakyServer, tmp_path) as (srv, sock):
        for rid in ("a", "b"):  # both parked on the one load, which fails
            send(sock, "submit", rid, {"pipeline": "image2d", "spec": {"prompt": "a cup"}})
        time.sleep(0.3)
        FlakyServer.gate.set()
        got = replies(sock, 2, "a parked submit was")
        assert all(r.type == "error" and r.body["field"] == "spec.preset" and "missing" in r.body["message"]
                   for r in got.values())
        send(sock, "ping", "p", {})  # the loop survived both refusals
        assert sock.poll(5000) and decode(sock.recv_multipart()).id == "p"
        FlakyServer.missing = False  # the files are fixed: the next submit loads again and is accepted
        with Client(srv.endpoint, timeout=60) as client:
            (job,) = client.submit("image2d", {"prompt": "a cup", "steps": 1})
            assert client.status(job)["state"] in ("queued", "running", "done")


def _follow_for(sess, seconds: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        sess.poll(0.05)


def test_a_submit_that_timed_out_before_a_server_came_up_never_runs(tmp_path, tiny):
    """Issue 12 (2): a submit reported as failed is never delivered later, by the blocking Client or
    by the add-on's Session (which lives on across the outage)."""
    from protocol.client import ConnectionLost
    from protocol.session import Session

    address = f"ipc://{tmp_path}/psd.sock"
    spec = {"pipeline": "image2d", "spec": {"prompt": "a ghost", "steps": 1}}
    sess = Session(address, heartbeat=60)
    with Client(address, timeout=0.5) as client:
        with pytest.raises(ConnectionLost) as err:
            client.submit("image2d", spec["spec"])
        assert not err.value.sent and err.value.key
        errors: list = []
        sess.request("submit", spec, on_error=errors.append, timeout=0.5)
        _follow_for(sess, 1.0)
        assert len(errors) == 1 and isinstance(errors[0], ConnectionLost) and not errors[0].sent
        srv = Server(tmp_path / "data", bind=address, presets=("tiny",))
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            replies: list = []
            sess.request("ping", on_reply=replies.append, timeout=30)
            _follow_for(sess, 2.0)  # the session reconnects and keeps going
            assert replies and sess.state.connected
            assert client.request("list", timeout=30).body["jobs"] == []  # no ghost job
            assert srv.store.list() == []
        finally:
            sess.close()
            srv.stop()
            thread.join(15)


SlowServer = gated_server()


def test_a_submit_that_timed_out_at_a_busy_server_is_found_again_by_its_key(tmp_path, tiny):
    """A submit that reached a server too busy to answer in time may still be accepted: resending it
    with the same key answers with the jobs it made, and makes no others."""
    from protocol.client import ConnectionLost

    with serving_with_dealer(SlowServer, tmp_path) as (srv, sock):
        with Client(srv.endpoint, timeout=1) as client:
            with pytest.raises(ConnectionLost) as err:
                client.submit("image2d", {"prompt": "a slow cup", "steps": 1})
            assert err.value.sent and err.value.key
            SlowServer.gate.set()
            client.timeout = 60
            first = client.submit("image2d", {"prompt": "a slow cup", "steps": 1}, key=err.value.key)
            again = client.submit("image2d", {"prompt": "a slow cup", "steps": 1}, key=err.value.key)
            assert first == again and [r["id"] for r in client.request("list").body["jobs"]] == first
        for rid in ("a", "b"):  # the same key twice from a raw client: one batch, both answers name it
            send(sock, "submit", rid, {"pipeline": "image2d", "spec": {"steps": 1}, "prompts": ["x", "y"], "key": "k1"})
        got = replies(sock, 2, "a keyed submit was")
        assert got["a"].body == got["b"].body and len(got["a"].body["jobs"]) == 2
        assert len(srv.store.list()) == 3
        send(sock, "submit", "c", {"pipeline": "image2d", "spec": {"prompt": "a cat"}, "key": 7})
        assert replies(sock, 1, "a bad key")["c"].body["field"] == "key"


def test_following_an_ended_job_that_was_seen_whole_ends_at_once_with_its_latest_snapshot(server):
    """The subscribe reply's ``last``: a client that saw every event of an ended job is told so (it
    no longer waits, or resubscribes, forever) and still gets the latest snapshot."""
    from protocol.session import Session

    with Client(server.endpoint) as client:
        (job,) = client.submit("image2d", {"prompt": "a cup", "steps": 1})
        last = [seq for seq, e in client.watch(job) if not isinstance(e, ImageSnapshot)][-1]
        t0 = time.monotonic()
        assert list(client.watch(job, after=last)) == [] and time.monotonic() - t0 < 5
    sess = Session(server.endpoint, heartbeat=0.2)
    try:
        got: list = []
        sess.follow(job, after=last)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            got.extend(sess.poll(0.05))
        assert sess.jobs[job].finished and not sess.busy
        assert [type(e.event) for e in got] == [ImageSnapshot]
    finally:
        sess.close()


def test_generate_with_the_mvdream_recipe_streams_meshes_a_texture_and_a_textured_glb(server, tmp_path):
    """generate --recipe mvdream (tiny MVDream twin, NeRF stage) over the real socket, end to end."""
    from backend.geometry.mesh import load_mesh
    from protocol.events import MeshSnapshot, TextureSnapshot

    with Client(server.endpoint, timeout=60) as client:
        with pytest.raises(ServerError) as err:
            client.submit("generate", {"prompt": "a wooden chair", "recipe": "nerf", "steps": 2})
        assert err.value.code == "unknown_name" and err.value.field == "spec.recipe" and "mvdream" in str(err.value)
        (job,) = client.submit("generate", {"prompt": "a wooden chair", "recipe": "mvdream", "steps": 2, "seed": 3})
        events = [e for _, e in client.watch(job)]
        assert isinstance(events[-1], Done), events[-1]
        assert any(isinstance(e, MeshSnapshot) for e in events)
        assert any(isinstance(e, TextureSnapshot) for e in events)
        assert {e.stage for e in events if isinstance(e, Progress)} == {"nerf"}
        _, files = client.result(job)
    (tmp_path / "out.glb").write_bytes(files["out.glb"])
    out = load_mesh(tmp_path / "out.glb")
    assert out.faces.shape[0] > 0 and out.uvs is not None and out.uvs.shape[0] > 0
    assert out.texture is not None and out.texture.shape[0] > 1 and out.texture.shape[1] > 1
