"""The wire format: one msgpack header frame, then one raw frame per array.

Header (a msgpack map): ``{"v": PROTOCOL_VERSION, "type": str, "id": str, "body": map,
"arrays": [{"name": str, "dtype": str, "shape": [int, ...], "frame": int}, ...]}``.
Array frames are C-order, little-endian bytes; ``frame`` is the frame's index in the
message (1 = the first frame after the header). Decoding checks every claim against the
limits below *before* allocating anything, and turns every defect into a
:class:`ProtocolError` that names the field and the reason. Standard library, msgpack and
numpy only (the Blender add-on imports this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

from protocol.errors import Psd3dError

PROTOCOL_VERSION = 1

# -- limits (checked before anything is allocated) ----------------------------------------------
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of msgpack header
MAX_FRAME_BYTES = 256 << 20  # one array frame
MAX_MESSAGE_BYTES = 512 << 20  # the whole message; also ZMQ_MAXMSGSIZE on every socket
MAX_ARRAYS = 16
MAX_ARRAY_ELEMENTS = 1 << 28  # 268M: an 8192² RGBA texture (messages.MAX_TEXTURE_SIDE), = MAX_FRAME_BYTES of uint8
MAX_NDIM = 4
MAX_ID_CHARS = 128
# ZMTP heartbeats on every socket (server and clients): a peer silent for the timeout is dropped by libzmq
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 3 * HEARTBEAT_IVL_MS
DTYPES = ("uint8", "int32", "uint32", "int64", "float16", "float32", "float64")


class ProtocolError(Psd3dError):
    """A message that does not follow the wire format (bad msgpack, wrong types, bad claims).
    ``request_id``: the message's ``id`` when the header could be read that far, else ""; the
    error reply carries it, so a client matching replies by id gets this one."""

    code = "bad_message"
    request_id = ""


class MessageTooLargeError(ProtocolError):
    """A message with more frames than a header and ``MAX_ARRAYS`` arrays, or more than
    ``MAX_MESSAGE_BYTES`` in all: refused before its frames are kept (its id is not read)."""

    code = "message_too_large"


@dataclass
class Message:
    type: str
    id: str = ""
    body: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION


def encode(message: Message) -> list[Any]:
    """Frames for ``socket.send_multipart(frames, copy=False)``: the header bytes, then each array
    as a buffer (no copy for C-contiguous little-endian arrays; the caller must not modify an
    array until the send completes)."""
    descriptors, frames = [], []
    for index, (name, array) in enumerate(message.arrays.items(), start=1):
        arr = np.asarray(array)
        if arr.dtype.name not in DTYPES:
            raise ProtocolError(f"arrays.{name}: dtype {arr.dtype} is not one of {', '.join(DTYPES)}", field=f"arrays.{name}")
        little = arr.dtype.newbyteorder("<")
        if not arr.flags.c_contiguous or arr.dtype != little:
            arr = np.array(arr, dtype=little, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        descriptors.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "frame": index})
        frames.append(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
    header = msgpack.packb({"v": message.version, "type": message.type, "id": message.id, "body": message.body,
                            "arrays": descriptors}, use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header: {len(header)} bytes, at most {MAX_HEADER_BYTES}", field="header")
    return [header, *frames]


def _require(cond: bool, fieldname: str, reason: str) -> None:
    if not cond:
        raise ProtocolError(f"{fieldname}: {reason}", field=fieldname)


def decode(frames: Sequence[Any]) -> Message:
    """Parse frames (bytes, memoryviews or zmq.Frame objects) into a :class:`Message`; arrays
    are read-only views on the frames' buffers (no copy)."""
    buffers = [memoryview(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    _require(len(buffers) >= 1, "header", "message has no frames")
    _require(sum(b.nbytes for b in buffers) <= MAX_MESSAGE_BYTES, "message", f"larger than {MAX_MESSAGE_BYTES} bytes")
    head = buffers[0]
    _require(head.nbytes <= MAX_HEADER_BYTES, "header", f"{head.nbytes} bytes, at most {MAX_HEADER_BYTES}")
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_HEADER_BYTES, max_str_len=MAX_HEADER_BYTES,
                                max_bin_len=MAX_HEADER_BYTES, max_array_len=1 << 16, max_map_len=1 << 16, strict_map_key=True)
    try:
        unpacker.feed(head)
        header = unpacker.unpack()
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"header: not valid msgpack ({type(exc).__name__})", field="header") from exc
    try:
        unpacker.unpack()
        trailing = True
    except msgpack.OutOfData:
        trailing = False
    except Exception:
        trailing = True
    _require(not trailing, "header", "extra bytes after the msgpack map")
    _require(isinstance(header, dict), "header", f"must be a map, got {type(header).__name__}")
    mid = header.get("id", "")
    try:
        return _decode_header(header, buffers)
    except ProtocolError as exc:  # the header parsed: name the request in the error if its id is readable
        exc.request_id = mid if isinstance(mid, str) and len(mid) <= MAX_ID_CHARS else ""
        raise


