"""CURVE security: certificates (pyzmq ``zmq.auth`` format) and a ZAP allow-list.

``keys/`` layout: ``server.key`` + ``server.key_secret`` (the server's certificate) and
``clients/*.key`` (public certificates of the clients allowed in). CURVE without a ZAP
handler would encrypt but admit anyone holding the server's public key, so the server runs
a ZAP authenticator that accepts only the allow-listed keys, and reloads the folder when it
changes.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.errors import InvalidInputError


def new_certificate(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Create ``NAME.key`` (public, give it out) and ``NAME.key_secret`` (keep it) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / f"{name}.key").exists():
        raise InvalidInputError(f"name: {folder / name}.key already exists; pick another name", field="name")
    public, secret = zmq.auth.create_certificates(folder, name)
    return Path(public), Path(secret)


class CurveGuard:
    """Makes a socket a CURVE server and keeps a ZAP allow-list in sync with ``keys/clients``."""

    def __init__(self, ctx: zmq.Context, keys: str | Path) -> None:
        self.keys = Path(keys)
        secret = self.keys / "server.key_secret"
        if not secret.is_file():
            raise InvalidInputError(f"keys: no {secret}; create it with `psd3d keys new server --dir {self.keys}`", field="keys")
        self.public, self.secret = zmq.auth.load_certificate(secret)
        self.clients = self.keys / "clients"
        self.clients.mkdir(exist_ok=True)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self._stamp = None
        self.refresh()

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def refresh(self) -> None:
        """Reload the allow-list when the clients folder changed (called from the server loop)."""
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in self.clients.glob("*.key")))
        if stamp != self._stamp:
            self.auth.configure_curve(domain="*", location=str(self.clients))
            self._stamp = stamp

    def stop(self) -> None:
        self.auth.stop()

