"""Draw the template browser's thumbnails: workflows/N-METHOD-....jpg, one card per shipped UI workflow that shows
what it makes: its example inputs, an arrow, and a labelled frame for the picture it produces (no model weights
here, so no generated result is faked).

    python tests/browser/thumbnails.py

Needs only Pillow and the DejaVu fonts (fonts-dejavu-core). The card is square, as the template browser shows it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # e2e_support
from e2e_support import INPUTS, UI_WORKFLOWS

SIZE = 512
BACKGROUND = (30, 31, 36)
PANEL = (46, 48, 56)
TEXT = (236, 236, 240)
MUTED = (160, 164, 176)
ACCENT = (120, 190, 140)
FONTS = Path("/usr/share/fonts/truetype/dejavu")

# method -> (title, what it makes, example inputs: (file in workflows/inputs, caption), the output frame's label
# and aspect w/h)
CARDS = {
    "references": ("References", "a portrait wearing the parts",
                   [("face.png", "face"), ("upper.png", "upper"), ("lower.png", "lower")], "portrait 512x768", 2 / 3),
    "parts2whole": ("Parts2Whole", "a person from the parts, in the pose",
                    [("upper.png", "upper"), ("lower.png", "lower"), ("face.png", "face"),
                     ("p2w_densepose.png", "pose")], "full body 512x768", 2 / 3),
    "mimicbrush": ("MimicBrush", "the masked region redrawn like the reference",
                   [("mb_source.png", "image + mask"), ("mb_reference.png", "reference")], "the edited image",
                   4 / 3),
    "hands": ("Hands first", "hands from the pose, then the body around them", [("hand_pose.json", "pose")],
              "body + hand crops", 2 / 3),
    "anydressing": ("AnyDressing", "a person wearing the garments",
                    [("garment_upper.png", "upper"), ("garment_lower.png", "lower"), ("garment_pose.png", "pose")],
                    "dressed person 576x768", 3 / 4),
    "references_likeness": ("Likeness + maps", "adain+attn, a weight per reference, heatmaps",
                            [("face.png", "face 1.2"), ("upper.png", "upper 1"), ("lower.png", "lower 0.7")],
                            "portrait + where each reference lands", 2 / 3),
}


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONTS / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), size)


def pose_picture(path: Path, size: tuple[int, int] = (256, 384)) -> Image.Image:
    """The example OpenPose frame drawn as points and bones: body (COCO-18) and the 21 keypoints of each hand."""
    person = json.loads(path.read_text())[0]["people"][0]
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)

    def points(key: str) -> list[Optional[tuple[float, float]]]:
        flat = person.get(key) or []
        return [(flat[i] * size[0], flat[i + 1] * size[1]) if flat[i + 2] > 0 else None
                for i in range(0, len(flat), 3)]

    body = points("pose_keypoints_2d")
    bones = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
             (1, 0))
    for a, b in bones:
        if a < len(body) and b < len(body) and body[a] and body[b]:
            draw.line([body[a], body[b]], fill=(90, 140, 220), width=3)
    for hand_key in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"):
        hand = points(hand_key)
        for finger in range(5):
            chain = [0] + [1 + 4 * finger + k for k in range(4)]
            for a, b in zip(chain, chain[1:]):
                if b < len(hand) and hand[a] and hand[b]:
                    draw.line([hand[a], hand[b]], fill=(240, 180, 60), width=2)
        for p in hand:
            if p:
                draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(255, 230, 120))
    return image


def example(name: str) -> Image.Image:
    path = INPUTS / name
    if path.suffix == ".json":
        return pose_picture(path)
    image = Image.open(path).convert("RGB")
    if name == "mb_source.png":  # the region MimicBrush redraws, tinted as the mask editor shows it
        mask = Image.open(INPUTS / "mb_mask.png").convert("L")
        tint = Image.new("RGB", image.size, (220, 60, 60))
        image = Image.composite(Image.blend(image, tint, 0.55), image, mask.point(lambda v: 255 if v > 127 else 0))
    return image


def fit(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    scale = min(box[0] / image.width, box[1] / image.height)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def centred_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, face, fill) -> None:
    box = draw.textbbox((0, 0), text, font=face)
    draw.text((xy[0] - (box[2] - box[0]) / 2, xy[1]), text, font=face, fill=fill)


def card(method: str) -> Image.Image:
    title, makes, inputs, output, aspect = CARDS[method]
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    centred_text(draw, (SIZE / 2, 22), title, font(34, bold=True), TEXT)
    centred_text(draw, (SIZE / 2, 70), makes, font(17), MUTED)

    # inputs: a column of tiles on the left
    top, bottom, left, column = 112, SIZE - 28, 24, 200
    tile_h = (bottom - top) / len(inputs)
    label = font(14)
    for i, (name, caption) in enumerate(inputs):
        y = top + i * tile_h
        picture = fit(example(name), (column, int(tile_h) - 26))
        x = left + (column - picture.width) // 2
        draw.rectangle([x - 3, y - 3, x + picture.width + 2, y + picture.height + 2], fill=PANEL)
        image.paste(picture, (x, int(y)))
        centred_text(draw, (left + column / 2, y + picture.height + 4), caption, label, MUTED)

    # the arrow, then the frame of what the workflow makes
    mid = (top + bottom) / 2
    ax0, ax1 = left + column + 14, left + column + 60
    draw.line([(ax0, mid), (ax1 - 10, mid)], fill=ACCENT, width=6)
    draw.polygon([(ax1, mid), (ax1 - 16, mid - 13), (ax1 - 16, mid + 13)], fill=ACCENT)
    room = (SIZE - 24 - (ax1 + 14), bottom - top)
    w, h = (room[0], room[0] / aspect) if room[0] / aspect <= room[1] else (room[1] * aspect, room[1])
    x0 = ax1 + 14 + (room[0] - w) / 2
    y0 = mid - h / 2
    draw.rounded_rectangle([x0, y0, x0 + w, y0 + h], radius=12, outline=ACCENT, width=4, fill=PANEL)
    words, lines = output.split(), [""]
    face = font(20, bold=True)
    for word in words:
        trial = f"{lines[-1]} {word}".strip()
        if draw.textlength(trial, font=face) > w - 24:
            lines.append(word)
        else:
            lines[-1] = trial
    for i, line in enumerate(lines):
        centred_text(draw, (x0 + w / 2, mid - 13 * len(lines) + 26 * i), line, face, TEXT)
    return image


def main() -> int:
    for method, workflow in UI_WORKFLOWS.items():
        path = workflow.with_suffix(".jpg")
        card(method).save(path, "JPEG", quality=88, optimize=True)
        print(path.relative_to(path.parents[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
