"""The optimisation loop the geometry and texture stages share (Algorithm 1's outer loop): one
distillation update a step, a ``Progress`` event with the step's metrics record, a snapshot every
``snapshot_every`` steps and at the last, a checkpoint every ``checkpoint_every``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Callable, Iterator

import torch

from protocol.events import Progress
from backend.outputs import MetricsLog
from backend.psd.distill import StepOutput


class DistillationStage(ABC):
    name: str  # the Progress events' stage: "geometry" | "texture"
    step: int
    log: MetricsLog
    settings: "GeometrySettings | TextureSettings"  # noqa: F821 -- both have snapshot_every, checkpoint_every

    @abstractmethod
    def update(self, total: int) -> tuple[torch.Tensor, StepOutput, dict]:
        """One optimisation step: (its timesteps, the distiller's output, extra metrics for the record)."""

    @abstractmethod
    def snapshot_event(self):
        """The current result as a snapshot event (mesh or texture)."""

    @abstractmethod
    def save_checkpoint(self) -> None: ...

    def run(self, total: int, should_stop: Callable[[], bool], shown: int | None = None) -> Iterator:
        """Steps until ``total`` or until ``should_stop()``; either way the last event is a snapshot
        of the current state, so a client that stops a job holds exactly what the job keeps.
        ``shown``: the step whose snapshot the caller has already sent."""
        s = self.settings
        snapshot_at = shown
        while self.step < total and not should_stop():
            start = time.perf_counter()
            t, out, extra = self.update(total)
            self.step += 1
            record = self.log.add(self.step - 1, int(t[0]), out.reward_w, out.reward_l, out.beta_r,
                                  time.perf_counter() - start, stage=self.name, **extra)
            yield Progress(self.step, total, self.name, record)
            if self.step % s.snapshot_every == 0 or self.step == total:
                yield self.snapshot_event()
                snapshot_at = self.step
            if self.step % s.checkpoint_every == 0:
                self.save_checkpoint()
        if snapshot_at != self.step:
            yield self.snapshot_event()
