"""Parity: one UNet evaluation of the ComfyUI MimicBrush path against the official semantics written
independently here with diffusers' UNet2DConditionModel and transformers' CLIP vision model.

The same synthetic mimicbrush.bin for both sides, float32. The diffusers side does what the official pipeline
does: image prompt = image_proj(CLIP hidden_states[-2]) of the reference and of an all-zero pixel tensor; the
reference UNet runs with batch [uncond, cond] image prompts on the clean reference latents at the current t and
stores the norm1 output of every mid/up transformer block; the imitative UNet gets [x_t | mask (nearest) |
latent of the black-filled image | depth guider feature] and in its mid/up self-attention computes
0.5 * Attn(cat[x, ref]) (concatenation as query, first N rows kept) + 0.5 * Attn(x), then overwrites the
uncond half with plain self-attention.
"""
import math

import diffusers  # a dependency of the pack
import pytest
import torch
import torch.nn.functional as F
from helpers import diffusers_sdpa

RES = 64  # working resolution (latent 8x8); image, mask and depth are given at this size (no resampling)
REF = 224  # the reference at CLIP's input size, so CLIP sees the same pixels on both sides
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, comfy_env):
    from humanref.pipelines.synthetic.mimicbrush import mimicbrush_checkpoint

    data = mimicbrush_checkpoint(seed=5, dtype=torch.float32)
    path = tmp_path_factory.mktemp("mbp") / "mimicbrush.bin"
    torch.save(data, str(path))
    return str(path), data


def _pixels(seed, h, w):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, h, w, 3), generator=g).float() / 255.0


