"""pipelines/mimicbrush_images.py against hand-computed cases and naive float64 loops (official geometry)."""
from __future__ import annotations

import pytest
import torch

from humanref.pipelines.mimicbrush.images import (
    Box,
    black_fill,
    blur_mask,
    crop_around,
    mask_box,
    pad_to_square,
    paste_back,
    resize_mask_binary,
    square_offsets,
    unpad,
)


def test_pad_to_square_centres_like_the_official_pil_paste():
    # official: padding = (long - short) // 2 before the content; 3x8 -> 8x8 with 2 rows above, 3 below
    img = torch.rand(1, 3, 8, 3)
    out = pad_to_square(img, 1.0)
    assert out.shape == (1, 8, 8, 3)
    assert torch.equal(out[:, 2:5], img)
    assert bool((out[:, :2] == 1).all()) and bool((out[:, 5:] == 1).all())
    m = torch.ones(1, 7, 2)
    mo = pad_to_square(m, 0.0)
    assert torch.equal(mo[0, :, 2:4], torch.ones(7, 2)) and float(mo[0, :, :2].sum() + mo[0, :, 4:].sum()) == 0
    assert square_offsets(3, 8) == (8, 2, 0) and square_offsets(7, 2) == (7, 0, 2) and square_offsets(5, 5) == (5, 0, 0)


def test_black_fill_and_binary_resize():
    img = torch.full((1, 4, 4, 3), 0.7)
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    out = black_fill(img, mask)
    assert float(out[0, 1:3, 1:3].abs().sum()) == 0 and float(out[0, 0, 0, 0]) == pytest.approx(0.7)
    r = resize_mask_binary(torch.kron(mask, torch.ones(4, 4)), 4)
    assert torch.equal(r, mask)


def naive_blur(mask: torch.Tensor, passes: int) -> torch.Tensor:
    """OpenCV GaussianBlur(3x3, sigma 0) on uint8, BORDER_REFLECT_101, as explicit float64 loops."""
    h, w = mask.shape
    x = (mask.double() * 255).round()
    k = (1, 2, 1)

    def refl(i, n):
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    for _ in range(passes):
        out = torch.zeros(h, w, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                s = 0.0
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        s += k[di + 1] * k[dj + 1] * float(x[refl(i + di, h), refl(j + dj, w)])
                out[i, j] = float(int(s / 16.0 + 0.5))  # round half up
        x = out
    return x / 255.0


def test_blur_matches_naive_opencv_semantics():
    mask = torch.zeros(9, 12)
    mask[2:6, 3:10] = 1.0
    mask[0, 0] = 1.0  # a corner pixel exercises the reflect-101 border
    ours = blur_mask(mask.unsqueeze(0), passes=10)[0]
    torch.testing.assert_close(ours.double(), naive_blur(mask, 10), rtol=0, atol=1e-6)
    # hand-computed single pass at a lone centre pixel: 255 * [1 2 1]x[1 2 1] / 16
    one = torch.zeros(5, 5)
    one[2, 2] = 1.0
    b = blur_mask(one.unsqueeze(0), passes=1)[0] * 255
    assert float(b[2, 2]) == 64.0 and float(b[2, 1]) == 32.0 and float(b[1, 1]) == 16.0  # 63.75, 31.875, 15.94


def test_unpad_inverts_the_padding():
    img = torch.rand(1, 6, 10, 3)
    sq = pad_to_square(img, 1.0)
    assert torch.equal(unpad(sq, 6, 10), img)
    assert unpad(torch.rand(1, 5, 5, 3), 6, 10).shape == (1, 6, 10, 3)  # resized to the long side first


def test_crop_box_is_square_around_the_mask_and_inside_the_image():
    mask = torch.zeros(100, 200)
    mask[40:60, 180:195] = 1
    assert mask_box(mask) == Box(40, 180, 60, 195)
    box = crop_around(mask, 10)
    assert (box.height, box.width) == (40, 40)  # max(20, 15) + 2 * 10
    assert box.right == 200 and box.left == 160  # moved left to stay inside, not shrunk
    assert box.top <= 40 and box.bottom >= 60
    big = crop_around(mask, 500)
    assert big == Box(0, 0, 100, 200)  # clipped to the image


def test_paste_back_changes_only_the_box_and_follows_the_alpha():
    orig = torch.rand(1, 30, 40, 3)
    mask = torch.zeros(30, 40)
    mask[10:20, 15:25] = 1
    box = Box(5, 10, 25, 30)
    gen = torch.zeros(1, 20, 20, 3)
    out = paste_back(orig, gen, mask, box)
    outside = torch.ones(30, 40, dtype=torch.bool)
    outside[5:25, 10:30] = False
    assert torch.equal(out[0][outside], orig[0][outside])
    alpha = blur_mask(mask[5:25, 10:30].unsqueeze(0))[0].unsqueeze(-1)
    torch.testing.assert_close(out[0, 5:25, 10:30], orig[0, 5:25, 10:30] * (1 - alpha))
