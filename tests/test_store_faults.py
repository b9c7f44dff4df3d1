"""The server under faults (issue 16, items 1-3): one server per data folder, a damaged store that is
refused and rebuilt from the job folders without losing an acknowledged job, a worker that outlives
errors outside its pipelines, terminal state and event in one transaction, and a full disk."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from protocol.client import Client, ServerError
from protocol.errors import DataFolderInUseError, StoreDamagedError
from backend.jobs import store as store_module
from backend.jobs.store import DataLock, JobStore, rebuild
from backend.server.server import Server


def _serve(data, *extra):
    """A real ``psd3d serve`` process on an ephemeral loopback port."""
    return subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--bind", "tcp://127.0.0.1:*",
                             "--preset", "tiny", "--data", str(data), *extra],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


# -- item 1: one server per data folder ---------------------------------------------------------------
def test_a_second_server_on_the_same_data_folder_refuses_naming_the_holder(tmp_path, psd3d_home):
    data = tmp_path / "data"
    first = _serve(data)
    try:
        assert "listening on" in first.stderr.readline()
        second = _serve(data)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert "[data_in_use]" in err and f"pid {first.pid}" in err, err
        assert "Traceback" not in err
        assert (data / "server.lock").read_text().strip() == str(first.pid)
        first.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock, however it died
        first.wait(10)
        third = _serve(data)
        try:
            assert "listening on" in third.stderr.readline()
        finally:
            third.kill()
            third.wait(10)
    finally:
        first.kill()
        first.wait(10)


def test_the_lock_is_held_for_the_servers_life_and_released_after(tmp_path):
    srv = Server(tmp_path / "data", bind="tcp://127.0.0.1:*")
    with pytest.raises(DataFolderInUseError) as err:
        DataLock(tmp_path / "data")
    assert f"pid {os.getpid()}" in err.value.message and err.value.field == "data"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.stop()
    thread.join(15)
    DataLock(tmp_path / "data").release()  # free again once the server has stopped


# -- item 2: a damaged store never loses acknowledged jobs silently ----------------------------------
def _running(data):
    srv = Server(data, bind="tcp://127.0.0.1:*", presets=("tiny",))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


def _damage(data, how: str) -> None:
    path = data / "jobs.sqlite3"
    if how == "truncate":
        path.write_bytes(b"")
    elif how == "header":
        with open(path, "r+b") as fh:
            fh.write(b"this is not SQLite, it is garbage" * 4)
    else:
        path.unlink()
        for suffix in ("-wal", "-shm"):
            (data / f"jobs.sqlite3{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["truncate", "header", "delete"])
def test_a_damaged_store_is_refused_and_recovered_without_losing_an_acknowledged_job(tmp_path, tiny, how):
    from backend.cli import main

    data = tmp_path / "data"
    srv, thread = _running(data)
    try:
        with Client(srv.endpoint, timeout=60) as client:
            first = client.submit("image2d", {"prompt": "a red teapot", "steps": 2, "seed": 1})[0]
            assert [type(e).__name__ for _, e in client.watch(first)][-1] == "Done"
            rest = client.submit("image2d", {"steps": 2}, ["a blue teapot", "a green cup", "a tin box"])
    finally:
        srv.stop()
        thread.join(15)
    acknowledged = [first, *rest]
    _damage(data, how)
    with pytest.raises(StoreDamagedError) as err:  # refused, never served empty
        Server(data, bind="tcp://127.0.0.1:*", presets=("tiny",))
    assert err.value.code == "store_damaged" and f"psd3d jobs recover --data {data.resolve()}" in err.value.message
    assert main(["jobs", "recover", "--data", str(data)]) == 0
    assert list(data.glob("jobs.sqlite3.damaged-*")) or how == "delete"  # the damaged file is kept aside
    srv, thread = _running(data)
    try:
        with Client(srv.endpoint, timeout=60) as client:
            assert client.status(first)["state"] == "done"
            assert [type(e).__name__ for _, e in client.watch(first)][-1] == "Done"  # a watcher still ends
            for job in acknowledged:
                kinds = [type(e).__name__ for _, e in client.watch(job)]
                assert kinds[-1] == "Done", (job, kinds)
                assert client.status(job)["state"] == "done"
            body, files = client.result(first)
            assert "image.png" in files and body["final"]["steps_done"] == 2
            assert {j["id"] for j in client.request("list").body["jobs"]} == set(acknowledged)
    finally:
        srv.stop()
        thread.join(15)


def test_a_new_store_whose_rows_are_still_in_its_wal_is_not_taken_for_damage(tmp_path):
    writer = JobStore(tmp_path)
    job = writer.create("image2d", {"prompt": "a cat"})
    assert (tmp_path / "jobs.sqlite3-wal").stat().st_size > 0  # WAL mode: the row is not checkpointed yet
    reader = JobStore(tmp_path)
    assert reader.get(job).state == "queued"
    reader.close()
    writer.close()


def test_rebuild_keeps_the_submit_keys_so_a_resent_submit_finds_its_jobs(tmp_path):
    store = JobStore(tmp_path)
    ids = store.create_jobs("image2d", [{"prompt": "a"}, {"prompt": "b"}], "f" * 32, key="k1")
    store.close()
    (tmp_path / "jobs.sqlite3").unlink()
    with pytest.raises(StoreDamagedError):
        JobStore(tmp_path)
    made = rebuild(tmp_path)
    assert sorted(made["queued"]) == sorted(ids) and made["done"] == []
    store = JobStore(tmp_path)
    assert store.submitted("k1") == (ids, "f" * 32)
    assert all(store.get(j).resume and store.get(j).state == "queued" for j in ids)
    store.close()


def test_recover_refuses_a_healthy_store_and_a_folder_a_server_holds(tmp_path):
    from backend.cli import main

    JobStore(tmp_path).create("image2d", {"prompt": "a cat"})
    assert main(["jobs", "recover", "--data", str(tmp_path)]) == 2  # not damaged: nothing to do
    (tmp_path / "jobs.sqlite3").write_bytes(b"")
    lock = DataLock(tmp_path)  # a server holds the folder
    try:
        assert main(["jobs", "recover", "--data", str(tmp_path)]) == 2
    finally:
        lock.release()
    assert main(["jobs", "recover", "--data", str(tmp_path)]) == 0


# -- item 3: the worker never dies silently; state and event in one transaction; a full disk ----------
@pytest.fixture()
def server(tmp_path, tiny):
    srv, thread = _running(tmp_path / "data")
    yield srv
    srv.stop()
    thread.join(15)


def test_a_store_error_outside_the_pipeline_fails_that_job_and_the_worker_runs_the_next(server, monkeypatch):
    real = JobStore.set_progress
    calls = []

    def full_once(self, job_id, step, total):
        calls.append(job_id)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, job_id, step, total)

    monkeypatch.setattr(JobStore, "set_progress", full_once)
    with Client(server.endpoint, timeout=60) as client:
        hit, after = client.submit("image2d", {"steps": 2}, ["a red teapot", "a blue teapot"])
        events = [e for _, e in client.watch(hit)]
        assert type(events[-1]).__name__ == "Failed" and events[-1].code == "disk_full", events[-1]
        assert client.status(hit)["state"] == "failed" and client.status(hit)["error"]["code"] == "disk_full"
        assert [type(e).__name__ for _, e in client.watch(after)][-1] == "Done"  # the worker lived on
        assert client.status(after)["state"] == "done"
        worker = client.hello()["worker"]
        assert worker["alive"] and worker["errors"] == 1 and worker["last_error"]["code"] == "disk_full"
        assert client.request("ping").body["worker"]["alive"]


def test_a_terminal_state_and_its_event_commit_together(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("image2d", {"prompt": "a cat"})
    assert store.transition(job, ("queued",), "running")
    store._db.execute("CREATE TRIGGER no_events BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'injected'); END")
    with pytest.raises(sqlite3.DatabaseError):
        store.end(job, "done", {"job": job, "kind": "done", "outputs": {}, "final": {}}, final={})
    assert store.get(job).state == "running" and store.get(job).final is None and store.last_event(job) is None
    store._db.execute("DROP TRIGGER no_events")
    assert store.end(job, "done", {"job": job, "kind": "done", "outputs": {}, "final": {}}, final={}) == 1
    assert store.get(job).state == "done" and store.last_event(job)["kind"] == "done"
    assert store.end(job, "cancelled", {"job": job, "kind": "failed"}, before=("queued",)) is None  # not queued
    store.close()


def test_a_job_whose_end_cannot_be_written_is_failed_once_the_store_recovers(server):
    """The worker's terminal write fails (the event insert aborts): the job does not become done without
    its event; once the store accepts writes the job fails with a named code and the next job runs."""
    server.store._db.execute("CREATE TRIGGER no_done BEFORE INSERT ON events WHEN NEW.body LIKE '%\"kind\": \"done\"%' "
                             "BEGIN SELECT RAISE(ABORT, 'injected'); END")
    with Client(server.endpoint, timeout=60) as client:
        (job,) = client.submit("image2d", {"prompt": "a red teapot", "steps": 2})
        deadline = time.monotonic() + 60
        while server.executor.errors == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.executor.errors == 1
        assert client.status(job)["state"] == "failed"  # never done without its done event
        assert client.status(job)["error"]["code"] == "storage_error"
        assert [type(e).__name__ for _, e in client.watch(job)][-1] == "Failed"
        server.store._db.execute("DROP TRIGGER no_done")
        (nxt,) = client.submit("image2d", {"prompt": "a blue teapot", "steps": 2})
        assert [type(e).__name__ for _, e in client.watch(nxt)][-1] == "Done"


def test_submits_are_refused_while_the_disk_is_nearly_full(server, monkeypatch):
    monkeypatch.setattr(store_module, "disk_free", lambda path: store_module.MIN_FREE_BYTES - 1)
    with Client(server.endpoint, timeout=60) as client:
        with pytest.raises(ServerError) as err:
            client.submit("image2d", {"prompt": "a red teapot", "steps": 2})
        assert err.value.code == "disk_full" and "MiB" in str(err.value)
        assert client.request("list").body["jobs"] == []  # nothing acknowledged, nothing created
        assert client.hello()["worker"]["min_free_bytes"] == store_module.MIN_FREE_BYTES
        monkeypatch.setattr(store_module, "disk_free", lambda path: store_module.MIN_FREE_BYTES)
        (job,) = client.submit("image2d", {"prompt": "a red teapot", "steps": 2})
        assert [type(e).__name__ for _, e in client.watch(job)][-1] == "Done"


def test_temp_files_left_by_a_crash_are_cleaned_at_start(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("image2d", {"prompt": "a cat"})
    store.close()
    left = [tmp_path / "jobs" / job / ".metrics.json.abc123.tmp", tmp_path / "uploads" / ".x.glb.def456.tmp"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    srv = Server(tmp_path, bind="tcp://127.0.0.1:*")
    try:
        assert not any(path.exists() for path in left)
        assert (tmp_path / "jobs" / job / "job.json").is_file()
    finally:
        srv.socket.close(0)
        srv.store.close()
        srv.data_lock.release()
