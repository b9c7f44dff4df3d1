"""How long the serve loop stalls, and how its memory grows, under the clients of issue 16 item 4.

Starts a real server in a child process on loopback (an executor that never runs a job, so the
figures are the loop's alone), pings it every 20 ms from its own connection while each case runs,
and prints the longest ping (the loop's stall) per case and the server's RSS before and after the
memory cases. The last line is ``key=value`` pairs.

    .venv/bin/python scripts/bench/server_stalls.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from protocol.wire import Message, decode, encode  # noqa: E402

SERVER = r"""
import sys, threading
from backend.server.server import Server

class Idle:
    def __init__(self, store, outbox): pass
    def start(self): pass
    def stop(self): pass
    def notify(self): pass
    def cancel(self, job): pass
    def finish(self, job): pass
    def health(self): return {"executor": "idle", "alive": True, "errors": 0, "last_error": None, "min_free_bytes": 0}
    def worker_of(self, job): return None
    def cancel_queued(self, job): return False

srv = Server(sys.argv[1], bind="tcp://127.0.0.1:*", presets=("tiny",), executor=Idle)
job = srv.store.create("image2d", {"prompt": "a cup"})
srv.store.set_state(job, "done")
(srv.store.folder(job) / "image.png").write_bytes(bytes(int(sys.argv[2])))
print(srv.endpoint, job, flush=True)
srv.serve_forever()
"""


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (``VmHWM``: its peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Prober:
    """Pings every 20 ms; ``worst()`` is the longest round trip since the last ``reset()``."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._worst, self._stop, self._n = 0.0, threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._n += 1
            rid = str(self._n)
            t0 = time.monotonic()
            self.sock.send_multipart(encode(Message("ping", rid)))
            while not self._stop.is_set():
                if self.sock.poll(50) and decode(self.sock.recv_multipart()).id == rid:
                    break
                self._worst = max(self._worst, time.monotonic() - t0)
            self._worst = max(self._worst, time.monotonic() - t0)
            time.sleep(0.02)

    def reset(self) -> None:
        self._worst = 0.0

    def worst(self) -> float:
        return self._worst

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close(0)


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def wait_reply(sock: zmq.Socket, rid: str, timeout_s: float = 300) -> Message | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = decode(sock.recv_multipart())
            if msg.id == rid or msg.type == "error":
                return msg
    return None


