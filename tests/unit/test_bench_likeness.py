"""bench/likeness: the synthetic figures, the box codec, the metric and the row specs, against hand-computed
cases and naive float64 loops; the training batch and a two-step training run are reproducible."""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench/ is a folder of scripts

from likeness import codec, figures, metric, model, rows  # noqa: E402

CENTRE_DOWN = figures.Layout("centre", "arms down")
CENTRE_UP = figures.Layout("centre", "arms up")
RED, BLUE, GREEN = (0.8, 0.1, 0.1), (0.1, 0.2, 0.7), (0.1, 0.6, 0.2)


def look(pattern: str = "solid") -> figures.Appearance:
    return figures.Appearance(RED, BLUE, pattern, GREEN)


# ------------------------------------------------------------------------------------------------ figures
def test_render_cells_by_hand():
    img = figures.render(CENTRE_DOWN, look())
    at = lambda r, c: tuple(round(v, 6) for v in img[:, r, c].tolist())  # noqa: E731
    assert at(1, 8) == pytest.approx(figures.SKIN)  # head: rows 1-3, columns 7-9
    assert at(5, 8) == pytest.approx(RED)  # torso: rows 4-9, columns 6-10
    assert at(5, 5) == pytest.approx(RED) and at(5, 11) == pytest.approx(RED)  # arms down at 5 and 11
    assert at(2, 5) == pytest.approx(figures.BACKGROUND)  # no arm above the shoulder
    assert at(12, 6) == pytest.approx(GREEN) and at(12, 10) == pytest.approx(GREEN)  # legs
    assert at(12, 8) == pytest.approx(figures.BACKGROUND)  # the gap between the legs
    up = figures.render(CENTRE_UP, look())
    assert tuple(up[:, 2, 5].tolist()) == pytest.approx(RED) and tuple(up[:, 7, 5].tolist()) == pytest.approx(
        figures.BACKGROUND)
    striped = figures.render(CENTRE_DOWN, look("horizontal stripes"))
    assert tuple(striped[:, 4, 8].tolist()) == pytest.approx(RED) and tuple(striped[:, 5, 8].tolist()) == \
        pytest.approx(BLUE)
    vertical = figures.render(CENTRE_DOWN, look("vertical stripes"))
    assert tuple(vertical[:, 5, 8].tolist()) == pytest.approx(RED) and tuple(vertical[:, 5, 7].tolist()) == \
        pytest.approx(BLUE)
    # 9 head + 30 torso + 10 arms + 20 legs cells
    assert int(figures.silhouette(CENTRE_DOWN).sum()) == 69
    assert torch.equal(metric.foreground(img), figures.silhouette(CENTRE_DOWN))


def test_layouts_fit_the_grid_and_differ():
    shapes = [figures.silhouette(layout) for layout in figures.LAYOUTS]
    assert len(set(figures.PROMPTS)) == 6
    for i, a in enumerate(shapes):
        for j, b in enumerate(shapes):
            assert (metric.iou(a, b) == 1.0) == (i == j)


def test_batch_is_a_pure_function_of_the_seed_and_appearance_is_independent_of_layout():
    a, la = figures.batch(5, 8)
    b, lb = figures.batch(5, 8)
    c, _ = figures.batch(6, 8)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    looks = [figures.sample(torch.Generator().manual_seed(3), layout=i)[1] for i in range(6)]
    assert all(x == looks[0] for x in looks)


def test_every_colour_is_far_from_the_background():
    gen = torch.Generator().manual_seed(0)
    bg = torch.tensor(figures.BACKGROUND)
    gaps = [float((torch.tensor(figures.random_colour(gen)) - bg).abs().max()) for _ in range(2000)]
    assert min(gaps) >= 0.45 > metric.FG_THRESHOLD
    assert float((torch.tensor(figures.SKIN) - bg).abs().max()) > metric.FG_THRESHOLD