def _decode_header(header: dict, buffers: list[memoryview]) -> Message:
    version = header.get("v")
    _require(isinstance(version, int) and not isinstance(version, bool), "v", "missing or not an integer")
    _require(version == PROTOCOL_VERSION, "v", f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    mtype = header.get("type")
    _require(isinstance(mtype, str) and 0 < len(mtype) <= 32, "type", "missing or not a short string")
    mid = header.get("id", "")
    _require(isinstance(mid, str) and len(mid) <= MAX_ID_CHARS, "id", f"must be a string of at most {MAX_ID_CHARS} characters")
    body = header.get("body", {})
    _require(isinstance(body, dict), "body", f"must be a map, got {type(body).__name__}")
    descriptors = header.get("arrays", [])
    _require(isinstance(descriptors, list), "arrays", "must be a list")
    _require(len(descriptors) <= MAX_ARRAYS, "arrays", f"{len(descriptors)} arrays, at most {MAX_ARRAYS}")
    _require(len(buffers) == len(descriptors) + 1, "arrays",
             f"header names {len(descriptors)} arrays but the message has {len(buffers) - 1} data frames")
    arrays: dict[str, np.ndarray] = {}
    used = set()
    for i, d in enumerate(descriptors):
        where = f"arrays[{i}]"
        _require(isinstance(d, dict), where, "must be a map")
        name, dtype, shape, frame = d.get("name"), d.get("dtype"), d.get("shape"), d.get("frame")
        _require(isinstance(name, str) and 0 < len(name) <= 64 and name not in arrays, f"{where}.name", "missing, too long or repeated")
        _require(dtype in DTYPES, f"{where}.dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
        _require(isinstance(shape, list) and len(shape) <= MAX_NDIM
                 and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_ARRAY_ELEMENTS for n in shape),
                 f"{where}.shape", f"must be a list of at most {MAX_NDIM} non-negative integers")
        count = math.prod(shape)  # Python integers: a product that would wrap in int64 (to 0) stays too large
        _require(count <= MAX_ARRAY_ELEMENTS, f"{where}.shape", f"{count} elements, at most {MAX_ARRAY_ELEMENTS}")
        _require(isinstance(frame, int) and not isinstance(frame, bool) and 1 <= frame < len(buffers) and frame not in used,
                 f"{where}.frame", f"must be an unused frame index in 1..{len(buffers) - 1}")
        used.add(frame)
        dt = np.dtype(dtype).newbyteorder("<")
        expected = count * dt.itemsize
        buf = buffers[frame]
        _require(buf.nbytes == expected, f"{where}.frame",
                 f"{buf.nbytes} bytes, but dtype {dtype} and shape {shape} need {expected}")
        _require(buf.nbytes <= MAX_FRAME_BYTES, f"{where}.frame", f"larger than {MAX_FRAME_BYTES} bytes")
        arrays[name] = np.frombuffer(buf, dtype=dt, count=count).reshape(shape)
    return Message(type=mtype, id=mid, body=body, arrays=arrays, version=version)
