"""``psd3d`` command line: ``image2d``, ``generate``, ``refine``, ``models`` (``serve`` comes with the service issue)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _image2d(args: argparse.Namespace) -> int:
    from protocol.specs import Image2dSpec
    from backend.models import quiet_libraries
    from backend.pipelines.image2d import run_image2d

    quiet_libraries()

    spec = Image2dSpec(prompt=args.prompt, method=args.method, reward=args.reward, preset=args.preset, steps=args.steps, seed=args.seed,
                       negative_prompt=args.negative_prompt, negative_embedding=args.negative_embedding,
                       guidance_scale=args.guidance_scale, reward_scale=args.reward_scale, interval=args.interval)
    print(f"psd3d image2d: {spec.method} on {spec.preset!r}, loading models…", file=sys.stderr)
    return _consume(run_image2d(spec, args.out), spec.method)


def _mesh3d(args: argparse.Namespace) -> int:
    from protocol.specs import GenerateSpec, RefineSpec
    from backend.models import quiet_libraries
    from backend.pipelines.mesh3d import run_generate, run_refine

    quiet_libraries()
    common = dict(prompt=args.prompt, method=args.method, reward=args.reward, preset=args.preset, steps=args.steps, seed=args.seed,
                  negative_prompt=args.negative_prompt, negative_embedding=args.negative_embedding,
                  guidance_scale=args.guidance_scale, reward_scale=args.reward_scale, interval=args.interval)
    if args.command == "refine":
        events = run_refine(RefineSpec(mesh=str(args.mesh), **common), args.out, resume=args.resume)
    else:
        init = str(args.init_mesh) if args.init_mesh else None
        events = run_generate(GenerateSpec(init_mesh=init, **common), args.out, resume=args.resume)
    print(f"psd3d {args.command}: {args.method} on {args.preset!r}, loading models…", file=sys.stderr)
    return _consume(events, args.method)


def _consume(events, label: str) -> int:
    """Drive a pipeline's events: one progress bar per stage, then the result paths."""
    from tqdm import tqdm

    from protocol.events import Done, Failed, Progress

    bar, stage = None, None
    for event in events:
        if isinstance(event, Progress):
            if event.stage != stage:
                if bar is not None:
                    bar.close()
                stage = event.stage
                bar = tqdm(total=event.total, initial=event.step - 1, desc=f"{label} {stage}", unit="step")
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


def _models(args: argparse.Namespace) -> int:
    from backend.psd.loading import models_dir, resolve_source
    from backend.presets import PRESETS

    print(f"model folder: {models_dir()}  (set PSD3D_HOME to move it)")
    for preset in PRESETS.values():
        print(f"\n{preset.name}: {preset.description}")
        srcs = [("prior", preset.models.prior.model), ("reward-path decoder", preset.models.prior.tiny_decoder),
                ("target reward", getattr(preset.models.target_reward, "checkpoint", None) or preset.models.target_reward.model)]
        srcs += [("unseen reward", s.model if hasattr(s, "model") else s.checkpoint) for s in preset.models.unseen_rewards]
        for role, src in srcs:
            if src is None:
                continue
            location, local = resolve_source(src)
            state = "present" if local else ("built on first use" if preset.models.build_tiny else "hub id (cache or download)")
            print(f"  {role:20s} {location}  [{state}]")
    print("\nReal weights: put a downloaded folder under the model folder with the preset's name (e.g. "
          "stable-diffusion-2-1-base/, HPS_v2.1_compressed.pt) or keep them in the Hugging Face cache.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from protocol.specs import METHODS, REWARDS
    from backend.presets import PRESETS

    parser = argparse.ArgumentParser(prog="psd3d", description="Preference Score Distillation: text to textured 3D props")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prompt", required=True)
        p.add_argument("--method", choices=METHODS, default="psd")
        p.add_argument("--reward", choices=REWARDS, default="hpsv2.1", help="the target reward; the others are reported as unseen")
        p.add_argument("--preset", choices=list(PRESETS), default="tiny")
        p.add_argument("--steps", type=int, default=None, help="override the preset's step count(s)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, required=True, help="output folder (the job folder)")
        p.add_argument("--negative-prompt", default=None, help="negative descriptors that initialise n")
        p.add_argument("--negative-embedding", default=None, help="a negative_embedding.pt learned by an earlier job")
        p.add_argument("--guidance-scale", type=float, default=None, help="gamma in eps(n) + gamma (eps(y) - eps(n))")
        p.add_argument("--reward-scale", type=float, default=None, help="k_r in sigmoid(k_r (r_l - r_w))")
        p.add_argument("--interval", type=int, default=None, help="run the pair and the n update every k-th step")

    p = sub.add_parser("image2d", help="the 2D experiment (Algorithm 2): optimise one image by PSD, SDS or DreamDPO")
    common(p)
    p.set_defaults(run=_image2d)
    g = sub.add_parser("generate", help="text to a textured mesh (DMTet geometry, then the texture stage)")
    common(g)
    g.add_argument("--init-mesh", type=Path, default=None, help="a blocked-out mesh to start from (kept in its frame)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted job in --out from its checkpoint")
    g.set_defaults(run=_mesh3d)
    r = sub.add_parser("refine", help="re-texture a mesh (its UVs kept; its texture the start)")
    common(r)
    r.add_argument("--mesh", type=Path, required=True, help="GLB/glTF/OBJ/PLY file")
    r.add_argument("--resume", action="store_true", help="continue an interrupted job in --out from its checkpoint")
    r.set_defaults(run=_mesh3d)

    m = sub.add_parser("models", help="show which model files are present and where real weights go")
    m.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
