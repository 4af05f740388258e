"""Bad-input sweep: for every node of the pack, bad inputs sent through the HTTP API.

Each case is one prompt. It must fail, either at validation (HTTP 400, ComfyUI's node_errors) or when the node
runs (the execution_error event), with a text that names the input (and, for files, the file); the exception
is the pack's own (ValueError and friends), never an error from deep inside torch; and the server keeps
serving: nothing is left in the queue, and each node's good prompt runs afterwards. The server is this
module's own, with a models folder holding the tiny models plus broken files: a checkpoint of the wrong
format, a pickle that needs code to load (its __reduce__ calls os.getcwd, harmless but refused by
weights_only), a file that is not a model at all, and a dangling symlink (a file listed but missing).

A second, small table holds edge inputs that must be accepted (all-ones masks, a mask of another size).
``pytest -s`` prints the tried/passed counts.
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import workloads
from e2e_support import TINY_CKPT, running_server

from humanref.cli.client import ExecutionFailed, PromptRejected

POSE_JSON = workloads.load_api("hands")["5"]["inputs"]["pose_json"]
# the pack's own exception types: a failure of these kinds was foreseen and worded by the node
OWN_ERRORS = {"ValueError", "FileNotFoundError", "KeyError"}


# ----------------------------------------------------------------------------------------------- bad files
class NeedsCode:
    """Unpickling this calls os.getcwd: harmless, but it is code, which weights_only refuses."""

    def __reduce__(self):
        return (os.getcwd, ())


def write_pickle_needing_code(path: str) -> None:
    import torch

    torch.save({"weight": torch.zeros(2, 2), "config": NeedsCode()}, path)


def bad_models(tiny_models: str, dest: str) -> str:
    """The soak's models folder (tiny models + tiny TAESD) with broken files in the pack's model folders."""
    import shutil

    workloads.soak_models(tiny_models, dest)
    controlnet = os.path.join(tiny_models, "controlnet", workloads.TINY_CONTROLNET)
    for folder, ext in (("mimicbrush", ".bin"), ("hand_generator", ".pt"), ("garment_weights", ".pt")):
        own = os.path.join(dest, folder + "_bad")
        os.makedirs(own)
        for name in os.listdir(os.path.join(tiny_models, folder)):
            os.symlink(os.path.join(tiny_models, folder, name), os.path.join(own, name))
        os.symlink(controlnet, os.path.join(own, "zz-wrong-format.safetensors"))  # a real model, another kind
        write_pickle_needing_code(os.path.join(own, "zz-needs-code" + ext))
        with open(os.path.join(own, "zz-not-a-model" + ext), "wb") as f:
            f.write(b"this is not a model file\n" * 4)
        os.symlink(os.path.join(own, "deleted" + ext), os.path.join(own, "zz-missing" + ext))
        os.unlink(os.path.join(dest, folder))
        os.rename(own, os.path.join(dest, folder))
    # Parts2Whole release folders: the tiny release with one part broken
    base = os.path.join(tiny_models, "parts2whole", workloads.TINY_RELEASE)
    releases = os.path.join(dest, "parts2whole_bad")
    os.makedirs(releases)
    os.symlink(base, os.path.join(releases, workloads.TINY_RELEASE))

    def broken(name: str, replace: dict[str, Optional[Callable[[str], None]]]) -> None:
        root = os.path.join(releases, name)
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            os.makedirs(os.path.join(root, rel), exist_ok=True)
            for f in files:
                key = os.path.normpath(os.path.join(rel, f))
                target = os.path.join(root, key)
                if key in replace:
                    if replace[key] is not None:
                        replace[key](target)
                else:
                    os.symlink(os.path.join(dirpath, f), target)

    def garbage(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"\x00" * 64)

    broken("zz-pickled-decoupled", {"decoupled_attn.pth": write_pickle_needing_code})
    broken("zz-no-pose-guider", {"pose_guider/diffusion_pytorch_model.safetensors": None})
    broken("zz-garbage-unet", {"unet/diffusion_pytorch_model.safetensors": garbage})
    broken("zz-wrong-unet", {"unet/diffusion_pytorch_model.safetensors": lambda p: shutil.copyfile(controlnet, p)})
    os.unlink(os.path.join(dest, "parts2whole"))
    os.rename(releases, os.path.join(dest, "parts2whole"))
    bad_banks(os.path.join(dest, "reference_banks"), controlnet)
    return dest


def bad_banks(folder: str, controlnet: str) -> None:
    """models/reference_banks/: a good (SDXL-like) bank, the same with a newer format version and truncated, a
    ControlNet, a dangling link."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from humanref.attention.bank import CapturedTokens, ReferenceBank, ReferenceInfo, Timing
    from humanref.pipelines.references.bank_files import save_reference_bank

    os.makedirs(folder)
    g = torch.Generator().manual_seed(0)
    bank = ReferenceBank((ReferenceInfo("face", 0, (64, 64), False),), {("input", 4, 0): 640, ("middle", 0, 0): 1280},
                         Timing.ONCE, "parts2whole", family="SDXL",
                         features={("input", 4, 0): (CapturedTokens(torch.randn(16, 640, generator=g), 0),),
                                   ("middle", 0, 0): (CapturedTokens(torch.randn(4, 1280, generator=g), 0),)})
    good = save_reference_bank(bank, folder, "sdxl-bank")
    os.rename(good, os.path.join(folder, "sdxl-bank.safetensors"))
    with safe_open(os.path.join(folder, "sdxl-bank.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, os.path.join(folder, "zz-newer-version.safetensors"), metadata={**meta, "format_version": "2"})
    with open(os.path.join(folder, "sdxl-bank.safetensors"), "rb") as src:
        data = src.read()
    with open(os.path.join(folder, "zz-damaged.safetensors"), "wb") as f:
        f.write(data[:-1000])
    os.symlink(controlnet, os.path.join(folder, "zz-wrong-format.safetensors"))
    os.symlink(os.path.join(folder, "deleted.safetensors"), os.path.join(folder, "zz-missing.safetensors"))


@pytest.fixture(scope="module")
def bad_server(tiny_models, tmp_path_factory):
    models = bad_models(str(tiny_models), str(tmp_path_factory.mktemp("bad-models")))
    with running_server(models) as server:
        yield server


@pytest.fixture(scope="module")
def bad_client(bad_server):
    from humanref.cli.client import ComfyClient

    client = ComfyClient(bad_server.url, timeout=60)
    workloads.upload_inputs(client)
    return client


# ----------------------------------------------------------------------------------------------- graphs
class Graph:
    """A small API prompt under construction; add() returns the new node's id."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    def preview(self, nid: str, output: int = 0) -> dict:
        """An output node that only stringifies its input: the graph runs up to our node and no further."""
        self.add("PreviewAny", source=[nid, output])
        return self.nodes


def base(g: Graph) -> tuple[str, str]:
    """(checkpoint loader id, tiny TAESD loader id)."""
    return g.add("CheckpointLoaderSimple", ckpt_name=TINY_CKPT), g.add("VAELoader", vae_name="taesd")


def image(g: Graph, name: str) -> list:
    return [g.add("LoadImage", image=name), 0]


def mask(g: Graph, name: str) -> list:
    return [g.add("LoadImageMask", image=name, channel="red"), 0]


def solid(g: Graph, value: float, width: int = 64, height: int = 64) -> list:
    return [g.add("SolidMask", value=value, width=width, height=height), 0]


def batch(g: Graph, img: list, amount: int) -> list:
    return [g.add("RepeatImageBatch", image=img, amount=amount), 0]


def encoder(g: Graph, ckpt: str, vae: str, **over) -> str:
    inputs = dict(writer=[ckpt, 0], vae=[vae, 0], clip=[ckpt, 1], timing="once at t=0", mask_rule="parts2whole",
                  max_side=64, image_1=image(g, "face.png"), mask_1=mask(g, "face_mask.png"),
                  **{f"label_{i}": label for i, label in enumerate(workloads.REF_LABELS, 1)})
    inputs.update(over)
    return g.add("HumanRef_ReferenceEncoder", **{k: v for k, v in inputs.items() if v is not None})


def encoder_prompt(**over) -> dict:
    g = Graph()
    ckpt, vae = base(g)
    over = {k: (v(g, ckpt, vae) if callable(v) else v) for k, v in over.items()}
    return g.preview(encoder(g, ckpt, vae, **over))


def patch_prompt(model: Optional[Callable] = None, bank: Optional[Callable] = None, **over) -> dict:
    g = Graph()
    ckpt, vae = base(g)
    bank_id = bank(g, ckpt, vae) if bank else [encoder(g, ckpt, vae), 0]
    inputs = dict(model=model(g, ckpt, vae) if model else [ckpt, 0], reference_bank=bank_id, mode="concat",
                  strength=1.0, start_percent=0.0, end_percent=1.0, blocks="all", custom_blocks="",
                  uncond_sees_references=False)
    for k, v in over.items():
        inputs[k] = v(g, ckpt, vae) if callable(v) else v
    return g.preview(g.add("HumanRef_MaskedSharedAttentionPatch", **inputs))


def mimicbrush_model(g: Graph, *_: str) -> list:
    return [g.add("HumanRef_MimicBrushLoader", ckpt_name=workloads.TINY_MIMICBRUSH), 0]


def p2w_model(g: Graph, *_: str) -> list:
    return [g.add("HumanRef_Parts2WholeLoader", release=workloads.TINY_RELEASE, weight_dtype="default"), 0]


def p2w_loader_prompt(release: str, dtype: str = "default") -> dict:
    g = Graph()
    return g.preview(g.add("HumanRef_Parts2WholeLoader", release=release, weight_dtype=dtype), 3)


def p2w_prompt(parts: int = 2, release: str = workloads.TINY_RELEASE, **over) -> dict:
    g = Graph()
    ckpt, vae = base(g)
    loader = g.add("HumanRef_Parts2WholeLoader", release=release, weight_dtype="default")
    pos = g.add("CLIPTextEncode", text=workloads.POSITIVE, clip=[ckpt, 1])
    inputs = dict(model=[loader, 0], reference_unet=[loader, 1], parts2whole=[loader, 3], image_encoder=[loader, 2],
                  vae=[vae, 0], clip=[ckpt, 1], positive=[pos, 0], width=64, height=64, batch_size=1,
                  mode="as trained", mask_source="mask: 1 = part", pose=image(g, "p2w_densepose.png"))
    inputs.update({f"label_{i}": label for i, label in enumerate(workloads.P2W_LABELS, 1)})
    for i in range(1, parts + 1):
        img, msk = workloads.PAIRS[(i - 1) % 3]
        inputs.update({f"image_{i}": image(g, img), f"mask_{i}": mask(g, msk)})
    for k, v in over.items():
        inputs[k] = v(g, ckpt, vae, loader) if callable(v) else v
    return g.preview(g.add("HumanRef_Parts2Whole", **{k: v for k, v in inputs.items() if v is not None}))


def mb_loader_prompt(name: str) -> dict:
    g = Graph()
    return g.preview(g.add("HumanRef_MimicBrushLoader", ckpt_name=name), 1)


def mb_conditioning(g: Graph, **over) -> str:
    ckpt, vae = base(g)
    loader = g.add("HumanRef_MimicBrushLoader", ckpt_name=workloads.TINY_MIMICBRUSH)
    inputs = dict(model=[loader, 0], mimicbrush=[loader, 1], vae=[vae, 0], image=image(g, "mb_source.png"),
                  mask=mask(g, "mb_mask.png"), reference=image(g, "mb_reference.png"), keep_shape=False,
                  writer="once at t=0 (fast)", resolution=256, crop_to_mask=False, crop_margin=64, depth_scale=1.0)
    for k, v in over.items():
        inputs[k] = v(g, ckpt, vae) if callable(v) else v
    return g.add("HumanRef_MimicBrushConditioning", **{k: v for k, v in inputs.items() if v is not None})


def mb_prompt(**over) -> dict:
    g = Graph()
    return g.preview(mb_conditioning(g, **over), 4)


def paste_prompt(images: Callable[[Graph], list]) -> dict:
    g = Graph()
    cond = mb_conditioning(g)
    return g.preview(g.add("HumanRef_MimicBrushPaste", images=images(g), edit=[cond, 4]))


def hand_loader_prompt(name: str) -> dict:
    g = Graph()
    return g.preview(g.add("HumanRef_HandGeneratorLoader", hand_generator_name=name))


def hands(g: Graph, trained: Optional[str] = None, **over) -> str:
    ckpt, vae = base(g)
    pos = g.add("CLIPTextEncode", text=workloads.POSITIVE, clip=[ckpt, 1])
    neg = g.add("CLIPTextEncode", text=workloads.NEGATIVE, clip=[ckpt, 1])
    inputs = dict(model=[ckpt, 0], positive=[pos, 0], negative=[neg, 0], vae=[vae, 0], pose_json=POSE_JSON,
                  control_net=[g.add("ControlNetLoader", control_net_name=workloads.TINY_CONTROLNET), 0], person=0,
                  seed=1, steps=1, cfg=7.0, sampler_name="euler", scheduler="normal", resolution=64, crop_scale=1.5,
                  control_strength=1.0, mask_dilation=8.0, heatmap_sigma=0.0, min_confidence=0.3,
                  coordinates="auto", width=128, height=192)
    if trained:
        inputs["hand_generator"] = [g.add("HumanRef_HandGeneratorLoader", hand_generator_name=trained), 0]
        inputs["vae"] = [ckpt, 2]  # the mask head reads the SD1.5 VAE decoder
    for k, v in over.items():
        inputs[k] = v(g, ckpt, vae) if callable(v) else v
    return g.add("HumanRef_HandGenerator", **{k: v for k, v in inputs.items() if v is not None})


def hands_prompt(trained: Optional[str] = None, **over) -> dict:
    g = Graph()
    return g.preview(hands(g, trained, **over))


def canvas_prompt(**over) -> dict:
    g = Graph()
    gen = hands(g)
    inputs = dict(hand_images=[gen, 0], hand_masks=[gen, 1], hand_crops=[gen, 2], background=0.5,
                  mask_threshold=0.0)
    for k, v in over.items():
        inputs[k] = v(g) if callable(v) else v
    return g.preview(g.add("HumanRef_HandCanvas", **inputs))


def outpaint_prompt(**over) -> dict:
    g = Graph()
    ckpt, vae = base(g)
    pos = g.add("CLIPTextEncode", text=workloads.POSITIVE, clip=[ckpt, 1])
    neg = g.add("CLIPTextEncode", text=workloads.NEGATIVE, clip=[ckpt, 1])
    inputs = dict(model=[ckpt, 0], positive=[pos, 0], negative=[neg, 0], vae=[vae, 0],
                  canvas=[g.add("EmptyImage", width=64, height=96, batch_size=1, color=0x808080), 0],
                  seed=1, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                  max_expansion=16, blending="sequential expansion", schedule="linear", unmasked_last_steps=1)
    inputs["keep_mask"] = [g.add("MaskComposite", destination=[g.add("SolidMask", value=0.0, width=64, height=96), 0],
                                 source=[g.add("SolidMask", value=1.0, width=16, height=16), 0], x=24, y=40,
                                 operation="add"), 0]
    for k, v in over.items():
        inputs[k] = v(g, ckpt, vae) if callable(v) else v
    return g.preview(g.add("HumanRef_SequentialMaskExpandOutpaint", **{k: v for k, v in inputs.items()
                                                                       if v is not None}))


def garments_prompt(weights: str = "none (training-free)", garments: int = 2, **over) -> dict:
    g = Graph()
    ckpt, vae = base(g)
    inputs = dict(writer=[ckpt, 0], vae=[vae, 0], garment_weights=weights, max_side=64,
                  **{f"slot_{i}": s for i, s in enumerate(workloads.GARMENT_SLOTS, 1)})
    for i in range(1, garments + 1):
        inputs[f"garment_{i}"] = image(g, ("garment_upper.png", "garment_lower.png")[(i - 1) % 2])
    for k, v in over.items():
        inputs[k] = v(g, ckpt, vae) if callable(v) else v
    return g.preview(g.add("HumanRef_GarmentLoRAExtractor", **{k: v for k, v in inputs.items() if v is not None}))


def save_bank_prompt(**over) -> dict:
    g = Graph()
    ckpt, vae = base(g)
    inputs = dict(reference_bank=[encoder(g, ckpt, vae), 0], filename_prefix="HumanRef/reference_banks/bank")
    for k, v in over.items():
        inputs[k] = v(g, ckpt, vae) if callable(v) else v
    return g.preview(g.add("HumanRef_SaveReferenceBank", **inputs))


def maps_prompt(patch: bool = True, recorder: Optional[dict] = None, images: Optional[Callable] = None,
                **over) -> dict:
    """Checkpoint -> (patch) -> recorder -> KSampler (2 steps) -> decode -> Reference Attention Maps."""
    g = Graph()
    ckpt, vae = base(g)
    model = [ckpt, 0]
    if patch:
        model = [g.add("HumanRef_MaskedSharedAttentionPatch", model=model, reference_bank=[encoder(g, ckpt, vae), 0],
                       mode="concat", strength=1.0, start_percent=0.0, end_percent=1.0, blocks="all",
                       custom_blocks="", uncond_sees_references=False), 0]
    rec = g.add("HumanRef_ReferenceAttentionRecorder", model=model, **{"blocks": "all", "step": -1,
                                                                       **(recorder or {})})
    pos = g.add("CLIPTextEncode", text=workloads.POSITIVE, clip=[ckpt, 1])
    neg = g.add("CLIPTextEncode", text=workloads.NEGATIVE, clip=[ckpt, 1])
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.add("KSampler", model=[rec, 0], positive=[pos, 0], negative=[neg, 0], latent_image=[latent, 0],
                    seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    decoded = [g.add("VAEDecode", samples=[sampled, 0], vae=[vae, 0]), 0]
    inputs = dict(attention_record=[rec, 1], images=images(g, decoded) if images else decoded, opacity=0.6,
                  normalize="per map")
    inputs.update(over)
    return g.preview(g.add("HumanRef_ReferenceAttentionMaps", **inputs))


def load_bank_prompt(name: str) -> dict:
    g = Graph()
    return g.preview(g.add("HumanRef_LoadReferenceBank", reference_bank_name=name))


# ----------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    node: str  # the node under test (without the HumanRef_ prefix)
    what: str
    prompt: Callable[[], dict]
    names: tuple[str, ...]  # every one of these must be in the error text (the input, the file, ...)
    stage: str = "run"  # "validation": refused by /prompt; "run": the node raises
    also: tuple[str, ...] = field(default_factory=tuple)  # more words the text must contain

    @property
    def id(self) -> str:
        return f"{self.node}: {self.what}"


def region_for(count: int):
    def make(g: Graph, *_):
        masks = solid(g, 1.0)
        for _ in range(count - 1):
            masks = [g.add("MaskComposite", destination=masks, source=solid(g, 1.0), x=0, y=0, operation="add"), 0]
        return [g.add("RepeatImageBatch", image=[g.add("MaskToImage", mask=masks), 0], amount=count), 0]
    return make


def masks_batch(count: int, value: float = 1.0):
    """A MASK batch of ``count`` (MaskToImage -> RepeatImageBatch -> ImageToMask)."""
    def make(g: Graph, *_):
        img = [g.add("MaskToImage", mask=solid(g, value)), 0]
        return [g.add("ImageToMask", image=batch(g, img, count), channel="red"), 0]
    return make


ENC = "ReferenceEncoder"
PATCH = "MaskedSharedAttentionPatch"
CASES: list[Case] = [
    # ---- ReferenceEncoder
    Case(ENC, "zero references (image_1 not connected)", lambda: encoder_prompt(image_1=None, mask_1=None),
         ("image_1",), "validation"),
    Case(ENC, "empty mask", lambda: encoder_prompt(mask_1=lambda g, *_: solid(g, 0.0)), ("mask_1",), also=("empty",)),
    Case(ENC, "mask batch does not match the image batch",
         lambda: encoder_prompt(image_1=lambda g, *_: batch(g, image(g, "face.png"), 2), mask_1=masks_batch(3)),
         ("mask_1", "image_1")),
    Case(ENC, "mask without its image", lambda: encoder_prompt(mask_2=lambda g, *_: solid(g, 1.0)),
         ("mask_2", "image_2")),
    Case(ENC, "too many references (two batches of four)",
         lambda: encoder_prompt(image_1=lambda g, *_: batch(g, image(g, "face.png"), 4), mask_1=None,
                                image_2=lambda g, *_: batch(g, image(g, "upper.png"), 4)), ("at most 6",)),
    Case(ENC, "label lines do not match the batch",
         lambda: encoder_prompt(image_1=lambda g, *_: batch(g, image(g, "face.png"), 2), mask_1=None,
                                label_1="face\nupper\nlower"), ("label_1",)),
    Case(ENC, "a MASK where an IMAGE belongs", lambda: encoder_prompt(image_1=lambda g, *_: solid(g, 1.0)),
         ("image_1",), "validation"),
    Case(ENC, "wrong model type (a CLIP as writer)", lambda: encoder_prompt(writer=lambda g, ckpt, vae: [ckpt, 1]),
         ("writer",), "validation"),
    Case(ENC, "wrong model type (MimicBrush's 13-channel UNet as writer)",
         lambda: encoder_prompt(writer=mimicbrush_model), ("writer",)),
    Case(ENC, "max_side below its minimum", lambda: encoder_prompt(max_side=-8), ("max_side",), "validation"),
    Case(ENC, "unknown timing", lambda: encoder_prompt(timing="sometimes"), ("timing",), "validation"),
    Case(ENC, "unknown mask rule", lambda: encoder_prompt(mask_rule="nearest"), ("mask_rule",), "validation"),
    # ---- MaskedSharedAttentionPatch
    Case(PATCH, "region_masks outside dual mode", lambda: patch_prompt(region_masks=lambda g, *_: solid(g, 1.0)),
         ("region_masks",), also=("dual",)),
    Case(PATCH, "more region masks than references",
         lambda: patch_prompt(mode="dual", region_masks=masks_batch(3)), ("region_masks",)),
    Case(PATCH, "an empty region mask", lambda: patch_prompt(mode="dual", region_masks=lambda g, *_: solid(g, 0.0)),
         ("region_masks",), also=("empty",)),
    Case(PATCH, "start_percent after end_percent", lambda: patch_prompt(start_percent=0.8, end_percent=0.2),
         ("start_percent", "end_percent")),
    Case(PATCH, "unknown block in custom_blocks", lambda: patch_prompt(blocks="custom", custom_blocks="input_99"),
         ("custom_blocks",)),
    Case(PATCH, "blocks = custom with nothing listed", lambda: patch_prompt(blocks="custom", custom_blocks=""),
         ("custom_blocks",)),
    Case(PATCH, "unknown mode", lambda: patch_prompt(mode="mix"), ("mode",), "validation"),
    Case(PATCH, "strength above its maximum", lambda: patch_prompt(strength=50.0), ("strength",), "validation"),
    Case(PATCH, "a MODEL where the bank belongs", lambda: patch_prompt(bank=lambda g, ckpt, vae: [ckpt, 0]),
         ("reference_bank",), "validation"),
    Case(PATCH, "wrong model type (a bank of the SD1.5 writer on the Parts2Whole UNet)",
         lambda: patch_prompt(model=p2w_model), ("reference_bank", "model")),
    # ---- ReferenceAttentionRecorder, ReferenceAttentionMaps
    Case("ReferenceAttentionRecorder", "a step the sampler never reaches",
         lambda: maps_prompt(recorder={"step": 7}), ("step is 7", "ran 2 steps")),
    Case("ReferenceAttentionRecorder", "an unknown block set", lambda: maps_prompt(recorder={"blocks": "decoder"}),
         ("blocks",), "validation"),
    Case("ReferenceAttentionMaps", "a model without a reference patch", lambda: maps_prompt(patch=False),
         ("attention_record", "no reference acted")),
    Case("ReferenceAttentionMaps", "images of another batch",
         lambda: maps_prompt(images=lambda g, decoded: batch(g, decoded, 3)), ("images", "batch of 3")),
    Case("ReferenceAttentionMaps", "opacity above 1", lambda: maps_prompt(opacity=1.5), ("opacity",), "validation"),
    # ---- SaveReferenceBank
    Case("SaveReferenceBank", "an every step bank (it holds no features)",
         lambda: save_bank_prompt(reference_bank=lambda g, ckpt, vae: [encoder(g, ckpt, vae, timing="every step"), 0]),
         ("reference_bank",), also=("once at t=0",)),
    Case("SaveReferenceBank", "a prefix leaving the output folder",
         lambda: save_bank_prompt(filename_prefix="../outside/bank"), ("filename_prefix",)),
    Case("SaveReferenceBank", "an absolute prefix", lambda: save_bank_prompt(filename_prefix="/tmp/bank"),
         ("filename_prefix",)),
    Case("SaveReferenceBank", "a MODEL where the bank belongs",
         lambda: save_bank_prompt(reference_bank=lambda g, ckpt, vae: [ckpt, 0]), ("reference_bank",), "validation"),
    # ---- LoadReferenceBank
    Case("LoadReferenceBank", "missing file", lambda: load_bank_prompt("no-such.safetensors"),
         ("reference_bank_name",), "validation"),
    Case("LoadReferenceBank", "listed but deleted (dangling link)", lambda: load_bank_prompt("zz-missing.safetensors"),
         ("zz-missing.safetensors",)),
    Case("LoadReferenceBank", "not a bank (a ControlNet)", lambda: load_bank_prompt("zz-wrong-format.safetensors"),
         ("zz-wrong-format.safetensors",), also=("not a HumanRef reference bank",)),
    Case("LoadReferenceBank", "a truncated bank", lambda: load_bank_prompt("zz-damaged.safetensors"),
         ("zz-damaged.safetensors",), also=("damaged",)),
    Case("LoadReferenceBank", "a bank of a newer format version", lambda: load_bank_prompt(
        "zz-newer-version.safetensors"), ("zz-newer-version.safetensors",), also=("format version '2'",)),
    Case("LoadReferenceBank", "an SDXL bank on the SD1.5 model", lambda: patch_prompt(
        bank=lambda g, *_: [g.add("HumanRef_LoadReferenceBank", reference_bank_name="sdxl-bank.safetensors"), 0]),
         ("reference_bank", "model"), also=("SDXL",)),
    # ---- Parts2WholeLoader
    Case("Parts2WholeLoader", "missing release", lambda: p2w_loader_prompt("no-such-release"), ("release",),
         "validation"),
    Case("Parts2WholeLoader", "pickled decoupled_attn.pth that needs code",
         lambda: p2w_loader_prompt("zz-pickled-decoupled"), ("zz-pickled-decoupled", "decoupled_attn.pth"),
         also=("weights_only",)),
    Case("Parts2WholeLoader", "release without pose guider weights", lambda: p2w_loader_prompt("zz-no-pose-guider"),
         ("zz-no-pose-guider", "pose_guider")),
    Case("Parts2WholeLoader", "unet weights that are not a safetensors file",
         lambda: p2w_loader_prompt("zz-garbage-unet"), ("zz-garbage-unet", "unet")),
    Case("Parts2WholeLoader", "unet weights of the wrong format (a ControlNet)",
         lambda: p2w_loader_prompt("zz-wrong-unet"), ("zz-wrong-unet", "unet")),
    Case("Parts2WholeLoader", "unknown weight_dtype", lambda: p2w_loader_prompt(workloads.TINY_RELEASE, "fp8"),
         ("weight_dtype",), "validation"),
    # ---- Parts2Whole
    Case("Parts2Whole", "zero parts", lambda: p2w_prompt(parts=0), ("image_1",)),
    Case("Parts2Whole", "empty part mask", lambda: p2w_prompt(mask_1=lambda g, *_: solid(g, 0.0)), ("mask_1",)),
    Case("Parts2Whole", "mask without its image", lambda: p2w_prompt(mask_4=lambda g, *_: solid(g, 1.0)),
         ("mask_4", "image_4")),
    Case("Parts2Whole", "size not a multiple of 8", lambda: p2w_prompt(width=100), ("width",)),
    Case("Parts2Whole", "unknown label", lambda: p2w_prompt(label_1="gloves"), ("label_1",), "validation"),
    Case("Parts2Whole", "wrong model type (the SD1.5 checkpoint as reference_unet)",
         lambda: p2w_prompt(reference_unet=lambda g, ckpt, vae, loader: [ckpt, 0]), ("reference_unet", "model")),
    Case("Parts2Whole", "wrong model type (MimicBrush's UNet as model)",
         lambda: p2w_prompt(model=lambda g, *_: mimicbrush_model(g)), ("model",)),
    Case("Parts2Whole", "too many parts (a batch of seven)",
         lambda: p2w_prompt(parts=1, image_1=lambda g, *_: batch(g, image(g, "face.png"), 7), mask_1=None),
         ("image_1",)),
    # ---- MimicBrushLoader
    Case("MimicBrushLoader", "missing file", lambda: mb_loader_prompt("no-such.bin"), ("ckpt_name",), "validation"),
    Case("MimicBrushLoader", "listed but deleted (dangling link)", lambda: mb_loader_prompt("zz-missing.bin"),
         ("zz-missing.bin",)),
    Case("MimicBrushLoader", "a pickle that needs code", lambda: mb_loader_prompt("zz-needs-code.bin"),
         ("zz-needs-code.bin",), also=("weights_only",)),
    Case("MimicBrushLoader", "not a model file", lambda: mb_loader_prompt("zz-not-a-model.bin"),
         ("zz-not-a-model.bin",)),
    Case("MimicBrushLoader", "checkpoint of the wrong format (a ControlNet)",
         lambda: mb_loader_prompt("zz-wrong-format.safetensors"), ("zz-wrong-format.safetensors",)),
    # ---- MimicBrushConditioning
    Case("MimicBrushConditioning", "empty mask", lambda: mb_prompt(mask=lambda g, *_: solid(g, 0.0, 512, 384)),
         ("mask",), also=("empty",)),
    Case("MimicBrushConditioning", "mask of another size", lambda: mb_prompt(mask=lambda g, *_: solid(g, 1.0, 64, 64)),
         ("mask", "image")),
    Case("MimicBrushConditioning", "two images", lambda: mb_prompt(image=lambda g, *_: batch(
        g, image(g, "mb_source.png"), 2)), ("image",)),
    Case("MimicBrushConditioning", "two references", lambda: mb_prompt(reference=lambda g, *_: batch(
        g, image(g, "mb_reference.png"), 2)), ("reference",)),
    Case("MimicBrushConditioning", "keep_shape without depth", lambda: mb_prompt(keep_shape=True), ("depth",)),
    Case("MimicBrushConditioning", "depth of another aspect ratio",
         lambda: mb_prompt(keep_shape=True, depth=lambda g, *_: image(g, "face.png")), ("depth",)),
    Case("MimicBrushConditioning", "wrong model type (the SD1.5 checkpoint)",
         lambda: mb_prompt(model=lambda g, ckpt, vae: [ckpt, 0]), ("model",)),
    Case("MimicBrushConditioning", "resolution not a multiple of 64", lambda: mb_prompt(resolution=300),
         ("resolution",)),
    Case("MimicBrushConditioning", "a CLIP vision where MIMICBRUSH belongs",
         lambda: mb_prompt(mimicbrush=lambda g, ckpt, vae: [ckpt, 1]), ("mimicbrush",), "validation"),
    # ---- MimicBrushPaste
    Case("MimicBrushPaste", "images that are not the square result",
         lambda: paste_prompt(lambda g: [g.add("EmptyImage", width=256, height=192, batch_size=1, color=0), 0]),
         ("images",)),
    Case("MimicBrushPaste", "a MASK where the images belong", lambda: paste_prompt(lambda g: solid(g, 1.0)),
         ("images",), "validation"),
    # ---- HandGeneratorLoader
    Case("HandGeneratorLoader", "missing file", lambda: hand_loader_prompt("no-such.safetensors"),
         ("hand_generator_name",), "validation"),
    Case("HandGeneratorLoader", "listed but deleted (dangling link)", lambda: hand_loader_prompt("zz-missing.pt"),
         ("zz-missing.pt",)),
    Case("HandGeneratorLoader", "a pickle that needs code", lambda: hand_loader_prompt("zz-needs-code.pt"),
         ("zz-needs-code.pt",)),
    Case("HandGeneratorLoader", "not a model file", lambda: hand_loader_prompt("zz-not-a-model.pt"),
         ("zz-not-a-model.pt",)),
    Case("HandGeneratorLoader", "checkpoint of the wrong format (a ControlNet)",
         lambda: hand_loader_prompt("zz-wrong-format.safetensors"), ("zz-wrong-format.safetensors",)),
    # ---- HandGenerator
    Case("HandGenerator", "no pose", lambda: hands_prompt(pose_json=""), ("pose_json",)),
    Case("HandGenerator", "pose_json that is not JSON", lambda: hands_prompt(pose_json="{people: "), ("pose_json",)),
    Case("HandGenerator", "a person the pose does not have", lambda: hands_prompt(person=3), ("person",)),
    Case("HandGenerator", "a pose without hands", lambda: hands_prompt(pose_json=POSE_JSON.replace(
        '"hand_right_keypoints_2d"', '"_r"').replace('"hand_left_keypoints_2d"', '"_l"')), ("hands",)),
    Case("HandGenerator", "training-free without a ControlNet", lambda: hands_prompt(control_net=None),
         ("control_net",)),
    Case("HandGenerator", "hand_mask of another size", lambda: hands_prompt(
        "humanref-tiny-hand-generator.safetensors", hand_mask=lambda g, *_: solid(g, 1.0, 32, 32)), ("hand_mask",)),
    Case("HandGenerator", "wrong model type (MimicBrush's 13-channel UNet)", lambda: hands_prompt(
        model=mimicbrush_model), ("model",)),
    Case("HandGenerator", "unknown coordinates", lambda: hands_prompt(coordinates="polar"), ("coordinates",),
         "validation"),
    # ---- HandCanvas
    Case("HandCanvas", "one mask for two hands", lambda: canvas_prompt(hand_masks=lambda g: solid(g, 1.0)),
         ("hand_masks",)),
    Case("HandCanvas", "hand images of another size",
         lambda: canvas_prompt(hand_images=lambda g: [g.add("EmptyImage", width=32, height=32, batch_size=2,
                                                            color=0), 0]), ("hand_images",)),
    Case("HandCanvas", "an IMAGE where the crops belong",
         lambda: canvas_prompt(hand_crops=lambda g: [g.add("EmptyImage", width=8, height=8, batch_size=1,
                                                           color=0), 0]), ("hand_crops",), "validation"),
    # ---- SequentialMaskExpandOutpaint
    Case("SequentialMaskExpandOutpaint", "keep_mask batch does not match the canvas",
         lambda: outpaint_prompt(keep_mask=masks_batch(2)), ("keep_mask",)),
    Case("SequentialMaskExpandOutpaint", "a MASK where the canvas belongs",
         lambda: outpaint_prompt(canvas=lambda g, *_: solid(g, 1.0, 64, 96)), ("canvas",), "validation"),
    Case("SequentialMaskExpandOutpaint", "unknown blending", lambda: outpaint_prompt(blending="soft"),
         ("blending",), "validation"),
    Case("SequentialMaskExpandOutpaint", "wrong model type (MimicBrush's 13-channel UNet)",
         lambda: outpaint_prompt(model=mimicbrush_model), ("model",)),
    # ---- GarmentLoRAExtractor
    Case("GarmentLoRAExtractor", "zero garments", lambda: garments_prompt(garments=0), ("garment_1",),
         "validation"),
    Case("GarmentLoRAExtractor", "a batch of two garments in one input",
         lambda: garments_prompt(garment_1=lambda g, *_: batch(g, image(g, "garment_upper.png"), 2)), ("garment_1",)),
    Case("GarmentLoRAExtractor", "two garments in one slot", lambda: garments_prompt(slot_2="upper"),
         ("slot_2", "slot_1")),
    Case("GarmentLoRAExtractor", "an empty slot name", lambda: garments_prompt(slot_1=" "), ("slot_1",)),
    Case("GarmentLoRAExtractor", "garments of different sizes",
         lambda: garments_prompt(garment_2=lambda g, *_: image(g, "face.png")), ("garment_2",)),
    Case("GarmentLoRAExtractor", "a fully transparent garment (RGBA)", lambda: garments_prompt(
        garment_1=lambda g, *_: [g.add("JoinImageWithAlpha", image=image(g, "garment_upper.png"),
                                       alpha=solid(g, 1.0, 288, 384)), 0]), ("garment_1",)),
    Case("GarmentLoRAExtractor", "empty garment mask", lambda: garments_prompt(mask_1=lambda g, *_: solid(g, 0.0)),
         ("mask_1",)),
    Case("GarmentLoRAExtractor", "region without its garment", lambda: garments_prompt(
        region_4=lambda g, *_: solid(g, 1.0)), ("region_4", "garment_4")),
    Case("GarmentLoRAExtractor", "an empty region", lambda: garments_prompt(region_1=lambda g, *_: solid(g, 0.0)),
         ("region_1",)),
    Case("GarmentLoRAExtractor", "a slot the weights have no LoRA for",
         lambda: garments_prompt(workloads.TINY_GARMENTS, slot_2="shoes"), ("slot_2", "shoes")),
    Case("GarmentLoRAExtractor", "missing weights file", lambda: garments_prompt("no-such.safetensors"),
         ("garment_weights",), "validation"),
    Case("GarmentLoRAExtractor", "weights listed but deleted (dangling link)",
         lambda: garments_prompt("zz-missing.pt"), ("zz-missing.pt",)),
    Case("GarmentLoRAExtractor", "weights in a pickle that needs code", lambda: garments_prompt("zz-needs-code.pt"),
         ("zz-needs-code.pt",)),
    Case("GarmentLoRAExtractor", "weights that are not a model file", lambda: garments_prompt("zz-not-a-model.pt"),
         ("zz-not-a-model.pt",)),
    Case("GarmentLoRAExtractor", "weights of the wrong format (a ControlNet)",
         lambda: garments_prompt("zz-wrong-format.safetensors"), ("zz-wrong-format.safetensors",)),
    Case("GarmentLoRAExtractor", "wrong model type (MimicBrush's 13-channel UNet as writer)",
         lambda: garments_prompt(writer=mimicbrush_model), ("writer",)),
]

# the good prompt of every node, run after its bad ones (the server keeps serving)
GOOD: dict[str, Callable[[], dict]] = {
    ENC: encoder_prompt, PATCH: patch_prompt, "Parts2WholeLoader": lambda: p2w_loader_prompt(workloads.TINY_RELEASE),
    "Parts2Whole": p2w_prompt, "MimicBrushLoader": lambda: mb_loader_prompt(workloads.TINY_MIMICBRUSH),
    "MimicBrushConditioning": mb_prompt,
    "MimicBrushPaste": lambda: paste_prompt(lambda g: [g.add("EmptyImage", width=256, height=256, batch_size=1,
                                                             color=0), 0]),
    "HandGeneratorLoader": lambda: hand_loader_prompt("humanref-tiny-hand-generator.safetensors"),
    "HandGenerator": hands_prompt, "HandCanvas": canvas_prompt, "SequentialMaskExpandOutpaint": outpaint_prompt,
    "GarmentLoRAExtractor": lambda: garments_prompt(workloads.TINY_GARMENTS),
    "ReferenceAttentionRecorder": maps_prompt, "ReferenceAttentionMaps": maps_prompt,
    "SaveReferenceBank": save_bank_prompt, "LoadReferenceBank": lambda: load_bank_prompt("sdxl-bank.safetensors"),
}

# edge inputs that are not errors: they must run
ACCEPTED: list[Case] = [
    Case(ENC, "all-ones mask (the whole reference)", lambda: encoder_prompt(mask_1=lambda g, *_: solid(g, 1.0)), ()),
    Case(ENC, "mask of another size (resized to the image)",
         lambda: encoder_prompt(mask_1=lambda g, *_: solid(g, 1.0, 32, 48)), ()),
    Case(PATCH, "all-ones region (the reference may go anywhere)",
         lambda: patch_prompt(mode="dual", region_masks=lambda g, *_: solid(g, 1.0)), ()),
    Case("Parts2Whole", "all-ones part mask", lambda: p2w_prompt(mask_1=lambda g, *_: solid(g, 1.0)), ()),
    Case("MimicBrushConditioning", "all-ones mask (redraw everything)",
         lambda: mb_prompt(mask=lambda g, *_: solid(g, 1.0, 512, 384)), ()),
    Case("GarmentLoRAExtractor", "all-ones garment mask and region",
         lambda: garments_prompt(mask_1=lambda g, *_: solid(g, 1.0), region_1=lambda g, *_: solid(g, 1.0)), ()),
    Case("SequentialMaskExpandOutpaint", "all-ones keep_mask (nothing to outpaint)",
         lambda: outpaint_prompt(keep_mask=lambda g, *_: solid(g, 1.0, 64, 96)), ()),
    Case("SequentialMaskExpandOutpaint", "empty keep_mask (plain txt2img)",
         lambda: outpaint_prompt(keep_mask=lambda g, *_: solid(g, 0.0, 64, 96)), ()),
]


# ----------------------------------------------------------------------------------------------- running
def outcome(client, prompt: dict) -> tuple[str, str, str]:
    """('validation' | 'run' | 'ok', exception type, text) of one prompt."""
    try:
        client.run(prompt, timeout=240)
    except PromptRejected as e:
        return "validation", "PromptRejected", str(e)
    except ExecutionFailed as e:
        return "run", str(e.data.get("exception_type", "")), str(e)
    return "ok", "", ""


def check(case: Case, stage: str, etype: str, text: str) -> list[str]:
    """What is wrong with the answer to a bad input (empty when it is right)."""
    problems = []
    if stage != case.stage:
        problems.append(f"expected a {case.stage} error, got {stage}")
    if stage == "run" and etype.rsplit(".", 1)[-1] not in OWN_ERRORS:
        problems.append(f"raised {etype}, not one of the pack's own errors")
    for word in case.names + case.also:
        if word not in text:
            problems.append(f"the text does not name {word!r}")
    return problems


def served(client) -> bool:
    """The server answers and its queue drains."""
    return "system" in client.system_stats() and workloads.wait_idle(client)


TALLY: dict[str, list[int]] = {}


def test_every_node_has_bad_inputs(object_info):
    ours = {name.removeprefix("HumanRef_") for name in object_info if name.startswith("HumanRef_")}
    assert ours == {c.node for c in CASES} == set(GOOD), ours ^ {c.node for c in CASES}


@pytest.mark.parametrize("node", sorted(GOOD))
def test_bad_inputs(bad_client, node):
    cases = [c for c in CASES if c.node == node]
    failures = []
    for case in cases:
        stage, etype, text = outcome(bad_client, case.prompt())
        problems = check(case, stage, etype, text)
        print(f"[{'ok' if not problems else 'FAIL'}] {case.id}: {text.splitlines()[-1] if text else stage}")
        if problems:
            failures.append(f"{case.id}: {'; '.join(problems)}\n    {text}")
        assert served(bad_client), case.id
    TALLY[node] = [len(cases), len(cases) - len(failures)]
    stage, _, text = outcome(bad_client, GOOD[node]())  # the server keeps serving this node
    assert stage == "ok", f"good prompt after the bad ones: {text}"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.id)
def test_edge_inputs_are_accepted(bad_client, case):
    stage, _, text = outcome(bad_client, case.prompt())
    assert stage == "ok", text


def test_full_workflow_after_the_sweep(bad_client):
    """After every bad prompt above, a whole example workflow still runs on this server."""
    result = bad_client.run(workloads.Job("references", dict(seed=5, refs=2, size=(64, 64))).prompt(),
                            timeout=300)
    assert any(f["filename"].endswith(".png") for f in workloads.output_files(result.history))
    tried = sum(t for t, _ in TALLY.values())
    passed = sum(p for _, p in TALLY.values())
    print(f"bad-input sweep: {tried} tried, {passed} passed over {len(TALLY)} nodes; {len(ACCEPTED)} edge inputs "
          "accepted")
