"""IMAGE/MASK helpers (pipelines/images.py) against PIL's resize and hand-written cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from humanref.pipelines.images import (
    BLACK,
    check_image,
    check_mask,
    check_not_empty,
    fit_mask,
    flatten_alpha,
    one_mask,
    resize_image,
    resize_mask,
    resize_square,
    to_bchw,
    to_bhwc,
)
from humanref.pipelines.notices import collect


def pil_resize(image: torch.Tensor, size: tuple[int, int], resample: int) -> np.ndarray:
    """[H, W, C] float -> PIL's float ("F" mode) resize per channel, clamped to 0..1."""
    chans = [np.asarray(Image.fromarray(image[..., c].numpy(), mode="F").resize((size[1], size[0]), resample))
             for c in range(image.shape[-1])]
    return np.stack(chans, -1).clip(0.0, 1.0)


@pytest.mark.parametrize("size", [(20, 30), (80, 90)], ids=["shrink", "enlarge"])
def test_bicubic_resize_is_pils(size):
    image = torch.rand(2, 37, 53, 3, generator=torch.Generator().manual_seed(0))
    out = resize_image(image, size)
    assert out.shape == (2, *size, 3) and out.dtype == image.dtype
    for b in range(2):
        assert np.abs(out[b].numpy() - pil_resize(image[b], size, Image.BICUBIC)).max() < 1e-5


@pytest.mark.parametrize("size,antialias", [(20, True), (90, False)], ids=["shrink", "enlarge"])
def test_bilinear_square_resize_is_pils(size, antialias):
    image = torch.rand(1, 45, 45, 1, generator=torch.Generator().manual_seed(1))
    out = resize_square(image, size, "bilinear", antialias=antialias)
    assert np.abs(out[0].numpy() - pil_resize(image[0], (size, size), Image.BILINEAR)).max() < 1e-5


def test_same_size_is_returned_untouched_and_results_stay_in_range():
    image = torch.rand(1, 8, 8, 3)
    assert resize_image(image, (8, 8)) is image
    stripes = torch.zeros(1, 16, 16, 1)
    stripes[:, :, ::2] = 1.0  # bicubic overshoots on hard edges: clamped to 0..1
    out = resize_image(stripes, (16, 40))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_layout_flips():
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # [B, H, W, C]
    assert to_bchw(x).shape == (2, 5, 3, 4) and torch.equal(to_bhwc(to_bchw(x)), x)
    assert to_bchw(x)[1, 4, 2, 3] == x[1, 2, 3, 4]
    assert to_bchw(x[0]).shape == (5, 3, 4)  # an unbatched [H, W, C] too


def test_resize_mask_is_bilinear():
    mask = torch.tensor([[[0.0, 1.0]]])  # [1, 1, 2] -> [1, 1, 4]: half-pixel centres
    assert resize_mask(mask, (1, 4)).tolist() == [[[0.0, 0.25, 0.75, 1.0]]]


def test_checks_name_the_input():
    with pytest.raises(ValueError, match=r"image_2 must be an IMAGE \[batch, height, width, channels\], got \(8, 8\)"):
        check_image(torch.zeros(8, 8), "image_2")
    with pytest.raises(ValueError, match=r"reference must be an IMAGE.*got list"):
        check_image([], "reference")
    assert check_image(torch.zeros(1, 4, 4, 1), "depth", channels=(1, 3)).shape == (1, 4, 4, 1)
    with pytest.raises(ValueError, match=r"mask_1 has 3 masks but image_1 has 2 images"):
        check_mask(torch.ones(3, 4, 4), "mask_1", 2, "image_1")
    with pytest.raises(ValueError, match=r"mask_1 must be a MASK \[batch, height, width\]"):
        check_mask(torch.ones(1, 1, 4, 4), "mask_1", 1, "image_1")
    assert check_mask(torch.ones(4, 4, dtype=torch.float16), "m", 2, "i").shape == (1, 4, 4)
    assert one_mask(torch.ones(1, 4, 5), "region_1").shape == (4, 5)
    with pytest.raises(ValueError, match=r"region_1 must be one MASK \[1, height, width\], got shape \(2, 4, 5\)"):
        one_mask(torch.ones(2, 4, 5), "region_1")
    with pytest.raises(ValueError, match=r"mask_2 \(batch item 1\) is empty \(all zero\): no use"):
        check_not_empty(torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]), "mask_2", "no use")
    with pytest.raises(ValueError, match=r"^mask is empty \(all zero\)"):
        check_not_empty(torch.zeros(1, 4, 4), "mask", "no use")


def test_fit_mask_resizes_with_a_warning_the_user_sees():
    mask = torch.ones(1, 4, 6)
    assert fit_mask(mask, (4, 6), "mask_1", "image_1") is mask
    with collect() as warnings:
        out = fit_mask(mask, (8, 12), "mask_1", "image_1")
    assert out.shape == (1, 8, 12)
    assert warnings == ["mask_1 is 6x4 but image_1 is 12x8; the mask is stretched to the image (give a mask of the "
                        "image's size to place it exactly)"]


def test_flatten_alpha_is_one_rule_over_white_or_black():
    rgba = torch.tensor([[[[0.2, 0.4, 0.6, 0.25], [1.0, 0.0, 0.0, 1.0]]]])  # [1, 1, 2, 4]
    rgb, alpha = flatten_alpha(rgba)
    # hand-computed: c * a + 1 * (1 - a)
    assert rgb[0, 0, 0].tolist() == pytest.approx([0.2 * 0.25 + 0.75, 0.4 * 0.25 + 0.75, 0.6 * 0.25 + 0.75])
    assert rgb[0, 0, 1].tolist() == [1.0, 0.0, 0.0] and alpha.tolist() == [[[0.25, 1.0]]]
    over_black, _ = flatten_alpha(rgba, BLACK)
    assert over_black[0, 0, 0].tolist() == pytest.approx([0.05, 0.1, 0.15])
    plain = torch.rand(1, 2, 2, 3)
    assert flatten_alpha(plain) == (plain, None)
