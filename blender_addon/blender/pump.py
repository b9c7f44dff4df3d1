"""The ``bpy.app.timers`` pump: each tick polls the session without blocking and applies what
arrived to the scene. Texture snapshots are converted to Blender's float pixels on a worker
thread (``core.pixels``); a later tick writes the ready buffer, so the main thread's share of a
snapshot is Blender's own ``foreach_set``. Jobs are found by id in the scenes' job lists, objects and images by the
job id stored on them, every tick (undo and file reloads invalidate held references)."""

from __future__ import annotations

import traceback

import bpy
import numpy as np

from protocol.events import Done, Failed, MeshSnapshot, Progress, TextureSnapshot
from protocol.session import JobEvent

from ..core import frames, pixels, text
from . import assets, connection, jobs, notices, results, scene, submits
from .jobs import find_job, job_items

ACTIVE_INTERVAL = 0.05  # seconds between ticks while jobs run
IDLE_INTERVAL = 1.0
SNAPSHOTS_KEY = "psd3d_snapshots"  # on an image: texture snapshots written into it
_converter = pixels.TextureConverter()  # texture snapshots -> float pixels, off the main thread


def ensure_timer() -> None:
    """Start the pump's timer (a submit, a file load, registering the add-on); once."""
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=0.05, persistent=True)


def stop_timer() -> None:
    """Stop the timer and the texture converter's thread (unregistering the add-on)."""
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    _converter.close()


def show_texture(job: str, rgba) -> None:
    """Show an (H,W,4) uint8 texture (row 0 at the top) in the job's image: converted off the main
    thread, written by a later tick (or ``flush_textures``). The array is handed over, not copied."""
    _converter.submit(job, rgba)


def write_textures() -> bool:
    """Write the texture snapshots the converter has finished into their jobs' images (main thread:
    ``foreach_set`` of a ready float32 buffer). Returns whether one was written."""
    wrote = False
    for done in _converter.ready():
        try:
            if done.error is not None:
                print(f"psd3d: a texture snapshot of job {done.key[:8]} was not shown: {done.error}")
                continue
            image = scene.job_image(done.key)
            if image is None:  # removed meanwhile (a refine reverted, the object deleted)
                continue
            scene.apply_pixels(image, done.pixels, done.width, done.height)
            image[SNAPSHOTS_KEY] = image.get(SNAPSHOTS_KEY, 0) + 1
            wrote = True
        finally:
            _converter.release(done)
    return wrote


def flush_textures(job: str | None = None) -> bool:
    """Wait for the conversions of ``job`` (or of all jobs) and write them: for the moments that need
    the newest texture now (a job's end, a save)."""
    _converter.wait(job)
    return write_textures()


def tick() -> float:
    """The timer callback: never raises (a raising timer is unregistered by Blender)."""
    try:
        return pump()
    except Exception:
        traceback.print_exc()
        return IDLE_INTERVAL


def pump(budget: float = 0.0) -> float:
    """One tick: write the textures converted since the last, follow the open jobs, apply their new
    events. Returns the next interval."""
    wrote = write_textures()
    if wrote:
        notices.redraw()
    for sc in bpy.data.scenes:
        if not sc.psd3d.defaults_applied:
            sc.psd3d.apply_defaults(connection.prefs())
    open_jobs = [(sc, item) for sc, item in job_items() if item.active and item.job_id]
    sess = connection.current()
    if not open_jobs and sess is None and not jobs.unanswered() and not submits.waiting():
        return ACTIVE_INTERVAL if _converter.pending() else IDLE_INTERVAL
    link_since = connection.link.since
    try:
        sess = connection.session()
    except connection.AddressError:  # said in the panel (connection.link); waits for new preferences
        if connection.link.since != link_since:
            notices.redraw()
        return IDLE_INTERVAL
    submits.resume(sess)  # lost replies: the same submits again; reopened files' submits: asked about by key
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
    return ACTIVE_INTERVAL if open_jobs or sess.busy or _converter.pending() else IDLE_INTERVAL


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
        show_texture(item.job_id, event.image)  # converted off the main thread; a later tick writes it
    elif isinstance(event, Done):
        item.state, item.last_seq = "done", job_event.seq  # step stays where it stopped (Stop & Keep)
        if event.final.get("target_reward") is not None:
            item.final_reward = float(event.final["target_reward"])
        flush_textures(item.job_id)  # the final texture (Stop & Keep's too) is in the image before it is packed
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
