"""Job outputs in the one schema the CLI, server, add-on and eval share (DESIGN.md "Job outputs").

``metrics.json``: ``{"steps": [{step, t, reward_w, reward_l, beta_r, seconds, ...}], "final": {...}}``;
``reward_curve.png``: those rewards over the steps; images as PNG, row 0 at the top.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from backend.files import atomic_write_bytes, atomic_write_json


def _clean(value):
    """JSON-safe scalars: tensors -> floats/lists, non-finite -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def config_to_json(config) -> dict:
    """A dataclass config as JSON-safe values (enums by value): saved with every job."""
    from dataclasses import asdict
    from enum import Enum

    def conv(v):
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(asdict(config))


def mean_or_none(value) -> float | None:
    if value is None:
        return None
    return float(value.float().mean()) if hasattr(value, "float") else float(value)


class MetricsLog:
    """Step records plus final metrics; written atomically as ``metrics.json``."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.final: dict = {}

    def add(self, step: int, t: int, reward_w=None, reward_l=None, beta_r=None, seconds: float = 0.0, **extra) -> dict:
        record = {"step": step, "t": int(t), "reward_w": mean_or_none(reward_w), "reward_l": mean_or_none(reward_l),
                  "beta_r": mean_or_none(beta_r), "seconds": round(float(seconds), 6)}
        record.update({k: _clean(v) for k, v in extra.items()})
        self.steps.append(record)
        return record

    def to_dict(self) -> dict:
        return {"steps": self.steps, "final": {k: _clean(v) for k, v in self.final.items()}}

    def write(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())


def to_rgba8(image) -> np.ndarray:
    """A (1,3,H,W) or (3,H,W) tensor in [0,1] -> (H,W,4) uint8 RGBA, row 0 on top."""
    arr = image.detach().float().cpu().clamp(0, 1).numpy()
    arr = arr[0] if arr.ndim == 4 else arr
    rgb = (arr.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    return np.concatenate([rgb, alpha], axis=2)


def png_bytes(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def save_png(rgba: np.ndarray, path: str | Path) -> Path:
    return atomic_write_bytes(path, png_bytes(rgba))


def plot_reward_curve(metrics: dict, path: str | Path, title: str = "") -> Path:
    """Winner/loser rewards of the pair steps and the current result's reward over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = metrics["steps"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key, label, style in (("reward_w", "winner x̂0", "-"), ("reward_l", "loser x̂0", "-"),
                              ("reward_current", "current result", "o-")):
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, label=label, linewidth=1, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("target reward")
    ax.set_title(title[:80], fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
