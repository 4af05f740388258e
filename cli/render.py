"""Draw a UI-format ComfyUI workflow (nodes at their positions, widget values, links) to a PNG.

Used for the README's workflow pictures, so they always show the graphs that ship in workflows/.
"""
from __future__ import annotations

import json
import textwrap
from typing import Any

from PIL import Image, ImageDraw, ImageFont

TYPE_COLOURS = {
    "MODEL": (180, 160, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110), "IMAGE": (100, 180, 255),
    "MASK": (120, 220, 160), "LATENT": (255, 150, 220), "CONDITIONING": (255, 170, 80),
    "REFERENCE_BANK": (90, 230, 230),
}
TITLE_H, SLOT_H, PAD = 26, 20, 24


def _font(size: int) -> Any:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _widget_lines(node: dict) -> list[str]:
    lines = []
    for value in node.get("widgets_values") or []:
        if isinstance(value, (dict, list)):
            continue
        text = str(value).replace("\n", " / ")
        lines.extend(textwrap.wrap(text, 42)[:2] or [""])
    return lines


def render_workflow(workflow: dict, scale: float = 1.0) -> Image.Image:
    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes) - PAD
    y0 = min(n["pos"][1] for n in nodes) - PAD
    boxes: dict[int, tuple[float, float, float, float]] = {}
    for n in nodes:
        w = max(float(n["size"][0]), 200.0)
        slots = max(len(n.get("inputs") or []), len(n.get("outputs") or []))
        h = max(float(n["size"][1]), TITLE_H + SLOT_H * slots + SLOT_H * len(_widget_lines(n)) + 8)
        boxes[n["id"]] = (n["pos"][0] - x0, n["pos"][1] - y0, w, h)
    width = int(max(b[0] + b[2] for b in boxes.values()) + PAD)
    height = int(max(b[1] + b[3] for b in boxes.values()) + PAD)
    img = Image.new("RGB", (width, height), (32, 32, 36))
    draw = ImageDraw.Draw(img)
    font, bold = _font(12), _font(14)
    by_id = {n["id"]: n for n in nodes}

    def out_xy(node_id: int, slot: int) -> tuple[float, float]:
        x, y, w, _ = boxes[node_id]
        return x + w, y + TITLE_H + SLOT_H * slot + SLOT_H / 2

    def in_xy(node_id: int, slot: int) -> tuple[float, float]:
        x, y, _, _ = boxes[node_id]
        return x, y + TITLE_H + SLOT_H * slot + SLOT_H / 2

    for link in workflow.get("links", []):
        _, src, src_slot, dst, dst_slot, kind = link[:6]
        if src not in by_id or dst not in by_id:
            continue
        (ax, ay), (bx, by) = out_xy(src, src_slot), in_xy(dst, dst_slot)
        colour = TYPE_COLOURS.get(str(kind), (200, 200, 200))
        dx = max(40.0, abs(bx - ax) / 2)
        pts = []
        for i in range(33):  # cubic bezier, as the ComfyUI canvas draws links
            t = i / 32
            c0, c1, c2, c3 = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
            pts.append((c0 * ax + c1 * (ax + dx) + c2 * (bx - dx) + c3 * bx, c0 * ay + c1 * ay + c2 * by + c3 * by))
        draw.line(pts, fill=colour, width=3)

    for n in nodes:
        x, y, w, h = boxes[n["id"]]
        ours = str(n["type"]).startswith("HumanRef_")
        outline = (90, 200, 200) if ours else (80, 80, 90)
        draw.rounded_rectangle([x, y, x + w, y + h], 8, fill=(53, 53, 60), outline=outline, width=2)
        draw.rounded_rectangle([x, y, x + w, y + TITLE_H], 8, fill=(30, 90, 95) if ours else (70, 70, 80))
        title = n.get("title") or n["type"].replace("HumanRef_", "") + (" (HumanRef)" if ours else "")
        draw.text((x + 8, y + 5), title, fill=(240, 240, 240), font=bold)
        for i, slot in enumerate(n.get("inputs") or []):
            cx, cy = in_xy(n["id"], i)
            colour = TYPE_COLOURS.get(str(slot.get("type")), (200, 200, 200))
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
            draw.text((cx + 8, cy - 7), slot["name"], fill=(210, 210, 210), font=font)
        for i, slot in enumerate(n.get("outputs") or []):
            cx, cy = out_xy(n["id"], i)
            colour = TYPE_COLOURS.get(str(slot.get("type")), (200, 200, 200))
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
            label = slot.get("name") or str(slot.get("type"))
            tw = draw.textlength(label, font=font)
            draw.text((cx - 8 - tw, cy - 7), label, fill=(210, 210, 210), font=font)
        slots = max(len(n.get("inputs") or []), len(n.get("outputs") or []))
        wy = y + TITLE_H + SLOT_H * slots + 4
        for line in _widget_lines(n):
            draw.rounded_rectangle([x + 6, wy, x + w - 6, wy + SLOT_H - 3], 5, fill=(34, 34, 40))
            draw.text((x + 12, wy + 2), line, fill=(190, 200, 200), font=font)
            wy += SLOT_H
    if scale != 1.0:
        img = img.resize((int(width * scale), int(height * scale)), Image.LANCZOS)
    return img


def render_file(path: str, out: str, scale: float = 1.0) -> None:
    with open(path, encoding="utf-8") as f:
        render_workflow(json.load(f), scale).save(out)
