"""The ``tiny`` models: random-initialised, seeded twins of the real model classes.

They are built once into ``$PSD3D_HOME/models/tiny-v2/`` with ``save_pretrained`` /
``torch.save`` in exactly the real on-disk layouts — a diffusers folder with
``model_index.json`` (Stable Diffusion layout), an ``AutoencoderTiny`` folder (TAESD
layout), an HPS checkpoint ``{'state_dict': ...}`` of an open_clip model, a
transformers ``CLIPModel`` folder (PickScore layout), and an MVDream UNet as the original
``sd-v2.1-base-4view.pt`` holds it (one flat state dict, ``model.diffusion_model.*`` in LDM
names) with an original-format yaml — and then loaded back through the same code as the
real weights. Only the paths differ. The version in the folder name changes whenever the
set of twins does, so a cache built by an older psd3d is rebuilt, not misread.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from backend.psd.loading import models_dir
from backend.psd.mvdream import ldm_state_dict, unet_from_params

TINY_NAME = "tiny-v2"  # v2: adds mvdream/
TINY_CLIP_ARCH = "psd3d-tiny-clip"
SEED = 0
TINY_MVDREAM_CHECKPOINT = "mvdream/sd-tiny-4view.pt"
TINY_MVDREAM_CONFIG = "mvdream/sd-tiny.yaml"
# MultiViewUNetModel arguments of the tiny MVDream (the keys of MVDream's configs/sd-v2-base.yaml): the
# tiny SD UNet's channels, heads and text width, so it shares tiny-v2/sd's VAE and text encoder.
TINY_MVDREAM_UNET = {
    "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
    "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 8, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 32, "use_checkpoint": False,
    "legacy": False, "camera_dim": 16,
}


def tiny_root() -> Path:
    return models_dir() / TINY_NAME


def ensure_tiny_models() -> Path:
    """Build the tiny models if absent; safe when several processes race (build into a
    temporary folder, then one atomic rename; the loser discards its copy)."""
    root = tiny_root()
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}.", dir=root.parent))
    try:
        build_tiny_models(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def clip_tokenizer():
    """A CLIP BPE tokenizer built offline from the vocabulary open_clip ships
    (the same 49408-token vocabulary as SD 2.1's tokenizer)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    # open_clip names the two special tokens <start_of_text>/<end_of_text>; the HF files of
    # SD 2.1 call the same ids 49406/49407 <|startoftext|>/<|endoftext|>.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): idx for tok, idx in simple.encoder.items()}
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=77,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="!",
    )


def tiny_clip_config() -> dict:
    """open_clip config of the tiny HPS twin: the ViT-H-14 layout, shrunk."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


def build_tiny_models(root: Path) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel

    root = Path(root)
    tokenizer = clip_tokenizer()

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ))
    # Stable Diffusion 2.1 base's noise schedule (scheduler/scheduler_config.json of the real model).
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd")

    torch.manual_seed(SEED + 1)
    AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(root / "taesd")

    torch.manual_seed(SEED + 2)
    import open_clip

    (root / "hps").mkdir()
    config_file = root / "hps" / f"{TINY_CLIP_ARCH}.json"
    config_file.write_text(json.dumps(tiny_clip_config(), indent=2))
    open_clip.add_model_config(config_file)
    clip = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    torch.save({"state_dict": clip.state_dict()}, root / "hps" / "HPS_v2.1_compressed.pt")

    torch.manual_seed(SEED + 3)
    pick = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
        projection_dim=32, logit_scale_init_value=math.log(100.0),
    ))
    pick.save_pretrained(root / "pickscore")
    tokenizer.save_pretrained(root / "pickscore")
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(root / "pickscore")

    torch.manual_seed(SEED + 4)
    build_tiny_mvdream(root)


def build_tiny_mvdream(root: Path) -> None:
    """The tiny MVDream as the original files are: a flat ``.pt`` state dict with the UNet under
    ``model.diffusion_model.`` (LDM names) and a config in the format of MVDream's sd-v2-base.yaml."""
    (root / TINY_MVDREAM_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ldm_state_dict(unet_from_params(TINY_MVDREAM_UNET)), root / TINY_MVDREAM_CHECKPOINT)
    config = {"model": {"target": "mvdream.ldm.interface.LatentDiffusionInterface", "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
        "parameterization": "eps",
        "unet_config": {"target": "mvdream.ldm.modules.diffusionmodules.openaimodel.MultiViewUNetModel",
                        "params": TINY_MVDREAM_UNET}}}}
    (root / TINY_MVDREAM_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