def test_image_and_cells_round_trip():
    cells = figures.batch(1, 1)[0][0]
    image = figures.to_image(cells)
    assert image.shape == (1, 128, 128, 3)
    assert torch.equal(image[0, 8 * 5 + 3, 8 * 7 + 6], cells[:, 5, 7])
    assert torch.allclose(figures.to_cells(image)[0], cells, atol=1e-6)


# ------------------------------------------------------------------------------------------------ codec
def test_codec_formula_inverts_and_scales_by_k():
    cells, _ = figures.batch(2, 16)
    z = codec.encode_cells(cells)
    assert torch.allclose(codec.A.T @ codec.A, torch.eye(3))
    assert torch.allclose(codec.decode_cells(z), cells, atol=1e-6)
    # a hand case: a cell of (1, 0, 0.5) -> K * A @ (0.5, -0.5, 0)
    one = torch.tensor([1.0, 0.0, 0.5]).view(1, 3, 1, 1)
    expected = codec.K * 0.5 * torch.tensor([0.0, -1.0, 1.0, 0.0])
    assert torch.allclose(codec.encode_cells(one).flatten(), expected)
    assert 0.2 < float(z.std()) / codec.K < 0.6  # colours in 0..1 spread to ~0.35 K


def test_codec_as_comfyui_taesd():
    comfyenv = pytest.importorskip("comfyenv")
    if not comfyenv.bootstrap():
        pytest.skip(comfyenv.SKIP_REASON)
    from comfy.taesd.taesd import TAESD

    taesd = TAESD()
    taesd.load_state_dict(codec.taesd_state_dict())
    cells, _ = figures.batch(4, 2)
    images = torch.cat([figures.to_image(c) for c in cells]).permute(0, 3, 1, 2)
    with torch.no_grad():
        raw = taesd.encode(images * 2 - 1)  # what comfy.sd.VAE passes (process_input)
        decoded = (taesd.decode(raw) + 1) / 2  # and gets back (process_output)
    assert torch.allclose(raw * codec.SD15_SCALE, codec.encode_cells(cells), atol=1e-5)
    assert torch.allclose(decoded, images, atol=1e-4)


# ------------------------------------------------------------------------------------------------ metric
def naive_background(x: list) -> list[float]:
    """The per-channel median of the 60 edge cells, by listing them and sorting."""
    ring = [(r, k) for r in range(16) for k in range(16) if r in (0, 15) or k in (0, 15)]
    assert len(ring) == 60
    return [statistics.median(x[c][r][k] for r, k in ring) for c in range(3)]


def naive_descriptor(img: torch.Tensor) -> list[float]:
    """The 11 statistics with plain loops in float64."""
    x = img.double().tolist()
    bg = naive_background(x)
    fg = [[max(abs(x[c][r][k] - bg[c]) for c in range(3)) > metric.FG_THRESHOLD for k in range(16)]
          for r in range(16)]
    shirt = [(r, k) for r in range(4, 10) for k in range(16) if fg[r][k]]
    trousers = [(r, k) for r in range(10, 16) for k in range(16) if fg[r][k]]
    mean = lambda cells, c: sum(x[c][r][k] for r, k in cells) / len(cells)  # noqa: E731
    out = [mean(shirt, c) for c in range(3)] + [mean(trousers, c) for c in range(3)]
    for c in range(3):
        m = mean(shirt, c)
        out.append(math.sqrt(sum((x[c][r][k] - m) ** 2 for r, k in shirt) / len(shirt)))
    for dr, dk in ((1, 0), (0, 1)):
        steps = [sum(abs(x[c][r][k] - x[c][r + dr][k + dk]) for c in range(3)) / 3
                 for r in range(4, 10 - dr) for k in range(16 - dk) if fg[r][k] and fg[r + dr][k + dk]]
        out.append(sum(steps) / len(steps) if steps else 0.0)
    return out


