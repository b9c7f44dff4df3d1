"""The wire format: round trips, zero-copy views, and a named error for every malformed message."""

import random

import msgpack
import numpy as np
import pytest

from protocol.wire import DTYPES, MAX_ARRAY_ELEMENTS, Message, ProtocolError, decode, encode


def test_round_trip_of_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    arrays = {dt: (rng.random((3, 4, 2)) * 100).astype(dt) for dt in DTYPES}
    arrays["empty"] = np.zeros((0, 3), np.float32)
    arrays["scalar"] = np.array(7, np.int32)
    arrays["noncontig"] = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    msg = Message(type="event", id="req-1", body={"job": "abc", "seq": 3, "nested": {"x": [1, 2.5, "s"]}}, arrays=arrays)
    out = decode(encode(msg))
    assert (out.type, out.id, out.body) == (msg.type, msg.id, msg.body)
    for name, arr in arrays.items():
        assert out.arrays[name].dtype == arr.dtype and out.arrays[name].shape == arr.shape
        np.testing.assert_array_equal(out.arrays[name], arr)


def test_decoded_arrays_are_views_on_the_received_frames():
    frames = [bytes(f) if i == 0 else bytearray(f) for i, f in enumerate(encode(Message("m", arrays={"a": np.arange(4, dtype=np.float32)})))]
    out = decode(frames)
    frames[1][0:4] = np.float32(42).tobytes()
    assert out.arrays["a"][0] == 42  # no copy was made


def header(**kw):
    base = {"v": 1, "type": "ping", "id": "1", "body": {}, "arrays": []}
    base.update(kw)
    return msgpack.packb(base, use_bin_type=True)


@pytest.mark.parametrize("frames,field", [
    ([], "header"),
    ([b"\xc1\xc1"], "header"),
    ([msgpack.packb([1, 2])], "header"),
    ([header(v=99)], "v"),
    ([header(v="1")], "v"),
    ([header(type=5)], "type"),
    ([header(body=[1])], "body"),
    ([header(id="x" * 500)], "id"),
    ([header(arrays=[{"name": "a", "dtype": "float32", "shape": [2], "frame": 1}])], "arrays"),
    ([header(arrays=[{"name": "a", "dtype": "complex64", "shape": [2], "frame": 1}]), b"\0" * 16], "arrays[0].dtype"),
    ([header(arrays=[{"name": "a", "dtype": "float32", "shape": [3], "frame": 1}]), b"\0" * 8], "arrays[0].frame"),
    ([header(arrays=[{"name": "a", "dtype": "float32", "shape": [MAX_ARRAY_ELEMENTS, 4], "frame": 1}]), b""], "arrays[0].shape"),
    ([header(arrays=[{"name": "a", "dtype": "float32", "shape": [-1], "frame": 1}]), b""], "arrays[0].shape"),
    ([header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1], "frame": 7}]), b"\0"], "arrays[0].frame"),
    ([header() + b"\x00"], "header"),
])
def test_malformed_messages_name_the_field(frames, field):
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert err.value.field == field and err.value.code == "bad_message"


def test_ten_thousand_random_messages_each_get_a_named_error_or_decode():
    """A fuzz of our own: random bytes, truncated and mutated valid messages, random headers."""
    rng = random.Random(0)
    valid = encode(Message("submit", "r", {"prompt": "a cat"}, {"pos": np.ones((5, 3), np.float32)}))
    valid = [bytes(f) for f in valid]
    outcomes = {"ok": 0, "error": 0}
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) for _ in range(rng.randint(1, 3))]
        elif kind == 1:
            head = bytearray(valid[0])
            for _ in range(rng.randint(1, 4)):
                head[rng.randrange(len(head))] = rng.getrandbits(8)
            frames = [bytes(head), valid[1]]
        elif kind == 2:
            frames = [valid[0][: rng.randint(0, len(valid[0]))], valid[1][: rng.randint(0, len(valid[1]))]]
        else:
            junk = {rng.choice(["v", "type", "id", "body", "arrays", "x"]): rng.choice([None, 1, -1, "s", [], {}, 2**40, 1.5, b"b"])
                    for _ in range(rng.randint(0, 5))}
            frames = [msgpack.packb(junk, use_bin_type=True)] + [b"\0" * rng.randint(0, 8)] * rng.randint(0, 2)
        try:
            decode(frames)
            outcomes["ok"] += 1
        except ProtocolError as exc:
            assert exc.field and exc.message
            outcomes["error"] += 1
    assert outcomes["ok"] + outcomes["error"] == 10_000 and outcomes["error"] > 9_000


def test_png_codec_round_trips_and_pillow_agrees():
    import io

    from PIL import Image

    from protocol.png import decode_png, encode_png
    from protocol.events import TextureSnapshot
    from protocol.messages import event_to_message, message_to_event, png_variant

    rgba = np.random.default_rng(3).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    data = encode_png(rgba)
    np.testing.assert_array_equal(decode_png(data), rgba)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")), rgba)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")  # Pillow's own filters: decoded or refused by name
    try:
        np.testing.assert_array_equal(decode_png(buf.getvalue()), rgba)
    except ProtocolError as exc:
        assert exc.field == "png"
    msg = png_variant(event_to_message("a" * 32, 4, TextureSnapshot(9, rgba)))
    job, seq, event = message_to_event(decode(encode(msg)))
    assert (job, seq, event.step) == ("a" * 32, 4, 9)
    np.testing.assert_array_equal(event.image, rgba)
    with pytest.raises(ProtocolError):
        decode_png(b"not a png")
