"""Timestep schedules t(tau): Algorithm 1's deterministic annealing as the paper's 3D configs
run it, and Algorithm 2's DDIM-like steps.

The 3D stages follow Consistent Flow Distillation's ``configs/cfd/`` (the configs appendix F.1's
2- and 3-stage pipelines ran), whose ``timestep-scheduler`` (threestudio/models/t_scheduler.py)
turns a progress fraction into one timestep per step:
``t = round(T * (t_min + (t_max - t_min) * (1 - p)))`` with T = 1000, [t_min, t_max] =
``[min_step_percent, max_step_percent]`` = [0.02, 0.98], and p either DreamTime's
(Huang et al. 2023) inverse-CDF of a bell-shaped weight over t (``dreamtime_anneal``) or a
linear ramp (``linear_anneal_max``). Every view of a step shares its t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch

T_MIN, T_MAX = 0.02, 0.98  # min/max_step_percent of every configs/cfd/*.yaml t_scheduler


class TimestepSchedule(Protocol):
    def sample(self, step: int, total: int, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) long timesteps for ``step`` of ``total``."""
        ...

    def max_fraction(self) -> float:
        """The largest t / num_train_timesteps this schedule can return."""
        ...


def _timesteps(fraction: float, n: int, num_train_timesteps: int) -> torch.Tensor:
    t = min(num_train_timesteps - 1, max(0, round(num_train_timesteps * fraction)))
    return torch.full((n,), t, dtype=torch.long)


@lru_cache(maxsize=8)
def _dreamtime_tail(peaks: tuple[int, int, int, int]) -> tuple[float, ...]:
    """1 - CDF of DreamTime's weight over t = 0..999 (CFD's ``dt_w_normalized``)."""
    m1, m2, s1, s2 = peaks
    weights = [math.exp(-((i - m1) ** 2) / s1**2) if i > m1 else math.exp(-((i - m2) ** 2) / s2**2) if i < m2 else 1.0
               for i in range(1000)]
    total, running, tail = sum(weights), 0.0, []
    for w in weights:
        running += w
        tail.append(1.0 - running / total)
    return tuple(tail)