@pytest.mark.parametrize("pattern", figures.PATTERNS)
def test_descriptor_against_naive_loops(pattern):
    img = figures.render(figures.LAYOUTS[3], look(pattern))
    assert metric.descriptor(img).tolist() == pytest.approx(naive_descriptor(img), abs=1e-12)
    noisy = (img + 0.05 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert metric.descriptor(noisy).tolist() == pytest.approx(naive_descriptor(noisy), abs=1e-9)


TINT = (0.45, 0.60, 0.75)  # a uniform bluish tint: > 0.25 from the grey and from every colour of ``look``


def on_background(img: torch.Tensor, colour: tuple) -> torch.Tensor:
    """``img`` with its grey background cells repainted ``colour``."""
    grey = (img == torch.tensor(figures.BACKGROUND).view(3, 1, 1)).all(dim=0)
    out = img.clone()
    out[:, grey] = torch.tensor(colour).view(3, 1)
    return out


def old_foreground(cells: torch.Tensor) -> torch.Tensor:
    """The rule before the background was estimated: different from the fixed grey."""
    bg = torch.tensor(figures.BACKGROUND, dtype=cells.dtype).view(3, 1, 1)
    return (cells - bg).abs().amax(dim=0) > metric.FG_THRESHOLD


def test_border_ring_and_background_by_hand():
    cells = torch.arange(3 * 4 * 5, dtype=torch.float64).view(3, 4, 5)
    # channel 0 of a 4x5 grid numbered row-major: first row 0-4, last row 15-19, first column 5, 10, last 9, 14
    assert metric.border(cells)[0].tolist() == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19, 5, 10, 9, 14]
    # median of those 14 values: the 7th and 8th of the sorted list (9 and 10) averaged
    assert metric.background(cells).tolist() == [9.5, 29.5, 49.5]
    with pytest.raises(ValueError, match=r"\[3, H, W\].*\(4, 4\)"):
        metric.border(torch.zeros(4, 4))


def test_foreground_on_a_tinted_background_is_the_figure():
    for layout in figures.LAYOUTS:
        tinted = on_background(figures.render(layout, look("vertical stripes")), TINT)
        assert metric.background(tinted).tolist() == pytest.approx(TINT)
        assert torch.equal(metric.foreground(tinted), figures.silhouette(layout)), layout
        assert bool(old_foreground(tinted).all())  # the fixed grey read the whole tinted grid as figure


def test_foreground_without_tint_is_unchanged():
    noise = torch.Generator().manual_seed(4)
    for layout in figures.LAYOUTS:
        for pattern in figures.PATTERNS:
            img = figures.render(layout, look(pattern))
            assert torch.equal(metric.background(img), torch.tensor(figures.BACKGROUND))
            assert torch.equal(metric.foreground(img), figures.silhouette(layout))
            assert torch.equal(metric.foreground(img), old_foreground(img))
            noisy = (img + 0.05 * torch.randn(img.shape, generator=noise)).clamp(0, 1)
            assert torch.equal(metric.foreground(noisy), old_foreground(noisy))


def test_foreground_with_the_figure_on_the_border():
    # which layouts reach the ring: raised arms the first row, right layouts' arms the last column; never more
    # than 6 of the 60 ring cells, never the last row or the first column
    shapes = {(layout.position, layout.pose): figures.silhouette(layout) for layout in figures.LAYOUTS}
    ring = {key: int(metric.border(shape.expand(3, -1, -1))[0].sum()) for key, shape in shapes.items()}
    assert ring == {("left", "arms down"): 0, ("left", "arms up"): 2, ("centre", "arms down"): 0,
                    ("centre", "arms up"): 2, ("right", "arms down"): 5, ("right", "arms up"): 6}
    assert not any(bool(shape[-1].any() or shape[:, 0].any()) for shape in shapes.values())
    right_up = figures.Layout("right", "arms up")
    img = on_background(figures.render(right_up, look()), TINT)
    assert bool(img[:, 0, 15].ne(torch.tensor(TINT)).any())  # a figure cell in the corner of the ring
    # with 23 stray cells in the ring as well (29 of 60 not background, one short of half) the median is the tint
    stray = img.clone()
    stray[:, 15, :12] = torch.tensor(RED).view(3, 1)
    stray[:, 1:12, 0] = torch.tensor(BLUE).view(3, 1)
    assert metric.background(img).tolist() == pytest.approx(TINT)
    assert torch.equal(metric.foreground(img), figures.silhouette(right_up))
    expected = figures.silhouette(right_up).clone()
    expected[15, :12] = expected[1:12, 0] = True
    assert metric.background(stray).tolist() == pytest.approx(TINT)
    assert torch.equal(metric.foreground(stray), expected)


