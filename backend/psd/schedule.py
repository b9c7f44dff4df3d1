"""Timestep schedules: Algorithm 1's annealed t(tau) and Algorithm 2's DDIM-like steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AnnealedSchedule:
    """Alg. 1 line 5, t(tau): t ~ U[t_min, t_max(tau)] with t_max annealed linearly from
    ``t_max_start`` to ``t_max_end`` over the first ``anneal_fraction`` of the run.
    Defaults: threestudio's SD guidance range [0.02, 0.98] (``min/max_step_percent``); the
    annealed upper bound 0.98 -> 0.5 follows ProlificDreamer's ``[0, 0.98, 0.5, 5001]`` of 25k steps."""

    t_min: float = 0.02
    t_max_start: float = 0.98
    t_max_end: float = 0.5
    anneal_fraction: float = 0.2

    def t_max(self, step: int, total: int) -> float:
        frac = min(1.0, step / max(1.0, self.anneal_fraction * total))
        return self.t_max_start + (self.t_max_end - self.t_max_start) * frac

    def sample(self, step: int, total: int, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        lo = int(self.t_min * num_train_timesteps)
        hi = max(lo + 1, int(self.t_max(step, total) * num_train_timesteps))
        t = torch.randint(lo, hi + 1, (1,), generator=generator)
        return t.expand(n).clone()


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
