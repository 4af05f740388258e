"""Loading a Parts2Whole release: synthetic folders with the release's exact key names (tiny shapes where the
loader allows, the full SD1.5 config for the config translation) through ComfyUI's own model classes."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from humanref.pipelines.loading.files import read_state_dict
from humanref.pipelines.parts2whole.release import DECOUPLED_FILE, load_release, release_unet_config
from humanref.pipelines.synthetic.base import sd15_unet_config
from humanref.pipelines.synthetic.parts2whole import tiny_release_unet_config, write_release

UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")
REF_FILE = os.path.join("reference_unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def master(tmp_path_factory, comfy_env):
    path = tmp_path_factory.mktemp("p2w") / "release"
    written = write_release(str(path), tiny_release_unet_config(), seed=3)
    return path, written


@pytest.fixture
def release(master, tmp_path):
    """A private copy to damage."""
    dst = tmp_path / "release"
    shutil.copytree(master[0], dst)
    return dst


def _edit(path, fn):
    sd = {k: v.clone() for k, v in load_file(str(path)).items()}  # no mmap of the file being rewritten
    fn(sd)
    save_file(sd, str(path))


def test_release_loads_with_every_key_used(master):
    path, written = master
    loaded = load_release(str(path), dtype=torch.float32)
    model = loaded.model.model
    assert type(model.model_config).__name__ == "SD15"
    settings = model.model_config.sampling_settings
    assert settings["beta_schedule"] == "sqrt_linear"  # diffusers "linear"
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    acp = torch.cumprod(1 - betas, 0)
    expected_sigmas = ((1 - acp) / acp).sqrt().float()
    assert torch.allclose(model.model_sampling.sigmas, expected_sigmas, rtol=1e-4)
    # weights arrive under ComfyUI's names: conv_in, a norm1 and an attn2 projection
    sd = model.diffusion_model.state_dict()
    unet = written["unet"]
    assert torch.equal(sd["input_blocks.0.0.weight"], unet["conv_in.weight"])
    assert torch.equal(sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"],
                       unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"])
    assert torch.equal(sd["output_blocks.3.1.transformer_blocks.0.ff.net.2.weight"],
                       unet["up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2.weight"])
    # the writer: exactly the documented stripped tensors were filled, its kept last norm1 is loaded
    filled = set(loaded.filled)
    last = "up_blocks.1.attentions.1."
    assert {"conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias",
            last + "proj_out.weight", last + "proj_out.bias", last + "transformer_blocks.0.attn1.to_q.weight",
            last + "transformer_blocks.0.attn2.to_k.weight", last + "transformer_blocks.0.ff.net.2.bias"} <= filled
    assert all(k.startswith(("conv_norm_out", "conv_out", last)) for k in filled)
    assert not any(".norm1." in k for k in filled)
    ref_sd = loaded.reference_unet.model.diffusion_model.state_dict()
    assert last + "transformer_blocks.0.norm1.weight" in written["reference_unet"]
    assert torch.equal(ref_sd["output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"],
                       written["reference_unet"]["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    assert not ref_sd["output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"].any()  # zero filled
    # decoupled weights for every transformer block, the pose guider, the image encoder
    dc = loaded.release.decoupled
    assert len(dc) == 7 and len(written["decoupled"]) == 14
    assert torch.equal(dc[("middle", 0, 0)][1],
                       written["decoupled"]["mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_dc.weight"])
    assert torch.equal(loaded.release.pose_guider.conv_out.weight, written["pose_guider"]["conv_out.weight"])
    enc = loaded.image_encoder.model.state_dict()
    assert torch.equal(enc["visual_projection.weight"].float(), written["image_encoder"]["visual_projection.weight"])
    assert loaded.image_encoder.image_size == 224


def test_full_size_config_matches_comfy_detection(comfy_env):
    """The config translation gives what ComfyUI's own diffusers detection derives for the real SD1.5 UNet."""
    import comfy.model_detection
    import comfy.utils

    from humanref.pipelines.loading.comfy_unet import unet_shapes
    from humanref.pipelines.loading.unet_configs import diffusers_config_from_ldm_config

    full = sd15_unet_config(channel_mult=(1, 2, 4, 4), num_res_blocks=2)
    cfg = diffusers_config_from_ldm_config(full)
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    mine = release_unet_config(cfg, "config.json")
    shapes = unet_shapes(mine)
    meta = {dk: torch.empty(shapes[lk], device="meta") for dk, lk in comfy.utils.unet_to_diffusers(mine).items()
            if lk in shapes}
    detected = comfy.model_detection.unet_config_from_diffusers_unet(meta)
    assert detected is not None
    for k, v in detected.items():
        if k in mine:
            assert mine[k] == v, k
    assert len(comfy.utils.unet_to_diffusers(mine)) >= len(shapes)