def test_descriptor_by_hand():
    solid = metric.descriptor(figures.render(CENTRE_DOWN, look())).tolist()
    assert solid == pytest.approx([*RED, *GREEN, 0, 0, 0, 0, 0], abs=1e-7)
    # horizontal stripes, arms down: torso rows 4-9 (3 red rows, 3 blue rows of 5), arms rows 4-8 (3 red, 2 blue
    # of 2 cells): 21 red, 19 blue; every vertical step is red<->blue, horizontal steps none
    h = metric.descriptor(figures.render(CENTRE_DOWN, look("horizontal stripes"))).tolist()
    mean = [(21 * r + 19 * b) / 40 for r, b in zip(RED, BLUE)]
    assert h[:3] == pytest.approx(mean, abs=1e-7)
    step = sum(abs(r - b) for r, b in zip(RED, BLUE)) / 3
    assert h[9] == pytest.approx(step, abs=1e-7) and h[10] == pytest.approx(0, abs=1e-7)
    blank = metric.descriptor(torch.tensor(figures.BACKGROUND).view(3, 1, 1).repeat(1, 16, 16))
    assert torch.isnan(blank).all()


def test_gap_closed_and_iou_by_hand():
    ref, base = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    assert metric.gap_closed(ref, base, ref) == 1.0
    assert metric.gap_closed(base, base, ref) == 0.0
    assert metric.gap_closed(torch.tensor([0.75, 0.0]), base, ref) == pytest.approx(0.75)
    assert metric.gap_closed(torch.tensor([-1.0, 0.0]), base, ref) == pytest.approx(-1.0)
    assert math.isnan(metric.gap_closed(ref, ref, ref))
    assert math.isnan(metric.gap_closed(torch.tensor([math.nan, 0.0]), base, ref))
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = a.clone()
    a[:2, :2] = True  # 4 cells
    b[1:3, 1:3] = True  # 4 cells, 1 shared
    assert metric.iou(a, b) == pytest.approx(1 / 7)
    for i, layout in enumerate(figures.LAYOUTS):
        assert metric.best_layout(figures.silhouette(layout)) == i


def test_quartiles_match_numpy():
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, math.nan]
    q = metric.quartiles(xs)
    finite = [x for x in xs if math.isfinite(x)]
    assert q["n"] == 6
    assert q["median"] == pytest.approx(np.median(finite))
    assert q["q25"] == pytest.approx(np.percentile(finite, 25)) and q["q75"] == pytest.approx(np.percentile(finite, 75))
    assert metric.quartiles([math.nan])["median"] is None


# ------------------------------------------------------------------------------------------------ rows, training
def test_rows_report_what_the_build_lacks():
    def apply(model, bank, mode="concat", strength=1.0, style_fidelity=1.0):
        return model

    modes = {"concat": None, "dual": None}
    assert rows.unavailable(rows.Row("x", "concat", {"style_fidelity": 0.0}), apply, modes) is None
    assert rows.unavailable(rows.BASELINE, apply, modes) is None
    assert "not available in this build: mode 'adain'" in rows.unavailable(rows.Row("x", "adain"), apply, modes)
    assert "has no reference_weights" in rows.unavailable(
        rows.Row("x", "concat", {"reference_weights": "1, 0"}), apply, modes)
    assert len({r.name for r in rows.ROWS}) == len(rows.ROWS)
    with pytest.raises(ValueError, match="timing 'sometimes'"):
        rows.unavailable(rows.Row("x", "concat", timing="sometimes"), apply, modes)