def case(prober: Prober, send, settle_s: float = 0.5) -> tuple[float, Message | None]:
    prober.reset()
    reply = send()
    time.sleep(settle_s)
    return prober.worst(), reply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller cases (a few seconds each)")
    args = ap.parse_args()
    faces, side, frames, peers, results = (200_000, 1024, 100_000, 2, 200) if args.quick else (2_000_000, 4096, 1_000_000, 8, 1100)
    result_bytes = 256 << 10
    data = tempfile.mkdtemp(prefix="psd3d-stalls-")
    child = subprocess.Popen([sys.executable, "-c", SERVER, data, str(result_bytes)], cwd=ROOT, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    endpoint, job = child.stdout.readline().split()
    out: dict[str, str] = {}
    try:
        prober = Prober(endpoint)
        warm = dealer(endpoint)  # another client: its job does not count against the batch's queue limit
        warm.send_multipart(encode(Message("submit", "warm", {"pipeline": "image2d", "spec": {"prompt": "a cup"}})))
        assert wait_reply(warm, "warm", 300).type == "ok"  # the tokenizer has loaded
        warm.close(0)
        sock = dealer(endpoint)
        time.sleep(1)
        out["rss_start_mib"] = f"{rss_mib(child.pid):.0f}"

        # batch: 1000 prompts
        def batch():
            sock.send_multipart(encode(Message("submit", "batch", {"pipeline": "image2d", "spec": {},
                                                                   "prompts": [f"a cup number {i}" for i in range(1000)]})))
            return wait_reply(sock, "batch")
        stall, reply = case(prober, batch)
        out["stall_batch_ms"] = f"{stall * 1000:.0f}"
        print(f"batch of 1000 prompts: {reply.type}, longest ping {stall * 1000:.0f} ms", flush=True)

        # upload: a large mesh and texture
        rng = np.random.default_rng(0)
        mesh = {"positions": rng.random((faces, 3), np.float32), "faces": rng.integers(0, faces, (faces, 3), dtype=np.int32),
                "uvs": rng.random((faces, 3, 2), np.float32), "texture": np.zeros((side, side, 4), np.uint8)}

        def upload():
            sock = dealer(endpoint)  # its own client: the batch's jobs fill that one's queue
            sock.send_multipart(encode(Message("submit", "up", {"pipeline": "refine", "spec": {"prompt": "a cup"}}, mesh)),
                                copy=False)
            return wait_reply(sock, "up")
        stall, reply = case(prober, upload)
        out["stall_upload_ms"] = f"{stall * 1000:.0f}"
        print(f"upload {faces} faces + {side}² texture: {reply.type} {reply.body.get('code', '')}, "
              f"longest ping {stall * 1000:.0f} ms", flush=True)
        del mesh

        # a message of many empty frames
        def many():  # sent by another process: building 1M frames here would hold this one's GIL (and the prober)
            code = ("import sys, zmq; from protocol.wire import Message, encode, decode; s = zmq.Context().socket(zmq.DEALER); "
                    "s.connect(sys.argv[1]); s.send_multipart([encode(Message('ping', 'many'))[0]] + [b''] * int(sys.argv[2])); "
                    "print(decode(s.recv_multipart()).body.get('code'))")
            done = subprocess.run([sys.executable, "-c", code, endpoint, str(frames)], cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
            return Message("error", "many", {"code": done.stdout.strip()})
        stall, reply = case(prober, many)
        out["stall_frames_ms"] = f"{stall * 1000:.0f}"
        print(f"{frames} empty frames: {reply.body.get('code')}, longest ping {stall * 1000:.0f} ms", flush=True)

        # memory: 10 frames of 400 MiB (each past the per-frame limit), then 3 of 250 MiB (held by libzmq, refused)
        before = rss_mib(child.pid)
        big = np.zeros(400 << 20 if not args.quick else 40 << 20, np.uint8)
        s = dealer(endpoint)
        s.send_multipart([encode(Message("ping", "big"))[0]] + [big] * 10, copy=False)
        time.sleep(5)
        s.close(0)
        out["rss_10x400_before_mib"], out["rss_10x400_after_mib"] = f"{before:.0f}", f"{rss_mib(child.pid):.0f}"
        print(f"10 x {big.nbytes >> 20} MiB frames: RSS {before:.0f} -> {rss_mib(child.pid):.0f} MiB", flush=True)
        del big
        before = rss_mib(child.pid)
        big = np.zeros(250 << 20 if not args.quick else 25 << 20, np.uint8)
        s = dealer(endpoint)
        s.send_multipart([encode(Message("ping", "big"))[0]] + [big] * 3, copy=False)
        reply = wait_reply(s, "big", 60)
        s.close(0)
        del big
        time.sleep(1)
        out["rss_3x250_before_mib"], out["rss_3x250_after_mib"] = f"{before:.0f}", f"{rss_mib(child.pid):.0f}"
        out["rss_peak_mib"] = f"{rss_mib(child.pid, 'VmHWM'):.0f}"  # libzmq held the 750 MiB message whole
        print(f"3 x 250 MiB frames: {reply.body.get('code') if reply else None}, RSS {before:.0f} -> "
              f"{rss_mib(child.pid):.0f} MiB", flush=True)

        # memory: peers that never read, each asking for a result many times
        before = rss_mib(child.pid)
        silent = []
        for p in range(peers):
            s = dealer(endpoint)
            s.setsockopt(zmq.RCVHWM, 1)
            for i in range(results):
                s.send_multipart(encode(Message("result", f"{p}.{i}", {"job": job})))
            silent.append(s)
        prober.reset()
        time.sleep(10)
        after = rss_mib(child.pid)
        out["rss_results_before_mib"], out["rss_results_after_mib"] = f"{before:.0f}", f"{after:.0f}"
        out["stall_results_ms"] = f"{prober.worst() * 1000:.0f}"
        print(f"{peers} peers x {results} results of {result_bytes >> 10} KiB, never read: RSS {before:.0f} -> {after:.0f} MiB",
              flush=True)
        for s in silent:
            s.close(0)
        prober.close()
        sock.close(0)
    finally:
        child.terminate()
        child.wait(30)
    print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
