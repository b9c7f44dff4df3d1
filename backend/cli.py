"""``psd3d`` command line: local runs (``image2d``, ``generate``, ``refine``), the backend (``serve``) and its
client commands (``submit``, ``watch``, ``status``, ``cancel``, ``finish``, ``result``), and ``models``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _image2d(args: argparse.Namespace) -> int:
    from protocol.specs import Image2dSpec
    from backend.models import quiet_libraries
    from backend.pipelines.image2d import run_image2d

    quiet_libraries()

    spec = Image2dSpec(**_spec_fields(args))
    print(f"psd3d image2d: {spec.method} on {spec.preset!r}, loading models…", file=sys.stderr)
    return _consume(run_image2d(spec, args.out), spec.method)


def _mesh3d(args: argparse.Namespace) -> int:
    from protocol.specs import GenerateSpec, RefineSpec
    from backend.models import quiet_libraries
    from backend.pipelines.mesh3d import run_generate, run_refine

    quiet_libraries()
    fields = _spec_fields(args)  # run here, the mesh is read from its path
    if args.command == "refine":
        events = run_refine(RefineSpec(mesh=str(args.mesh), **fields), args.out, resume=args.resume)
    else:
        spec = GenerateSpec(init_mesh=str(args.init_mesh) if args.init_mesh else None, **fields)
        events = run_generate(spec, args.out, resume=args.resume)
    print(f"psd3d {args.command}: {args.method} on {args.preset!r}, loading models…", file=sys.stderr)
    return _consume(events, args.method, spec.stages if args.command == "generate" else ())


def _consume(events, label: str, stages: tuple[str, ...] = ()) -> int:
    """Drive a pipeline's events: one progress bar per stage (named "stage k of n" from ``stages``,
    the job's stages), then the result paths."""
    from tqdm import tqdm

    from protocol.events import Done, Failed, Progress
    from protocol.specs import stage_label

    bar, stage = None, None
    for event in events:
        if isinstance(event, Progress):
            if event.stage != stage:
                if bar is not None:
                    bar.close()
                stage = event.stage
                bar = tqdm(total=event.total, initial=event.step - 1, desc=f"{label} {stage_label(stages, stage)}", unit="step")
            m = event.metrics
            bar.set_postfix({k: f"{m[k]:.4f}" for k in ("reward_w", "reward_current") if m.get(k) is not None})
            bar.update(1)
        elif isinstance(event, Done):
            if bar is not None:
                bar.close()
            print(f"target reward {event.final['target_reward']:.4f} ({event.final['target_reward_name']})")
            for name, path in event.outputs.items():
                print(f"  {name:20s} {path}")
            return 0
        elif isinstance(event, Failed):
            if bar is not None:
                bar.close()
            print(f"psd3d: error [{event.code}] {event.message}", file=sys.stderr)
            return 2
    return 1


