#!/usr/bin/env python
"""Wire cost on one loopback socket pair: raw ZeroMQ frames vs our messages carrying the same
bytes as arrays, and the latency of a mesh + texture snapshot (50k faces, 1024^2 RGBA) from
encode to decoded arrays.

    .venv/bin/python scripts/bench/wire.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from protocol.events import MeshSnapshot, TextureSnapshot  # noqa: E402
from protocol.messages import event_to_message, message_to_event  # noqa: E402
from protocol.wire import decode, encode  # noqa: E402


def pair():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    return a, b


def throughput(send, recv, payload_bytes: int, count: int) -> float:
    a, b = pair()
    start = time.perf_counter()
    for _ in range(count):
        send(a)
        recv(b)
    elapsed = time.perf_counter() - start
    a.close(0), b.close(0)
    return payload_bytes * count / elapsed / 1e6


def main() -> None:
    size = 16 << 20  # 16 MiB per message
    array = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    raw = array.tobytes()
    count = 40
    raw_mb_s = throughput(lambda s: s.send(raw, copy=False), lambda s: s.recv(copy=False), size, count)
    msg = event_to_message("0" * 32, 1, TextureSnapshot(1, array.view(np.uint8).reshape(-1, 1024, 4)[: size // 4096]))
    ours_mb_s = throughput(lambda s: s.send_multipart(encode(msg), copy=False),
                           lambda s: decode(s.recv_multipart(copy=False)), size, count)
    print(f"16 MiB messages: raw {raw_mb_s:.0f} MB/s, psd3d arrays {ours_mb_s:.0f} MB/s")

    rng = np.random.default_rng(1)
    mesh = MeshSnapshot(1, rng.random((25_000, 3), dtype=np.float32), rng.integers(0, 25_000, (50_000, 3), dtype=np.int32),
                        rng.random((50_000, 3, 2), dtype=np.float32), 1)
    tex = TextureSnapshot(1, rng.integers(0, 255, (1024, 1024, 4), dtype=np.uint8))
    a, b = pair()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        for event in (mesh, tex):
            a.send_multipart(encode(event_to_message("0" * 32, 1, event)), copy=False)
        for _ in range(2):
            message_to_event(decode(b.recv_multipart(copy=False)))
        times.append(time.perf_counter() - start)
    a.close(0), b.close(0)
    snapshot_ms = sorted(times)[len(times) // 2] * 1000
    print(f"mesh (50k faces, per-corner UVs) + 1024^2 RGBA texture, encode -> decoded arrays: {snapshot_ms:.1f} ms (median of 20)")
    print(f"array_vs_raw={ours_mb_s / raw_mb_s:.2f} snapshot_ms={snapshot_ms:.1f}")


if __name__ == "__main__":
    main()
