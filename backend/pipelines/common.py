"""What every pipeline shares: turning an unexpected exception into a Failed event."""

from __future__ import annotations

import traceback
from pathlib import Path

from protocol.events import Failed
from backend.files import atomic_write_bytes


def internal_failure(exc: BaseException, out_dir: Path) -> Failed:
    """A Failed event for a bug (not bad input); the traceback goes to ``error.txt`` in the job folder."""
    text = "".join(traceback.format_exception(exc))
    path = atomic_write_bytes(out_dir / "error.txt", text.encode())
    return Failed("internal", f"{type(exc).__name__}: {exc} (traceback in {path})")