def _serve(args: argparse.Namespace) -> int:
    from backend.models import quiet_libraries
    from backend.pipelines.presets import PRESETS
    from backend.server.server import Server

    quiet_libraries()
    presets = tuple(args.preset) if args.preset else tuple(PRESETS)
    executor = None
    if args.executor == "ray":  # Ray is imported only here: a plain serve never loads it
        from functools import partial

        from backend.server.ray_executor import RayConfig, RayExecutor

        executor = partial(RayExecutor, config=RayConfig(address=args.ray_address, workers=args.ray_workers))
    from backend.server.admission import QueueLimits

    queue_limits = QueueLimits(per_client=args.max_queued_per_client, total=args.max_queued)
    server = Server(args.data, bind=args.bind, presets=presets, keys=args.keys, executor=executor,
                    queue_limits=queue_limits)
    print(f"psd3d serve: listening on {server.endpoint}, data in {args.data}, presets {', '.join(presets)} "
          f"(Ctrl-C stops; running jobs resume on the next start)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


def _spec_fields(args: argparse.Namespace) -> dict:
    """The flags as spec fields, for ``psd3d <pipeline>`` and ``psd3d submit <pipeline>`` alike: the
    pipeline's spec dataclass names them (``spec_field_names``), a flag not given leaves the spec's
    default; the mesh is not among them (sent as arrays, or read from its path here). For a server,
    ``--negative-embedding`` names a finished job (its id)."""
    from protocol.messages import UPLOADED_MESH_FIELD, spec_field_names

    pipeline = getattr(args, "pipeline", None) or args.command
    keys = [k for k in spec_field_names(pipeline) if k != UPLOADED_MESH_FIELD.get(pipeline)]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _camera_rig(path: str) -> dict:
    """``--cameras FILE``: the spec's camera rig from a JSON file (checked with the spec)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read a camera rig from {path}: {exc}") from exc


def _mesh_upload(args: argparse.Namespace) -> dict | None:
    """The --mesh / --init-mesh file read here and sent as arrays (the server never reads client paths)."""
    import numpy as np

    from backend.geometry.mesh import load_mesh

    path = getattr(args, "mesh", None) or getattr(args, "init_mesh", None)
    if not path:
        return None
    mesh = load_mesh(path, "mesh" if getattr(args, "mesh", None) else "init_mesh")
    arrays = {"positions": mesh.positions.numpy().astype(np.float32), "faces": mesh.faces.numpy().astype(np.int32)}
    if mesh.uvs is not None:
        arrays["uvs"] = mesh.uvs.numpy().astype(np.float32)
        if mesh.texture is not None:
            arrays["texture"] = mesh.texture
    return arrays


def _client(args: argparse.Namespace):
    from protocol.client import Client

    curve = (str(args.key), str(args.server_key)) if args.key else None
    return Client(args.server, curve=curve)


def _prune(args: argparse.Namespace) -> int:
    from backend.jobs.store import JobStore

    store = JobStore(args.data)
    removed = store.prune(args.older_than)
    store.close()
    print(f"removed {len(removed)} finished job(s) older than {args.older_than} day(s) from {args.data}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    """Rebuild a damaged job store from the job folders (refused while a server holds the folder)."""
    from backend.jobs.store import DataLock, rebuild

    lock = DataLock(args.data)
    try:
        made = rebuild(args.data)
    finally:
        lock.release()
    for path in made["aside"]:
        print(f"kept the damaged store file as {path}")
    print(f"rebuilt the job store in {args.data}: {len(made['done'])} done, {len(made['queued'])} queued to resume"
          + (f", {len(made['skipped'])} folder(s) with an unreadable job.json skipped: {', '.join(made['skipped'])}"
             if made["skipped"] else ""))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from backend.server.security import new_certificate

    public, secret = new_certificate(args.dir, args.name)
    print(f"public  {public}   (servers: copy client keys into <keys>/clients/; clients: use the server's)")
    print(f"secret  {secret}   (keep it private)")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from protocol.specs import job_stages

    prompts = None
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    fields = _spec_fields(args)
    if prompts is not None:
        fields.pop("prompt", None)
    with _client(args) as client:
        jobs = client.submit(args.pipeline, fields, prompts, mesh=_mesh_upload(args))
        for job in jobs:
            print(job)
        if args.watch and len(jobs) == 1:
            stages = () if args.pipeline != "generate" else job_stages(
                fields.get("recipe"), getattr(args, "init_mesh", None) is not None,
                bool(fields.get("init_mesh_through_coarse")))
            return _watch_job(client, jobs[0], stages)
    return 0


def _watch_job(client, job: str, stages: tuple[str, ...] = ()) -> int:
    return _consume((event for _, event in client.watch(job)), job[:8], stages)


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _watch_job(client, args.job)


def _status(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        if args.job:
            print(json.dumps(client.status(args.job), indent=1))
        else:
            for row in client.request("list", {"batch": args.batch} if args.batch else {}).body["jobs"]:
                print(f"{row['id']}  {row['state']:9s} {row['pipeline']:8s} {row['step']}/{row['total']}  "
                      f"{row['spec'].get('prompt', '')[:60]}")
    return 0


def _control(args: argparse.Namespace) -> int:
    with _client(args) as client:
        getattr(client, args.command)(args.job)
    print(f"{args.command}: {args.job}")
    return 0


def _result(args: argparse.Namespace) -> int:
    from backend.files import atomic_write_bytes

    with _client(args) as client:
        body, files = client.result(args.job)
    for name, data in files.items():
        print(f"  {name:22s} {atomic_write_bytes(args.out / name, data)}")
    return 0


def _models(args: argparse.Namespace) -> int:
    import json

    from backend.pipelines.presets import model_report
    from backend.psd.loading import models_dir

    report = model_report()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"model folder: {models_dir()}  (set PSD3D_HOME to move it)")
    for preset in report["presets"]:
        print(f"\n{preset['preset']}: {preset['description']}")
        for row in preset["models"]:
            state = f"present, {row['bytes'] / 2**20:,.0f} MiB" if row["present"] else \
                ("built on first use" if preset["built_on_first_use"] else "MISSING")
            print(f"  {row['role']:30s} {row['source']}  [{state}]")
            if row["present"]:
                print(f"  {'':30s} at {row['path']}")
            elif row["fetch"]:
                print(f"  {'':30s} fetch: {row['fetch']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from protocol.specs import METHODS, RASTERIZERS, RECIPES, REWARDS
    from backend.pipelines.presets import PRESETS
    from backend.server.admission import QueueLimits

    parser = argparse.ArgumentParser(prog="psd3d", description="Preference Score Distillation: text to textured 3D props")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, with_out: bool = True) -> None:
        p.add_argument("--prompt", required=True)
        p.add_argument("--method", choices=METHODS, default="psd")
        p.add_argument("--reward", choices=REWARDS, default="hpsv2.1", help="the target reward; the others are reported as unseen")
        p.add_argument("--preset", choices=list(PRESETS), default="tiny")
        p.add_argument("--steps", type=int, default=None, help="override the preset's step count(s)")
        p.add_argument("--seed", type=int, default=0)
        if with_out:
            p.add_argument("--out", type=Path, required=True, help="output folder (the job folder)")
        p.add_argument("--negative-prompt", default=None, help="negative descriptors that initialise n")
        p.add_argument("--negative-embedding", default=None, help="a negative_embedding.pt learned by an earlier job")
        p.add_argument("--guidance-scale", type=float, default=None, help="gamma in eps(n) + gamma (eps(y) - eps(n))")
        p.add_argument("--reward-scale", type=float, default=None, help="k_r in sigmoid(k_r (r_l - r_w))")
        p.add_argument("--interval", type=int, default=None, help="run the pair and the n update every k-th step")

    def cameras(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cameras", type=_camera_rig, default=None, metavar="FILE",
                       help='a JSON camera rig: {"orbit": {"elevation": [lo, hi], ...}} or {"matrices": [[16 numbers], '
                            '...], "fov_y": [deg, ...]} (docs/protocol.md, Specs); default: the preset\'s orbit')

    def rasterizer(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rasterizer", choices=RASTERIZERS, default=None,
                       help="default: nvdiffrast on CUDA when it builds, else torch. nvdiffrast's licence is "
                            "non-commercial; torch is this project's own (MIT)")

    def recipe(p: argparse.ArgumentParser) -> None:
        p.add_argument("--recipe", choices=RECIPES, default=None,
                       help="sd-dmtet (default): DMTet geometry on Stable Diffusion, then the texture stage; "
                            "mvdream: the paper's single stage, a NeRF distilled from MVDream's four views, baked; "
                            "mvdream-nerf: the paper's 2-stage pipeline, that NeRF refined on SD 2.1 at 512^2; "
                            "mvdream-dmtet: the paper's 3-stage pipeline, that NeRF -> DMTet geometry -> PSD texture")

    def through_coarse(p: argparse.ArgumentParser) -> None:
        p.add_argument("--init-mesh-through-coarse", action="store_true",
                       help="mvdream-dmtet: start the MVDream stage's NeRF from --init-mesh instead of skipping that stage")

    def max_t(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-t", type=float, default=None,
                       help="refine strength: the largest noise level, a fraction of the diffusion schedule "
                            "(default 0.404, the paper's texture stage; lower keeps more of your texture)")

    def pipeline_flags(p: argparse.ArgumentParser, name: str) -> None:
        """A pipeline's own flags (and its mesh), for running it here and for submitting it alike."""
        if name == "generate":
            recipe(p)
            p.add_argument("--init-mesh", type=Path, default=None, help="a blocked-out mesh to start from (kept in its frame)")
            through_coarse(p)
        if name == "refine":
            p.add_argument("--mesh", type=Path, required=True, help="GLB/glTF/OBJ/PLY file")
            max_t(p)
        if name != "image2d":
            rasterizer(p)
            cameras(p)

    p = sub.add_parser("image2d", help="the 2D experiment (Algorithm 2): optimise one image by PSD, SDS or DreamDPO")
    common(p)
    p.set_defaults(run=_image2d)
    g = sub.add_parser("generate", help="text to a textured mesh (--recipe: DMTet + texture stage, or MVDream's single stage)")
    common(g)
    pipeline_flags(g, "generate")
    g.add_argument("--resume", action="store_true", help="continue an interrupted job in --out from its checkpoint")
    g.set_defaults(run=_mesh3d)
    r = sub.add_parser("refine", help="re-texture a mesh (its UVs kept; its texture the start)")
    common(r)
    pipeline_flags(r, "refine")
    r.add_argument("--resume", action="store_true", help="continue an interrupted job in --out from its checkpoint")
    r.set_defaults(run=_mesh3d)

    sv = sub.add_parser("serve", help="run the backend: a ZeroMQ server with a job store and a GPU (or CPU) worker")
    sv.add_argument("--bind", default="tcp://127.0.0.1:5557", help="ZeroMQ endpoint (loopback unless CURVE keys are set)")
    sv.add_argument("--data", type=Path, default=Path.home() / ".local" / "share" / "psd3d", help="job store folder")
    sv.add_argument("--preset", action="append", choices=list(PRESETS), help="offer only these presets (repeatable)")
    sv.add_argument("--keys", type=Path, default=None, help="CURVE folder: server.key_secret and clients/*.key")
    sv.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: one worker in this process; ray: one actor per GPU of a Ray cluster (README 'Several GPUs')")
    sv.add_argument("--ray-address", default=None,
                    help="with --executor ray: 'auto' or HOST:PORT of a running cluster (default: a local Ray of its own)")
    sv.add_argument("--ray-workers", type=int, default=None, help="with --executor ray: actors (default: one per GPU)")
    sv.add_argument("--max-queued-per-client", type=int, default=QueueLimits.per_client,
                    help="queued jobs one client (CURVE key, or connection) may have; more is refused with queue_full")
    sv.add_argument("--max-queued", type=int, default=QueueLimits.total, help="queued jobs in all; more is refused with queue_full")
    sv.set_defaults(run=_serve)

    def server_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default="tcp://127.0.0.1:5557", help="the backend's address")
        p.add_argument("--key", type=Path, default=None, help="this client's .key_secret (CURVE)")
        p.add_argument("--server-key", type=Path, default=None, help="the server's public .key (CURVE)")

    su = sub.add_parser("submit", help="submit a job to a running backend")
    spipes = su.add_subparsers(dest="pipeline", required=True)
    for name in ("image2d", "generate", "refine"):
        sp = spipes.add_parser(name)
        common(sp, with_out=False)
        server_arg(sp)
        sp.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
        sp.add_argument("--prompts-file", type=Path, default=None, help="a batch: one job per line of this file")
        pipeline_flags(sp, name)
        sp.set_defaults(run=_submit)
    for name, fn, helptext in (("watch", _watch, "follow a job's progress"), ("cancel", _control, "cancel a job"),
                               ("finish", _control, "stop a job now and keep its current state as the result")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("job")
        server_arg(c)
        c.set_defaults(run=fn)
    st = sub.add_parser("status", help="one job's state, or all jobs")
    st.add_argument("job", nargs="?")
    st.add_argument("--batch", default=None, help="only the jobs of this batch")
    server_arg(st)
    st.set_defaults(run=_status)
    rs = sub.add_parser("result", help="download a finished job's files")
    rs.add_argument("job")
    rs.add_argument("--out", type=Path, required=True)
    server_arg(rs)
    rs.set_defaults(run=_result)

    jb = sub.add_parser("jobs", help="manage the job store")
    jsub = jb.add_subparsers(dest="jobs_command", required=True)
    pr = jsub.add_parser("prune", help="delete finished jobs (and their folders) older than N days")
    pr.add_argument("--older-than", type=float, default=30.0, help="days (default 30; 0 = all finished jobs)")
    pr.add_argument("--data", type=Path, default=Path.home() / ".local" / "share" / "psd3d")
    pr.set_defaults(run=_prune)
    rc = jsub.add_parser("recover", help="rebuild a damaged job store from the job folders (server stopped)")
    rc.add_argument("--data", type=Path, default=Path.home() / ".local" / "share" / "psd3d")
    rc.set_defaults(run=_recover)

    k = sub.add_parser("keys", help="CURVE certificates for remote use")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("new", help="create NAME.key (public) and NAME.key_secret")
    kn.add_argument("name")
    kn.add_argument("--dir", type=Path, default=Path("keys"))
    kn.set_defaults(run=_keys)

    m = sub.add_parser("models", help="show which model files are present and where real weights go")
    m.add_argument("--json", action="store_true", help="every preset's models: source, places looked, bytes, fetch command")
    m.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from protocol.errors import Psd3dError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Psd3dError as exc:  # bad input, a refused bind, a server's error reply, a lost connection
        print(f"psd3d: error [{exc.code}] {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
