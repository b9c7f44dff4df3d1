"""The job index: the jobs of every scene in the open file, found by id on every call (undo and
file reloads invalidate held references). The bottom of the bpy layer: imports nothing of it."""

from __future__ import annotations

import uuid

import bpy

from protocol.specs import RECIPE_STAGES


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


def job_stages(item) -> tuple[str, ...]:
    """The job's stages in order (generate: its recipe's, protocol.specs.RECIPE_STAGES; refine:
    the texture stage); each has its share of the bar."""
    if item.pipeline == "refine":
        return ("texture",)
    return RECIPE_STAGES.get(item.recipe or "sd-dmtet", ())


def progress(item) -> tuple[float, str]:
    """The whole job's progress as (fraction, text): one bar over all its stages, which fills once."""
    if not item.total or item.state in ("submitting", "queued"):
        return 0.0, item.state
    stages = job_stages(item)
    stage_frac = min(item.step / item.total, 1.0)
    text = f"{item.stage} {item.step}/{item.total}"
    if item.stage in stages:
        index = stages.index(item.stage)
        frac = (index + stage_frac) / len(stages)
        if len(stages) > 1:
            text += f" (stage {index + 1} of {len(stages)})"
    else:
        frac = stage_frac
    if item.state == "done":
        frac = 1.0
        text = f"done, stopped at {text}" if item.step < item.total else "done"
    return frac, text


# -- submissions: a job is listed ("submitting") as soon as it is asked for; its id comes with the reply --
_submissions: set[str] = set()  # the submissions of this session still waiting for their reply


def new_submission() -> str:
    token = uuid.uuid4().hex
    _submissions.add(token)
    return token


def submission_items(token: str) -> list:
    """The job items still waiting for a submission's reply, by their index in it."""
    return sorted((item for _, item in job_items() if item.submission == token and item.state == "submitting"),
                  key=lambda item: item.index)


def end_submission(token: str) -> list:
    """The job items of a submission (by their index in it), which no longer waits for its reply."""
    _submissions.discard(token)
    return submission_items(token)


def resume_submission(token: str) -> None:
    """A submission of the open file waits for a reply again (its key was sent once more)."""
    _submissions.add(token)


def forget_submission(token: str) -> None:
    """No reply will come for this request: its items are unanswered again (and asked about again)."""
    _submissions.discard(token)


def unanswered() -> list:
    """Items still "submitting" whose reply this Blender no longer awaits (the file was reopened, Blender
    restarted): ``submits`` asks the backend about them by their key (the submission token)."""
    return [item for _, item in job_items() if item.state == "submitting" and item.submission not in _submissions]
