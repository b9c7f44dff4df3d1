"""The Ray executor on one local Ray cluster with two fake GPUs (module-scoped: Ray starts once), tiny
preset, real sockets: two jobs at once on two actors; an actor's process killed mid-job resumes from its
checkpoint and ends with the uninterrupted run's result; cancel and finish; a serve restart."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest

from protocol.client import Client
from protocol.events import Done, Progress
from backend.jobs.store import JobStore
from backend.pipelines.presets import PRESETS
from backend.server.server import Server

REFINE = {"prompt": "a leather ball", "steps": 8, "seed": 5}  # tiny: a checkpoint every 4 steps


def test_a_plain_serve_never_imports_ray():
    code = "import sys, backend.server.server, backend.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


OBJECT_STORE = 80 * 2**20  # per node (Ray's minimum is 75 MiB)


@pytest.fixture(scope="module")
def ray_auth():
    """Token authentication on, explicitly (Ray 2.60's default), with a token of this module's own; set
    before Ray is imported, which reads its configuration once. The Ray processes the tests start, and
    their serve processes, inherit it."""
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    yield pytest.importorskip("ray")
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def ray_cluster(psd3d_home, ray_auth):
    ray = ray_auth
    ray.init(num_cpus=2, num_gpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _progress_until(client, job: str, step: int) -> list[tuple[int, int]]:
    """(seq, step) of the job's progress events, watched until one reaches ``step``."""
    seen = []
    for seq, event in client.watch(job):
        if isinstance(event, Progress):
            seen.append((seq, event.step))
            if event.step >= step:
                break
    return seen


def _ray_server(data, **config):
    from backend.server.ray_executor import RayConfig, RayExecutor

    executor = partial(RayExecutor, config=RayConfig(workers=2, threads=1, **config))
    srv = Server(data, bind="tcp://127.0.0.1:*", presets=tuple(PRESETS), executor=executor)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, ray_cluster, tiny):
    """One server and its two actors for the tests that share them (an actor takes ~15 s to start here)."""
    srv, thread = _ray_server(tmp_path_factory.mktemp("ray") / "data")
    srv.stop_and_wait = lambda: (srv.stop(), thread.join(30))
    yield srv
    srv.stop_and_wait()


def _ball_upload(tmp_path) -> dict:
    from backend.geometry.mesh import Mesh, load_mesh, save_glb
    from backend.geometry.primitives import uv_sphere

    v, f, uv = uv_sphere(16, 8, radius=0.4)
    save_glb(Mesh(v, f.long(), uv, np.full((16, 16, 4), 180, np.uint8)), tmp_path / "ball.glb")
    ball = load_mesh(tmp_path / "ball.glb")
    return {"positions": ball.positions.numpy(), "faces": ball.faces.numpy().astype(np.int32),
            "uvs": ball.uvs.numpy(), "texture": ball.texture}


def _texture(tmp_path, client, job, name):
    from backend.geometry.mesh import load_mesh

    _, files = client.result(job)
    (tmp_path / name).write_bytes(files["out.glb"])
    return load_mesh(tmp_path / name).texture