def test_unet_folder_in_the_dc_keys_and_no_decoupled_file(release):
    """The release's unet file may carry the _dc keys; without decoupled_attn.pth they are used."""
    dc = {k: v.clone() for k, v in load_file(str(release / DECOUPLED_FILE)).items()}
    _edit(release / UNET_FILE, lambda sd: sd.update(dc))
    os.remove(release / DECOUPLED_FILE)
    loaded = load_release(str(release), dtype=torch.float32)
    assert len(loaded.release.decoupled) == 7


def test_missing_key_names_file_and_key(release):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    _edit(release / UNET_FILE, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=r"unet.diffusion_pytorch_model\.safetensors: 1 missing keys.*attn1\.to_q"):
        load_release(str(release))


def test_reference_unet_missing_a_kept_key_fails(release):
    key = "up_blocks.1.attentions.1.transformer_blocks.0.norm1.weight"  # norm1 of the stripped block is kept
    _edit(release / REF_FILE, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=r"reference_unet.*missing keys.*norm1\.weight"):
        load_release(str(release))


def test_wrong_shape_names_file_key_and_shapes(release):
    key = "mid_block.attentions.0.proj_in.weight"
    _edit(release / REF_FILE, lambda sd: sd.__setitem__(key, torch.zeros(64, 64, 3, 3)))
    with pytest.raises(ValueError, match=r"reference_unet.*key mid_block\.attentions\.0\.proj_in\.weight has shape "
                                         r"\(64, 64, 3, 3\), expected \(64, 64, 1, 1\)"):
        load_release(str(release))


def test_unexpected_key_fails(release):
    _edit(release / UNET_FILE, lambda sd: sd.__setitem__("down_blocks.0.extra.weight", torch.zeros(1)))
    with pytest.raises(ValueError, match=r"unet.*unexpected keys.*down_blocks\.0\.extra\.weight"):
        load_release(str(release))


def test_decoupled_file_checked(release):
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_dc.weight"
    _edit(release / DECOUPLED_FILE, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=r"decoupled_attn\.pth: .*missing.*mid_block.*to_k_dc"):
        load_release(str(release))


def test_pickled_decoupled_file(release, tmp_path):
    """A pickled decoupled_attn.pth loads only through torch.load(weights_only=True)."""
    sd = {k: v.clone() for k, v in load_file(str(release / DECOUPLED_FILE)).items()}
    os.remove(release / DECOUPLED_FILE)
    torch.save(sd, str(release / DECOUPLED_FILE))
    assert len(load_release(str(release), dtype=torch.float32).release.decoupled) == 7

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, str(bad), _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match=r"evil\.pth is neither safetensors nor .*weights_only=True.*refusing"):
        read_state_dict(str(bad))


def test_not_a_release(tmp_path):
    (tmp_path / "something").mkdir()
    (tmp_path / "something" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"something is not a Parts2Whole release: missing unet/config\.json"):
        load_release(str(tmp_path / "something"))
    with pytest.raises(ValueError, match="does not exist"):
        load_release(str(tmp_path / "nowhere"))


def test_unsupported_unet_config(release):
    import json

    cfg_path = release / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 1024
    cfg["use_linear_projection"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unet.diffusion_pytorch_model\.safetensors: .*shape"):
        load_release(str(release))


def test_image_encoder_mismatch(release):
    _edit(release / "image_encoder" / "model.safetensors", lambda sd: sd.pop("visual_projection.weight"))
    with pytest.raises(ValueError, match=r"image_encoder.model\.safetensors: does not match.*visual_projection"):
        load_release(str(release))


def test_pose_guider_mismatch(release):
    _edit(release / "pose_guider" / "diffusion_pytorch_model.safetensors",
          lambda sd: sd.__setitem__("blocks.1.weight", torch.zeros(32, 16, 5, 5)))
    with pytest.raises(ValueError, match=r"pose_guider.*key blocks\.1\.weight has shape \(32, 16, 5, 5\)"):
        load_release(str(release))
