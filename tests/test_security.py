"""Key hygiene and the CURVE allow-list (issue 16, items 6 and 7), over real CURVE sockets on loopback:
secret keys private on disk; the clients/ reload applies every valid file, skips bad ones with a
warning and never stops the server; a removed client is refused from its next request on, also on
a connection that is already open."""

from __future__ import annotations

import logging
import shutil
import stat
import threading
import time

import pytest

from backend.server.security import CurveGuard, new_certificate
from backend.server.server import Server
from protocol.client import Client, ConnectionLost, ServerError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_files_are_written_private(tmp_path):
    folder = tmp_path / "keys"
    public, secret = new_certificate(folder, "server")
    assert _mode(secret) == 0o600, oct(_mode(secret))
    assert _mode(folder) == 0o700, oct(_mode(folder))
    assert _mode(public) & 0o077 in (0o044, 0o004, 0o040, 0)  # the public half may be readable
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    new_certificate(loose, "alice")  # an existing folder is tightened too: it now holds a secret
    assert _mode(loose) == 0o700 and _mode(loose / "alice.key_secret") == 0o600
    from protocol.errors import InvalidInputError

    with pytest.raises(InvalidInputError):  # never over an existing certificate
        new_certificate(folder, "server")


def test_the_cli_key_command_writes_private_keys(tmp_path):
    from backend.cli import main

    assert main(["keys", "new", "bob", "--dir", str(tmp_path / "k")]) == 0
    assert _mode(tmp_path / "k" / "bob.key_secret") == 0o600 and _mode(tmp_path / "k") == 0o700


@pytest.fixture()
def curve_server(tmp_path):
    keys = tmp_path / "keys"
    new_certificate(keys, "server")
    (keys / "clients").mkdir()
    people = {}
    for name in ("alice", "bob", "carol"):
        pub, secret = new_certificate(tmp_path / name, name)
        people[name] = (pub, (str(secret), str(keys / "server.key")))
    for name in ("alice", "bob"):
        shutil.copy(people[name][0], keys / "clients" / f"{name}.key")
    srv = Server(tmp_path / "data", bind="tcp://127.0.0.1:*", keys=keys)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, keys / "clients", people, thread
    srv.stop()
    thread.join(15)


def _admitted(srv, curve, timeout=3.0) -> bool:
    with Client(srv.endpoint, timeout=timeout, curve=curve) as client:
        try:
            return client.request("ping").type == "ok"
        except ConnectionLost:
            return False


def test_a_bad_file_in_clients_is_skipped_with_a_warning_and_removals_still_apply(curve_server, caplog):
    srv, clients, people, thread = curve_server
    assert _admitted(srv, people["alice"][1]) and _admitted(srv, people["bob"][1])
    assert not _admitted(srv, people["carol"][1], timeout=2)
    with caplog.at_level(logging.WARNING, logger="psd3d.security"):
        (clients / "broken.key").write_text("this is not a certificate\n")
        (clients / "garbage.key").write_text('metadata\ncurve\n    public-key = "short"\n')
        (clients / "gone.key").symlink_to(clients / "no-such-file.key")  # a dangling link
        (clients / "bob.key").unlink()  # bob is removed in the same reload
        shutil.copy(people["carol"][0], clients / "carol.key")  # carol is added
        time.sleep(1.5)
        assert thread.is_alive()  # the server did not stop
        assert _admitted(srv, people["alice"][1])
        assert _admitted(srv, people["carol"][1])  # every valid file applied
        assert not _admitted(srv, people["bob"][1], timeout=2)  # the removal applied despite the bad files
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for name in ("broken.key", "garbage.key", "gone.key"):
        assert name in warned, warned
    assert thread.is_alive()


def test_the_allow_list_skips_bad_files(tmp_path):
    keys = tmp_path / "keys"
    new_certificate(keys, "server")
    (keys / "clients").mkdir()
    pub, _ = new_certificate(tmp_path / "a", "alice")
    shutil.copy(pub, keys / "clients" / "alice.key")
    (keys / "clients" / "dangling.key").symlink_to(tmp_path / "nowhere")
    (keys / "clients" / "empty.key").write_text("")
    import zmq

    guard = CurveGuard(zmq.Context.instance(), keys)
    try:
        assert len(guard.allowed) == 1
        user = zmq.auth.load_certificate(pub)[0].decode()
        assert guard.admits(user) and not guard.admits(None) and not guard.admits("x" * 40)
    finally:
        guard.stop()


def test_a_removed_client_is_refused_on_its_open_connection(curve_server):
    """Revocation takes effect on the next request of a connection that is already open (CurveZMQ
    authenticates only at the handshake; the server checks each request's ZAP User-Id)."""
    srv, clients, people, thread = curve_server
    with Client(srv.endpoint, timeout=5, curve=people["alice"][1]) as alice, \
            Client(srv.endpoint, timeout=5, curve=people["bob"][1]) as bob:
        assert alice.request("ping").type == "ok" and bob.request("ping").type == "ok"
        socket = alice.socket
        (clients / "alice.key").unlink()
        removed = time.monotonic()
        with pytest.raises(ServerError) as refused:
            while True:  # the next request after the reload is refused; before it, at most ~0.1 s
                alice.request("ping")
                assert time.monotonic() - removed < 1.0, "still served a second after the removal"
                time.sleep(0.01)
        latency = time.monotonic() - removed
        assert refused.value.code == "unauthorized" and latency < 1.0, latency
        assert alice.socket is socket  # the same connection, answered (not dropped)
        with pytest.raises(ServerError):
            alice.request("list")
        assert bob.request("ping").type == "ok"  # others are served on
        shutil.copy(people["alice"][0], clients / "alice.key")  # added back: served again
        time.sleep(0.3)
        assert alice.request("ping").type == "ok"
    assert thread.is_alive()


def test_a_revoked_subscriber_gets_no_more_events(curve_server):
    """A subscription made before the removal ends with it: the publish path checks the key too."""
    srv, clients, people, thread = curve_server
    from protocol.wire import Message

    with Client(srv.endpoint, timeout=5, curve=people["alice"][1]) as alice:
        assert alice.request("ping").type == "ok"
        job = "a" * 32
        peer = next(iter(srv._users))  # alice's routing id, recorded at her request
        srv.subscribers.setdefault(job, set()).add(peer)
        srv.outbox.put((job, Message("event", "", {"job": job, "seq": 1, "kind": "progress", "step": 1, "total": 2,
                                                   "stage": "image2d", "metrics": {}})))
        assert alice.socket.poll(3000), "the event did not come while allowed"
        alice.socket.recv_multipart()
        (clients / "alice.key").unlink()
        time.sleep(0.3)
        srv.outbox.put((job, Message("event", "", {"job": job, "seq": 2, "kind": "progress", "step": 2, "total": 2,
                                                   "stage": "image2d", "metrics": {}})))
        assert not alice.socket.poll(1000), "an event went to a revoked client"
        assert peer not in srv.subscribers.get(job, set())
