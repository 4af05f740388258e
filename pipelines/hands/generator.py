"""Stage 1 (paper III-B): hand crops generated from hand keypoints, with their masks, ComfyUI side.

Two backends:

- trained: our 15-channel SD1.5 UNet (``hand_weights``); the 11-channel condition, downscaled bilinearly to
  the latent, reaches it as the ``noise_concat`` conditioning value (ComfyUI concatenates it to the latent on
  every call: any sampler, scheduler, LoRA); the mask comes from the mask head on the VAE decoder features of
  the final latent.
- training-free (default): the user's SD1.5 checkpoint with an OpenPose ControlNet on the hands-only skeleton
  of each crop; the mask is drawn from the keypoints (finger capsules and palm, dilated): an approximation of
  the hand's silhouette, not a segmentation.

Every crop of the person (one for both hands when they are close, else one per hand) is one batch item.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .condition import (
    HandCrop,
    crop_image,
    downscale_condition,
    hand_condition,
    hand_skeleton,
    keypoint_mask,
    plan_crops,
)
from .keypoints import Person, PoseFrame


@dataclass(frozen=True, eq=False)
class HandCrops:
    """What the canvas node needs to put the generated crops back: the canvas size, the person, the crops."""

    width: int
    height: int
    person: Person
    crops: tuple[HandCrop, ...]


@dataclass(frozen=True)
class SamplingOptions:
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"


def plan(frame: PoseFrame, person: Person, size: int, crop_scale: float) -> HandCrops:
    return HandCrops(frame.width, frame.height, person, plan_crops(person, size, crop_scale))


def _sample(model: Any, positive: list, negative: list, batch: int, size: int, o: SamplingOptions) -> Tensor:
    import nodes as comfy_nodes

    latent = torch.zeros(batch, 4, size // 8, size // 8)
    (out,) = comfy_nodes.common_ksampler(model, o.seed, o.steps, o.cfg, o.sampler_name, o.scheduler, positive, negative,
                                   {"samples": latent})
    return out["samples"]


def crop_masks(hands: HandCrops, mask: Optional[Tensor]) -> Optional[Tensor]:
    """A canvas-sized hand MASK cut into the crops ([B, size, size]), for the condition's mask channel."""
    if mask is None:
        return None
    if mask.ndim == 3:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"hand_mask must be a MASK [batch, height, width], got {tuple(mask.shape)}")
    if tuple(mask.shape) != (hands.height, hands.width):
        raise ValueError(f"hand_mask is {mask.shape[1]}x{mask.shape[0]} but the pose canvas is "
                         f"{hands.width}x{hands.height}: give a mask of the pose's size")
    return torch.stack([crop_image(mask.unsqueeze(-1).float(), c)[..., 0] for c in hands.crops])


@torch.no_grad()
def generate_trained(weights: Any, positive: list, negative: list, vae: Any, hands: HandCrops,
                     options: SamplingOptions, sigma: Optional[float] = None,
                     hand_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(IMAGE [B, S, S, 3], MASK [B, S, S]) from the trained hand generator."""
    import node_helpers

    from .weights import predict_mask

    size = hands.crops[0].size
    masks = crop_masks(hands, hand_mask)
    cond = torch.stack([hand_condition(hands.person, c, sigma, None if masks is None else masks[i])
                        for i, c in enumerate(hands.crops)])
    cond = downscale_condition(cond, size // 8, size // 8)
    pos = node_helpers.conditioning_set_values(positive, {"noise_concat": cond})
    neg = node_helpers.conditioning_set_values(negative, {"noise_concat": cond})
    samples = _sample(weights.model, pos, neg, len(hands.crops), size, options)
    images = vae.decode(samples)[..., :3].float().cpu()
    mask = predict_mask(weights.head, vae, samples)
    if mask.shape[-2:] != images.shape[1:3]:
        raise ValueError(f"the mask head gave {tuple(mask.shape[-2:])} for images of {tuple(images.shape[1:3])}")
    return images, mask


@torch.no_grad()
def generate_training_free(model: Any, positive: list, negative: list, vae: Any, control_net: Any,
                           hands: HandCrops, options: SamplingOptions, strength: float = 1.0,
                           dilation: float = 8.0) -> tuple[Tensor, Tensor]:
    """(IMAGE, MASK): SD1.5 + OpenPose ControlNet on each crop's hands-only skeleton; keypoint masks."""
    import nodes as comfy_nodes

    if control_net is None:
        raise ValueError("the training-free hand generator needs an OpenPose ControlNet: connect control_net "
                         "(e.g. control_v11p_sd15_openpose) or choose a trained hand_generator file")
    hint = skeletons(hands)
    pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint, strength,
                                                                0.0, 1.0, vae=vae)
    samples = _sample(model, pos, neg, len(hands.crops), hands.crops[0].size, options)
    images = vae.decode(samples)[..., :3].float().cpu()
    masks = torch.stack([keypoint_mask(hands.person, c, dilation * c.size / 512.0) for c in hands.crops])
    return images, masks


def skeletons(hands: HandCrops) -> Tensor:
    """[B, S, S, 3]: the hands-only OpenPose drawing of every crop."""
    return torch.stack([hand_skeleton(hands.person, c) for c in hands.crops])
