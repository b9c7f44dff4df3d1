#!/usr/bin/env python
"""LocalExecutor vs the Ray executor on the same batch: 8 tiny image2d jobs through a real server and
socket. Local: one worker in the server process (torch on every core); Ray: a local cluster with two
fake GPUs, two actors pinned to one torch thread each. Each executor first runs one warm-up job per
worker (models load once per worker and stay), then the batch is timed from submit to the last ``done``.

Prints, per executor: worker start-up, dispatch latency (submit -> first progress of a job that found an
idle worker), per-job overhead (wall x workers / jobs minus a job's own step time, from its metrics), the
batch's wall time; last line ``ray_2workers_vs_local=`` (the wall-time ratio; target <= 0.6 on 2 cores).

    .venv/bin/python scripts/bench/executors.py [--jobs 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PSD3D_HOME", str(Path(tempfile.gettempdir()) / "psd3d-bench-home"))
# token authentication on (Ray 2.60's default), stated explicitly, with a token of this run's own
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

from protocol.client import Client  # noqa: E402
from protocol.events import Done, Progress  # noqa: E402
from backend.server.server import Server  # noqa: E402


@dataclass
class Run:
    name: str
    workers: int
    startup_s: float
    dispatch_s: list[float]  # submit -> first progress, jobs that found an idle worker
    wall_s: float
    step_s: float  # mean of a job's summed step seconds (its metrics.json)
    jobs: int

    @property
    def overhead_s(self) -> float:
        return self.wall_s * self.workers / self.jobs - self.step_s


def _watch(endpoint: str, job: str, submitted: float, out: dict) -> None:
    with Client(endpoint, timeout=120) as client:
        for _, event in client.watch(job):
            if isinstance(event, Progress) and "first" not in out:
                out["first"] = time.perf_counter() - submitted
            if isinstance(event, Done):
                out["done"] = time.perf_counter()


def run(name: str, executor, workers: int, data: Path, jobs: int, steps: int) -> Run:
    start = time.perf_counter()
    srv = Server(data, bind="tcp://127.0.0.1:*", presets=("tiny",), executor=executor)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with Client(srv.endpoint, timeout=600) as client:
            warm = [client.submit("image2d", {"prompt": f"warm-up {i}", "steps": 1})[0] for i in range(workers)]
            for job in warm:
                list(client.watch(job))
            startup = time.perf_counter() - start
            submitted = time.perf_counter()
            ids = client.submit("image2d", {"steps": steps, "seed": 1},
                                prompts=[f"a small wooden toy number {i}" for i in range(jobs)])
            seen = [{} for _ in ids]
            watchers = [threading.Thread(target=_watch, args=(srv.endpoint, job, submitted, out)) for job, out in zip(ids, seen)]
            for w in watchers:
                w.start()
            for w in watchers:
                w.join()
            wall = max(out["done"] for out in seen) - submitted
            compute = [sum(r["seconds"] for r in json.loads((srv.store.folder(job) / "metrics.json").read_text())["steps"])
                       for job in ids]
    finally:
        srv.stop()
        thread.join(60)
    return Run(name, workers, startup, [out["first"] for out in seen[:workers]], wall, statistics.mean(compute), jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import torch

    from backend.models import quiet_libraries
    from backend.psd.tiny import ensure_tiny_models

    quiet_libraries()
    ensure_tiny_models()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="psd3d-bench-"))
    local = run("local", None, 1, tmp / "local", args.jobs, args.steps)

    import ray

    from backend.server.ray_executor import RayConfig, RayExecutor

    ray.init(num_cpus=2, num_gpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        remote = run("ray", partial(RayExecutor, config=RayConfig(workers=2, threads=1)), 2, tmp / "ray", args.jobs, args.steps)
    finally:
        ray.shutdown()
    for r in (local, remote):
        print(f"{r.name:5s} workers={r.workers} startup={r.startup_s:.1f}s dispatch_latency="
              f"{statistics.mean(r.dispatch_s) * 1000:.0f}ms per_job_overhead={r.overhead_s:.2f}s "
              f"step_time_per_job={r.step_s:.2f}s wall={r.wall_s:.2f}s ({args.jobs} jobs x {args.steps} steps)")
    print(f"ray_2workers_vs_local={remote.wall_s / local.wall_s:.2f}")


if __name__ == "__main__":
    main()
