"""Parity: one UNet evaluation of the ComfyUI Parts2Whole path against the official semantics written
independently here with diffusers' UNet2DConditionModel and transformers' CLIP vision model.

Same synthetic release on disk for both sides (diffusers key names, stripped reference UNet), two masked
references, a pose image, float32. The diffusers side implements what the official code does: reference UNet
once at t = 0 with the label text, norm1 features times the mask (nearest resize to the layer's grid from its
token count, 3x3 all-ones conv, clamp), reader self-attention over [own, references] for the cond half only,
decoupled cross-attention over six zero-padded CLIP image embeddings (zeros for uncond), pose guider output
added after conv_in, noise schedule DDIM "linear" betas.
"""
import math

import diffusers  # a dependency of the pack
import pytest
import torch
from helpers import diffusers_sdpa
from naive import naive_parts2whole, pose_guider_forward

SIZE = 224  # reference images: CLIP's input size, so CLIP sees the same pixels on both sides
OUT = 64  # output size; both sides VAE-encode the references as the pipeline prepared them (resized to OUT)
LABELS = ("upper body clothes", "face")
TOL = 1e-4


@pytest.fixture(scope="module")
def release(tmp_path_factory, comfy_env):
    from humanref.pipelines.synthetic.parts2whole import tiny_release_unet_config, write_release

    path = tmp_path_factory.mktemp("p2w") / "release"
    written = write_release(str(path), tiny_release_unet_config(), seed=21)
    return str(path), written


def _pixels(seed: int, channels: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, SIZE, SIZE, channels), generator=g).float() / 255.0


def _box(top, left, bottom, right):
    m = torch.zeros(1, SIZE, SIZE)
    m[:, top:bottom, left:right] = 1.0
    return m


# ----------------------------------------------------------------------------------------------- official side
def official_token_mask(mask, tokens):
    """[1, 1, H, W] pixel mask -> [1, tokens, 1] weights: the official layer grid from the token count, then the
    Parts2Whole rule."""
    h, w = mask.shape[-2:]
    s = 2 ** math.ceil(0.5 * math.log2(h * w / tokens))
    grid = (math.ceil(h / s), math.ceil(w / s))
    return naive_parts2whole(mask[0], grid).to(mask.dtype).unsqueeze(-1)


class WriteProcessor:
    def __init__(self, name, bank, mask):
        self.name, self.bank, self.mask = name, bank, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        weights = 1.0 if self.mask is None else official_token_mask(self.mask, hidden_states.shape[1])
        self.bank.setdefault(self.name, []).append(hidden_states * weights)
        out = diffusers_sdpa(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        return attn.to_out[0](out)


class ReadProcessor:
    """Batch [uncond, cond]: the uncond half plain self-attention, the cond half K/V = [own, refs...]."""

    def __init__(self, name, bank):
        self.name, self.bank = name, bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        half = hidden_states.shape[0] // 2
        unc, con = hidden_states[:half], hidden_states[half:]
        out_u = diffusers_sdpa(attn, attn.to_q(unc), attn.to_k(unc), attn.to_v(unc))
        kv = torch.cat([con] + [r.expand(half, -1, -1) for r in self.bank[self.name]], dim=1)
        out_c = diffusers_sdpa(attn, attn.to_q(con), attn.to_k(kv), attn.to_v(kv))
        return attn.to_out[0](torch.cat([out_u, out_c], dim=0))


class DecoupledProcessor:
    def __init__(self, wk, wv, image_tokens=6):
        self.wk, self.wv, self.n = wk, wv, image_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        text, img = encoder_hidden_states[:, :-self.n], encoder_hidden_states[:, -self.n:]
        q = attn.to_q(hidden_states)
        out = diffusers_sdpa(attn, q, attn.to_k(text), attn.to_v(text))
        out = out + 1.0 * diffusers_sdpa(attn, q, img @ self.wk.t(), img @ self.wv.t())
        return attn.to_out[0](out)


def official_eps(path, written, x_t, t, ref_latents, ref_masks, label_embs, pos, neg, clip_images, pose):
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    cfg = {k: v for k, v in written["unet_config"].items() if not k.startswith("_")}
    ref_unet = UNet2DConditionModel(**cfg).eval()
    missing, unexpected = ref_unet.load_state_dict(written["reference_unet"], strict=False)
    assert not unexpected and missing and all("up_blocks.1.attentions.1" in k or "conv_" in k for k in missing)
    unet = UNet2DConditionModel(**cfg).eval()
    unet.load_state_dict(written["unet"])

    bank: dict = {}
    with torch.no_grad():
        for lat, mask, emb in zip(ref_latents, ref_masks, label_embs):
            procs = {}
            for name in ref_unet.attn_processors:
                procs[name] = WriteProcessor(name, bank, mask) if name.endswith("attn1.processor") else \
                    diffusers.models.attention_processor.AttnProcessor2_0()
            ref_unet.set_attn_processor(procs)
            ref_unet(lat, torch.zeros(()), encoder_hidden_states=emb)

        encoder = CLIPVisionModelWithProjection.from_pretrained(f"{path}/image_encoder").eval()
        processor = CLIPImageProcessor.from_pretrained(f"{path}/feature_extractor")
        embeds = []
        for img in clip_images:
            pil = Image.fromarray((img[0] * 255).round().to(torch.uint8).numpy())
            pixel = processor(images=pil, return_tensors="pt").pixel_values
            embeds.append(encoder(pixel).image_embeds.unsqueeze(1))
        tokens = torch.cat(embeds + [torch.zeros_like(embeds[0])] * (6 - len(embeds)), dim=1)
        ehs = torch.cat([torch.cat([neg, torch.zeros_like(tokens)], 1), torch.cat([pos, tokens], 1)], 0)

        dc = written["decoupled"]
        procs = {}
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                procs[name] = ReadProcessor(name, bank)
            else:
                prefix = name[: -len(".processor")]
                procs[name] = DecoupledProcessor(dc[f"{prefix}.processor.to_k_dc.weight"],
                                                 dc[f"{prefix}.processor.to_v_dc.weight"])
        unet.set_attn_processor(procs)
        pose_fea = pose_guider_forward(written["pose_guider"], pose)
        hook = unet.conv_in.register_forward_hook(lambda m, i, o: o + pose_fea)
        try:
            eps = unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=ehs).sample
        finally:
            hook.remove()
    return eps[:1], eps[1:], tokens


