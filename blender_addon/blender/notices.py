"""What the add-on tells the artist outside an operator (a timer cannot ``report``): notices shown
in the Jobs panel until dismissed, and redraws of the areas that show the add-on's state.
The bottom of the bpy layer: imports nothing of it."""

from __future__ import annotations

from dataclasses import dataclass

import bpy

from ..core import text

KEEP = 5  # notices shown at most; older ones drop off


@dataclass
class Notice:
    text: str
    level: str = "ERROR"  # ERROR | WARNING | INFO (the panel's icon)


_notices: list[Notice] = []


def post(message: str, level: str = "ERROR") -> None:
    """Add a notice (the server's file paths shortened to their names) and redraw the panel."""
    _notices.append(Notice(text.without_paths(message), level))
    del _notices[:-KEEP]
    print(f"psd3d: {message}")
    redraw()


def notices() -> list[Notice]:
    return list(_notices)


def messages() -> list[str]:
    """The notices' texts, oldest first."""
    return [n.text for n in _notices]


def dismiss(index: int | None = None) -> None:
    """Forget one notice (by index) or all of them."""
    if index is None:
        _notices.clear()
    elif 0 <= index < len(_notices):
        del _notices[index]
    redraw()


def redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "STATUSBAR", "IMAGE_EDITOR", "PREFERENCES"):
                area.tag_redraw()
