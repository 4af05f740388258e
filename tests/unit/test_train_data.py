"""training/: dataset formats and validator, the hand examples (crop, condition, mask dropout, augmentation),
the garment geometry, and the validate-data command. Datasets are written by the tests (training.synthetic
and by hand); expected values come from PIL reads and hand-computed formulas, not from the code under test."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from humanref.training.anydressing.data import (
    GarmentDataConfig,
    GarmentDataset,
    cover,
    fit,
    garment_samples,
    validate_garment_dataset,
)
from humanref.training.augment import ColorAugment, augment_colors
from humanref.training.datasets import check_mask
from humanref.training.hands.data import (
    MASK_CHANNEL,
    HandDataConfig,
    HandDataset,
    drop_mask_channel,
    hand_samples,
    validate_hand_dataset,
)
from humanref.training.synthetic import write_garment_dataset, write_hand_dataset


def messages(report):
    return {(p.path, p.message) for p in report.errors}


def test_a_clean_synthetic_hand_dataset_validates(tmp_path):
    names = write_hand_dataset(str(tmp_path), count=3)
    report = validate_hand_dataset(str(tmp_path), workers=1)
    assert report.ok and report.samples == names and not report.errors and not report.warnings


def test_the_validator_reports_every_problem_of_a_hand_dataset_at_once(tmp_path):
    root = str(tmp_path)
    write_hand_dataset(root, count=6)
    os.remove(os.path.join(root, "masks", "hand_0000.png"))  # missing mask
    with open(os.path.join(root, "keypoints", "hand_0001.json")) as f:
        pose = json.load(f)
    pose["people"][0]["hand_left_keypoints_2d"] = pose["people"][0]["hand_left_keypoints_2d"][:-3]  # 20 points
    with open(os.path.join(root, "keypoints", "hand_0001.json"), "w") as f:
        json.dump(pose, f)
    with open(os.path.join(root, "images", "hand_0002.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")  # unreadable image
    os.remove(os.path.join(root, "captions", "hand_0003.txt"))  # missing caption
    Image.new("L", (10, 10)).save(os.path.join(root, "masks", "hand_0004.png"))  # wrong size
    report = validate_hand_dataset(root, workers=1)
    assert not report.ok
    assert report.samples == ["hand_0005"]
    got = {p.path: p.message for p in report.errors}
    assert set(got) == {"masks/hand_0000.png", "keypoints/hand_0001.json", "images/hand_0002.png",
                        "captions/hand_0003.txt", "masks/hand_0004.png"}
    assert got["masks/hand_0000.png"].startswith("missing mask")
    assert "hand_left_keypoints_2d has 20 keypoints, expected 21" in got["keypoints/hand_0001.json"]
    assert got["images/hand_0002.png"].startswith("cannot be read as an image")
    assert got["captions/hand_0003.txt"].startswith("missing caption")
    assert got["masks/hand_0004.png"] == "is 10x10 but the image is 96x80"
    text = report.format()
    assert "1 usable sample(s), 5 error(s)" in text and "keypoints/hand_0001.json" in text


def test_hand_dataset_folder_level_problems(tmp_path):
    root = str(tmp_path)
    report = validate_hand_dataset(os.path.join(root, "nope"), workers=1)
    assert not report.ok and "is not a directory" in report.format()
    write_hand_dataset(root, count=2, masks=False)
    os.rename(os.path.join(root, "captions"), os.path.join(root, "texts"))
    with open(os.path.join(root, "keypoints", "stray.json"), "w") as f:
        f.write("{}")
    report = validate_hand_dataset(root, workers=1)
    assert ("captions/", "missing folder (a caption per image, captions/<name>.txt)") in messages(report)
    warnings = {str(p) for p in report.warnings}
    assert "keypoints/stray.json: keypoint file without a matching image (ignored)" in warnings
    assert any(p.path == "masks/" and "keypoint-drawn" in p.message for p in report.warnings)


def test_keypoint_file_problems(tmp_path):
    root = str(tmp_path)
    write_hand_dataset(root, count=3)
    with open(os.path.join(root, "keypoints", "hand_0000.json"), "w") as f:
        f.write("{not json")
    with open(os.path.join(root, "keypoints", "hand_0001.json"), "w") as f:
        json.dump({"people": [{"pose_keypoints_2d": [0.0] * 54}]}, f)  # no hands
    got = {p.path: p.message for p in validate_hand_dataset(root, workers=1).errors}
    assert got["keypoints/hand_0000.json"].startswith("is not valid JSON")
    assert got["keypoints/hand_0001.json"].startswith("has no person with a hand")


def test_the_validator_reports_every_problem_of_a_garment_dataset(tmp_path):
    root = str(tmp_path)
    write_garment_dataset(root, ("upper", "lower"), count=5, garment_masks=True)
    os.remove(os.path.join(root, "masks", "lower", "look_0000.png"))
    Image.new("L", (48, 64)).save(os.path.join(root, "masks", "upper", "look_0001.png"))  # empty region
    with open(os.path.join(root, "garments", "upper", "look_0002.png"), "wb") as f:
        f.write(b"garbage")
    Image.new("L", (5, 5), 255).save(os.path.join(root, "garment_masks", "lower", "look_0003.png"))
    report = validate_garment_dataset(root, "upper,lower", workers=1)
    got = {p.path: p.message for p in report.errors}
    assert report.samples == ["look_0004"]
    assert got["masks/lower/look_0000.png"].startswith("missing mask of the lower garment on the person")
    assert got["masks/upper/look_0001.png"].startswith("is empty (all black): the upper garment is nowhere")
    assert got["garments/upper/look_0002.png"].startswith("cannot be read as an image")
    assert got["garment_masks/lower/look_0003.png"] == "is 5x5 but the garment image is 40x40"
    bad_slot = validate_garment_dataset(root, ["upper", "hat"], workers=1)
    assert ("garments/hat/", "missing folder (the hat garment images, garments/hat/<name>.png)") in messages(bad_slot)
    with pytest.raises(ValueError, match="--slots names a slot twice"):
        validate_garment_dataset(root, "upper,upper")
    with pytest.raises(ValueError, match="slot names are letters"):
        validate_garment_dataset(root, "upper,lo wer")


def test_check_mask_reports_one_problem_per_bad_mask_file(tmp_path):
    def problems(path, size):
        found = []
        check_mask(str(path), size, "the image", "MISSING", "nothing kept", lambda p, m: found.append((p, m)))
        return [m for _, m in found]

    assert problems(tmp_path / "absent.png", (4, 3)) == ["MISSING"]
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    assert problems(tmp_path / "garbage.png", (4, 3))[0].startswith("cannot be read as a mask image")
    Image.new("L", (4, 3), 0).save(tmp_path / "black.png")
    assert problems(tmp_path / "black.png", (4, 3)) == ["is empty (all black): nothing kept"]
    assert problems(tmp_path / "black.png", (5, 3)) == ["is 4x3 but the image is 5x3"]  # size first
    one = Image.new("L", (4, 3), 0)
    one.putpixel((3, 2), 1)  # a single barely-white pixel is a mask
    one.save(tmp_path / "one.png")
    assert problems(tmp_path / "one.png", (4, 3)) == [] and problems(tmp_path / "one.png", None) == []
    Image.new("RGBA", (4, 3), (255, 255, 255, 0)).save(tmp_path / "alpha.png")  # white pixels, alpha 0: empty
    assert problems(tmp_path / "alpha.png", None) == ["is empty (all black): nothing kept"]


def test_mask_channel_dropout_zero_fills_only_the_mask_channel_half_the_time():
    cond = torch.rand(11, 8, 8) + 0.1
    dropped = 0
    for seed in range(2000):
        out, drop = drop_mask_channel(cond, 0.5, torch.Generator().manual_seed(seed))
        assert torch.equal(out[:MASK_CHANNEL], cond[:MASK_CHANNEL])
        if drop:
            dropped += 1
            assert not out[MASK_CHANNEL].any()
        else:
            assert torch.equal(out[MASK_CHANNEL], cond[MASK_CHANNEL])
    assert abs(dropped / 2000 - 0.5) < 0.04  # binomial sd 0.011
    assert not drop_mask_channel(cond, 0.0, torch.Generator())[1]
    assert drop_mask_channel(cond, 1.0, torch.Generator())[1]


def _square_hand_dataset(root):
    """One 64x64 sample whose mask is a known rectangle; crop 'none' at resolution 64 is the identity."""
    write_hand_dataset(root, count=1, size=(64, 64), two_hands_every=0)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:50, 10:40] = 255
    Image.fromarray(mask).save(os.path.join(root, "masks", "hand_0000.png"))
    return mask


def test_hand_example_condition_mask_image_against_the_files(tmp_path):
    root = str(tmp_path)
    mask = _square_hand_dataset(root)
    samples, _ = hand_samples(root)
    photo = np.asarray(Image.open(os.path.join(root, "images", "hand_0000.png")).convert("RGB")) / 255.0
    config = HandDataConfig(resolution=64, crop="none", augment=None, mask_dropout=0.0)
    ex = HandDataset(samples, config).example(0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ex["mask"], torch.from_numpy(mask / 255.0).float())
    torch.testing.assert_close(ex["condition"][MASK_CHANNEL], torch.from_numpy(mask / 255.0).float())
    torch.testing.assert_close(ex["image"], torch.from_numpy(photo).float().permute(2, 0, 1) * 2 - 1)
    heat = ex["condition"][:MASK_CHANNEL]
    assert heat.shape == (10, 64, 64) and float(heat.max()) == pytest.approx(1.0, abs=0.02)
    assert not heat[5:].any()  # the sample has one (left) hand: the right hand's channels are zero
    always = HandDataset(samples, HandDataConfig(resolution=64, crop="none", augment=None, mask_dropout=1.0))
    ex = always.example(0, torch.Generator().manual_seed(0))
    assert ex["mask_dropped"] and not ex["condition"][MASK_CHANNEL].any()
    torch.testing.assert_close(ex["mask"], torch.from_numpy(mask / 255.0).float())  # the target stays


def test_hand_examples_are_a_function_of_seed_epoch_and_index(tmp_path):
    root = str(tmp_path)
    write_hand_dataset(root, count=3)
    samples, _ = hand_samples(root)
    ds = HandDataset(samples, HandDataConfig(resolution=64), seed=5)
    a, b = ds[(2, 1)], ds[(2, 1)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["condition"], b["condition"])
    assert a["image"].shape == (3, 64, 64) and a["condition"].shape == (11, 64, 64) and a["mask"].shape == (64, 64)
    assert any(not torch.equal(ds[(e, 1)]["image"], a["image"]) for e in range(3, 8))  # augmentation varies
    with pytest.raises(ValueError, match="--mask-source files needs a masks/ folder"):
        write_hand_dataset(str(tmp_path / "nomask"), count=1, masks=False)
        HandDataset(hand_samples(str(tmp_path / "nomask"))[0], HandDataConfig(mask_source="files"))
    keypoint_masks = HandDataset(hand_samples(str(tmp_path / "nomask"))[0],
                                 HandDataConfig(resolution=64, mask_source="keypoints"))
    assert float(keypoint_masks[(0, 0)]["mask"].max()) == 1.0


def test_color_augmentation_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(6, 5, 3, generator=g, dtype=torch.float64) * 0.6 + 0.2
    aug = ColorAugment(rgb_shift=0.1, brightness=0.2, contrast=0.3, p=1.0)
    out = augment_colors(img, aug, torch.Generator().manual_seed(11))
    draws = torch.Generator().manual_seed(11)  # the documented consumption: 2 fire draws, 3 shifts, b, c
    torch.rand(2, generator=draws, dtype=torch.float64)
    shift = (torch.rand(3, generator=draws, dtype=torch.float64) * 2 - 1) * 0.1
    b = (torch.rand(1, generator=draws, dtype=torch.float64) * 2 - 1) * 0.2
    c = (torch.rand(1, generator=draws, dtype=torch.float64) * 2 - 1) * 0.3
    x = img + shift
    expected = ((x - x.mean()) * (1 + c) + x.mean() + b).clamp(0, 1)
    torch.testing.assert_close(out, expected)
    assert torch.equal(augment_colors(img, ColorAugment(p=0.0), torch.Generator()), img)
    assert torch.equal(augment_colors(img, None, torch.Generator()), img)
    with pytest.raises(ValueError, match="augmentation probability"):
        ColorAugment(p=2.0)


def test_garment_geometry_cover_and_fit():
    x = torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 4, 8)
    c = cover(x, 4, 4)  # scale 1, centre crop columns 2..5
    assert torch.equal(c, x[:, :, 2:6])
    g, area = fit(torch.ones(3, 10, 20), 16, 16, fill=1.0)  # scale 0.8 -> 8 x 16, rows 4..11
    assert g.shape == (3, 16, 16) and area.shape == (16, 16)
    assert torch.equal(area[4:12], torch.ones(8, 16)) and not area[:4].any() and not area[12:].any()


def test_garment_examples(tmp_path):
    root = str(tmp_path)
    write_garment_dataset(root, ("upper", "lower"), count=2)
    samples, _ = garment_samples(root, ("upper", "lower"))
    ex = GarmentDataset(samples, ("upper", "lower"), GarmentDataConfig(64, 48))[(0, 1)]
    assert ex["person"].shape == (3, 64, 48) and ex["garments"].shape == (2, 3, 64, 48)
    assert ex["regions"].shape == (2, 64, 48) and ex["garment_masks"].shape == (2, 64, 48)
    region = np.asarray(Image.open(os.path.join(root, "masks", "lower", "look_0001.png"))) / 255.0
    torch.testing.assert_close(ex["regions"][1], torch.from_numpy(region).float())  # same size: unchanged
    # the 40x40 garment fits as 48x48 in rows 8..55: padding rows are outside the token mask
    assert not ex["garment_masks"][:, :8].any() and ex["garment_masks"][:, 8:56].all()
    with pytest.raises(ValueError, match="--height must be a multiple of 8"):
        GarmentDataConfig(60, 48)


def test_validate_data_command(tmp_path, capsys):
    from humanref.training.cli import main

    write_hand_dataset(str(tmp_path / "h"), count=2)
    assert main(["validate-data", "hand", str(tmp_path / "h")]) == 0
    assert "2 usable sample(s), 0 error(s)" in capsys.readouterr().out
    os.remove(str(tmp_path / "h" / "captions" / "hand_0001.txt"))
    assert main(["validate-data", "hand", str(tmp_path / "h")]) == 1
    assert "captions/hand_0001.txt: missing caption" in capsys.readouterr().out
    # --validate-only: the report, nothing trained or loaded (no checkpoint exists at --base)
    assert main(["hand-generator", "--data", str(tmp_path / "h"), "--base", "none.safetensors", "--out",
                 str(tmp_path / "x.safetensors"), "--validate-only"]) == 1
    assert "captions/hand_0001.txt: missing caption" in capsys.readouterr().err
    with open(str(tmp_path / "h" / "captions" / "hand_0001.txt"), "w") as f:
        f.write("a hand")
    assert main(["hand-generator", "--data", str(tmp_path / "h"), "--base", "none.safetensors", "--out",
                 str(tmp_path / "x.safetensors"), "--validate-only"]) == 0
    assert not (tmp_path / "x.safetensors").exists()
    write_garment_dataset(str(tmp_path / "g"), ("upper",), count=1)
    assert main(["validate-data", "garments", str(tmp_path / "g"), "--slots", "upper"]) == 0
    assert main(["validate-data", "garments", str(tmp_path / "g")]) == 2
    assert "garments datasets need --slots" in capsys.readouterr().err
