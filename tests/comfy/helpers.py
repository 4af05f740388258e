"""Small shared helpers of the comfy tier (sampling entry points, references)."""
from __future__ import annotations

import torch


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
