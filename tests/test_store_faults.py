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
