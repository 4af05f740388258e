"""Training the hand generator (paper III-B, IV-B) into HumanRef's layout (``pipelines.hands.weights``).

The model is the SD1.5 UNet (diffusers) with a 15-channel ``conv_in`` (the checkpoint's 4 latent channels
kept, 11 new condition channels randomly initialised) plus the mask head f_m. One step:

- latents x0 of the crop (VAE posterior sample, SD scaling), noise eps, t ~ U{0..999}, x_t (DDPM schedule);
- eps_hat = UNet([x_t, condition downscaled bilinearly to the latent], t, CLIP(caption));
- the mask head reads the VAE decoder's middle-block features (the inference input of the layout) of the
  one-step estimate x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t), so the mask loss reaches the UNet
  (the paper's multi-task regularisation); ``mask_input="clean"`` uses x0 instead (head-only mask learning);
- L = ||eps - eps_hat||^2 + 0.5 * mean((M - m)^2), m the head's raw output for the ``clamp`` activation
  (clamped only at inference), its sigmoid for ``sigmoid``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...pipelines.hands.condition import CONDITION_CHANNELS, downscale_condition
from ...pipelines.hands.weights import ACTIVATIONS, IN_CHANNELS, MaskHead
from ..base import BaseModel, UNetTask, build_unet, ddim_scheduler, decoder_mid_features, vae_decode, vae_encode

MASK_INPUTS = ("x0-estimate", "clean")
CONV_IN_INITS = ("random", "zeros")


@dataclass(frozen=True)
class HandTrainConfig:
    lr: float = 1e-5
    mask_head_lr: Optional[float] = None  # None: lr
    mask_weight: float = 0.5  # lambda of eq. 8
    mask_input: str = "x0-estimate"
    mask_activation: str = "clamp"
    conv_in_init: str = "random"
    caption_dropout: float = 0.0
    resolution: int = 512
    sample_steps: int = 20
    sample_cfg: float = 7.0

    def __post_init__(self) -> None:
        if self.mask_input not in MASK_INPUTS:
            raise ValueError(f"--mask-input must be one of {MASK_INPUTS}, got {self.mask_input!r}")
        if self.mask_activation not in ACTIVATIONS:
            raise ValueError(f"--mask-activation must be one of {ACTIVATIONS}, got {self.mask_activation!r}")
        if self.conv_in_init not in CONV_IN_INITS:
            raise ValueError(f"--conv-in-init must be one of {CONV_IN_INITS}, got {self.conv_in_init!r}")
        if self.lr <= 0 or (self.mask_head_lr is not None and self.mask_head_lr <= 0):
            raise ValueError("learning rates must be positive")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"--caption-dropout must be within 0..1, got {self.caption_dropout}")
        if self.mask_weight < 0:
            raise ValueError(f"--mask-weight must not be negative, got {self.mask_weight}")


def widen_conv_in(unet: Any, base_weight: Tensor, init: str, generator: torch.Generator) -> None:
    """conv_in [C, 15, 3, 3]: channels 0-3 the checkpoint's, 4-14 N(0, std of the checkpoint's) or zeros."""
    w = torch.zeros(base_weight.shape[0], IN_CHANNELS, *base_weight.shape[2:])
    w[:, :4] = base_weight.float()
    if init == "random":
        std = float(base_weight.float().std())
        w[:, 4:] = torch.randn(w[:, 4:].shape, generator=generator) * std
    with torch.no_grad():
        unet.conv_in.weight.copy_(w)


def condition_preview(condition: Tensor) -> Tensor:
    """[11, S, S] -> [S, S, 3]: finger heatmaps (max) in white, the mask channel in red."""
    heat = condition[: CONDITION_CHANNELS - 1].max(dim=0).values
    mask = condition[CONDITION_CHANNELS - 1]
    return torch.stack([torch.maximum(heat, 0.6 * mask), heat, heat], dim=-1).clamp(0, 1)


class HandTask(UNetTask):
    kind = "hand-generator"

    def __init__(self, base: BaseModel, config: HandTrainConfig, seed: int = 0) -> None:
        self._init_common(base, config)
        self.unet = build_unet(base, in_channels=IN_CHANNELS)
        widen_conv_in(self.unet, base.unet["conv_in.weight"], config.conv_in_init,
                      torch.Generator().manual_seed(seed + 12_345))
        with torch.random.fork_rng(devices=[]):  # the head's default init, reproducible, global RNG untouched
            torch.manual_seed(seed + 54_321)
            self.head = MaskHead(activation=config.mask_activation)

    # ---- protocol ------------------------------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.head]

    def param_groups(self) -> list[dict]:
        head_lr = self.config.mask_head_lr or self.config.lr
        return [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": self.config.lr},
                {"params": list(self.head.parameters()), "lr": head_lr}]

    def settings(self) -> dict:
        c = self.config
        return {"kind": self.kind, "base": self.base.name, "resolution": c.resolution,
                "mask_activation": c.mask_activation}

    def metadata(self) -> dict:
        return {"mask_activation": self.config.mask_activation, "base_checkpoint": self.base.name,
                "heatmap_sigma": str(self.config.resolution / 64.0), "resolution": str(self.config.resolution),
                "description": "hand generator trained with python -m humanref train hand-generator"}

    def save(self, path: str, metadata: dict) -> None:
        from ...pipelines.hands.weights import save_hand_generator

        meta = self.metadata()
        meta.update({k: str(v) for k, v in metadata.items()})
        save_hand_generator(path, self.unet.state_dict(), self.head, meta)

    def load(self, path: str) -> None:
        """Weights back from a file in our layout (resume)."""
        from ...pipelines.hands.weights import mask_head_from_state_dict, split_checkpoint
        from ...pipelines.loading.diffusers_unet import diffusers_names
        from ...pipelines.loading.files import read_state_dict

        sd, metadata = read_state_dict(path)
        unet, head, meta = split_checkpoint(sd, metadata, path)
        self.unet.load_state_dict(diffusers_names(self.base.unet_config, unet, path), strict=True)
        loaded = mask_head_from_state_dict(head, meta.get("mask_activation", "clamp"), path)
        self.head.load_state_dict(loaded.state_dict())

    # ---- the objective -------------------------------------------------------------------------------------
    def encode(self, batch: dict, generator: torch.Generator, autocast: Any) -> tuple[Tensor, Tensor]:
        if "latents" in batch:  # precomputed (a latent cache, or a test on a fixed batch)
            latents = batch["latents"].float()
        else:
            with torch.no_grad(), autocast():
                latents = vae_encode(self.vae, batch["image"], self.base.scale_factor, generator).float()
        cond = downscale_condition(batch["condition"], latents.shape[-2], latents.shape[-1])
        return latents, cond

    def contexts(self, captions: list[str], generator: torch.Generator) -> Tensor:
        drop = torch.rand(len(captions), generator=generator) < self.config.caption_dropout
        return self.text([("" if d else c) for c, d in zip(captions, drop.tolist())]).to(self.device)

    def predict(self, noisy: Tensor, cond: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        return self.unet(torch.cat([noisy, cond.to(noisy.dtype)], dim=1), t, ctx).sample

    def mask_logits(self, latents: Tensor) -> Tensor:
        """The head's raw output (before the clamp/sigmoid of inference) at image resolution, [B, H, W]."""
        feats = decoder_mid_features(self.vae, latents, self.base.scale_factor)
        return F.avg_pool2d(self.head.layers(feats), 2)[:, 0]

    def compute_loss(self, batch: dict, generator: torch.Generator, autocast: Any,
                     noise: Optional[Tensor] = None, timesteps: Optional[Tensor] = None) -> tuple[Tensor, dict]:
        latents, cond = self.encode(batch, generator, autocast)
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(self.device)
        ctx = self.contexts(batch["caption"], generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with autocast():
            eps = self.predict(noisy, cond, timesteps, ctx).float()
        loss_ldm = F.mse_loss(eps, noise)
        if self.config.mask_input == "x0-estimate":
            a = self.alphas[timesteps].view(-1, 1, 1, 1)
            x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x0 = latents
        with autocast():
            raw = self.mask_logits(x0).float()
        pred = torch.sigmoid(raw) if self.config.mask_activation == "sigmoid" else raw
        loss_mask = F.mse_loss(pred, batch["mask"].float())
        loss = loss_ldm + self.config.mask_weight * loss_mask
        return loss, {"loss": loss.detach(), "ldm": loss_ldm.detach(), "mask": loss_mask.detach()}

    # ---- sample grid ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, condition: Tensor, captions: list[str], generator: torch.Generator, autocast: Any,
                 steps: Optional[int] = None, cfg: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """DDIM with classifier-free guidance (negative = empty caption) -> (images [B, S, S, 3], masks [B, S, S])."""
        steps = steps or self.config.sample_steps
        cfg = self.config.sample_cfg if cfg is None else cfg
        size = condition.shape[-1]
        b = condition.shape[0]
        cond = downscale_condition(condition, size // 8, size // 8).to(self.device)
        pos = self.text(captions).to(self.device)
        neg = self.text([""] * b).to(self.device)
        sched = ddim_scheduler()
        sched.set_timesteps(steps)
        x = torch.randn(b, 4, size // 8, size // 8, generator=generator).to(self.device)
        for t in sched.timesteps:
            tt = t.expand(b).to(self.device)
            with autocast():
                eps_c = self.predict(x, cond, tt, pos).float()
                eps_u = self.predict(x, cond, tt, neg).float() if cfg != 1.0 else eps_c
            x = sched.step(eps_u + cfg * (eps_c - eps_u), t, x).prev_sample
        with autocast():
            images = vae_decode(self.vae, x, self.base.scale_factor).float()
            raw = self.mask_logits(x).float()
        mask = torch.sigmoid(raw) if self.config.mask_activation == "sigmoid" else raw.clamp(0, 1)
        return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu(), mask.cpu()

    def sample_grid(self, batch: dict, generator: torch.Generator, autocast: Any) -> Tensor:
        """Rows: [training crop | condition | generated | predicted mask] per sample."""
        images, masks = self.generate(batch["condition"], batch["caption"], generator, autocast)
        rows = []
        for i in range(images.shape[0]):
            crop = ((batch["image"][i].cpu().float() + 1) / 2).permute(1, 2, 0)
            rows.append(torch.cat([crop, condition_preview(batch["condition"][i].cpu()), images[i],
                                   masks[i].unsqueeze(-1).expand(-1, -1, 3)], dim=1))
        return torch.cat(rows, dim=0)

