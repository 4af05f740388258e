"""The likeness benchmark's synthetic world: figures whose appearance and layout vary independently.

An image is a 16x16 grid of colour cells (one cell per latent pixel of the 8x-downsampling codec, so a 128x128
picture in ComfyUI). A figure has a *layout* (position left/centre/right, arms down/up: six classes, each with a
fixed silhouette and a prompt) and an *appearance* drawn independently of it (shirt colour, a shirt pattern of
solid, horizontal or vertical stripes with a second colour, trouser colour; the head keeps one skin tone).
The background is a flat light grey, so the figure's cells are those that differ from it.

Everything is a pure function of its arguments or of a ``torch.Generator`` seed, on CPU in float32.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

GRID = 16  # cells per side (= latent pixels)
CELL = 8  # pixels per cell side in the decoded image (the codec's downscale ratio)
BACKGROUND = (0.92, 0.92, 0.92)
SKIN = (0.80, 0.60, 0.45)
POSITIONS = {"left": 4, "centre": 8, "right": 12}  # the figure's centre column
POSES = ("arms down", "arms up")
PATTERNS = ("solid", "horizontal stripes", "vertical stripes")
PROMPT_REPEATS = 18  # 18 x "left arms down," = 72 tokens: one 77-token CLIP chunk


@dataclass(frozen=True)
class Layout:
    position: str
    pose: str

    @property
    def prompt(self) -> str:
        """The layout's words repeated to fill CLIP's 75 tokens: the random text encoder lets one differing word
        change the whole sequence only a little (cosine 0.98 between two prompts); repeated, every position
        differs (cosine 0.7-0.9), which the mini UNet learns to follow within its short training."""
        return ", ".join([f"{self.position} {self.pose}"] * PROMPT_REPEATS)


LAYOUTS: tuple[Layout, ...] = tuple(Layout(p, q) for p in POSITIONS for q in POSES)
PROMPTS: tuple[str, ...] = tuple(layout.prompt for layout in LAYOUTS)


@dataclass(frozen=True)
class Appearance:
    shirt: tuple[float, float, float]
    stripe: tuple[float, float, float]
    pattern: str
    trousers: tuple[float, float, float]


def parts(layout: Layout) -> dict[str, Tensor]:
    """Boolean [GRID, GRID] masks of the head, the shirt (torso and arms) and the trousers (two legs)."""
    if layout.position not in POSITIONS or layout.pose not in POSES:
        raise ValueError(f"unknown layout {layout}; positions {tuple(POSITIONS)}, poses {POSES}")
    cx = POSITIONS[layout.position]
    head = torch.zeros(GRID, GRID, dtype=torch.bool)
    shirt = torch.zeros_like(head)
    trousers = torch.zeros_like(head)
    head[1:4, cx - 1:cx + 2] = True
    shirt[4:10, cx - 2:cx + 3] = True
    arm_rows = slice(4, 9) if layout.pose == "arms down" else slice(0, 5)
    shirt[arm_rows, cx - 3] = True
    shirt[arm_rows, cx + 3] = True
    trousers[10:15, cx - 2:cx] = True
    trousers[10:15, cx + 1:cx + 3] = True
    return {"head": head, "shirt": shirt, "trousers": trousers}


def silhouette(layout: Layout) -> Tensor:
    """The figure's cells for ``layout`` (what a sample that follows the prompt should cover)."""
    p = parts(layout)
    return p["head"] | p["shirt"] | p["trousers"]


def random_colour(gen: torch.Generator) -> tuple[float, float, float]:
    """A saturated, mid-bright colour: every one differs from the background by >= 0.5 in some channel."""
    h, s, v = torch.rand(3, generator=gen).tolist()
    return colorsys.hsv_to_rgb(h, 0.55 + 0.45 * s, 0.35 + 0.5 * v)


def random_appearance(gen: torch.Generator) -> Appearance:
    shirt, stripe, trousers = random_colour(gen), random_colour(gen), random_colour(gen)
    pattern = PATTERNS[int(torch.randint(len(PATTERNS), (1,), generator=gen))]
    return Appearance(shirt, stripe, pattern, trousers)


def render(layout: Layout, look: Appearance) -> Tensor:
    """[3, GRID, GRID] RGB in 0..1."""
    p = parts(layout)
    img = torch.tensor(BACKGROUND).view(3, 1, 1).repeat(1, GRID, GRID)
    rows = torch.arange(GRID).view(-1, 1).expand(GRID, GRID)
    cols = torch.arange(GRID).view(1, -1).expand(GRID, GRID)
    if look.pattern == "horizontal stripes":
        second = rows % 2 == 1
    elif look.pattern == "vertical stripes":
        second = cols % 2 == 1
    elif look.pattern == "solid":
        second = torch.zeros(GRID, GRID, dtype=torch.bool)
    else:
        raise ValueError(f"unknown pattern {look.pattern!r}; expected one of {PATTERNS}")
    for mask, colour in ((p["head"], SKIN), (p["shirt"] & ~second, look.shirt), (p["shirt"] & second, look.stripe),
                         (p["trousers"], look.trousers)):
        img[:, mask] = torch.tensor(colour).view(3, 1)
    return img


def sample(gen: torch.Generator, layout: Optional[int] = None) -> tuple[int, Appearance, Tensor]:
    """(layout index, appearance, image): the layout uniform unless given, the appearance independent of it."""
    index = int(torch.randint(len(LAYOUTS), (1,), generator=gen)) if layout is None else layout
    look = random_appearance(gen)
    return index, look, render(LAYOUTS[index], look)


def batch(seed: int, count: int) -> tuple[Tensor, Tensor]:
    """``count`` training images [count, 3, GRID, GRID] and their layout indices, a pure function of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    items = [sample(gen) for _ in range(count)]
    return torch.stack([i[2] for i in items]), torch.tensor([i[0] for i in items])


def to_image(cells: Tensor) -> Tensor:
    """[3, GRID, GRID] cells -> a ComfyUI IMAGE [1, GRID*CELL, GRID*CELL, 3] (each cell a CELL x CELL block)."""
    big = cells.repeat_interleave(CELL, dim=1).repeat_interleave(CELL, dim=2)
    return big.permute(1, 2, 0).unsqueeze(0).contiguous()


def to_cells(image: Tensor) -> Tensor:
    """A ComfyUI IMAGE [B, H, W, 3] -> [B, 3, H/CELL, W/CELL] cell means (the inverse of :func:`to_image`)."""
    x = image[..., :3].permute(0, 3, 1, 2).float()
    return torch.nn.functional.avg_pool2d(x, CELL)
