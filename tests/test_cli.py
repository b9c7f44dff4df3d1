"""`psd3d generate` as an artist types it: the MVDream recipe end to end on the tiny twins, its
progress bar naming the stage and its number, and a bad recipe refused by the parser."""

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
