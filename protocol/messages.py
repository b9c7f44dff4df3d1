"""Messages on top of the wire format: requests, replies, events, and pipeline specs.

Requests (client -> server): hello, submit, cancel, finish, status, list, subscribe, result, ping.
Every request gets exactly one reply: type "ok" (body = the answer) or "error" (body =
{code, field, message}). Events (server -> client) have type "event" and body
{job, seq, kind, ...}; snapshot arrays travel as raw frames.

The error contract (docs/protocol.md, "Errors"): ``bad_message`` only when the frames break the
wire format (``protocol.wire.decode``); inside a body, a name that is not one of the offered
choices is ``unknown_name`` and every other bad field (missing, unknown, wrong type, out of
range) is ``invalid_input``. ``field`` is the path inside the body (``spec.steps``,
``prompts[2]``, ``job``), or, for an uploaded array, ``arrays[i]`` (its index in the header's list).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from protocol import specs, wire
from protocol.errors import InvalidInputError, Psd3dError, require_choice
from protocol.png import decode_png, encode_png
from protocol.events import Done, Failed, ImageSnapshot, MeshSnapshot, Progress, TextureSnapshot
from protocol.specs import GenerateSpec, Image2dSpec, RefineSpec
from protocol.wire import Message, ProtocolError

REQUESTS = ("hello", "submit", "cancel", "finish", "status", "list", "subscribe", "result", "ping")
SPECS = {"image2d": Image2dSpec, "generate": GenerateSpec, "refine": RefineSpec}


def ok(request: Message, body: dict | None = None, arrays: dict | None = None) -> Message:
    return Message("ok", request.id, body or {}, arrays or {})


def error(request_id: str, exc: Psd3dError) -> Message:
    return Message("error", request_id, exc.to_dict())


UPLOADED_MESH_FIELD = {"refine": "mesh", "generate": "init_mesh"}  # the spec field a submit's mesh arrays fill


def spec_field_names(pipeline: str) -> tuple[str, ...]:
    """The fields of a pipeline's spec, read from its dataclass (the one place they are written)."""
    return tuple(f.name for f in dataclasses.fields(SPECS[pipeline]))


def check_pipeline(pipeline: Any) -> str:
    """A submit's ``pipeline``: one of :data:`SPECS`' names, else ``unknown_name``."""
    require_choice(pipeline, tuple(SPECS), "pipeline")
    return pipeline


