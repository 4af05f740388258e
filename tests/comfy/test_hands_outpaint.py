"""SequentialMaskExpandOutpaint on a tiny SD15 model: the keep region at every masked step, the pixel blend,
second-order samplers, the inpainting-model mask channel, bad masks."""
from __future__ import annotations

import pytest
import torch

from humanref.pipelines.hands.mask_expand import step_index
from humanref.pipelines.hands.outpaint import OutpaintOptions, latent_mask, outpaint
from humanref.pipelines.notices import collect

SIZE = (64, 80)  # latent 8 x 10


def canvas_and_mask():
    g = torch.Generator().manual_seed(2)
    canvas = torch.full((1, *SIZE, 3), 0.5)
    canvas[:, 16:40, 24:40] = torch.rand(1, 24, 16, 3, generator=g)  # the "hands"
    mask = torch.zeros(1, *SIZE)
    mask[:, 16:40, 24:40] = 1.0  # aligned with the latent grid: binary on the latent too
    return canvas, mask


def recording(model, calls):
    """A clone whose APPLY_MODEL wrapper records (sigma, x, c_concat) of every model call."""
    import comfy.patcher_extension as pe

    rec = model.clone()

    def wrapper(executor, x, t, c_concat=None, *args, **kwargs):
        calls.append((float(t.reshape(-1)[0]), x.detach().clone(), None if c_concat is None else c_concat.clone()))
        return executor(x, t, c_concat, *args, **kwargs)

    rec.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "humanref_test_record", wrapper)
    return rec


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_keep_region_is_the_noised_canvas_at_every_masked_step(tiny_model, clip_vae, conds, sampler):
    import comfy.sample

    _, vae = clip_vae
    canvas, mask = canvas_and_mask()
    calls: list = []
    options = OutpaintOptions(seed=5, steps=5, cfg=4.0, sampler_name=sampler, max_expansion=16)
    image, latent, fn = outpaint(recording(tiny_model, calls), conds[0], conds[1], vae, canvas, mask, options)
    raw = vae.encode(canvas)
    clean = tiny_model.model.process_latent_in(raw)
    noise = comfy.sample.prepare_noise(raw, 5)
    sigmas = torch.tensor([s for s, _ in fn.calls] + [0.0])  # not used for the schedule, just for ordering
    schedule = fn.schedule(5)
    assert sum(k is None for k in schedule) == 2  # final two steps unmasked
    assert len(calls) == len(fn.calls) and len(calls) >= 5
    masked_checked = unmasked_seen = 0
    for (sigma, x, _), (s2, step) in zip(calls, fn.calls):
        assert sigma == pytest.approx(s2)
        keep = schedule[step]
        expected = clean + sigma * noise
        if keep is None:
            region = latent_mask(mask, 8, 10)[0, 0] > 0.5
            assert (x[:, :, region] - expected[:, :, region]).abs().max() > 1e-3  # no blending at the end
            unmasked_seen += 1
            continue
        k = keep[0, 0] >= 1.0
        assert k.sum() > 0
        assert torch.allclose(x[:, :, k], expected.expand_as(x)[:, :, k], atol=1e-5), (sampler, step)
        masked_checked += 1
    assert masked_checked >= 3 and unmasked_seen >= 2
    # the expansion shrinks: the first step keeps more than the last masked step, which is the original mask
    assert schedule[0].sum() > schedule[2].sum()
    assert torch.equal(schedule[2], latent_mask(mask, 8, 10))
    assert torch.equal(image[mask > 0.5], canvas[mask > 0.5])  # pixel blend: the hand pixels exactly
    assert (image[mask < 0.5] - canvas[mask < 0.5]).abs().max() > 1e-2  # the rest is generated
    assert latent["samples"].shape == (1, 4, 8, 10)
    assert sigmas.numel() > 0


def test_second_order_calls_at_intermediate_sigmas_follow_sigma(tiny_model, clip_vae, conds):
    """dpmpp_2s_ancestral evaluates between schedule sigmas: those calls get the mask of the step they are in."""
    _, vae = clip_vae
    canvas, mask = canvas_and_mask()
    options = OutpaintOptions(seed=1, steps=4, cfg=1.5, sampler_name="dpmpp_2s_ancestral", max_expansion=16)
    _, _, fn = outpaint(tiny_model, conds[0], conds[1], vae, canvas, mask, options)
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(tiny_model.get_model_object("model_sampling"), "normal", 4)
    steps = [step for _, step in fn.calls]
    assert len(fn.calls) > 4 and steps == sorted(steps) and set(steps) == {0, 1, 2, 3}
    for s, step in fn.calls:
        assert step == step_index(sigmas, s)
        assert float(sigmas[step]) >= s * (1 - 1e-5) and s > float(sigmas[step + 1])


def test_inpainting_model_mask_channel_gets_the_exact_hand_mask(tiny_sd15_config, clip_vae, conds):
    from humanref.pipelines.synthetic.base import build_model

    _, vae = clip_vae
    model = build_model(dict(tiny_sd15_config, in_channels=9), seed=4)
    canvas, mask = canvas_and_mask()
    calls: list = []
    outpaint(recording(model, calls), conds[0], conds[1], vae, canvas, mask,
             OutpaintOptions(steps=3, unmasked_last_steps=1, max_expansion=16))
    expected = 1.0 - latent_mask(mask, 8, 10)[0, 0]  # 1 = generate, the original mask (never the dilated one)
    for _, _, c_concat in calls:
        assert c_concat is not None and c_concat.shape[1] == 5
        assert torch.equal(c_concat[:, 0], expected.expand(c_concat.shape[0], -1, -1))


def test_bad_masks(tiny_model, clip_vae, conds):
    _, vae = clip_vae
    canvas, mask = canvas_and_mask()
    opts = OutpaintOptions(steps=2, unmasked_last_steps=0, max_expansion=8)
    with collect() as warnings:
        same, _, fn = outpaint(tiny_model, conds[0], conds[1], vae, canvas, torch.ones(1, *SIZE), opts)
    assert fn is None and torch.equal(same, canvas) and "keep_mask is all white" in warnings[0]
    with collect() as warnings:
        plain, _, fn = outpaint(tiny_model, conds[0], conds[1], vae, canvas, torch.zeros(1, *SIZE), opts)
    assert fn is None and plain.shape == canvas.shape and "keep_mask is all black" in warnings[0]
    small = torch.nn.functional.interpolate(mask[None], size=(32, 40))[0]
    with collect() as warnings:
        image, _, fn = outpaint(tiny_model, conds[0], conds[1], vae, canvas, small, opts)
    inner = torch.zeros_like(mask, dtype=torch.bool)
    inner[:, 18:38, 26:38] = True  # where the upscaled mask is exactly 1
    assert "keep_mask is 40x32 but canvas is 80x64; the mask is stretched" in warnings[0]
    assert torch.equal(image[inner], canvas[inner])
    odd = torch.rand(1, 60, 76, 3)  # not a multiple of 8: padded, then cropped back
    image, latent, _ = outpaint(tiny_model, conds[0], conds[1], vae, odd, torch.zeros(1, 60, 76) + (
        torch.arange(76) < 20).float(), opts)
    assert image.shape == odd.shape and torch.equal(image[:, :, :20], odd[:, :, :20])
    with pytest.raises(ValueError, match="keep_mask has 3 masks"):
        outpaint(tiny_model, conds[0], conds[1], vae, canvas, torch.zeros(3, *SIZE), opts)
