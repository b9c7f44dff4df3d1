"""Issue 16, item 4: memory stays bounded and the loop stays responsive whatever clients do.
Real loopback sockets; each test names the limit it holds the server to."""

import contextlib
import threading
import time

import numpy as np
import pytest
import zmq

from protocol import messages, wire
from protocol.client import Client, ServerError
from protocol.wire import Message, decode, encode
from backend.server.server import Server


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
