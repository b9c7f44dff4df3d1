"""`psd3d generate` as an artist types it: the MVDream recipe end to end on the tiny twins, its
progress bar naming the stage and its number, and a bad recipe refused by the parser."""

import argparse

import pytest

from backend.cli import main
from backend.geometry.mesh import load_mesh


def test_generate_with_the_three_stage_recipe_names_each_stage(tmp_path, psd3d_home, capsys):
    out = tmp_path / "prop"
    assert main(["generate", "--preset", "tiny", "--recipe", "mvdream-dmtet", "--steps", "1",
                 "--prompt", "a wooden cup", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for label in ("stage 1 of 3: nerf", "stage 2 of 3: geometry", "stage 3 of 3: texture"):
        assert label in err
    mesh = load_mesh(out / "out.glb")
    assert mesh.uvs is not None and mesh.texture is not None


def test_generate_with_the_single_stage_recipe_ends_as_a_textured_glb(tmp_path, psd3d_home, capsys):
    out = tmp_path / "prop"
    assert main(["generate", "--preset", "tiny", "--recipe", "mvdream", "--steps", "2",
                 "--prompt", "a wooden cup", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "psd nerf" in err and "stage 1 of" not in err  # one stage: the bar names it, no "of N"
    mesh = load_mesh(out / "out.glb")
    assert mesh.uvs is not None and mesh.texture is not None and len(mesh.faces) > 0
    assert (out / "preview.png").is_file() and (out / "metrics.json").is_file()


def test_an_unknown_recipe_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--recipe", "nerf", "--prompt", "a cup", "--out", "x"])
    assert "--recipe" in capsys.readouterr().err


def _subparser(parser, *path: str):
    """The argparse parser of ``psd3d <path...>`` (e.g. ``submit generate``)."""
    import argparse

    for name in path:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("pipeline", ["image2d", "generate", "refine"])
def test_every_spec_field_is_a_flag_and_every_flag_given_reaches_the_spec(pipeline, tmp_path):
    """Issue 12 item 13: the spec's fields are written once, in its dataclass. Running a pipeline here
    and submitting it take a flag for each (its mesh aside: a path here, arrays to a server), and what
    the flags say is the spec, whichever way it runs."""
    import dataclasses
    import json

    from backend import cli
    from protocol.messages import SPECS, UPLOADED_MESH_FIELD, spec_field_names

    names = [n for n in spec_field_names(pipeline) if n != UPLOADED_MESH_FIELD.get(pipeline)]
    parser = cli.build_parser()
    for path in ((pipeline,), ("submit", pipeline)):
        dests = {a.dest for a in _subparser(parser, *path)._actions}
        assert set(names) <= dests, (path, set(names) - dests)
    rig = tmp_path / "cams.json"
    rig.write_text(json.dumps({"orbit": {"elevation": [0, 30]}}))
    given = {"image2d": [], "generate": ["--recipe", "mvdream", "--rasterizer", "torch", "--cameras", str(rig)],
             "refine": ["--mesh", "m.glb", "--max-t", "0.3", "--rasterizer", "torch", "--cameras", str(rig)]}[pipeline]
    argv = ["--prompt", "a cup", "--seed", "7", "--guidance-scale", "12", "--interval", "2", *given]
    values = {"steps": "5", "negative_prompt": "blurry", "negative_embedding": "e" * 32, "reward_scale": "0.5"}
    for path in ((pipeline, "--out", "o"), ("submit", pipeline)):
        fields = cli._spec_fields(parser.parse_args([*path, *argv]))
        # every field's flag given (a choice: its last; a switch: on) reaches the spec fields: none is dropped
        actions = {a.dest: a for a in _subparser(parser, *path[:2] if path[0] == "submit" else path[:1])._actions}
        every = list(argv)
        for name in set(names) - set(fields):
            action = actions[name]
            every += ([action.option_strings[0]] if isinstance(action, argparse._StoreTrueAction) else
                      [action.option_strings[0], action.choices[-1] if action.choices else values[name]])
        assert set(names) <= set(cli._spec_fields(parser.parse_args([*path, *every]))), path
        spec = SPECS[pipeline](**fields, **({"mesh": "m.glb"} if pipeline == "refine" else {}))
        assert (spec.prompt, spec.seed, spec.guidance_scale, spec.interval) == ("a cup", 7, 12.0, 2)
        if pipeline != "image2d":
            assert spec.cameras == {"orbit": {"elevation": [0, 30]}} and spec.rasterizer == "torch"
        unset = {f.name: f.default for f in dataclasses.fields(spec) if f.name in names and f.name not in fields}
        assert all(getattr(spec, k) == v for k, v in unset.items())  # a flag not given leaves the spec's default


def test_generate_here_writes_the_spec_its_flags_give(tmp_path, psd3d_home):
    """Running here builds the spec from the same flags (no list of its own): spec.json records the
    camera rig and rasterizer given."""
    import json

    rig = tmp_path / "cams.json"
    rig.write_text(json.dumps({"orbit": {"elevation": [0, 30], "azimuth": [-90, 90]}}))
    out = tmp_path / "prop"
    assert main(["generate", "--preset", "tiny", "--steps", "1", "--prompt", "a cup", "--cameras", str(rig),
                 "--rasterizer", "torch", "--guidance-scale", "20", "--out", str(out)]) == 0
    spec = json.loads((out / "spec.json").read_text())["spec"]
    assert spec["cameras"] == {"orbit": {"elevation": [0, 30], "azimuth": [-90, 90]}}
    assert (spec["rasterizer"], spec["guidance_scale"], spec["steps"]) == ("torch", 20.0, 1)


def test_a_camera_rig_file_that_cannot_be_read_is_refused_by_the_parser(tmp_path, capsys):
    bad = tmp_path / "cams.json"
    bad.write_text("{not json")
    for rig in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            main(["generate", "--prompt", "a cup", "--cameras", str(rig), "--out", "x"])
        assert "--cameras" in capsys.readouterr().err
