"""Differentiable 2D reward models behind one interface.

* :class:`HpsReward` — HPSv2.1: open_clip ViT-H-14 with the ``HPS_v2.1_compressed.pt``
  checkpoint (hub repo ``xswu/HPSv2``). Reference scoring: 224 px bicubic resize + centre
  crop, CLIP mean/std, score = cosine of the L2-normalised image and text features.
* :class:`PickScoreReward` — PickScore v1 (``yuvalkirstain/PickScore_v1``, a transformers
  ``CLIPModel``; processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``):
  score = ``logit_scale.exp()`` x cosine, as its model card computes it (values near 20).

Both take images in [0,1] (B,3,H,W) and are differentiable end to end; text features are
computed once per prompt by the caller (:meth:`text_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union

import torch
import torch.nn.functional as F

from backend.psd.loading import Layout, bound_tokens, file_path, load_or_explain

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardModel(Protocol):
    name: str

    def text_features(self, prompt: str) -> torch.Tensor: ...

    def score(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) in [0,1] -> rewards (B,) float32, differentiable."""
        ...


def clip_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Differentiable twin of CLIP's eval transform: resize the short side to ``size``
    (bicubic, antialiased), centre-crop ``size`` x ``size``, normalise. images (B,3,H,W) in [0,1]."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    images = images[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def cosine_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine between (B,D) image features and (D,) or (B,D) text features."""
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    img = F.normalize(image_features.to(dtype), dim=-1)
    txt = F.normalize(text_features.to(dtype), dim=-1)
    return (img * txt.expand_as(img)).sum(-1)


@dataclass(frozen=True)
class HpsSource:
    """HPSv2.1 files: an open_clip architecture name and a checkpoint ``{'state_dict': ...}``.

    ``checkpoint`` is a file path, a name under ``$PSD3D_HOME/models``, or ``"<hub repo>:<file>"``.
    ``model_config`` registers a non-builtin architecture (the tiny twin) with open_clip."""

    arch: str = "ViT-H-14"
    checkpoint: str = "xswu/HPSv2:HPS_v2.1_compressed.pt"
    model_config: str | None = None

    def sources(self, role: str) -> list[tuple[str, str, Layout]]:
        found = [(role, self.checkpoint, Layout.FILE)]
        if self.model_config is not None:
            found.append((f"{role} (open_clip config)", self.model_config, Layout.FILE))
        return found


@dataclass(frozen=True)
class PickScoreSource:
    model: str = "yuvalkirstain/PickScore_v1"
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def sources(self, role: str) -> list[tuple[str, str, Layout]]:
        return [(role, self.model, Layout.TRANSFORMERS_MODEL), (f"{role} (processor)", self.processor, Layout.PROCESSOR)]


RewardSource = Union[HpsSource, PickScoreSource]


class HpsReward:
    name = "hpsv2.1"

    def __init__(self, model, tokenizer, image_size: int = 224) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size

    @classmethod
    def from_source(cls, source: HpsSource, device="cpu", dtype=torch.float32) -> "HpsReward":
        import open_clip

        if source.model_config is not None:
            open_clip.add_model_config(Path(load_or_explain(
                "open_clip model config", source.model_config, "preset.target_reward",
                lambda loc, lo: _existing_file(loc), Layout.FILE)))

        def load(location: str, local_only: bool):
            path = file_path(location, local_only)
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = open_clip.create_model(source.arch, pretrained=None, device="cpu")
            model.load_state_dict(state["state_dict"])
            return model

        model = load_or_explain("HPSv2.1 reward checkpoint", source.checkpoint, "preset.target_reward", load, Layout.FILE)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(model.to(device=device, dtype=dtype), open_clip.get_tokenizer(source.arch), int(size))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([prompt]).to(self.device)
        return self.model.encode_text(tokens)[0]

    def score(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = clip_preprocess(images.to(dtype), self.image_size, CLIP_MEAN, CLIP_STD)
        return cosine_scores(self.model.encode_image(pixels), text_features)


class PickScoreReward:
    name = "pickscore"

    def __init__(self, model, tokenizer, image_size: int, mean, std) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    @classmethod
    def from_source(cls, source: PickScoreSource, device="cpu", dtype=torch.float32) -> "PickScoreReward":
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        model = load_or_explain(
            "PickScore model", source.model, "preset.unseen_reward",
            lambda loc, lo: CLIPModel.from_pretrained(loc, local_files_only=lo, torch_dtype=dtype),
            Layout.TRANSFORMERS_MODEL,
        )
        tok, proc = load_or_explain(
            "PickScore processor", source.processor, "preset.unseen_reward",
            lambda loc, lo: (CLIPTokenizer.from_pretrained(loc, local_files_only=lo),
                             CLIPImageProcessor.from_pretrained(loc, local_files_only=lo)),
            Layout.PROCESSOR,
        )
        bound_tokens(tok, model.config.text_config.max_position_embeddings)
        crop = proc.crop_size
        crop = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))
        return cls(model.to(device), tok, crop, proc.image_mean, proc.image_std)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer([prompt], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(**ids))[0]

    def score(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.model.dtype), self.image_size, self.mean, self.std)
        feats = _features(self.model.get_image_features(pixel_values=pixels))
        return self.model.logit_scale.exp() * cosine_scores(feats, text_features)


def load_reward(source: RewardSource, device="cpu", dtype=torch.float32) -> RewardModel:
    if isinstance(source, HpsSource):
        return HpsReward.from_source(source, device, dtype)
    return PickScoreReward.from_source(source, device, dtype)


def _features(output) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _existing_file(location: str) -> str:
    if not Path(location).is_file():
        raise OSError(f"no file at {location}")
    return location


