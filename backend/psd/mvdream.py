"""MVDream (Shi et al., 2023), the multi-view diffusion prior: SD 2.1 base with two changes.

1. Every self-attention (``attn1``) runs over the F views of one object jointly —
   ``(b f) l c -> b (f l) c``, views consecutive in the batch — while text cross-attention and
   the feed-forward stay per view (bytedance/MVDream ``ldm/modules/attention.py``,
   ``BasicTransformerBlock3D``).
2. A camera — the 4x4 camera-to-world matrix in MVDream's frame, translation scaled to unit
   length, flattened row-major to 16 numbers — goes through Linear(16, 4C), SiLU, Linear(4C, 4C)
   and is added to the timestep embedding (``openaimodel.py``, ``MultiViewUNetModel.camera_embed``).

Here the UNet is diffusers' ``UNet2DConditionModel`` with the camera MLP beside its time embedding
(:class:`TimeCameraEmbedding`) and :class:`MultiViewAttnProcessor` on every attention. The original checkpoint
(``sd-v2.1-base-4view.pt``) is one flat state dict with the UNet under ``model.diffusion_model.``
in LDM names; :func:`ldm_name` maps each diffusers parameter to its LDM name, so loading and
saving (the tiny twin) use one table. The VAE, text encoder and schedule are SD 2.1 base's,
which MVDream kept frozen; they load from the SD 2.1 base diffusers folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from protocol.errors import InvalidInputError, ModelNotFoundError
from backend.psd.loading import Layout, file_path, load_or_explain
from backend.psd.prior import DiffusionPrior, PriorSource, at_least_fp32, load_prior_parts, module_dtype

NUM_FRAMES = 4  # MVDream's 4-view model (sd-v2.1-base-4view)
LDM_UNET_PREFIX = "model.diffusion_model."
DEFAULT_MVDREAM_CHECKPOINT = "MVDream/MVDream:sd-v2.1-base-4view.pt"
SD21_MVDREAM_CONFIG = Path(__file__).with_name("mvdream_sd21.yaml")

# MVDream's camera_utils.convert_opengl_to_blender: world (x, y, z) -> (x, -z, y), a Y-up world
# turned Z-up. Our world is glTF's, which is MVDream's Y-up world (camera_utils puts azimuth 0 on +Z).
_Y_UP_TO_Z_UP = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)


def mvdream_camera(c2w: torch.Tensor) -> torch.Tensor:
    """MVDream's camera condition for cameras in our world: c2w (N,4,4) or (4,4), OpenGL axes,
    glTF world -> (N,16) float32 on c2w's device.

    Equals ``camera_utils.get_camera`` for the same view: the matrix turned Z-up (its
    ``blender_coord``), the camera position scaled to unit length (``normalize_camera``; the
    model sees direction only, not distance or field of view), flattened row-major."""
    c2w = torch.as_tensor(c2w)
    if c2w.shape[-2:] != (4, 4) or c2w.ndim not in (2, 3):
        raise InvalidInputError(f"c2w: expected (N,4,4) or (4,4) camera-to-world matrices, got {tuple(c2w.shape)}",
                                field="c2w")
    m = _Y_UP_TO_Z_UP.to(c2w.device) @ c2w.reshape(-1, 4, 4).double()
    distance = m[:, :3, 3].norm(dim=1, keepdim=True)
    if not bool((distance > 0).all()):
        raise InvalidInputError("c2w: a camera sits at the origin, where MVDream's camera direction is undefined",
                                field="c2w")
    m[:, :3, 3] = m[:, :3, 3] / distance
    return m.reshape(-1, 16).float()


# -- the UNet ------------------------------------------------------------------------------

class MultiViewAttnProcessor:
    """diffusers' scaled dot-product attention; with ``joint`` the F consecutive views of each object
    attend as one sequence, ``(b f) l c -> b (f l) c`` (MVDream's attn1). ``num_frames`` comes per
    call through the UNet's ``cross_attention_kwargs``; ``joint=False`` (attn2) takes and ignores it."""

    def __init__(self, joint: bool) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0  # diffusers loads in seconds

        self.joint = joint
        self.sdpa = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 num_frames: int = 1) -> torch.Tensor:
        if not self.joint or num_frames == 1:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        bf, length, channels = hidden_states.shape  # (b f) l c
        joint = hidden_states.reshape(bf // num_frames, num_frames * length, channels)  # b (f l) c
        out = self.sdpa(attn, joint, encoder_hidden_states, attention_mask, temb)
        return out.reshape(bf, length, out.shape[-1])


class TimeCameraEmbedding(torch.nn.Module):
    """MultiViewUNetModel's ``emb``: ``time_embed(t_emb) + camera_embed(camera)``, the camera term
    only when a camera is given. It takes the place of diffusers' ``time_embedding``, which the UNet
    calls as ``time_embedding(t_emb, timestep_cond)``: the camera travels as ``timestep_cond``."""

    def __init__(self, time: torch.nn.Module, camera_dim: int) -> None:
        super().__init__()
        self.time = time  # diffusers' TimestepEmbedding: linear_1, SiLU, linear_2
        width = time.linear_2.out_features
        self.camera = torch.nn.Sequential(torch.nn.Linear(camera_dim, width), torch.nn.SiLU(),
                                          torch.nn.Linear(width, width))

    def forward(self, t_emb: torch.Tensor, camera: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(t_emb)
        return emb if camera is None else emb + self.camera(camera.to(emb.dtype))


class MultiViewUNet(torch.nn.Module):
    """MVDream's ``MultiViewUNetModel``, called as the original: ``unet(x, t, context, camera,
    num_frames)`` with x (N·F,C,h,w), t (N·F,), context (N·F,L,D), camera (N·F,16) or None ->
    eps (N·F,C,h,w). The F views of one object are consecutive in the batch.

    ``unet`` is diffusers' ``UNet2DConditionModel`` of the same shape; this adds the camera MLP
    (``camera_dim`` inputs; None: no camera) and the multi-view attention processors."""

    def __init__(self, unet, camera_dim: int | None) -> None:
        super().__init__()
        self.unet = unet
        self.camera_dim = camera_dim
        if camera_dim is not None:
            unet.time_embedding = TimeCameraEmbedding(unet.time_embedding, camera_dim)
        unet.set_attn_processor({name: MultiViewAttnProcessor(joint=name.endswith("attn1.processor"))
                                 for name in unet.attn_processors})

    @property
    def config(self):
        return self.unet.config

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, camera: torch.Tensor | None = None,
                num_frames: int = 1) -> torch.Tensor:
        if x.shape[0] % num_frames:
            raise InvalidInputError(f"x: a batch of {x.shape[0]} is not whole objects of {num_frames} views",
                                    field="x")
        if camera is not None and (self.camera_dim is None or camera.shape != (x.shape[0], self.camera_dim)):
            raise InvalidInputError(f"camera: expected ({x.shape[0]}, {self.camera_dim}) for this UNet, "
                                    f"got {tuple(camera.shape)}", field="camera")
        return self.unet(x, t, encoder_hidden_states=context, timestep_cond=camera,
                         cross_attention_kwargs={"num_frames": num_frames}).sample


# -- the original config -------------------------------------------------------------------

# MultiViewUNetModel.__init__ arguments that only touch training or memory (image_size is unused).
_IGNORED = {"image_size", "use_checkpoint", "use_fp16", "use_bf16", "dropout", "legacy", "num_heads_upsample",
            "use_new_attention_order"}
# Arguments whose non-default values select layers this port does not build.
_DEFAULTS = {"conv_resample": True, "dims": 2, "num_classes": None, "use_scale_shift_norm": False,
             "resblock_updown": False, "use_spatial_transformer": True, "n_embed": None,
             "disable_self_attentions": None, "num_attention_blocks": None, "disable_middle_self_attn": False,
             "adm_in_channels": None}
_REQUIRED = ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions",
             "context_dim")