def dreamtime_fraction(progress: float, peaks: tuple[int, int, int, int], t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """DreamTime's t(tau) as CFD's ``TimestepScheduler.update_step`` computes it.

    ``peaks = (m1, m2, s1, s2)`` (``dreamtime_anneal``): the weight over integer t in [0, 1000)
    is 1 on [m2, m1], exp(-(t - m1)^2 / s1^2) above m1 and exp(-(t - m2)^2 / s2^2) below m2. The
    step at ``progress`` takes the t where the weight's upper tail mass equals ``progress``, mapped
    into [t_min, t_max]. Deterministic; decreasing from ~t_max to t_min."""
    tail = _dreamtime_tail(peaks)
    idx = min(range(1000), key=lambda i: abs(tail[i] - progress))
    return t_min + (t_max - t_min) * idx / 1000.0


@dataclass(frozen=True)
class DreamTimeSchedule:
    """Geometry stage: ``configs/cfd/sd-mesh-geometry-stage2.yaml`` ``t_scheduler.dreamtime_anneal:
    [700, 400, 100, 200]`` over [0.02, 0.98]: t falls from 979 to 20, lingering on 400..700."""

    peaks: tuple[int, int, int, int] = (700, 400, 100, 200)
    t_min: float = T_MIN
    t_max: float = T_MAX

    def fraction(self, step: int, total: int) -> float:
        return dreamtime_fraction(step / max(1, total), self.peaks, self.t_min, self.t_max)

    def sample(self, step: int, total: int, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        return _timesteps(self.fraction(step, total), n, num_train_timesteps)

    def max_fraction(self) -> float:
        return self.t_max


@dataclass(frozen=True)
class LinearAnnealSchedule:
    """t falls linearly from ``t_start`` to ``t_end`` (fractions of the diffusion schedule) over the run.

    Defaults: the texture stage, ``configs/cfd/sd-mesh-texture-stage3.yaml`` ``t_scheduler``:
    ``linear_anneal_max = linear_anneal_min = [0.6, 0.8]`` over [0.02, 0.98], i.e.
    t = 0.98 - 0.96 p with p from 0.6 to 0.8: t from 0.404 to 0.212 (404 -> 212). That stage refines
    a texture the earlier stages made, so it never starts from pure noise."""

    t_start: float = T_MAX - (T_MAX - T_MIN) * 0.6
    t_end: float = T_MAX - (T_MAX - T_MIN) * 0.8

    def fraction(self, step: int, total: int) -> float:
        p = min(1.0, step / max(1, total - 1))
        return self.t_start + (self.t_end - self.t_start) * p

    def sample(self, step: int, total: int, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        return _timesteps(self.fraction(step, total), n, num_train_timesteps)

    def max_fraction(self) -> float:
        return max(self.t_start, self.t_end)

    def capped(self, t_max: float) -> "LinearAnnealSchedule":
        """The same ramp with every t at most ``t_max`` (refine's strength)."""
        return LinearAnnealSchedule(min(self.t_start, t_max), min(self.t_end, t_max))


@dataclass(frozen=True)
class RandomAnnealedSchedule:
    """t ~ U[t_min(tau), t_max(tau)], both bounds annealed linearly over the first
    ``anneal_fraction`` of the run: threestudio's random SDS timesteps with annealed
    ``min/max_step_percent: [start_iter, start, end, end_iter]``. ``t_min_end`` None keeps t_min.

    MVDream's single stage (MVDream-threestudio ``configs/mvdream-sd21.yaml``,
    ``guidance.min_step_percent: [0, 0.98, 0.02, 8000]``, ``max_step_percent: [0, 0.98, 0.50, 8000]``
    of ``trainer.max_steps: 10000``) is :data:`MVDREAM_SCHEDULE`. The defaults here are the analytic
    test bed's (not a paper setting), where many particles average over t."""

    t_min: float = T_MIN
    t_max_start: float = T_MAX
    t_max_end: float = 0.5
    anneal_fraction: float = 0.2
    t_min_end: float | None = None

    def _progress(self, step: int, total: int) -> float:
        return min(1.0, step / max(1.0, self.anneal_fraction * total))

    def t_max(self, step: int, total: int) -> float:
        return self.t_max_start + (self.t_max_end - self.t_max_start) * self._progress(step, total)

    def t_low(self, step: int, total: int) -> float:
        if self.t_min_end is None:
            return self.t_min
        return self.t_min + (self.t_min_end - self.t_min) * self._progress(step, total)

    def sample(self, step: int, total: int, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        lo = int(self.t_low(step, total) * num_train_timesteps)
        hi = max(lo, int(self.t_max(step, total) * num_train_timesteps))
        t = torch.randint(lo, min(hi, num_train_timesteps - 1) + 1, (1,), generator=generator)
        return t.expand(n).clone()

    def max_fraction(self) -> float:
        return max(self.t_max_start, self.t_max_end)


MVDREAM_SCHEDULE = RandomAnnealedSchedule(t_min=0.98, t_min_end=0.02, t_max_start=0.98, t_max_end=0.50,
                                          anneal_fraction=8000 / 10000)


@dataclass(frozen=True)
class DdimLikeSchedule:
    """Alg. 2 lines 3-5: N update timesteps t_i spaced evenly from ``t_start`` down to
    ``t_end`` (a 50-step DDIM grid by default), each shifted by tau ~ U[T1, T2] = ``shift``."""

    t_start: int = 980
    t_end: int = 20
    shift: tuple[int, int] = (0, 19)

    def sample(self, step: int, total: int, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        frac = step / max(1, total - 1)
        base = round(self.t_start + (self.t_end - self.t_start) * frac)
        tau = int(torch.randint(self.shift[0], self.shift[1] + 1, (1,), generator=generator))
        t = min(num_train_timesteps - 1, max(0, base + tau))
        return torch.full((n,), t, dtype=torch.long)

    def max_fraction(self) -> float:
        return (self.t_start + self.shift[1]) / 1000.0
