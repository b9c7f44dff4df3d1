#!/usr/bin/env python
"""Compare methods as the paper's Table 2 does: generate each prompt with each method (or reuse
finished job folders), render 60 equally spaced views (appendix F.2), score them with the
target reward and the unseen rewards, and write a table (markdown + CSV).

    .venv/bin/python scripts/eval.py --preset sd21-draft --methods sds dreamdpo psd --out eval/run1
    .venv/bin/python scripts/eval.py --preset tiny --limit 2 --steps 2 --out /tmp/eval   # plumbing check

Job folders are ``OUT/<method>/<prompt index>/``; an existing ``out.glb`` there is scored, not redone.
With ``tiny`` the numbers are a plumbing check, not a measurement, and the table says so.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_PROMPTS = ROOT.parent / "shared" / "eval" / "prompts40.txt"


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from protocol.events import Done, Failed
    from protocol.specs import RECIPES, GenerateSpec
    from backend.geometry.mesh import load_mesh
    from backend.models import load_models, quiet_libraries
    from backend.pipelines.evaluate import EVAL_VIEWS, score_mesh
    from backend.pipelines.mesh3d import run_generate
    from backend.pipelines.presets import PRESETS, get_preset

    ap = argparse.ArgumentParser(description="method comparison over a prompt list")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--preset", choices=list(PRESETS), default="sd21-draft")
    ap.add_argument("--methods", nargs="+", default=["sds", "dreamdpo", "psd"])
    ap.add_argument("--recipe", choices=RECIPES, default="sd-dmtet", help="the generate pipeline every prop is made by")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    quiet_libraries()
    prompts = [p.strip() for p in args.prompts.read_text().splitlines() if p.strip()][: args.limit]
    models = load_models(get_preset(args.preset).models)
    names = [models.target_reward.name] + [r.name for r in models.unseen_rewards]
    rows = []
    for method in args.methods:
        for i, prompt in enumerate(tqdm(prompts, desc=method, unit="prompt")):
            job = args.out / method / f"{i:03d}"
            if not (job / "out.glb").is_file():
                spec = GenerateSpec(prompt=prompt, method=method, preset=args.preset, steps=args.steps, seed=args.seed,
                                    recipe=args.recipe)
                last = None
                for last in run_generate(spec, job, models=models):
                    pass
                if isinstance(last, Failed) or not isinstance(last, Done):
                    print(f"{method} #{i}: failed: {getattr(last, 'message', last)}", file=sys.stderr)
                    continue
            scores = score_mesh(load_mesh(job / "out.glb"), prompt, models)
            rows.append({"method": method, "prompt": i, **scores})
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "prompt", *names])
        writer.writeheader()
        writer.writerows(rows)
    label = "PLUMBING CHECK (random tiny models): these numbers mean nothing about quality.\n\n" if args.preset == "tiny" else ""
    lines = [f"# Method comparison — pipeline {args.recipe}, preset {args.preset}, {len(prompts)} prompts, "
             f"{EVAL_VIEWS} views each\n", label,
             "| method | " + " | ".join(f"{n} ↑" for n in names) + " |", "|---|" + "---|" * len(names)]
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            lines.append(f"| {method} | " + " | ".join(f"{sum(r[n] for r in mine) / len(mine):.4f}" for n in names) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