def spec_from_body(pipeline: Any, fields: Any):
    """A pipeline spec from a submit body; an unknown pipeline and a missing or unknown field are
    named errors (``pipeline``, ``spec.NAME``). Its values are checked by :func:`validate_spec`."""
    check_pipeline(pipeline)
    if not isinstance(fields, dict):
        raise InvalidInputError("spec: must be a map of the pipeline's fields", field="spec")
    cls = SPECS[pipeline]
    known = set(spec_field_names(pipeline))
    for key in fields:
        if key not in known:
            raise InvalidInputError(f"spec.{key}: not a field of {pipeline} (fields: {', '.join(sorted(known))})",
                                    field=f"spec.{key}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in fields:
            raise InvalidInputError(f"spec.{name}: required for {pipeline}", field=f"spec.{name}")
    return cls(**fields)


def in_body(exc: Psd3dError, field: str) -> Psd3dError:
    """``exc`` renamed to the path of its field inside a request body (a spec's ``steps`` is
    ``spec.steps``; a batch's third prompt is ``prompts[2]``), its message too."""
    if exc.field is not None and exc.field != field:
        if exc.message.startswith(f"{exc.field}:"):
            exc.message = f"{field}:{exc.message[len(exc.field) + 1:]}"
            exc.args = (exc.message,)
        exc.field = field
    return exc


def spec_path(name: str, prompt_index: int | None = None) -> str:
    """Where a spec field lives in a submit body: ``spec.NAME``; a batch's prompt is ``prompts[i]``."""
    if prompt_index is not None and (name == "prompt" or name.startswith("prompt.")):
        return f"prompts[{prompt_index}]"
    return f"spec.{name}"


def validate_spec(spec, presets: tuple[str, ...], prompt_index: int | None = None) -> None:
    """``spec.validate`` with its errors named by their path in the submit body."""
    try:
        spec.validate(presets)
    except Psd3dError as exc:
        raise in_body(exc, spec_path(exc.field, prompt_index) if exc.field else "spec") from None


def limits() -> dict:
    """Every limit a client may meet, read from the constants that enforce them (``hello`` sends it)."""
    return {
        "header_bytes": wire.MAX_HEADER_BYTES, "frame_bytes": wire.MAX_FRAME_BYTES, "message_bytes": wire.MAX_MESSAGE_BYTES,
        "arrays": wire.MAX_ARRAYS, "array_elements": wire.MAX_ARRAY_ELEMENTS, "array_dims": wire.MAX_NDIM,
        "id_chars": wire.MAX_ID_CHARS, "prompt_chars": specs.MAX_PROMPT_CHARS, "steps": specs.MAX_STEPS,
        "seed": specs.MAX_SEED, "batch_prompts": specs.MAX_BATCH, "cameras": specs.MAX_CAMERAS,
        "max_t": [specs.MIN_T, specs.MAX_T], "vertices": MAX_VERTICES, "faces": MAX_FACES,
        "texture_side": MAX_TEXTURE_SIDE,
    }


def event_to_message(job_id: str, seq: int, event) -> Message:
    body: dict = {"job": job_id, "seq": seq}
    arrays: dict = {}
    if isinstance(event, Progress):
        body.update(kind="progress", step=event.step, total=event.total, stage=event.stage, metrics=event.metrics)
    elif isinstance(event, Done):
        body.update(kind="done", outputs=event.outputs, final=event.final)
    elif isinstance(event, Failed):
        body.update(kind="failed", code=event.code, message=event.message, field=event.field)
    elif isinstance(event, (ImageSnapshot, TextureSnapshot)):
        body.update(kind="image" if isinstance(event, ImageSnapshot) else "texture", step=event.step)
        arrays["image"] = event.image
    elif isinstance(event, MeshSnapshot):
        body.update(kind="mesh", step=event.step, topology_id=event.topology_id)
        arrays.update(positions=event.positions, faces=event.faces)
        if event.uvs is not None:
            arrays["uvs"] = event.uvs
    else:
        raise TypeError(f"not an event: {type(event).__name__}")
    return Message("event", "", body, arrays)


MAX_VERTICES = 2_000_000
MAX_FACES = 2_000_000
MAX_TEXTURE_SIDE = 8192
MESH_ARRAYS = ("positions", "faces", "uvs", "texture")


def check_mesh_arrays(arrays: dict) -> None:
    """An uploaded mesh (submit arrays): positions (V,3) float32, faces (F,3) int32 in [0, V),
    optional per-corner uvs (F,3,2) float32 and texture (H,W,4) uint8 — checked against the limits.
    Errors name the array as ``arrays[i]``, its index in the message's header."""
    index = {name: i for i, name in enumerate(arrays)}

    def need(cond: bool, name: str, reason: str) -> None:
        if not cond:
            where = f"arrays[{index[name]}]" if name in index else "arrays"
            raise InvalidInputError(f"{where}: {name}: {reason}", field=where)

    for name in arrays:
        need(name in MESH_ARRAYS, name, f"not a mesh array ({', '.join(MESH_ARRAYS)})")
    need("positions" in arrays and "faces" in arrays, "positions", "an uploaded mesh needs positions and faces")
    pos, faces = arrays["positions"], arrays["faces"]
    need(pos.dtype == np.float32 and pos.ndim == 2 and pos.shape[1] == 3 and 0 < pos.shape[0] <= MAX_VERTICES,
         "positions", f"must be (V,3) float32 with 0 < V <= {MAX_VERTICES}, got {pos.shape} {pos.dtype}")
    need(bool(np.isfinite(pos).all()), "positions", "contain NaN or inf")
    need(faces.dtype == np.int32 and faces.ndim == 2 and faces.shape[1] == 3 and 0 < faces.shape[0] <= MAX_FACES,
         "faces", f"must be (F,3) int32 with 0 < F <= {MAX_FACES}, got {faces.shape} {faces.dtype}")
    need(int(faces.min()) >= 0 and int(faces.max()) < pos.shape[0], "faces", f"indices must lie in [0, {pos.shape[0]})")
    if "uvs" in arrays:
        uvs = arrays["uvs"]
        need(uvs.dtype == np.float32 and uvs.shape == (faces.shape[0], 3, 2) and bool(np.isfinite(uvs).all()),
             "uvs", f"must be finite (F,3,2) float32 per corner, got {uvs.shape} {uvs.dtype}")
    if "texture" in arrays:
        tex = arrays["texture"]
        need(tex.dtype == np.uint8 and tex.ndim == 3 and tex.shape[2] == 4 and 0 < min(tex.shape[:2])
             and max(tex.shape[:2]) <= MAX_TEXTURE_SIDE, "texture",
             f"must be (H,W,4) uint8 RGBA up to {MAX_TEXTURE_SIDE} px, got {tex.shape} {tex.dtype}")
        need("uvs" in arrays, "texture", "a texture needs per-corner uvs")


PNG_AUTO_BYTES = 256 << 10  # "auto": images larger than this travel as PNG
TEXTURE_ENCODINGS = ("raw", "png", "auto")  # a subscribe's choice, kept per connection


def png_variant(msg: Message) -> Message:
    """The same image/texture event with its image as PNG bytes (for slow links)."""
    data = np.frombuffer(encode_png(np.ascontiguousarray(msg.arrays["image"])), np.uint8)
    return Message(msg.type, msg.id, {**msg.body, "encoding": "png"}, {"png": data})


def wants_png(encoding: str, msg: Message) -> bool:
    if msg.body.get("kind") not in ("image", "texture") or encoding == "raw":
        return False
    return encoding == "png" or msg.arrays["image"].nbytes > PNG_AUTO_BYTES


def message_to_event(msg: Message) -> tuple[str, int, Any]:
    """(job id, sequence number, event) from an event message."""
    b, a = msg.body, msg.arrays
    kind = b.get("kind")
    if kind == "progress":
        event = Progress(b["step"], b["total"], b["stage"], b.get("metrics", {}))
    elif kind == "done":
        event = Done(b["outputs"], b["final"])
    elif kind == "failed":
        event = Failed(b["code"], b["message"], b.get("field"))
    elif kind in ("image", "texture"):
        image = decode_png(a["png"].tobytes()) if b.get("encoding") == "png" else a["image"]
        event = (ImageSnapshot if kind == "image" else TextureSnapshot)(b["step"], image)
    elif kind == "mesh":
        event = MeshSnapshot(b["step"], a["positions"], a["faces"], a.get("uvs"), b["topology_id"])
    else:
        raise ProtocolError(f"kind: unknown event kind {kind!r}", field="kind")
    return b["job"], b["seq"], event
