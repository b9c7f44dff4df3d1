"""CURVE security: certificates (pyzmq ``zmq.auth`` format) and a ZAP allow-list.

``keys/`` layout: ``server.key`` + ``server.key_secret`` (the server's certificate) and
``clients/*.key`` (public certificates of the clients allowed in). CURVE without a ZAP
handler would encrypt but admit anyone holding the server's public key, so the server runs
a ZAP authenticator that accepts only the allow-listed keys.

The allow-list is this module's, not pyzmq's: it is reloaded while serving whenever the
``clients`` folder changes, applies every valid file, and skips a malformed file or a
dangling link with a logged warning (one bad file never keeps a removal from applying, and
never stops the server). CurveZMQ authenticates a connection once, at its handshake, so the
server also checks every request's authenticated key (the ZAP ``User-Id``, the client's
public key in z85) against the current list with :meth:`CurveGuard.admits`: a client
removed from ``clients/`` is refused from its next request on, on a connection already open.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.errors import InvalidInputError

log = logging.getLogger("psd3d.security")

REFRESH_S = 0.1  # the allow-list is re-read at most this often (a request after a removal waits no longer)


def new_certificate(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Create ``NAME.key`` (public, give it out) and ``NAME.key_secret`` (keep it) in ``folder``.

    The folder is made (or tightened to) 0700 and the secret file is 0600 from the moment it
    has its name: both are written in a private temporary folder first, then linked into place
    (never over an existing file)."""
    folder = Path(folder)
    if not name or "/" in name or name.startswith("."):
        raise InvalidInputError(f"name: {name!r} is not a plain file name", field="name")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # also an existing folder: it holds secrets
    public_path, secret_path = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public_path.exists() or secret_path.exists():
        raise InvalidInputError(f"name: {folder / name}.key already exists; pick another name", field="name")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".keys-") as tmp:  # mkdtemp: 0700
        public, secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        try:
            os.link(secret, secret_path)  # link: fails rather than replace a file made meanwhile
            os.link(public, public_path)
        except FileExistsError:
            raise InvalidInputError(f"name: {folder / name}.key already exists; pick another name", field="name") from None
    return public_path, secret_path


def load_allow_list(folder: Path) -> tuple[frozenset[bytes], list[str]]:
    """The z85 public keys of every valid ``*.key`` file in ``folder``, and a warning per file skipped
    (unreadable, a dangling link, no public key, a key that is not 40 z85 characters)."""
    keys, skipped = set(), []
    try:
        paths = sorted(folder.glob("*.key"))
    except OSError as exc:
        return frozenset(), [f"{folder}: cannot be read ({exc})"]
    for path in paths:
        try:
            public, _ = zmq.auth.load_certificate(path)
            if len(public) != 40 or len(zmq.utils.z85.decode(public)) != 32:
                raise ValueError("the public key is not 40 z85 characters")
        except Exception as exc:  # OSError (a dangling link, permissions), ValueError (malformed)
            skipped.append(f"{path}: skipped ({type(exc).__name__}: {exc})")
            continue
        keys.add(public)
    return frozenset(keys), skipped


def _stamp(folder: Path) -> tuple:
    """What changes when a file in the folder is added, removed, replaced or edited (dangling links too)."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".key"):
                    try:
                        st = os.stat(entry.path)  # follows links: a link's target counts
                        entries.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size))
                    except OSError:
                        entries.append((entry.name, None, None, None))
    except OSError:
        return ("unreadable",)
    return tuple(sorted(entries, key=lambda e: e[0]))


class CurveGuard:
    """Makes a socket a CURVE server and keeps a ZAP allow-list in sync with ``keys/clients``."""

    def __init__(self, ctx: zmq.Context, keys: str | Path) -> None:
        self.keys = Path(keys)
        secret = self.keys / "server.key_secret"
        if not secret.is_file():
            raise InvalidInputError(f"keys: no {secret}; create it with `psd3d keys new server --dir {self.keys}`", field="keys")
        self.public, self.secret = zmq.auth.load_certificate(secret)
        if self.secret is None:
            raise InvalidInputError(f"keys: {secret} holds no secret key", field="keys")
        self.clients = self.keys / "clients"
        self.clients.mkdir(exist_ok=True)
        self.allowed: frozenset[bytes] = frozenset()  # replaced whole: the ZAP thread reads it
        self._stamp = None
        self._checked = 0.0
        self.refresh(force=True)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    # the ZAP handler's question at each handshake (pyzmq's credentials-provider interface)
    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed

    def admits(self, user_id: str | None) -> bool:
        """Whether a request whose connection authenticated as ``user_id`` (the ZAP ``User-Id``: the
        client's public key in z85) is still on the allow-list; re-reads the folder if it is stale."""
        self.refresh()
        return user_id is not None and user_id.encode("ascii", "replace") in self.allowed

    def refresh(self, force: bool = False) -> None:
        """Reload the allow-list when the clients folder changed. Never raises: a bad file is skipped
        with a warning, and a folder that cannot be read keeps the list as it was (logged)."""
        now = time.monotonic()
        if not force and now - self._checked < REFRESH_S:
            return
        self._checked = now
        try:
            stamp = _stamp(self.clients)
            if stamp == self._stamp:
                return
            if stamp == ("unreadable",):
                log.warning("keys: %s cannot be read; the allow-list stays as it was", self.clients)
                return
            allowed, skipped = load_allow_list(self.clients)
            for line in skipped:
                log.warning("keys: %s", line)
            removed = len(self.allowed - allowed)
            self.allowed, self._stamp = allowed, stamp
            log.info("keys: %d client key(s) allowed (%d removed, %d file(s) skipped)", len(allowed), removed, len(skipped))
        except Exception:  # never stop the server over the allow-list
            log.exception("keys: reloading %s failed; the allow-list stays as it was", self.clients)

    def stop(self) -> None:
        self.auth.stop()
