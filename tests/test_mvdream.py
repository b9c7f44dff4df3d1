"""MVDream: our UNet against a plain-torch reference of the original blocks (bytedance/MVDream
openaimodel.py, attention.py) reading the LDM-keyed checkpoint itself; cameras against
camera_utils.get_camera; the tiny twin in the original layout, loaded through the real path."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from protocol.errors import ModelNotFoundError
from backend.pipelines.presets import PRESETS, SD21_MODELS, TINY_MODELS, model_report
from backend.psd.loading import Layout, fetch_command
from backend.psd.mvdream import (LDM_UNET_PREFIX, SD21_MVDREAM_CONFIG, MultiViewPrior, diffusers_unet_config,
                                 ldm_name, ldm_state_dict, load_unet, mvdream_camera, read_unet_params, unet_from_params)
from backend.psd.tiny import TINY_MVDREAM_CHECKPOINT, TINY_MVDREAM_CONFIG, ensure_tiny_models, tiny_root
from backend.render.camera import look_at, orbit_position

# Three levels, attention on the first two only, two ResBlocks per level, two transformer blocks
# per SpatialTransformer3D, heads from num_head_channels as in sd-v2-base.yaml.
PARAMS = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
              num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
              use_linear_in_transformer=True, transformer_depth=2, context_dim=24, use_checkpoint=False,
              legacy=False, camera_dim=16)
OBJECTS, VIEWS = 2, 4
TOLERANCE = 2e-5  # max |ours - reference| / max |reference| in float32 (measured 2.2e-6)


# -- the reference: MultiViewUNetModel's forward, block by block, on the LDM state dict ----------

class Weights(dict):
    """The checkpoint's UNet tensors; remembers which ones the reference read."""

    def __init__(self, state):
        super().__init__({k[len(LDM_UNET_PREFIX):]: v for k, v in state.items()})
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def timestep_embedding(t, dim, max_period=10000):  # util.timestep_embedding: [cos, sin]
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def linear(w, name, x):
    return F.linear(x, w[name + ".weight"], w[name + ".bias"] if name + ".bias" in w else None)


def conv(w, name, x, stride=1):
    weight = w[name + ".weight"]
    return F.conv2d(x, weight, w[name + ".bias"], stride=stride, padding=weight.shape[-1] // 2)


def group_norm(w, name, x, eps):  # normalization(): GroupNorm32(32, c), eps 1e-5; attention's Normalize: 1e-6
    return F.group_norm(x, 32, w[name + ".weight"], w[name + ".bias"], eps)


def layer_norm(w, name, x):
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"])


def res_block(w, name, x, emb):  # ResBlock, no scale-shift norm, no up/down
    h = conv(w, f"{name}.in_layers.2", F.silu(group_norm(w, f"{name}.in_layers.0", x, 1e-5)))
    h = h + linear(w, f"{name}.emb_layers.1", F.silu(emb))[:, :, None, None]
    h = conv(w, f"{name}.out_layers.3", F.silu(group_norm(w, f"{name}.out_layers.0", h, 1e-5)))
    skip = conv(w, f"{name}.skip_connection", x) if f"{name}.skip_connection.weight" in w else x
    return skip + h


def attention(w, name, x, context, heads):  # CrossAttention: to_q/k/v without bias, to_out.0
    context = x if context is None else context
    q, k, v = linear(w, f"{name}.to_q", x), linear(w, f"{name}.to_k", context), linear(w, f"{name}.to_v", context)
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (y.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d) for y in (q, k, v))
    sim = torch.einsum("bid,bjd->bij", q, k) * d**-0.5
    out = torch.einsum("bij,bjd->bid", sim.softmax(dim=-1), v)
    out = out.reshape(b, heads, n, d).permute(0, 2, 1, 3).reshape(b, n, inner)
    return linear(w, f"{name}.to_out.0", out)


