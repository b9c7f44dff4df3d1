"""The ``bpy.app.timers`` pump: each tick polls the session without blocking and applies what
arrived to the scene. Jobs are found by id in the scenes' job lists, objects and images by the
job id stored on them, every tick (undo and file reloads invalidate held references)."""

from __future__ import annotations

import traceback

import bpy
import numpy as np

from protocol.events import Done, Failed, MeshSnapshot, Progress, TextureSnapshot
from protocol.session import JobEvent

from ..core import frames, text
from . import assets, connection, jobs, notices, results, scene
from .jobs import find_job, job_items

ACTIVE_INTERVAL = 0.05  # seconds between ticks while jobs run
IDLE_INTERVAL = 1.0
SNAPSHOTS_KEY = "psd3d_snapshots"  # on an image: texture snapshots written into it


def ensure_timer() -> None:
    """Start the pump's timer (a submit, a file load, registering the add-on); once."""
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=0.05, persistent=True)


def stop_timer() -> None:
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)


def tick() -> float:
    """The timer callback: never raises (a raising timer is unregistered by Blender)."""
    try:
        return pump()
    except Exception:
        traceback.print_exc()
        return IDLE_INTERVAL


def pump(budget: float = 0.0) -> float:
    """One tick: follow the open jobs, apply their new events. Returns the next interval."""
    for sc in bpy.data.scenes:
        if not sc.psd3d.defaults_applied:
            sc.psd3d.apply_defaults(connection.prefs())
    for item in jobs.unanswered():
        item.state, item.message = "lost", "the file was closed before the backend answered its submit; submit again"
    open_jobs = [(sc, item) for sc, item in job_items() if item.active and item.job_id]
    sess = connection.current()
    if not open_jobs and sess is None:
        return IDLE_INTERVAL
    link_since = connection.link.since
    try:
        sess = connection.session()
    except connection.AddressError:  # said in the panel (connection.link); waits for new preferences
        if connection.link.since != link_since:
            notices.redraw()
        return IDLE_INTERVAL
    for _, item in open_jobs:
        if item.job_id not in sess.jobs:
            sess.follow(item.job_id, after=item.last_seq)
    changed = False
    for job_event in sess.poll(budget):
        changed |= apply(job_event)
    for job in [job for job, followed in sess.jobs.items() if followed.finished]:
        sess.unfollow(job)
    if changed or connection.link.since != link_since:
        notices.redraw()
    return ACTIVE_INTERVAL if open_jobs or sess.busy else IDLE_INTERVAL


def apply(job_event: JobEvent) -> bool:
    sc, item = find_job(job_event.job)
    if item is None:  # the job was removed from the list: stop following it
        connection.session().unfollow(job_event.job)
        return False
    event = job_event.event
    if isinstance(event, Progress):
        item.state, item.stage, item.step, item.total = "running", event.stage, event.step, event.total
        reward = event.metrics.get("reward_w", event.metrics.get("reward_current"))
        if reward is not None:
            item.reward = float(reward)
        item.last_seq = job_event.seq
    elif isinstance(event, MeshSnapshot):
        if item.pipeline == "refine":  # the artist's mesh is never rewritten
            return False
        obj = ensure_object(sc, item)
        # every mesh is fitted to Size: the prop ends as large as asked, however the shape grows on the way
        item.mesh_scale = frames.fit_size(frames.points_to_blender(event.positions), item.size)
        scene.apply_mesh(obj.data, event.positions, event.faces, event.uvs, event.topology_id, item.mesh_scale)
    elif isinstance(event, TextureSnapshot):
        image = scene.job_image(item.job_id)
        if image is None:
            if item.pipeline == "refine":
                return False  # the artist reverted and removed it
            ensure_object(sc, item)
            image = scene.job_image(item.job_id)
        scene.apply_texture(image, event.image)
        image[SNAPSHOTS_KEY] = image.get(SNAPSHOTS_KEY, 0) + 1
    elif isinstance(event, Done):
        item.state, item.last_seq = "done", job_event.seq  # step stays where it stopped (Stop & Keep)
        if event.final.get("target_reward") is not None:
            item.final_reward = float(event.final["target_reward"])
        scene.pack_job_images()  # a generated image is kept in the .blend only when packed
        if item.batch:
            assets.finish_batch_job(sc, item, event.final)
        results.fetch(item.job_id)
    elif isinstance(event, Failed):
        item.state = "cancelled" if event.code == "cancelled" else ("lost" if event.code == "unknown_job" else "failed")
        item.message = "cancelled" if item.state == "cancelled" else f"[{event.code}] {text.without_paths(event.message)}"
        item.last_seq = max(item.last_seq, job_event.seq)
        print(f"psd3d: job {item.job_id[:8]} ({item.prompt!r}) {item.state}: {event.message}")
    return True


def ensure_object(sc: bpy.types.Scene, item) -> bpy.types.Object:
    """The job's object, made at the 3D cursor if the file has none (a batch job, or one deleted)."""
    obj = scene.job_object(item.job_id)
    if obj is None:
        collection = assets.batch_collection(sc, item.batch) if item.batch else sc.collection
        obj = scene.new_job_object(item.job_id, assets.object_name(item), assets.placement(sc, item), collection)
    return obj


def running_summary() -> tuple[str, float] | None:
    """(text, fraction) of the open jobs, for the status bar: each job's whole progress, averaged."""
    open_jobs = [item for _, item in job_items() if item.active]
    if not open_jobs:
        return None
    first = open_jobs[0]
    text = f"PSD {jobs.progress(first)[1]}: {first.prompt[:32]}"
    if len(open_jobs) > 1:
        text += f" (+{len(open_jobs) - 1} more)"
    return text, float(np.clip(np.mean([jobs.progress(item)[0] for item in open_jobs]), 0, 1))
