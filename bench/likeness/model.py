"""Training the likeness benchmark's mini latent diffusion model, and its checkpoint in ComfyUI's SD1.5 layout.

The UNet is the tiny SD1.5 layout of ``pipelines.synthetic.base.tiny_sd15_unet_config`` (320 channels, context
768, one level, a middle transformer: ComfyUI detects it as SD15), ComfyUI's own ``UNetModel`` trained in place
with ComfyUI's discrete eps schedule, so the very module and parameterisation KSampler uses. Text conditioning
comes from the random CLIP-L of the tiny checkpoint (deterministic weights, fp16-rounded as the file stores
them): its embeddings of the six layout prompts differ, which is all the UNet needs; the empty prompt is the
unconditional one (dropped for 15 % of the training samples, for classifier-free guidance). The VAE is the exact
box codec of ``codec.py``. The checkpoint (UNet fp32, CLIP fp16, codec fp32) loads with CheckpointLoaderSimple.

Reproducible: data, timesteps and noise of step i come from a generator seeded with (seed, i); the initial
weights from ``random_like``; one fixed thread count. The same torch build and thread count give the same
weights (their sha256 is recorded next to the file and in the benchmark's JSON).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import codec, figures

CHECKPOINT = "humanref-likeness-sd15.safetensors"
FORMAT = 4  # bump when the data, codec or training changes meaning (invalidates cached checkpoints)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 700
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 30
    ema: float = 0.99  # the saved weights are this exponential moving average of the trained ones
    final_lr_fraction: float = 0.1  # cosine decay to lr * this
    uncond_fraction: float = 0.15
    loss_weight_cap: float = 16.0  # see loss_weight
    seed: int = 0
    threads: int = 1  # CPU results depend on the thread count; one is also robust on a busy machine
    bf16: bool = True  # CPU autocast: ~2.4x faster on CPUs with avx512_bf16
    channel_mult: tuple[int, ...] = (1, 1, 1)  # UNet levels (see unet_config)

    def key(self) -> str:
        """What a cached checkpoint must match."""
        text = json.dumps({"format": FORMAT, **asdict(self), "torch": torch.__version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def clip_state_dict() -> dict[str, Tensor]:
    """The tiny checkpoint's random CLIP-L, fp16 (the checkpoint's own values), without the projection."""
    from humanref.pipelines.synthetic.base import clip_shapes, random_like

    sd = random_like(clip_shapes(), 1, torch.float16)
    return {k: v for k, v in sd.items() if k != "text_projection.weight"}


def load_clip(sd: dict[str, Tensor]) -> Any:
    """A comfy.sd.CLIP of the SD1.5 family from ``clip_state_dict``."""
    import comfy.sd
    import comfy.supported_models

    from humanref.pipelines.synthetic.base import sd15_unet_config

    clip = comfy.sd.CLIP(target=comfy.supported_models.SD15(sd15_unet_config()).clip_target(),
                         embedding_directory=None)
    clip.load_sd(sd)
    return clip


def encode_prompt(clip: Any, prompt: str) -> tuple[Tensor, Tensor]:
    """(cond [1, 77, 768], pooled), as CLIPTextEncode computes them."""
    return clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)


def prompt_table(clip: Any) -> Tensor:
    """[len(PROMPTS) + 1, 77, 768]: each layout's prompt, then the empty prompt (index -1)."""
    return torch.cat([encode_prompt(clip, p)[0] for p in (*figures.PROMPTS, "")]).float()


def schedule() -> Tensor:
    """ComfyUI's SD1.5 sigmas per discrete timestep (ModelSamplingDiscrete's defaults are SD1.5's)."""
    import comfy.model_sampling

    return comfy.model_sampling.ModelSamplingDiscrete().sigmas.float()


def unet_config(config: TrainConfig) -> dict:
    """An SD1.5-layout UNet config (320 channels, context 768, conv proj_in: ComfyUI detects it as SD15)."""
    from humanref.pipelines.synthetic.base import sd15_unet_config

    return sd15_unet_config(channel_mult=tuple(config.channel_mult), num_res_blocks=1, middle=True)