def transformer_block_3d(w, name, x, context, heads, num_frames):  # BasicTransformerBlock3D
    bf, length, c = x.shape
    x = x.reshape(bf // num_frames, num_frames * length, c)  # (b f) l c -> b (f l) c
    x = attention(w, f"{name}.attn1", layer_norm(w, f"{name}.norm1", x), None, heads) + x
    x = x.reshape(bf, length, c)  # b (f l) c -> (b f) l c
    x = attention(w, f"{name}.attn2", layer_norm(w, f"{name}.norm2", x), context, heads) + x
    a, gate = linear(w, f"{name}.ff.net.0.proj", layer_norm(w, f"{name}.norm3", x)).chunk(2, dim=-1)  # GEGLU
    return linear(w, f"{name}.ff.net.2", a * F.gelu(gate)) + x


def spatial_transformer_3d(w, name, x, context, num_frames, params):  # SpatialTransformer3D, use_linear
    b, c, h, wd = x.shape
    heads = c // params["num_head_channels"]
    y = group_norm(w, f"{name}.norm", x, 1e-6).reshape(b, c, h * wd).transpose(1, 2)
    y = linear(w, f"{name}.proj_in", y)
    depth = 0
    while f"{name}.transformer_blocks.{depth}.norm1.weight" in w:
        y = transformer_block_3d(w, f"{name}.transformer_blocks.{depth}", y, context, heads, num_frames)
        depth += 1
    y = linear(w, f"{name}.proj_out", y)
    return y.transpose(1, 2).reshape(b, c, h, wd) + x


def timestep_sequential(w, name, x, emb, context, num_frames, params):  # TimestepEmbedSequential
    j = 0
    while any(k.startswith(f"{name}.{j}.") for k in w):
        layer = f"{name}.{j}"
        if f"{layer}.in_layers.0.weight" in w:
            x = res_block(w, layer, x, emb)
        elif f"{layer}.proj_in.weight" in w:
            x = spatial_transformer_3d(w, layer, x, context, num_frames, params)
        elif f"{layer}.op.weight" in w:  # Downsample: 3x3 conv, stride 2
            x = conv(w, f"{layer}.op", x, stride=2)
        elif f"{layer}.conv.weight" in w:  # Upsample: nearest x2, 3x3 conv
            x = conv(w, f"{layer}.conv", F.interpolate(x, scale_factor=2, mode="nearest"))
        else:  # input_blocks.0: the input conv
            x = conv(w, layer, x)
        j += 1
    return x


def reference_unet(w, params, x, t, context, camera, num_frames):
    """MultiViewUNetModel.forward."""
    emb = linear(w, "time_embed.2", F.silu(linear(w, "time_embed.0", timestep_embedding(t, params["model_channels"]).to(x.dtype))))
    if camera is not None:
        emb = emb + linear(w, "camera_embed.2", F.silu(linear(w, "camera_embed.0", camera)))
    hs, h = [], x
    n_in = len({k.split(".")[1] for k in w if k.startswith("input_blocks.")})
    n_out = len({k.split(".")[1] for k in w if k.startswith("output_blocks.")})
    for i in range(n_in):
        h = timestep_sequential(w, f"input_blocks.{i}", h, emb, context, num_frames, params)
        hs.append(h)
    h = timestep_sequential(w, "middle_block", h, emb, context, num_frames, params)
    for i in range(n_out):
        h = timestep_sequential(w, f"output_blocks.{i}", torch.cat([h, hs.pop()], dim=1), emb, context, num_frames, params)
    return conv(w, "out.2", F.silu(group_norm(w, "out.0", h, 1e-5)))


# -- random weights in the original layout -----------------------------------------------------

def random_checkpoint(tmp_path, params, seed=0, sharp=1.5):
    """A flat .pt (model.diffusion_model.*) and an original-format yaml. Weights ~ 1/sqrt(fan_in);
    attn1's queries and keys ``sharp`` times larger, so the other views move a view's eps by half its
    size (at 2.5 the model is ill-conditioned: float32 rounding alone moves eps by 6e-4 of its size)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = ldm_state_dict(unet_from_params(params))
    state = {}
    for key, value in names.items():
        shape = value.shape
        if len(shape) == 1 and key.endswith(".weight"):  # group and layer norm scales
            state[key] = 1 + 0.2 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = int(np.prod(shape[1:]))
            scale = sharp if (".attn1.to_q." in key or ".attn1.to_k." in key) else 1.0
            state[key] = scale * torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    ckpt, config = tmp_path / "mv.pt", tmp_path / "mv.yaml"
    torch.save({**state, "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, ckpt)
    config.write_text(yaml.safe_dump({"model": {"params": {"unet_config": {"params": params}}}}))
    return state, ckpt, config


def inputs(seed=1, size=8):
    gen = torch.Generator().manual_seed(seed)
    n = OBJECTS * VIEWS
    x = torch.randn(n, 4, size, size, generator=gen)
    t = torch.tensor([500] * VIEWS + [120] * VIEWS)
    context = torch.randn(n, 77, PARAMS["context_dim"], generator=gen)
    c2w = torch.stack([look_at(orbit_position(15.0, 37.0 + 90 * v, 2.0)) for v in range(VIEWS)] * OBJECTS)
    return x, t, context, mvdream_camera(c2w)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    state, ckpt, config = random_checkpoint(tmp_path_factory.mktemp("mvdream"), PARAMS)
    unet = load_unet(ckpt, config)
    weights = Weights(state)
    x, t, context, camera = inputs()
    with torch.no_grad():
        ref = reference_unet(weights, PARAMS, x, t, context, camera, VIEWS)
        ours = unet(x, t, context, camera, VIEWS)
    return unet, weights, (x, t, context, camera), ref, ours


def test_unet_matches_the_original_blocks_to_float32_rounding(model_and_reference):
    unet, weights, (x, t, context, camera), ref, ours = model_and_reference
    assert weights.read == set(weights)  # the reference read every tensor of the checkpoint, no more
    err_abs, err_rel = float((ours - ref).abs().max()), rel(ours, ref)
    print(f"mvdream vs reference: max abs {err_abs:.2e}, relative to max |eps| {err_rel:.2e}")
    assert err_rel < TOLERANCE, (err_abs, err_rel)
    with torch.no_grad():
        per_view = reference_unet(weights, PARAMS, x, t, context, camera, 1)
        no_camera = reference_unet(weights, PARAMS, x, t, context, None, VIEWS)
    # the other views and the camera matter: several percent of eps, far above the tolerance
    assert rel(per_view, ref) > 0.05 and rel(no_camera, ref) > 0.05, (rel(per_view, ref), rel(no_camera, ref))


def test_a_per_view_attn1_or_a_dropped_camera_fails_the_comparison(model_and_reference):
    unet, _, (x, t, context, camera), ref, _ = model_and_reference
    with torch.no_grad():
        mutants = {"attn1 per view": unet(x, t, context, camera, 1), "camera dropped": unet(x, t, context, None, VIEWS)}
        # "(b f) -> b (f)" read as "(f b)": objects interleaved view by view attend across objects
        order = torch.arange(OBJECTS * VIEWS).reshape(OBJECTS, VIEWS).T.reshape(-1)
        back = torch.argsort(order)
        mutants["views interleaved"] = unet(x[order], t[order], context[order], camera[order], VIEWS)[back]

        def swap(y):  # the two objects trade places; each one's views stay together, so eps follows
            return torch.cat([y[VIEWS:], y[:VIEWS]])

        assert rel(swap(unet(swap(x), swap(t), swap(context), swap(camera), VIEWS)), ref) < TOLERANCE
    for name, eps in mutants.items():
        assert rel(eps, ref) > 100 * TOLERANCE, name


def test_checkpoint_keys_must_match_the_config(tmp_path):
    state, ckpt, config = random_checkpoint(tmp_path, PARAMS)
    broken = {k: v for k, v in state.items() if "camera_embed.2.bias" not in k}
    broken[LDM_UNET_PREFIX + "label_emb.0.0.weight"] = torch.zeros(3)
    broken[LDM_UNET_PREFIX + "out.2.bias"] = torch.zeros(5)
    torch.save(broken, ckpt)
    with pytest.raises(ModelNotFoundError) as err:
        load_unet(ckpt, config)
    message = err.value.message
    assert "missing 1 (model.diffusion_model.camera_embed.2.bias)" in message
    assert "unexpected 1 (model.diffusion_model.label_emb.0.0.weight)" in message
    assert "model.diffusion_model.out.2.bias (5,) (config: (4,))" in message


def test_ldm_names_of_the_real_config_agree_with_diffusers_converter():
    """At sd-v2-base.yaml's size (on the meta device): every name we give the original checkpoint is
    the one diffusers' own LDM converter maps to the same parameter; camera_embed the only extra."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    params = read_unet_params(SD21_MVDREAM_CONFIG)
    assert params["model_channels"] == 320 and params["context_dim"] == 1024 and params["camera_dim"] == 16
    with torch.device("meta"):
        unet = unet_from_params(params)
    ldm = ldm_state_dict(unet)
    assert len(ldm) == len(unet.unet.state_dict())
    camera = {k for k in ldm if ".camera_embed." in k}
    assert camera == {LDM_UNET_PREFIX + f"camera_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    # the converter only moves values by name: give it each parameter's own diffusers name as its value
    ours = {LDM_UNET_PREFIX + ldm_name(k, unet.config): k.replace("time_embedding.time.", "time_embedding.")
            for k in unet.unet.state_dict()}
    assert set(ours) == set(ldm)
    converted = convert_ldm_unet_checkpoint({k: v for k, v in ours.items() if k not in camera},
                                            {**diffusers_unet_config(params), "class_embed_type": None})
    assert converted == {name: name for ldm_key, name in ours.items() if ldm_key not in camera}
    for known in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.3.0.op.weight",
                  "middle_block.1.proj_in.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                  "output_blocks.11.1.proj_out.weight", "out.2.weight"):
        assert LDM_UNET_PREFIX + known in ldm


# -- cameras -----------------------------------------------------------------------------------

def get_camera_reference(elevation, azimuth):
    """camera_utils.create_camera_to_world_matrix + convert_opengl_to_blender, one view, flattened."""
    el, az = np.radians(elevation), np.radians(azimuth)
    position = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, [0, 1, 0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    up /= np.linalg.norm(up)
    c2w = np.eye(4)
    c2w[:3, :3] = np.array([right, up, -forward]).T
    c2w[:3, 3] = position
    flip_yz = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    return (flip_yz @ c2w).flatten()


@pytest.mark.parametrize("elevation", [0.0, 15.0, 30.0, -10.0])
def test_cameras_are_mvdreams_get_camera(elevation):
    azimuths = [0.0, 90.0, 180.0, 270.0, 37.0]
    for distance in (0.9, 2.5):  # distance is not seen
        c2w = torch.stack([look_at(orbit_position(elevation, az, distance)) for az in azimuths])
        ours = mvdream_camera(c2w).double().numpy()
        expected = np.stack([get_camera_reference(elevation, az) for az in azimuths])
        np.testing.assert_allclose(ours, expected, atol=2e-6)
    # the front view (camera on +Z, glTF's front) is MVDream's azimuth 0: camera on -Y of its Z-up world
    front = mvdream_camera(look_at(orbit_position(0.0, 0.0, 3.0))).reshape(4, 4)
    np.testing.assert_allclose(front[:3, 3].numpy(), [0, -1, 0], atol=1e-6)


# -- the tiny twin -----------------------------------------------------------------------------

def test_tiny_twin_is_in_the_original_layout_and_loads_as_a_prior(psd3d_home):
    root = ensure_tiny_models()
    state = torch.load(root / TINY_MVDREAM_CHECKPOINT, map_location="cpu", weights_only=True)
    assert all(k.startswith(LDM_UNET_PREFIX) for k in state)
    assert {LDM_UNET_PREFIX + f"camera_embed.{i}.weight" for i in (0, 2)} <= set(state)
    config = yaml.safe_load((root / TINY_MVDREAM_CONFIG).read_text())
    params = config["model"]["params"]["unet_config"]["params"]
    assert params["camera_dim"] == 16 and config["model"]["params"]["unet_config"]["target"].endswith("MultiViewUNetModel")

    prior = MultiViewPrior.from_source(TINY_MODELS.mvdream)
    assert prior.num_frames == 4 and prior.unet.config.cross_attention_dim == 32
    text = prior.encode_text(["a wooden chest"] * 4)  # the tiny SD's text encoder feeds it
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    camera = mvdream_camera(torch.stack([look_at(orbit_position(10.0, 90.0 * v, 2.0)) for v in range(4)]))
    eps = prior.predict_eps(x, torch.full((4,), 300), text, camera)
    assert eps.shape == x.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    eps.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the same weights through load_unet directly
    unet = load_unet(tiny_root() / TINY_MVDREAM_CHECKPOINT, tiny_root() / TINY_MVDREAM_CONFIG)
    with torch.no_grad():
        assert torch.equal(unet(x, torch.full((4,), 300), text, camera, 4), eps.detach())


def test_model_report_lists_mvdream(psd3d_home):
    ensure_tiny_models()
    by_preset = {p["preset"]: p for p in model_report()["presets"]}
    tiny_rows = {r["role"]: r for r in by_preset["tiny"]["models"]}
    assert tiny_rows["mvdream"]["present"] and tiny_rows["mvdream config"]["present"]
    real = {r["role"]: r for r in by_preset["sd21-paper"]["models"]}
    assert real["mvdream"]["source"] == "MVDream/MVDream:sd-v2.1-base-4view.pt"
    assert real["mvdream"]["fetch"] == fetch_command("MVDream/MVDream:sd-v2.1-base-4view.pt", Layout.FILE)
    assert real["mvdream"]["fetch"].startswith("hf download MVDream/MVDream sd-v2.1-base-4view.pt --local-dir ")
    assert real["mvdream config"]["present"]
    assert sum(r["source"] == SD21_MODELS.prior.model for r in by_preset["sd21-paper"]["models"]) == 1
    assert set(PRESETS) == set(by_preset)


def test_a_missing_checkpoint_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PSD3D_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        MultiViewPrior.from_source(SD21_MODELS.mvdream)
    assert err.value.field == "preset.mvdream"
    assert fetch_command("MVDream/MVDream:sd-v2.1-base-4view.pt", Layout.FILE) in err.value.message
    assert str(tmp_path / "home" / "models" / "sd-v2.1-base-4view.pt") in err.value.message


def test_psd3d_models_lists_the_tiny_twin_and_the_real_checkpoint(psd3d_home, capsys, tmp_path, monkeypatch):
    """`psd3d models` as a user reads it: the tiny preset's MVDream twin (checkpoint and yaml) present
    where ensure_tiny_models put it; the paper preset's sd-v2.1-base-4view.pt with its fetch command."""
    from backend.cli import main as cli_main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # an empty hub cache: the real file is missing
    root = ensure_tiny_models()
    assert cli_main(["models"]) == 0
    sections, name = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith(" ") and ": " in line and not line.startswith("model folder"):
            name = line.split(":")[0]
        elif name is not None:
            sections.setdefault(name, []).append(line.strip())
    tiny = sections["tiny"]
    for role, file in (("mvdream", TINY_MVDREAM_CHECKPOINT), ("mvdream config", TINY_MVDREAM_CONFIG)):
        row = next(i for i, line in enumerate(tiny) if line.split("  ")[0].strip() == role)
        assert "[present" in tiny[row] and tiny[row + 1] == f"at {root / file}", tiny[row:row + 2]
    paper = sections["sd21-paper"]
    row = next(i for i, line in enumerate(paper) if line.split("  ")[0].strip() == "mvdream")
    assert "MVDream/MVDream:sd-v2.1-base-4view.pt" in paper[row] and "[MISSING]" in paper[row]
    assert paper[row + 1] == "fetch: " + fetch_command("MVDream/MVDream:sd-v2.1-base-4view.pt", Layout.FILE)