def _wait(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_jobs_run_at_once_and_a_killed_worker_resumes_with_the_same_result(ray_server, tmp_path):
    upload = _ball_upload(tmp_path)
    store = ray_server.store
    with Client(ray_server.endpoint, timeout=60) as client:
        hello = client.hello()
        assert hello["worker"]["executor"] == "ray" and hello["worker"]["gpus"] == 2
        assert [w["name"] for w in hello["worker"]["workers"]] == ["ray-0", "ray-1"]
        # the device is the workers' (fake GPUs: torch sees none there), not the serve process's own
        _wait(lambda: all(w["state"] == "idle" for w in client.hello()["worker"]["workers"]))
        assert client.hello()["device"] == f"ray: cpu on {socket.gethostname()} x2"
        (plain,) = client.submit("refine", REFINE, mesh=upload)
        (killed,) = client.submit("refine", REFINE, mesh=upload)
        # both run at once, each on its own actor
        _wait(lambda: all(client.status(j)["state"] == "running" and client.status(j)["worker"] for j in (plain, killed)))
        workers = {client.status(j)["worker"] for j in (plain, killed)}
        assert len(workers) == 2 and all(w.startswith("ray-") for w in workers)
        assert {w["state"] for w in client.hello()["worker"]["workers"]} == {"busy"}
        seen = _progress_until(client, killed, 6)  # past the checkpoint at step 4
        lane = next(lane for lane in ray_server.executor.lanes if lane.job == killed)
        os.kill(lane.info["pid"], signal.SIGKILL)  # the actor's process, mid-job
        rest = list(client.watch(killed, after=seen[-1][0]))
        assert client.status(killed)["state"] == "done" and client.status(plain)["state"] == "done"
        steps = [s for _, s in seen] + [e.step for _, e in rest if isinstance(e, Progress)]
        resumed = steps[len(seen):]
        assert resumed[0] <= 5 and resumed[-1] == 8 and resumed == list(range(resumed[0], 9))  # no gap past step 4
        assert set(steps) == set(range(1, 9))
        bodies = store.events_after(killed, 0)
        assert [b["seq"] for b in bodies] == list(range(1, len(bodies) + 1))  # exactly once, in order
        assert [b["kind"] for b in bodies].count("done") == 1 and bodies[-1]["kind"] == "done"
        folder = store.folder(killed)
        assert not list(folder.rglob(".*.tmp"))  # nothing half-written left
        assert (folder / "checkpoints").is_dir() and (folder / "out.glb").is_file()  # the actor wrote the server's folder
        assert np.array_equal(_texture(tmp_path, client, killed, "killed.glb"), _texture(tmp_path, client, plain, "plain.glb"))
        # the restarted actor (max_restarts) took jobs again: a third one runs on the pool
        (third,) = client.submit("image2d", {"prompt": "a red teapot", "steps": 2})
        assert isinstance(list(client.watch(third))[-1][1], Done)


def test_cancel_and_finish_stop_a_ray_worker_within_a_step(ray_server):
    with Client(ray_server.endpoint, timeout=60) as client:
        (cancelled,) = client.submit("image2d", {"prompt": "a lamp", "steps": 400})
        (finished,) = client.submit("image2d", {"prompt": "a chair", "steps": 400})
        steps = {}
        for job, act in ((cancelled, client.cancel), (finished, client.finish)):
            _wait(lambda: client.status(job)["step"] >= 2)
            steps[job] = client.status(job)["step"]
            act(job)
        _wait(lambda: client.status(cancelled)["state"] == "cancelled" and client.status(finished)["state"] == "done",
              timeout=30)
        # the worker stopped within a few (tiny, ~0.1 s) steps of the request: the flag is polled every step
        final = client.status(finished)
        assert final["step"] <= steps[finished] + 5 and len(final["final"]) > 0
        assert ray_server.store.get(cancelled).step <= steps[cancelled] + 5
        # both actors are free again at once (their jobs stopped, not ran on): two new jobs run together
        (a,) = client.submit("image2d", {"prompt": "a cup", "steps": 2})
        (b,) = client.submit("image2d", {"prompt": "a mug", "steps": 2})
        _wait(lambda: client.status(a)["state"] == "done" and client.status(b)["state"] == "done", timeout=30)
        assert client.status(cancelled)["error"]["code"] == "cancelled"


def test_a_worker_that_answers_after_a_failure_is_ended_before_its_job_runs_again(ray_server):
    """An ActorUnavailableError may be a network blip with the job still running there: before the job is
    requeued, the lane makes sure the process that ran it is gone (killed if it still answers)."""
    executor = ray_server.executor
    lane = next(lane for lane in executor.lanes if lane.job is None and lane.state == "idle")
    old = lane.info["pid"]
    executor._confirm_gone(lane, old)
    assert lane.handle is not None and lane.info["pid"] != old and lane.state == "idle"
    _wait(lambda: not os.path.exists(f"/proc/{old}"), timeout=30)


def test_a_stopped_serve_puts_its_running_job_back_in_the_queue_and_frees_its_gpus(ray_server, ray_cluster):
    with Client(ray_server.endpoint, timeout=60) as client:
        (job,) = client.submit("image2d", {"prompt": "a vase", "steps": 400})
        _wait(lambda: client.status(job)["step"] >= 2)
    ray_server.stop_and_wait()
    store = JobStore(ray_server.store.root)  # the server closed its own
    row, last = store.get(job), store.last_event(job)
    store.close()
    assert row.state == "queued" and row.resume and row.step < 400  # stopped at a step, resumes on the next start
    assert last["kind"] == "progress"  # no terminal event
    _wait(lambda: ray_cluster.available_resources().get("GPU") == 2, timeout=60)  # its actors are gone


def _ray_serve_args(address: str) -> tuple[str, ...]:
    """``psd3d serve --executor ray`` joined to the test cluster (its token in the env), one worker."""
    return ("--executor", "ray", "--ray-address", address, "--ray-workers", "1")


def _worker_pid(client) -> int:
    _wait(lambda: client.hello()["worker"]["workers"][0]["pid"] is not None)
    return client.hello()["worker"]["workers"][0]["pid"]


def test_a_serve_killed_mid_job_takes_its_actors_along_and_its_restart_redispatches(tmp_path, ray_cluster, ray_server,
                                                                                     serve_process):
    """kill -9 of the serve process: its (non-detached) actors die with their owner, so nothing writes the
    job's folder any more; the restarted serve requeues the job onto a new actor, which resumes it."""
    ray_server.stop_and_wait()  # both GPUs free for this test's own serve processes
    _wait(lambda: ray_cluster.available_resources().get("GPU") == 2, timeout=60)
    upload = _ball_upload(tmp_path)
    address = ray_cluster.get_runtime_context().gcs_address
    proc, endpoint = serve_process(tmp_path / "data", *_ray_serve_args(address))
    try:
        with Client(endpoint, timeout=60) as client:
            (job,) = client.submit("refine", REFINE, mesh=upload)
            _progress_until(client, job, 5)
            old_actor = _worker_pid(client)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        def gone() -> bool:
            try:
                os.kill(old_actor, 0)
            except ProcessLookupError:
                return True
            return False
        _wait(gone, timeout=60)
        proc, endpoint = serve_process(tmp_path / "data", *_ray_serve_args(address))
        with Client(endpoint, timeout=60) as client:
            events = list(client.watch(job))
            assert isinstance(events[-1][1], Done) and client.status(job)["state"] == "done"
            steps = [e.step for _, e in events if isinstance(e, Progress)]
            assert set(steps) == set(range(1, 9)) and steps[-1] == 8
        store = JobStore(tmp_path / "data")
        kinds = [b["kind"] for b in store.events_after(job, 0)]
        store.close()
        assert kinds.count("done") == 1 and kinds[-1] == "done"
    finally:
        proc.kill()
        proc.wait(10)


def test_a_node_leaving_mid_job_moves_its_job_to_another_nodes_gpu(tmp_path, ray_auth, tiny, serve_process):
    """A multi-node cluster on this machine (``ray.cluster_utils.Cluster``): a head without GPUs, node A
    with one. A job runs on A's actor; A leaves (every process of it killed) with no GPU left in the
    cluster; node B joins with one. The job moves to an actor on B and resumes from its checkpoint: no step
    past the checkpoint missing, one ``done``, the whole result."""
    from ray.cluster_utils import Cluster

    upload = _ball_upload(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                                            "object_store_memory": OBJECT_STORE})
    proc = None
    try:
        node_a = cluster.add_node(num_cpus=0, num_gpus=1, object_store_memory=OBJECT_STORE)
        proc, endpoint = serve_process(tmp_path / "data", "--executor", "ray", "--ray-address", cluster.address)
        with Client(endpoint, timeout=60) as client:
            (job,) = client.submit("refine", REFINE, mesh=upload)
            seen = _progress_until(client, job, 5)  # past the checkpoint at step 4
            (worker,) = client.hello()["worker"]["workers"]
            assert worker["node"] == node_a.node_id and worker["job"] == job
            # A node that vanishes takes its workers with it at once. remove_node kills only A's Ray daemons; the
            # actor's process would notice a moment later and could finish the job first (seen on a CI run).
            os.kill(worker["pid"], signal.SIGKILL)
            cluster.remove_node(node_a, allow_graceful=False)
            assert client.status(job)["state"] in ("running", "queued"), "the job ended before its node left"
            node_b = cluster.add_node(num_cpus=0, num_gpus=1, object_store_memory=OBJECT_STORE)
            _wait(lambda: client.status(job)["state"] in ("done", "failed", "cancelled"), timeout=180)
            (worker,) = client.hello()["worker"]["workers"]
            assert worker["node"] == node_b.node_id and worker["state"] == "idle"
            rest = list(client.watch(job, after=seen[-1][0]))
            assert isinstance(rest[-1][1], Done) and client.status(job)["state"] == "done"
            steps = [s for _, s in seen] + [e.step for _, e in rest if isinstance(e, Progress)]
            # 1..k on node A, then once back to the checkpoint at step 4 and on to 8 on node B: no gap past it
            back = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
            assert len(back) == 1, steps
            on_a, on_b = steps[:back[0]], steps[back[0]:]
            assert on_a == list(range(1, len(on_a) + 1)) and 5 <= len(on_a) < 8
            assert on_b == list(range(5, 9))
            _, files = client.result(job)
        (tmp_path / "moved.glb").write_bytes(files["out.glb"])
        from backend.geometry.mesh import load_mesh

        assert load_mesh(tmp_path / "moved.glb").texture.shape[0] > 0  # the whole result, readable
        store = JobStore(tmp_path / "data")
        bodies = store.events_after(job, 0)
        store.close()
        assert [b["seq"] for b in bodies] == list(range(1, len(bodies) + 1))  # exactly once, in order
        assert [b["kind"] for b in bodies].count("done") == 1 and bodies[-1]["kind"] == "done"
        assert not list((tmp_path / "data").rglob(".*.tmp"))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        cluster.shutdown()