def build_unet(config: TrainConfig) -> torch.nn.Module:
    """ComfyUI's UNetModel of ``unet_config``, ``random_like`` weights, the output convolution zero."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from humanref.pipelines.loading.comfy_unet import unet_shapes
    from humanref.pipelines.synthetic.base import random_like

    cfg = unet_config(config)
    unet = UNetModel(**cfg, operations=comfy.ops.disable_weight_init)
    sd = random_like(unet_shapes(cfg), config.seed)
    sd["out.2.weight"].zero_()
    unet.load_state_dict(sd)
    return unet


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    low = config.final_lr_fraction
    return config.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(config: TrainConfig, step: int, sigmas: Tensor, table: Tensor) -> tuple[Tensor, ...]:
    """(model input, timesteps, context, target noise) of step ``step``: a pure function of (seed, step)."""
    cells, layouts = figures.batch(config.seed * 1_000_003 + step, config.batch)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 500_000_000)
    x0 = codec.encode_cells(cells)
    t = torch.randint(0, len(sigmas), (config.batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(config.batch, generator=gen) < config.uncond_fraction
    sigma = sigmas[t].view(-1, 1, 1, 1)
    x_in = (x0 + sigma * noise) / torch.sqrt(sigma ** 2 + 1)  # ComfyUI's EPS calculate_input
    context = table[torch.where(drop, torch.full_like(layouts, len(table) - 1), layouts)]
    return x_in, t.float(), context, noise


def loss_weight(sigma2: Tensor, config: TrainConfig) -> Tensor:
    """The v-prediction weighting of the eps loss, 1 + sigma^2 (the eps error times sigma is the x0 error),
    capped: plain eps MSE barely rewards the layout, which is decided at high noise (at sigma 5 an x0 error of
    0.23 is an eps error of 0.009), so the prompt would be ignored for thousands of steps."""
    return (1.0 + sigma2).clamp(max=config.loss_weight_cap)


def train(config: TrainConfig, table: Tensor, log: Optional[Callable[[str], None]] = None) -> tuple[dict, dict]:
    """Train from scratch; (UNet state dict, record with the loss curve and the time taken)."""
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # denormal gradients late in training slow a CPU down many times
    unet = build_unet(config)
    unet.train()
    sigmas = schedule()
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step)
        x_in, t, context, noise = training_batch(config, step, sigmas, table)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            eps = unet(x_in, t, context)
        sigma2 = sigmas[t.long()].view(-1, 1, 1, 1) ** 2
        loss = (loss_weight(sigma2, config) * (eps.float() - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1.0 - config.ema)
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 25 == 0:
            recent = losses[-25:]
            log(f"step {step + 1}/{config.steps}: loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    chunk = max(1, config.steps // 20)
    curve = [sum(losses[i:i + chunk]) / len(losses[i:i + chunk]) for i in range(0, len(losses), chunk)]
    sd = {k: v.float().contiguous() for k, v in ema.items()}
    return sd, {"train_seconds": seconds, "loss_curve_every": chunk, "loss_curve": curve,
                "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:])}


def weights_sha256(sd: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].float().numpy().tobytes())
    return h.hexdigest()


def checkpoint_state_dict(unet: dict[str, Tensor], clip: dict[str, Tensor]) -> dict[str, Tensor]:
    """One SD1.5 single-file checkpoint (ldm keys): trained UNet, the random CLIP-L, the box codec as TAESD."""
    from humanref.pipelines.loading.comfy_unet import UNET_PREFIX

    sd = {f"{UNET_PREFIX}{k}": v for k, v in unet.items()}
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.items()})
    sd.update({f"first_stage_model.{k}": v for k, v in codec.taesd_state_dict().items()})
    return {k: v.contiguous() for k, v in sd.items()}


def trained_checkpoint(out_dir: str, config: TrainConfig, retrain: bool = False,
                       log: Callable[[str], None] = print) -> tuple[str, dict]:
    """The cached checkpoint for ``config`` under ``out_dir`` (trained now when missing, stale or ``retrain``);
    (path, record: config, key, training time, loss curve, weights sha256)."""
    from safetensors.torch import save_file

    path = os.path.join(out_dir, CHECKPOINT)
    info_path = path + ".json"
    if not retrain and os.path.isfile(path) and os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("key") == config.key():
            log(f"using the cached mini model {path} (trained in {info['train_seconds']:.0f} s)")
            return path, info
        log(f"{path} was trained with other settings; training again")
    os.makedirs(out_dir, exist_ok=True)
    clip_sd = clip_state_dict()
    table = prompt_table(load_clip(clip_sd))
    log(f"training the mini model: {config.steps} steps of {config.batch} on {config.threads} threads")
    unet_sd, record = train(config, table, log)
    info = {"key": config.key(), "config": asdict(config), "format": FORMAT, "torch": torch.__version__,
            "unet_sha256": weights_sha256(unet_sd), **record}
    save_file(checkpoint_state_dict(unet_sd, clip_sd), path)
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    log(f"trained in {record['train_seconds']:.0f} s; saved {path}")
    return path, info
