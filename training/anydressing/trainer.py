"""Training AnyDressing's garment weights (paper 4, supplement 7) into HumanRef's format (``garment_weights``).

Trainable: per slot, a LoRA on q/k/v of every writer self-attention (GarmentsNet's GFE) and the dressing
projections W'_k, W'_v of every reader self-attention (initialised from the reader's W_k, W_v). Frozen: the
SD1.5 UNet (writer and reader share it), the VAE and CLIP. One step:

- garments -> VAE means (as the GarmentLoRAExtractor node encodes them) -> writer pass at t = 0;
- person -> x0 (posterior sample), noise, t, x_t; reader pass with the dual attention (lambda 1.0 in training;
  the node's default 0.7 is the paper's inference value);
- L = L_LDM + 0.01 * L_IGL + 0.001 * L_HF, L_HF only on the samples with t <= 350, on the VAE decode of the
  one-step estimate x0_hat (``training.losses``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import BaseModel, UNetTask, build_unet, ddim_scheduler, transformer_paths, vae_decode, vae_encode
from ..losses import localization_loss, texture_loss
from .model import GarmentAdapters, ReaderPass, WriterPass, grids_for, install, module_widths


@dataclass(frozen=True)
class GarmentTrainConfig:
    slots: tuple[str, ...] = ("upper", "lower")
    rank: int = 32
    alpha: Optional[float] = None  # None: rank (LoRA scale 1)
    lr: float = 5e-5
    dressing_scale: float = 1.0  # lambda of the dual term in training
    localization_weight: float = 0.01
    texture_weight: float = 0.001
    texture_max_timestep: int = 350
    canny_low: float = 0.1
    canny_high: float = 0.2
    caption_dropout: float = 0.0
    height: int = 768
    width: int = 576
    sample_steps: int = 30
    sample_cfg: float = 6.0
    sample_dressing_scale: float = 0.7

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        for name in ("localization_weight", "texture_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.texture_max_timestep < 1000:
            raise ValueError(f"--texture-max-timestep must be within 0..999, got {self.texture_max_timestep}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"--caption-dropout must be within 0..1, got {self.caption_dropout}")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class GarmentTask(UNetTask):
    kind = "garments"
    # some writer LoRA parameters never get a gradient (the reader reads only the writer blocks' attention
    # inputs, so what the last block's LoRA changes goes nowhere); DDP must look for them
    unused_parameters = True

    def __init__(self, base: BaseModel, config: GarmentTrainConfig, seed: int = 0) -> None:
        self._init_common(base, config)
        self.unet = build_unet(base)
        self.unet.requires_grad_(False)
        pairs = transformer_paths(base.unet_config)
        self.diffusers_paths = [d for d, _ in pairs]
        self.comfy_paths = [c for _, c in pairs]
        widths, own = module_widths(self.unet, self.diffusers_paths)
        self.adapters = GarmentAdapters(self.diffusers_paths, widths, config.slots, config.rank, config.lora_alpha, own,
                                        torch.Generator().manual_seed(seed + 4_242))
        install(self.unet, self.adapters, self.diffusers_paths)
        self.levels = len(base.unet_config["channel_mult"])

    # ---- protocol ------------------------------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [self.adapters]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.adapters.parameters()), "lr": self.config.lr}]

    def settings(self) -> dict:
        c = self.config
        return {"kind": self.kind, "base": self.base.name, "slots": list(c.slots), "rank": c.rank,
                "alpha": c.lora_alpha, "height": c.height, "width": c.width}

    def save(self, path: str, metadata: dict) -> None:
        import os

        from ...pipelines.anydressing.weights import save_garment_weights

        lora, dressing = self.adapters.export(self.comfy_paths)
        tmp = path + ".part.safetensors"
        save_garment_weights(tmp, self.base.family, self.config.slots, self.config.rank, lora, dressing,
                             alpha=self.config.lora_alpha)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        from ...pipelines.anydressing.weights import load_garment_weights

        weights = load_garment_weights(path)
        if weights.base_model != self.base.family:
            raise ValueError(f"{path} is for {weights.base_model}, the base is {self.base.family}")
        self.adapters.load_from(weights, self.comfy_paths)

    # ---- passes --------------------------------------------------------------------------------------------
    def grids(self, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        return grids_for(latent_hw[0], latent_hw[1], self.levels)

    def run_writer(self, garment_latents: Tensor, garment_masks: Optional[Tensor], garments: int,
                   autocast: Any) -> WriterPass:
        """GarmentsNet once at t = 0 over [B * G] garment latents (sample-major)."""
        rows = garment_latents.shape[0]
        writer = WriterPass(torch.arange(garments, device=self.device).repeat(rows // garments),
                            garment_masks, self.grids(tuple(garment_latents.shape[-2:])))
        ctx = torch.zeros(rows, 1, int(self.base.unet_config["context_dim"]), device=self.device)
        with autocast():
            self.unet(garment_latents, torch.zeros(rows, device=self.device), ctx,
                      cross_attention_kwargs={"garment": writer})
        return writer

    def reader_eps(self, noisy: Tensor, t: Tensor, ctx: Tensor, reader: Optional[ReaderPass], autocast: Any) -> Tensor:
        with autocast():
            return self.unet(noisy, t, ctx, cross_attention_kwargs={"garment": reader}).sample.float()

    def encode_garments(self, garments: Tensor, autocast: Any) -> Tensor:
        """[B, G, 3, H, W] -> [B * G, 4, h, w]: the VAE mean (ComfyUI's VAE encode), scaled."""
        with torch.no_grad(), autocast():
            return vae_encode(self.vae, garments.flatten(0, 1), self.base.scale_factor, sample=False).float()

    def compute_loss(self, batch: dict, generator: torch.Generator, autocast: Any,
                     noise: Optional[Tensor] = None, timesteps: Optional[Tensor] = None) -> tuple[Tensor, dict]:
        c = self.config
        person = batch["person"]
        b, g = batch["garments"].shape[:2]
        if "latents" in batch:
            latents = batch["latents"].float()
        else:
            with torch.no_grad(), autocast():
                latents = vae_encode(self.vae, person, self.base.scale_factor, generator).float()
        glat = batch["garment_latents"] if "garment_latents" in batch else self.encode_garments(batch["garments"],
                                                                                                autocast)
        writer = self.run_writer(glat, batch["garment_masks"].flatten(0, 1), g, autocast)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(self.device)
        drop = (torch.rand(b, generator=generator) < c.caption_dropout).tolist()
        ctx = self.text(["" if d else cap for cap, d in zip(batch["caption"], drop)]).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        reader = ReaderPass(writer, g, c.dressing_scale, self.grids(tuple(latents.shape[-2:])),
                            want_maps=c.localization_weight > 0)
        eps = self.reader_eps(noisy, timesteps, ctx, reader, autocast)
        loss_ldm = F.mse_loss(eps, noise)
        loss = loss_ldm
        parts = {"ldm": loss_ldm.detach()}
        if c.localization_weight > 0:
            loss_loc = localization_loss(reader.maps, batch["regions"])
            loss = loss + c.localization_weight * loss_loc
            parts["localization"] = loss_loc.detach()
        if c.texture_weight > 0:
            sel = timesteps <= c.texture_max_timestep
            loss_tex = torch.zeros((), device=self.device)
            if bool(sel.any()):
                a = self.alphas[timesteps[sel]].view(-1, 1, 1, 1)
                x0 = (noisy[sel] - (1 - a).sqrt() * eps[sel]) / a.sqrt()
                with autocast():
                    decoded = vae_decode(self.vae, x0, self.base.scale_factor).float()
                loss_tex = texture_loss(decoded, person[sel], batch["regions"][sel], c.canny_low, c.canny_high)
                loss = loss + c.texture_weight * loss_tex
            parts["texture"] = loss_tex.detach()
        parts["loss"] = loss.detach()
        return loss, parts

    # ---- sample grid ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, garments: Tensor, garment_masks: Tensor, captions: Sequence[str], generator: torch.Generator,
                 autocast: Any, steps: Optional[int] = None, cfg: Optional[float] = None,
                 lam: Optional[float] = None) -> Tensor:
        """DDIM with joint CFG (uncond: no text, no garments) -> images [B, H, W, 3] in 0..1."""
        c = self.config
        steps, cfg = steps or c.sample_steps, c.sample_cfg if cfg is None else cfg
        lam = c.sample_dressing_scale if lam is None else lam
        b, g = garments.shape[:2]
        writer = self.run_writer(self.encode_garments(garments, autocast), garment_masks.flatten(0, 1), g, autocast)
        h, w = garments.shape[-2] // 8, garments.shape[-1] // 8
        reader = ReaderPass(writer, g, lam, self.grids((h, w)))
        pos = self.text(list(captions)).to(self.device)
        neg = self.text([""] * b).to(self.device)
        sched = ddim_scheduler()
        sched.set_timesteps(steps)
        x = torch.randn(b, 4, h, w, generator=generator).to(self.device)
        for t in sched.timesteps:
            tt = t.expand(b).to(self.device)
            eps_c = self.reader_eps(x, tt, pos, reader, autocast)
            eps_u = self.reader_eps(x, tt, neg, None, autocast) if cfg != 1.0 else eps_c
            x = sched.step(eps_u + cfg * (eps_c - eps_u), t, x).prev_sample
        with autocast():
            images = vae_decode(self.vae, x, self.base.scale_factor).float()
        return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    def sample_grid(self, batch: dict, generator: torch.Generator, autocast: Any) -> Tensor:
        """Rows: [garment 1 | ... | garment G | generated | training image] per sample."""
        images = self.generate(batch["garments"], batch["garment_masks"], batch["caption"], generator, autocast)
        rows = []
        for i in range(images.shape[0]):
            tiles = [((x.cpu().float() + 1) / 2).permute(1, 2, 0) for x in batch["garments"][i]]
            tiles += [images[i], ((batch["person"][i].cpu().float() + 1) / 2).permute(1, 2, 0)]
            rows.append(torch.cat(tiles, dim=1))
        return torch.cat(rows, dim=0)


def collate(items: Sequence[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out