_OPTIONAL = {"channel_mult": (1, 2, 4, 8), "num_heads": -1, "num_head_channels": -1, "transformer_depth": 1,
             "use_linear_in_transformer": False, "camera_dim": None}


def read_unet_params(config: str | Path) -> dict:
    """``model.params.unet_config.params`` of an original-format MVDream yaml."""
    try:
        with open(config) as f:
            params = yaml.safe_load(f)["model"]["params"]["unet_config"]["params"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"mvdream config {config}: no model.params.unet_config.params "
                                "(the format of bytedance/MVDream's configs/sd-v2-base.yaml)",
                                field="preset.mvdream") from exc
    return dict(params)


def diffusers_unet_config(params: dict) -> dict:
    """``UNet2DConditionModel`` arguments for ``MultiViewUNetModel(**params)``."""
    def bad(reason: str) -> InvalidInputError:
        return InvalidInputError(f"mvdream config: {reason}", field="preset.mvdream")

    unknown = set(params) - _IGNORED - set(_DEFAULTS) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise bad(f"unknown unet_config params {sorted(unknown)}")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise bad(f"unet_config params {missing} are required")
    unsupported = {k: params[k] for k, v in _DEFAULTS.items() if k in params and params[k] != v}
    if unsupported:
        raise bad(f"unsupported unet_config values {unsupported} (supported: {_DEFAULTS})")
    p = {**_OPTIONAL, **params}
    if not isinstance(p["num_res_blocks"], int) or not isinstance(p["transformer_depth"], int):
        raise bad("num_res_blocks and transformer_depth must be integers (one value for every level)")
    if not isinstance(p["context_dim"], int):
        raise bad(f"context_dim must be one integer, got {p['context_dim']!r}")
    if (p["num_heads"] == -1) == (p["num_head_channels"] == -1):
        raise bad("set exactly one of num_heads and num_head_channels")

    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    heads = [c // p["num_head_channels"] if p["num_head_channels"] != -1 else p["num_heads"] for c in channels]
    if any(c % h for c, h in zip(channels, heads)):
        raise bad(f"channels {channels} do not split into {heads} heads")
    attends = [2**level in p["attention_resolutions"] for level in range(len(channels))]
    return dict(
        sample_size=int(params.get("image_size", 32)),
        in_channels=p["in_channels"],
        out_channels=p["out_channels"],
        block_out_channels=tuple(channels),
        layers_per_block=p["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        cross_attention_dim=p["context_dim"],
        attention_head_dim=tuple(heads),  # diffusers' name for the number of heads per level
        use_linear_projection=bool(p["use_linear_in_transformer"]),
        transformer_layers_per_block=p["transformer_depth"],
        # openaimodel.py: GroupNorm32(32, c) (eps 1e-5); the transformers' Normalize has eps 1e-6,
        # diffusers' Transformer2DModel too; timestep_embedding is [cos, sin] with exponent / half.
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    )


def unet_from_params(params: dict) -> MultiViewUNet:
    """A randomly initialised :class:`MultiViewUNet` of ``MultiViewUNetModel(**params)``'s shape."""
    from diffusers import UNet2DConditionModel

    config = diffusers_unet_config(params)  # checks params first
    return MultiViewUNet(UNet2DConditionModel(**config), params.get("camera_dim"))


# -- LDM names -----------------------------------------------------------------------------

_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.time.linear_1": "time_embed.0",
          "time_embedding.time.linear_2": "time_embed.2", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "time_embedding.camera.0": "camera_embed.0",
          "time_embedding.camera.2": "camera_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_name(key: str, config) -> str:
    """The LDM (openaimodel.py) name of diffusers UNet parameter ``key``, without the prefix.

    Levels have ``L = layers_per_block`` ResBlocks down and ``L + 1`` up; in ``input_blocks`` level
    b's blocks are 1 + b(L+1) + j and its Downsample (b+1)(L+1); in ``output_blocks`` level b's
    (reversed order) are b(L+1) + j, the Upsample after the last one's ResBlock (and attention)."""
    per = config.layers_per_block + 1
    for prefix, ldm in _FIXED.items():
        if key.startswith(prefix + "."):
            return ldm + key[len(prefix):]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        side, b, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if part == "downsamplers":
            return f"input_blocks.{(b + 1) * per}.0.{rest.replace('conv.', 'op.', 1)}"
        if part == "upsamplers":
            slot = 2 if config.up_block_types[b].startswith("CrossAttn") else 1
            return f"output_blocks.{b * per + per - 1}.{slot}.{rest}"
        index = 1 + b * per + j if side == "down_blocks" else b * per + j
        blocks = "input_blocks" if side == "down_blocks" else "output_blocks"
        slot = 1 if part == "attentions" else 0
        return f"{blocks}.{index}.{slot}.{_ldm_layer(part, rest)}"
    if mid:
        part, j, rest = mid[1], int(mid[2]), mid[3]
        return f"middle_block.{2 * j if part == 'resnets' else 1}.{_ldm_layer(part, rest)}"
    raise InvalidInputError(f"mvdream config: diffusers parameter {key!r} has no LDM counterpart",
                            field="preset.mvdream")


def _ldm_layer(part: str, rest: str) -> str:
    """A ResBlock's or SpatialTransformer's parameter inside it (the attention names agree)."""
    if part == "attentions":
        return rest
    first, _, tail = rest.partition(".")
    return f"{_RESNET[first]}.{tail}"


def ldm_state_dict(unet: MultiViewUNet) -> dict[str, torch.Tensor]:
    """The UNet's weights as the original checkpoint holds them: ``model.diffusion_model.<LDM name>``."""
    return {LDM_UNET_PREFIX + ldm_name(k, unet.config): v for k, v in unet.unet.state_dict().items()}


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The flat state dict (a Lightning ``{"state_dict": ...}`` wrapper is opened too)."""
    try:  # memory-mapped: of a file that also holds the VAE and text encoder, only the UNet is read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) torch.save file cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def _listed(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} ({', '.join(names[:shown])}{more})" if names else "none"


def load_unet(checkpoint: str | Path, config: str | Path, dtype: torch.dtype = torch.float32) -> MultiViewUNet:
    """MVDream's UNet from the original files: ``checkpoint`` a flat state dict with the UNet under
    ``model.diffusion_model.`` (LDM names, camera_embed included; other prefixes are ignored),
    ``config`` an original-format yaml (``model.params.unet_config.params``).

    A checkpoint that lacks a parameter of the config's UNet, or holds one it does not have, or
    one of another shape, raises :class:`ModelNotFoundError` naming them."""
    params = read_unet_params(config)
    state = _read_checkpoint(str(checkpoint))
    with torch.device("meta"):
        model = unet_from_params(params)
    wanted = {ldm_name(k, model.config): (k, v.shape) for k, v in model.unet.state_dict().items()}
    held = {k[len(LDM_UNET_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    missing = sorted(LDM_UNET_PREFIX + k for k in set(wanted) - set(held))
    unexpected = sorted(LDM_UNET_PREFIX + k for k in set(held) - set(wanted))
    misshapen = sorted(f"{LDM_UNET_PREFIX}{k} {tuple(held[k].shape)} (config: {tuple(shape)})"
                       for k, (_, shape) in wanted.items() if k in held and held[k].shape != shape)
    if missing or unexpected or misshapen:
        raise ModelNotFoundError(
            f"preset.mvdream: {checkpoint} is not the MVDream UNet of {config}: missing {_listed(missing)}; "
            f"unexpected {_listed(unexpected)}; other shapes {_listed(misshapen)}", field="preset.mvdream")
    model.unet.load_state_dict({k: held[ldm].to(dtype) for ldm, (k, _) in wanted.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# -- the prior -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MVDreamSource:
    """Where MVDream's files are: ``checkpoint`` the original ``.pt`` (a path, a name under
    ``$PSD3D_HOME/models`` or ``owner/name:file``), ``config`` its original-format yaml, and ``base``
    the SD 2.1 base folder whose VAE, text encoder, tokenizer and schedule MVDream kept frozen
    (with the TAESD for the reward path)."""

    checkpoint: str = DEFAULT_MVDREAM_CHECKPOINT
    config: str = str(SD21_MVDREAM_CONFIG)
    base: PriorSource = field(default_factory=PriorSource)

    def sources(self) -> list[tuple[str, str, Layout]]:
        """(role, source, layout) of every file set this prior loads (for ``psd3d models``)."""
        return [("mvdream", self.checkpoint, Layout.FILE), ("mvdream config", self.config, Layout.FILE),
                *((f"mvdream {role}", source, layout) for role, source, layout in self.base.sources())]


class MultiViewPrior(DiffusionPrior):
    """MVDream as a score function: the batch is objects x views, the ``num_frames`` views of one
    object consecutive, each with its camera (:func:`mvdream_camera`)."""

    num_frames = NUM_FRAMES

    @classmethod
    def from_source(cls, source: MVDreamSource, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "MultiViewPrior":
        config = load_or_explain("MVDream config", source.config, "preset.mvdream", file_path, Layout.FILE)
        unet = load_or_explain("MVDream checkpoint", source.checkpoint, "preset.mvdream",
                               lambda loc, lo: load_unet(file_path(loc, lo), config, dtype), Layout.FILE)
        return cls.from_parts(unet, load_prior_parts(source.base, dtype, with_unet=False), device)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    camera: torch.Tensor | None = None) -> torch.Tensor:
        """eps(x_t, cond, t, camera): x_t (N·F,C,h,w), t (N·F,), cond (N·F,L,D), camera (N·F,16) or
        None -> (N·F,C,h,w) float32, F = ``num_frames``. Runs in the model's dtype as
        :meth:`DiffusionPrior.predict_eps` does; gradients flow to ``cond`` and ``x_t``."""
        unet = self.active_unet()
        dtype = module_dtype(unet)
        span = self._span(dtype)
        out = unet(span.inputs(x_t).to(dtype), t.to(self.device), span.inputs(cond).to(dtype),
                   None if camera is None else camera.to(self.device), self.num_frames)
        return span.output(at_least_fp32(out))