# ----------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("mode", ["as trained", "as released"])
def test_one_unet_evaluation_matches_official_semantics(release, clip_vae, conds, mode):
    import nodes
    from diffusers import DDIMScheduler

    from humanref.pipelines.parts2whole.pipeline import PartInput, apply_parts2whole
    from humanref.pipelines.parts2whole.release import load_release

    path, written = release
    clip, vae = clip_vae
    loaded = load_release(path, dtype=torch.float32)
    images = [_pixels(1), _pixels(2)]
    masks = [_box(20, 30, 150, 200), _box(100, 0, 224, 90)]
    pose = _pixels(3)[:, :OUT, :OUT]
    parts = [PartInput(i + 1, images[i], masks[i], LABELS[i]) for i in range(2)]
    positive, negative = conds
    result = apply_parts2whole(loaded.model, loaded.reference_unet, loaded.release, loaded.image_encoder, vae,
                               clip, positive, parts, OUT, OUT, pose, mode)
    record = []

    def post_cfg(args):
        record.append({k: args[k].clone() for k in ("input", "sigma", "cond_denoised", "uncond_denoised")})
        return args["denoised"]

    model = result.model.clone()
    model.set_model_sampler_post_cfg_function(post_cfg)
    latent = torch.zeros(1, 4, OUT // 8, OUT // 8)
    nodes.common_ksampler(model, 5, 1, 3.5, "euler", "normal", result.positive, negative, {"samples": latent})
    assert len(record) == 1
    r = record[0]
    sigma = float(r["sigma"][0])

    # the release's schedule: DDIM with diffusers "linear" betas; sigma_max is t = 999 of that schedule
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    acp = sched.alphas_cumprod
    sigmas = ((1 - acp) / acp).sqrt()
    assert abs(sigma - float(sigmas[999])) < 1e-4 * float(sigmas[999])
    x_t = r["input"] / math.sqrt(sigma ** 2 + 1)
    eps_c = (r["input"] - r["cond_denoised"]) / sigma
    eps_u = (r["input"] - r["uncond_denoised"]) / sigma

    labels = [LABELS[0]] * 2 if mode == "as released" else list(LABELS)
    label_embs = [clip.encode_from_tokens(clip.tokenize(lbl)) for lbl in labels]
    pos = label_embs[0] if mode == "as released" else positive[0][0]
    prepared = [p.reference for p in result.parts]
    assert [tuple(p.image.shape) for p in prepared] == [(OUT, OUT, 3)] * 2
    ref_latents = [vae.encode(p.image[None]) * 0.18215 for p in prepared]
    ref_masks = [p.mask[None, None] for p in prepared]
    off_u, off_c, tokens = official_eps(path, written, x_t, torch.tensor([999.0]), ref_latents, ref_masks,
                                        label_embs, pos, negative[0][0], images, pose.movedim(-1, 1))
    assert float(eps_c.abs().mean()) > 0.05  # a real signal
    # the references, the image tokens and the pose all matter at this size
    assert float((off_c - off_u).abs().max()) > 1e-2
    diff_c = float((eps_c - off_c).abs().max())
    diff_u = float((eps_u - off_u).abs().max())
    print(f"parity {mode}: max abs diff cond {diff_c:.2e}, uncond {diff_u:.2e}")
    assert diff_u <= TOL, diff_u
    assert diff_c <= TOL, diff_c
