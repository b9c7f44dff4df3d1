"""The job index: the jobs of every scene in the open file, found by id on every call (undo and
file reloads invalidate held references). The bottom of the bpy layer: imports nothing of it."""

from __future__ import annotations

import bpy


def job_items():
    """(scene, job item) for every job of every scene in the open file."""
    for sc in bpy.data.scenes:
        for item in sc.psd3d.jobs:
            yield sc, item


def find_job(job: str):
    """(scene, job item) of the job with this id, or (None, None)."""
    for sc, item in job_items():
        if item.job_id == job:
            return sc, item
    return None, None


def open_jobs() -> list:
    """The job items still waiting for the backend (submitting, queued, running)."""
    return [item for _, item in job_items() if item.active]
