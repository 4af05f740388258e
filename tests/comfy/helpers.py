"""Shared helpers of the comfy tier: sampling entry points, references and a reference bank, a tiny SD1.5 base
and checkpoint file for the trainers."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

from humanref.pipelines.references.inputs import prepare_references
from humanref.pipelines.references.patch import build_reference_bank
from humanref.training.base import base_from_state_dict
from humanref.training.base import load_base as _REAL_LOAD_BASE  # before any monkeypatch
from humanref.training.loop import autocast_for

LATENT = torch.zeros(1, 4, 6, 10)  # the reference-patch tests' latent: a 6x10 grid
NOGRAD = autocast_for(torch.device("cpu"), None)
_CACHE: dict = {}
atexit.register(_CACHE.clear)  # ComfyUI objects go while ComfyUI's modules are still there


def ksample(model, conds, latent: torch.Tensor, cfg: float = 5.0, steps: int = 3, seed: int = 7,
            sampler: str = "euler", record: list | None = None):
    """Real KSampler path (nodes.common_ksampler); ``record`` collects (cond_denoised, uncond_denoised) per step."""
    import nodes

    if record is not None:
        model = model.clone()

        def post_cfg(args):
            record.append((args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
            return args["denoised"]

        model.set_model_sampler_post_cfg_function(post_cfg)
    pos, neg = conds
    out = nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", pos, neg, {"samples": latent})
    return out[0]["samples"]


def custom_sample(model, conds, latent: torch.Tensor, cfg: float = 5.0, steps: int = 3, seed: int = 7,
                  sampler: str = "euler"):
    """SamplerCustomAdvanced with RandomNoise, CFGGuider, KSamplerSelect and BasicScheduler nodes."""
    from comfy_extras import nodes_custom_sampler as ncs

    pos, neg = conds
    noise = ncs.RandomNoise.execute(seed).result[0]
    guider = ncs.CFGGuider.execute(model, pos, neg, cfg).result[0]
    sampler_obj = ncs.KSamplerSelect.execute(sampler).result[0]
    sigmas = ncs.BasicScheduler.execute(model, "normal", steps, 1.0).result[0]
    out = ncs.SamplerCustomAdvanced.execute(noise, guider, sampler_obj, sigmas, {"samples": latent}).result
    return out[0]["samples"]


def reference_images(count: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, size[0], size[1], 3, generator=g) for _ in range(count)]


def box_mask(size: tuple[int, int], top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    m = torch.zeros(1, *size)
    m[:, top:bottom, left:right] = 1.0
    return m


def diffusers_sdpa(attn, q, k, v):
    """Multi-head attention as diffusers' AttnProcessor2_0 computes it (for the official-semantics references)."""
    import torch.nn.functional as F

    b, h = q.shape[0], attn.heads
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(b, -1, h * o.shape[-1])


def make_bank(model, clip_vae, timing="once at t=0", count=2, masked=True, seed=0, size=(64, 48)):
    clip, vae = clip_vae
    images = reference_images(count, size, seed)
    inputs = []
    for i, img in enumerate(images):
        mask = box_mask(size, 8, 4, 40 + 4 * i, 30) if masked and i % 2 == 0 else None
        inputs.append((i + 1, img, mask, ["face", "upper body clothes", "shoes", "hair or headwear"][i % 4]))
    refs = prepare_references(inputs, 768, 6)
    return build_reference_bank(model, vae, clip, refs, timing, "parts2whole")


def tiny_unet_ldm() -> dict:
    if "unet" not in _CACHE:
        from humanref.pipelines.synthetic.base import random_like, tiny_sd15_unet_config, unet_shapes

        _CACHE["unet"] = random_like(unet_shapes(tiny_sd15_unet_config()), 0, torch.float32)
    return _CACHE["unet"]


def tiny_base(clip_vae):
    """A fresh BaseModel (the checkpoint reading path minus the file): tiny UNet, the session's CLIP/VAE."""
    clip, vae = clip_vae
    sd = {f"model.diffusion_model.{k}": v for k, v in tiny_unet_ldm().items()}
    return base_from_state_dict(sd, "tiny-sd15.safetensors", clip=clip, vae=vae)


def tiny_checkpoint(clip_vae) -> str:
    """An SD1.5 single-file checkpoint in the tiny-models layout (tiny UNet, full CLIP and VAE), fp16, once."""
    if "checkpoint" not in _CACHE:
        import comfy.supported_models
        from safetensors.torch import save_file

        from humanref.pipelines.synthetic.base import tiny_sd15_unet_config

        clip, vae = clip_vae
        config = comfy.supported_models.SD15(tiny_sd15_unet_config())
        sd = {f"model.diffusion_model.{k}": v for k, v in tiny_unet_ldm().items()}
        sd.update(config.process_clip_state_dict_for_saving(clip.get_sd()))
        sd.update(config.process_vae_state_dict_for_saving(vae.get_sd()))
        folder = tempfile.mkdtemp(prefix="humanref-train-test-")
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, "humanref-tiny-sd15.safetensors")
        save_file({k: v.half().contiguous() for k, v in sd.items()}, path)
        _CACHE["checkpoint"] = path
    return _CACHE["checkpoint"]


def cached_load_base(path: str):
    """training.base.load_base, reading each checkpoint file once per session (the CLI tests share it)."""
    if ("base", path) not in _CACHE:
        _CACHE[("base", path)] = _REAL_LOAD_BASE(path)
    return _CACHE[("base", path)]