def test_rows_cover_every_mode_and_control():
    from humanref.attention.reader import MODES
    from humanref.attention.schedules import WEIGHT_TYPES

    covered = {r.mode for r in rows.ROWS}
    assert set(MODES) <= covered
    assert {r.reference_mask for r in rows.ROWS} == set(rows.REFERENCE_MASKS)
    assert {r.kwargs.get("weight_type") for r in rows.ROWS} >= {"linear in", "linear out", "ease in"}
    assert {r.kwargs.get("weight_type") for r in rows.ROWS} - {None} <= set(WEIGHT_TYPES)
    for mode in ("concat", "adain+attn"):
        assert {r.kwargs.get("style_fidelity", 1.0) for r in rows.ROWS if r.mode == mode} >= {0.0, 0.5, 1.0}
        weights = {r.kwargs.get("reference_weights") for r in rows.ROWS if r.mode == mode and r.references == 2}
        assert weights == {"1, 1", "1, 0.25", "0.25, 1"}
    # AdaIN rows default to the anchors' per-step statistics; one row keeps the t=0 bank to show the difference
    adain = {r.name: r.timing for r in rows.ROWS if r.mode in ("adain", "adain+attn")}
    assert adain["adain"] == adain["adain+attn"] == rows.EVERY_STEP
    assert sorted(adain.values()).count(rows.ONCE) == 1


def test_training_batch_is_reproducible():
    config = model.TrainConfig(batch=4, seed=2)
    sigmas = torch.linspace(0.03, 14.6, 1000)
    table = torch.randn(7, 3, 8, generator=torch.Generator().manual_seed(0))
    a = model.training_batch(config, 7, sigmas, table)
    b = model.training_batch(config, 7, sigmas, table)
    c = model.training_batch(config, 8, sigmas, table)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    x_in, t, _, noise = a
    cells, _ = figures.batch(config.seed * 1_000_003 + 7, 4)
    sigma = sigmas[t.long()].view(-1, 1, 1, 1)
    assert torch.allclose(x_in * torch.sqrt(sigma ** 2 + 1), codec.encode_cells(cells) + sigma * noise, atol=1e-5)
    weights = model.loss_weight(torch.tensor([0.0, 3.0, 100.0]), model.TrainConfig(loss_weight_cap=16.0))
    assert weights.tolist() == [1.0, 4.0, 16.0]
    assert [model.learning_rate(model.TrainConfig(steps=100, warmup=10, lr=1.0), s) for s in (0, 9, 10, 99)] == \
        pytest.approx([0.1, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))])


def test_two_training_steps_give_the_same_weights():
    comfyenv = pytest.importorskip("comfyenv")
    if not comfyenv.bootstrap():
        pytest.skip(comfyenv.SKIP_REASON)
    config = model.TrainConfig(steps=2, batch=2, warmup=1, threads=1)
    table = torch.randn(7, 77, 768, generator=torch.Generator().manual_seed(0))
    first, record = model.train(config, table)
    second, _ = model.train(config, table)
    assert model.weights_sha256(first) == model.weights_sha256(second)
    unet = model.build_unet(config)
    # three levels of one res block: conv_in + 3 res + 2 downsamples in, 6 out, down to 4x4 at a 16x16 latent
    assert (len(unet.input_blocks), len(unet.output_blocks)) == (6, 6)
    import comfy.model_detection

    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    assert type(comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")).__name__ == "SD15"
    untrained = {k: v.float() for k, v in unet.state_dict().items()}
    assert model.weights_sha256(untrained) != model.weights_sha256(first)
    assert len(record["loss_curve"]) == 2 and all(math.isfinite(v) for v in record["loss_curve"])


def test_prompts_fill_one_clip_chunk():
    comfyenv = pytest.importorskip("comfyenv")
    if not comfyenv.bootstrap():
        pytest.skip(comfyenv.SKIP_REASON)
    from comfy.sd1_clip import SDTokenizer

    tokenizer = SDTokenizer()
    for prompt in figures.PROMPTS:
        chunks = tokenizer.tokenize_with_weights(prompt)
        words = [t for t in chunks[0] if t[0] not in (tokenizer.start_token, tokenizer.end_token)]
        assert len(chunks) == 1 and 60 <= len(words) <= 75, prompt
