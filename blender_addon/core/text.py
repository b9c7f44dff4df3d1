"""Text shown to the artist: the backend's messages without the server's file paths (they mean
nothing on the artist's machine and leak the server's layout)."""

from __future__ import annotations

import re

# an absolute POSIX path of two or more parts, or a Windows drive path; the last part is kept
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-~+@]+){2,}[\\/]?")


def without_paths(message: str) -> str:
    """``message`` with every absolute file path replaced by its last part ("…/name")."""
    def short(match: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", match.group(0)) if p]
        return f"…/{parts[-1]}" if parts else match.group(0)

    return _PATH.sub(short, message)