class WriteProcessor:
    """Writer: store the attn1 input (the norm1 output), then plain self-attention."""

    def __init__(self, name, bank):
        self.name, self.bank = name, bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.bank[self.name] = hidden_states.clone()
        out = diffusers_sdpa(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        return attn.to_out[0](out)


class ReadProcessor:
    """Reader, official: blend for every row with that row's bank entry, then the uncond half replaced."""

    def __init__(self, name, bank):
        self.name, self.bank = name, bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        n = hidden_states.shape[1]
        full = torch.cat([hidden_states, self.bank[self.name]], dim=1)
        shared = attn.to_out[0](diffusers_sdpa(attn, attn.to_q(full), attn.to_k(full), attn.to_v(full)))[:, :n]
        raw = attn.to_out[0](diffusers_sdpa(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                   attn.to_v(hidden_states)))
        out = shared * 0.5 + raw * 0.5
        half = hidden_states.shape[0] // 2
        return torch.cat([raw[:half], out[half:]], dim=0)


def guider_forward(sd, depth):
    x = F.interpolate(depth, size=(RES, RES), mode="bilinear", align_corners=True)
    x = F.silu(F.conv2d(x, sd["conv_in.weight"], sd["conv_in.bias"], padding=1))
    for i in range(6):
        x = F.silu(F.conv2d(x, sd[f"blocks.{i}.weight"], sd[f"blocks.{i}.bias"], stride=1 + i % 2, padding=1))
    return F.conv2d(x, sd["conv_out.weight"], sd["conv_out.bias"], padding=1)


def official_eps(data, x_t, t, ref_latent, ref_pixels, mask, masked_latent, depth):
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from humanref.pipelines.synthetic.mimicbrush import TINY_CLIP_VISION

    cfg = dict(sample_size=RES // 8, out_channels=4, layers_per_block=1, block_out_channels=(320,),
               down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
               cross_attention_dim=768, attention_head_dim=8)
    unet = UNet2DConditionModel(in_channels=13, **cfg).eval()
    unet.load_state_dict(data["unet"])
    ref_unet = UNet2DConditionModel(in_channels=4, **cfg).eval()
    missing, unexpected = ref_unet.load_state_dict(data["referencenet"], strict=False)
    assert not unexpected and all(k.startswith(("conv_", "up_blocks.0.attentions.1")) for k in missing)

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()
    # ComfyUI keeps CLIP vision weights in fp16 (text_encoder_dtype) and computes in fp32: same weights here
    encoder.load_state_dict({k: v.half().float() for k, v in data["image_encoder"].items()}, strict=False)
    pil = Image.fromarray((ref_pixels[0] * 255).round().to(torch.uint8).numpy())
    pixel = CLIPImageProcessor()(images=pil, return_tensors="pt").pixel_values
    w, b = data["image_proj"]["projector.weight"], data["image_proj"]["projector.bias"]
    with torch.no_grad():
        cond = encoder(pixel, output_hidden_states=True).hidden_states[-2] @ w.t() + b
        uncond = encoder(torch.zeros_like(pixel), output_hidden_states=True).hidden_states[-2] @ w.t() + b
        prompts = torch.cat([uncond, cond], dim=0)

        midup = [n for n in ref_unet.attn_processors if n.startswith(("mid_block", "up_blocks"))
                 and n.endswith("attn1.processor")]
        assert len(midup) == 3  # tiny model: middle + 2 up transformers (10 on SD1.5)
        bank: dict = {}
        procs = {n: (WriteProcessor(n, bank) if n in midup else diffusers.models.attention_processor.AttnProcessor2_0())
                 for n in ref_unet.attn_processors}
        ref_unet.set_attn_processor(procs)
        ref_unet(ref_latent.repeat(2, 1, 1, 1), t, encoder_hidden_states=prompts)

        procs = {n: (ReadProcessor(n, bank) if n in midup else diffusers.models.attention_processor.AttnProcessor2_0())
                 for n in unet.attn_processors}
        unet.set_attn_processor(procs)
        feat = guider_forward(data["depth_guider"], depth)
        mask_lat = F.interpolate(mask, size=(RES // 8, RES // 8))
        extra = torch.cat([mask_lat, masked_latent, feat], dim=1).repeat(2, 1, 1, 1)
        eps = unet(torch.cat([torch.cat([x_t, x_t]), extra], dim=1), t, encoder_hidden_states=prompts).sample
    return eps[:1], eps[1:], cond, uncond


def test_one_unet_evaluation_matches_official_semantics(checkpoint, clip_vae):
    import nodes

    from humanref.pipelines.images import resize_square
    from humanref.pipelines.mimicbrush.pipeline import setup_mimicbrush
    from humanref.pipelines.mimicbrush.weights import load_mimicbrush

    path, data = checkpoint
    _, vae = clip_vae
    loaded = load_mimicbrush(path, dtype=torch.float32)
    image = _pixels(1, RES, RES)
    mask = torch.zeros(1, RES, RES)
    mask[:, 16:48, 8:40] = 1.0
    reference = _pixels(2, REF, REF)
    depth = _pixels(3, RES, RES)
    setup = setup_mimicbrush(loaded.model, loaded.parts, vae, image, mask, reference, depth=depth, keep_shape=True,
                             resolution=RES)
    record = []

    def post_cfg(args):
        record.append({k: args[k].clone() for k in ("input", "sigma", "cond_denoised", "uncond_denoised")})
        return args["denoised"]

    model = setup.model.clone()
    model.set_model_sampler_post_cfg_function(post_cfg)
    nodes.common_ksampler(model, 5, 1, 5.0, "euler", "normal", setup.positive, setup.negative, setup.latent)
    assert len(record) == 1
    r = record[0]
    sigma = float(r["sigma"][0])
    from diffusers import DDIMScheduler

    acp = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert abs(sigma - float(((1 - acp[999]) / acp[999]).sqrt())) < 1e-4 * sigma  # t = 999
    x_t = r["input"] / math.sqrt(sigma ** 2 + 1)
    eps_c = (r["input"] - r["cond_denoised"]) / sigma
    eps_u = (r["input"] - r["uncond_denoised"]) / sigma

    ref_latent = vae.encode(resize_square(reference, RES)) * 0.18215
    masked_latent = vae.encode(image * (1 - mask[..., None])) * 0.18215
    off_u, off_c, cond, uncond = official_eps(data, x_t, torch.tensor([999.0]), ref_latent, reference,
                                              mask[:, None], masked_latent, depth.mean(-1)[:, None])
    torch.testing.assert_close(setup.positive[0][0], cond, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(setup.negative[0][0], uncond, rtol=1e-4, atol=1e-4)
    assert float(eps_c.abs().mean()) > 0.05  # a real signal
    assert float((off_c - off_u).abs().max()) > 1e-2  # image prompt and references matter
    diff_c = float((eps_c - off_c).abs().max())
    diff_u = float((eps_u - off_u).abs().max())
    assert diff_u <= TOL, diff_u
    assert diff_c <= TOL, diff_c
