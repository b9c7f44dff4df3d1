"""The one backend session the add-on holds, what the backend offered (hello), and a local
``psd3d serve`` started from the preferences. Module state, closed by ``shutdown`` on unregister."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import bpy
import zmq

from protocol.errors import Psd3dError
from protocol.session import Session
from protocol.wire import Message

_session: Session | None = None
_session_key: tuple | None = None
_server: subprocess.Popen | None = None
_offered: dict = {}  # the last hello reply
_preset_items: list = []  # EnumProperty items must outlive the callback (a Blender requirement)
DEFAULT_PRESETS = ("tiny", "sd21-draft", "sd21-paper")
HELLO_TIMEOUT = 10.0  # a backend just started (Start Local Backend) answers once it has bound


@dataclass
class Link:
    """What the add-on last learned of the backend: shown in the panel and the preferences."""

    state: str = "unknown"  # unknown | checking | ok | failed
    text: str = ""
    since: float = 0.0


link = Link()


class AddressError(Exception):
    """The preferences' address or CURVE keys cannot open a socket (a malformed address, unreadable keys)."""


_refused: tuple | None = None  # the (address, keys) that last failed to open, with its error


def addon_key() -> str:
    return __package__.rsplit(".", 1)[0]  # the add-on's package (bl_ext.<repo>.psd3d or blender_addon)


def prefs():
    return bpy.context.preferences.addons[addon_key()].preferences


def is_local(address: str) -> bool:
    return address.startswith(("ipc://", "inproc://", "tcp://127.", "tcp://localhost", "tcp://[::1]"))


def curve_keys(p) -> tuple[str, str] | None:
    """(client secret key file, server public key file) from the preferences, when CURVE is on."""
    return (bpy.path.abspath(p.client_key), bpy.path.abspath(p.server_key)) if p.use_curve else None


def session() -> Session:
    """The session for the address and keys in the preferences (made anew when they change).
    Raises ``AddressError`` (and says why in ``link``) when they cannot open one; the same
    address is not tried again, every timer tick, until the preferences change."""
    global _session, _session_key, _refused
    p = prefs()
    curve = curve_keys(p)
    key = (p.address, curve)
    if _session is None or _session.closed or key != _session_key:
        if _refused is not None and _refused[0] == key:
            raise AddressError(_refused[1])
        if _session is not None:
            _session.close()
        _session = _session_key = None
        try:
            _session = Session(p.address, curve=curve, texture_encoding="raw" if is_local(p.address) else "auto")
        except (zmq.ZMQError, OSError, ValueError, Psd3dError) as exc:
            reason = f"address: cannot connect to {p.address!r} ({exc}); write it as tcp://host:port"
            if curve is not None:
                reason += " and check the CURVE key files"
            _refused = (key, reason)
            _offered.clear()
            _set_link("failed", reason)
            raise AddressError(reason) from exc
        _refused = None
        _session_key = key
        _hello(_session)  # a new address: learn what it offers (presets for the panel) without waiting
    return _session


def check() -> None:
    """Ask the backend in the preferences for its hello (once: a fresh session has already asked);
    the answer, or the failure, lands in ``link`` and ``offered`` in a later poll."""
    sess = session()
    if link.state != "checking":
        _hello(sess)


def _hello(sess: Session) -> None:
    address = sess.address

    def ok(msg: Message) -> None:
        set_offered(msg.body)
        b = msg.body
        w = b.get("worker") or {}  # a Ray executor: its workers and GPUs, not the serve process's device
        where = (f"Ray: {len(w.get('workers', []))} workers, {w.get('gpus', 0):g} GPUs" if w.get("executor") == "ray"
                 else b.get("device", "?"))
        _set_link("ok", f"{b.get('server')} {b.get('version', '')} on {where} (protocol "
                        f"{b.get('protocol')}) at {address}; presets {', '.join(b.get('presets', []))}")

    def failed(exc: Exception) -> None:
        if sess.closed:  # replaced (a new address) or shut down: not an answer about the backend
            return
        _offered.clear()
        _set_link("failed", f"no backend at {address}: {exc}")
        print(f"psd3d: {link.text}")

    _set_link("checking", f"asking {address}...")
    sess.request("hello", on_reply=ok, on_error=failed, timeout=HELLO_TIMEOUT)


def _set_link(state: str, text: str) -> None:
    link.state, link.text, link.since = state, text, time.monotonic()


def current() -> Session | None:
    return _session


def offered() -> dict:
    return _offered


def set_offered(hello: dict) -> None:
    _offered.clear()
    _offered.update(hello)


def preset_items():
    names = tuple(_offered.get("presets") or DEFAULT_PRESETS)
    if [item[0] for item in _preset_items] != list(names):
        _preset_items[:] = [(n, n, f"Backend preset {n!r}") for n in names]
    return _preset_items


# -- a local backend --------------------------------------------------------------------------------
def find_psd3d(configured: str) -> str | None:
    if configured:
        path = bpy.path.abspath(configured)
        return path if os.access(path, os.X_OK) else None
    return shutil.which("psd3d")


def start_server(executable: str, address: str, data_dir: str, log_path: Path) -> subprocess.Popen:
    global _server
    if _server is not None and _server.poll() is None:
        return _server
    log = open(log_path, "ab")
    try:
        _server = subprocess.Popen([executable, "serve", "--bind", address, "--data", data_dir],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()
    return _server


def server_process() -> subprocess.Popen | None:
    return _server


def shutdown() -> None:
    """Close the socket and stop a server this add-on started (its jobs resume when it starts again)."""
    global _session, _session_key, _server, _refused
    if _session is not None:
        _session.close()
    _session = _session_key = _refused = None
    if _server is not None and _server.poll() is None:
        _server.terminate()
        try:
            _server.wait(10)
        except subprocess.TimeoutExpired:
            _server.kill()
    _server = None
    _offered.clear()
    _set_link("unknown", "")
