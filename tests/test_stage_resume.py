"""Whole-pipeline resume (issue 14 item 6): ``psd3d serve`` killed with SIGKILL in each stage of the
3-stage recipe (MVDream NeRF -> DMTet geometry -> texture) resumes that stage on the next start: no
earlier stage runs again, no step is skipped, one ``done``, and the result is a complete GLB."""

import os
import signal

from protocol.client import Client
from protocol.events import Done, Failed, MeshSnapshot, Progress
from protocol.specs import job_stages
from backend.geometry.mesh import load_mesh

STEPS = 6


def test_a_kill_in_each_stage_resumes_that_stage(tmp_path, psd3d_home, serve_process):
    env = dict(os.environ, PSD3D_HOME=psd3d_home, HF_HUB_OFFLINE="1")
    stages = job_stages("mvdream-dmtet")
    seen: list[tuple[int, object]] = []
    proc, address = serve_process(tmp_path / "data", "--preset", "tiny", env=env)  # killed at the end by the fixture
    with Client(address, timeout=60) as client:
        (job,) = client.submit("generate", {"prompt": "a wooden stool", "recipe": "mvdream-dmtet", "preset": "tiny",
                                            "steps": STEPS, "seed": 5})
    for stage in stages:  # kill once the stage has taken two steps, then start again
        with Client(address, timeout=60) as client:
            for seq, event in client.watch(job, after=seen[-1][0] if seen else 0):
                seen.append((seq, event))
                if isinstance(event, Progress) and event.stage == stage and event.step >= 2:
                    break
                assert not isinstance(event, (Done, Failed)), event
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc, address = serve_process(tmp_path / "data", "--preset", "tiny", env=env)
    with Client(address, timeout=60) as client:
        seen += list(client.watch(job, after=seen[-1][0]))
        assert client.status(job)["state"] == "done"
    # each event once, in order, across four server processes (snapshots are latest-only, unsequenced)
    seqs = [seq for seq, e in seen if isinstance(e, (Progress, Done, Failed))]
    assert seqs == sorted(set(seqs))
    progress = [e for _, e in seen if isinstance(e, Progress)]
    order = [stages.index(e.stage) for e in progress]
    assert order == sorted(order) and set(order) == {0, 1, 2}  # no stage ran again after a later one began
    for stage in stages:
        steps = [e.step for e in progress if e.stage == stage]
        assert set(steps) == set(range(1, STEPS + 1)), (stage, steps)  # none skipped
        # a resumed stage repeats at most the steps since its last checkpoint, never goes back to its start twice
        assert steps.count(1) <= 2
    assert sum(isinstance(e, Done) for _, e in seen) == 1 and isinstance(seen[-1][1], Done)
    # the streamed meshes' topology ids only rise, across stages and restarts; one id, one set of faces
    meshes = [e for _, e in seen if isinstance(e, MeshSnapshot)]
    assert len(meshes) >= 3 and [m.topology_id for m in meshes] == sorted(m.topology_id for m in meshes)
    for a, b in zip(meshes, meshes[1:]):
        assert a.topology_id != b.topology_id or a.faces.shape == b.faces.shape
    result = load_mesh(tmp_path / "data" / "jobs" / job / "out.glb")
    assert result.texture is not None and result.uvs is not None and result.faces.shape[0] > 50
