"""protocol.session.Session, the add-on's non-blocking client, against a real ``psd3d serve``:
exactly-once in-order delivery across a hard server restart, snapshots after it, timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from protocol.client import ConnectionLost, ServerError
from protocol.events import Done, MeshSnapshot, Progress, TextureSnapshot
from protocol.session import Session


def _serve(address: str, data, env) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--bind", address, "--data", str(data),
                             "--preset", "tiny"], stderr=subprocess.PIPE, text=True, env=env)
    assert "listening on" in proc.stderr.readline()
    return proc


def _poll_until(sess: Session, done, timeout: float = 180.0, sink=None) -> None:
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < timeout, "timed out"
        for event in sess.poll(0.05):
            if sink is not None:
                sink.append(event)


def test_a_followed_job_survives_a_kill_9_of_the_server(tmp_path, psd3d_home):
    address = f"ipc://{tmp_path}/psd.sock"
    env = dict(os.environ, PSD3D_HOME=psd3d_home, HF_HUB_OFFLINE="1")
    proc = _serve(address, tmp_path / "data", env)
    sess = Session(address, heartbeat=0.5)
    try:
        got: list = []
        jobs: list = []
        sess.request("submit", {"pipeline": "generate", "spec": {"prompt": "a clay pot", "steps": 24}},
                     on_reply=lambda m: jobs.extend(m.body["jobs"]), timeout=180)
        _poll_until(sess, lambda: bool(jobs))
        sess.follow(jobs[0])
        _poll_until(sess, lambda: any(isinstance(e.event, Progress) and e.event.stage == "texture" for e in got), sink=got)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(1.0)  # a silence longer than the heartbeat: the ping fails
        sess.poll(0.1)
        proc = _serve(address, tmp_path / "data", env)  # same address: the job resumes from its checkpoint
        _poll_until(sess, lambda: any(isinstance(e.event, Done) for e in got), sink=got)
        seqs = [e.seq for e in got if isinstance(e.event, (Progress, Done))]
        assert seqs == list(range(1, len(seqs) + 1))  # each exactly-once event once, in order
        assert sess.state.connected
        kinds = {type(e.event) for e in got}
        assert MeshSnapshot in kinds and TextureSnapshot in kinds
        # resubscribing a finished job (a client that was away) brings its latest snapshots back
        late = Session(address)
        try:
            events: list = []
            late.follow(jobs[0], after=seqs[-1])
            _poll_until(late, lambda: {type(e.event) for e in events} >= {MeshSnapshot, TextureSnapshot}, sink=events)
        finally:
            late.close()
    finally:
        sess.close()
        proc.kill()
        proc.wait(10)


def test_errors_and_timeouts_reach_only_their_own_request(tmp_path, psd3d_home):
    address = f"ipc://{tmp_path}/psd.sock"
    env = dict(os.environ, PSD3D_HOME=psd3d_home, HF_HUB_OFFLINE="1")
    proc = _serve(address, tmp_path / "data", env)
    sess = Session(address)
    try:
        errors: list = []
        replies: list = []
        sess.request("status", {"job": "0" * 32}, on_error=errors.append)
        sess.request("submit", {"pipeline": "generate", "spec": {"prompt": "", "method": "x"}}, on_error=errors.append)
        sess.request("hello", on_reply=replies.append)
        _poll_until(sess, lambda: len(errors) == 2 and replies)
        assert all(isinstance(e, ServerError) for e in errors)
        assert {e.code for e in errors} == {"unknown_job", "invalid_input"} and errors[1].field == "spec.prompt"
        assert "tiny" in replies[0].body["presets"]
        sess.follow("1" * 32)  # a job the server does not know ends as failed, not as silence
        lost: list = []
        _poll_until(sess, lambda: bool(lost), sink=lost)
        assert lost[0].event.code == "unknown_job"
    finally:
        proc.kill()
        proc.wait(10)
    timeouts: list = []
    sess.request("ping", on_error=timeouts.append, timeout=0.2)
    _poll_until(sess, lambda: bool(timeouts), timeout=5)
    assert isinstance(timeouts[0], ConnectionLost) and not sess.state.connected
    sess.close()
