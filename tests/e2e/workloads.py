"""The soak's workloads and how they run: the five example workflows (workflows/api/*.json) as graph builders
with their variants (seeds, 1 to 6 references, parts or garments, masks and regions, image sizes, writer timings,
injection modes), the soak plan, the server-side helpers (upload, queue, wait, fetch, resident memory) and the
soak itself.

Shared by the e2e tier (tests/e2e/test_soak.py, test_faults.py, test_bad_inputs.py) and by bench/soak.py, which
runs the same soak as a benchmark and writes its figures as JSON.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from e2e_support import INPUTS, REPO, TINY_CKPT, with_style_lora

API_DIR = REPO / "workflows" / "api"
WORKFLOWS = ("references", "parts2whole", "mimicbrush", "anydressing", "hands")
GROWTH_MAX = 0.05  # resident memory after the soak / after the warm-up - 1
# glibc raises its mmap threshold as large blocks are freed, so freed tensor memory stays in the heap and the
# idle VmRSS swung by about +-3% between runs; fixed at 128 KiB, freed tensors go back to the system and VmRSS
# follows live memory (three runs: +1.7%, +1.9%, +1.9%). Only the soak's own server gets it.
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}

TINY_CONTROLNET = "humanref-tiny-controlnet-sd15.safetensors"
TINY_LORA = "humanref-tiny-style-lora-sd15.safetensors"
TINY_GARMENTS = "humanref-tiny-garments-sd15.safetensors"
TINY_RELEASE = "humanref-tiny-parts2whole"
TINY_MIMICBRUSH = "humanref-tiny-mimicbrush.bin"
TINY_HANDS = "humanref-tiny-hand-generator.safetensors"

P2W_LABELS = ("upper body clothes", "lower body clothes", "whole body clothes", "hair or headwear", "face", "shoes")
GARMENT_SLOTS = ("upper", "lower", "hat", "shoes", "bag", "outer")
REF_LABELS = ("face", "upper body clothes", "lower body clothes", "hair or headwear", "shoes", "whole body clothes")
POSITIVE = "a photo of a person"
NEGATIVE = "blurry"
FAST_VAE = "taesd"  # a tiny synthetic TAESD (models/vae_approx) in place of the checkpoint's full-size VAE
# (image, mask) pairs of workflows/inputs, cycled for references and parts
PAIRS = (("face.png", "face_mask.png"), ("upper.png", "upper_mask.png"), ("lower.png", "lower_mask.png"))


def load_api(name: str) -> dict:
    with open(API_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def _load_mask(name: str) -> dict:
    return {"class_type": "LoadImageMask", "inputs": {"image": name, "channel": "red"}}


def add_node(prompt: dict, node: dict) -> str:
    nid = str(max(int(k) for k in prompt) + 1)
    prompt[nid] = node
    return nid


def use_vae(prompt: dict, vae_name: str) -> dict:
    """Every input fed by the checkpoint's VAE (node 1, output 2) reads a VAELoader(vae_name) instead, except a
    trained hand generator's (its mask head reads the SD1.5 VAE decoder's features)."""
    vid = add_node(prompt, {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}})
    for node in prompt.values():
        if node["class_type"] == "HumanRef_HandGenerator" and "hand_generator" in node["inputs"]:
            continue
        for key, value in node["inputs"].items():
            if value == ["1", 2]:
                node["inputs"][key] = [vid, 0]
    return prompt


def same_texts(prompt: dict) -> dict:
    """One positive and one negative text for every workflow: ComfyUI keeps the text encodings cached from one
    prompt to the next, so the soak spends its time in the pack's nodes, not in CLIP-L."""
    for node in prompt.values():
        if node["class_type"] == "CLIPTextEncode":
            text = node["inputs"]["text"]
            node["inputs"]["text"] = NEGATIVE if not text or text.startswith("blurry") else POSITIVE
    return prompt


def save_latent(prompt: dict, sampler_id: str, prefix: str) -> str:
    """A SaveLatent after the sampler: the exact latent comes back through /view (bit-exact comparisons)."""
    return add_node(prompt, {"class_type": "SaveLatent",
                             "inputs": {"samples": [sampler_id, 0], "filename_prefix": prefix}})


# ----------------------------------------------------------------------------------------------- the workloads
def references(seed: int, refs: int = 3, masks: bool = True, size: tuple[int, int] = (128, 192),
                       steps: int = 2, timing: str = "every step", mode: str = "concat", labels: int = 6) -> dict:
    """workflows/api/references.json with 1..6 references (the example inputs cycled) and ``labels``
    different labels (each label is one CLIP-L encoding in the writer)."""
    p = load_api("references")
    p["1"]["inputs"]["ckpt_name"] = TINY_CKPT
    enc = p["8"]["inputs"]
    for i in range(1, 7):
        enc.pop(f"image_{i}", None)
        enc.pop(f"mask_{i}", None)
    for nid in ("2", "3", "4", "5", "6", "7"):
        del p[nid]
    for i in range(1, refs + 1):
        image, mask = PAIRS[(i - 1) % len(PAIRS)]
        enc[f"image_{i}"] = [add_node(p, {"class_type": "LoadImage", "inputs": {"image": image}}), 0]
        if masks:
            enc[f"mask_{i}"] = [add_node(p, _load_mask(mask)), 0]
        enc[f"label_{i}"] = REF_LABELS[(i - 1) % labels]
    enc["timing"] = timing
    enc["max_side"] = 128
    p["9"]["inputs"]["mode"] = mode
    p["9"]["inputs"]["strength"] = 0.5 if mode == "blend" else 1.0
    p["12"]["inputs"].update(width=size[0], height=size[1])
    p["13"]["inputs"].update(seed=seed, steps=steps)
    return p


def parts2whole(seed: int, parts: int = 3, masks: bool = True, size: tuple[int, int] = (64, 96), steps: int = 2,
                pose: bool = True, labels: int = 6) -> dict:
    """workflows/api/parts2whole.json with 1..6 parts and ``labels`` different labels."""
    p = load_api("parts2whole")
    p["1"]["inputs"]["ckpt_name"] = TINY_CKPT
    p["2"]["inputs"]["release"] = TINY_RELEASE
    node = p["12"]["inputs"]
    for i in range(1, 7):
        node.pop(f"image_{i}", None)
        node.pop(f"mask_{i}", None)
    for nid in ("3", "4", "5", "6", "7", "8"):
        del p[nid]
    for i in range(1, parts + 1):
        image, mask = PAIRS[(i - 1) % len(PAIRS)]
        node[f"image_{i}"] = [add_node(p, {"class_type": "LoadImage", "inputs": {"image": image}}), 0]
        if masks:
            node[f"mask_{i}"] = [add_node(p, _load_mask(mask)), 0]
        node[f"label_{i}"] = P2W_LABELS[(i - 1) % labels]
    if not pose:
        node.pop("pose")
        del p["9"]
    node.update(width=size[0], height=size[1])
    p["13"]["inputs"].update(seed=seed, steps=steps)
    return p


def mimicbrush(seed: int, source: str = "mb_source.png", mask: str = "mb_mask.png", steps: int = 2,
               writer: str = "every step (exact)", keep_shape: bool = False, crop_to_mask: bool = False) -> dict:
    p = load_api("mimicbrush")
    p["1"]["inputs"]["ckpt_name"] = TINY_CKPT
    p["2"]["inputs"]["ckpt_name"] = TINY_MIMICBRUSH
    p["3"]["inputs"]["image"] = source
    p["4"]["inputs"]["image"] = mask
    p["7"]["inputs"].update(resolution=256, writer=writer, keep_shape=keep_shape, crop_to_mask=crop_to_mask)
    if source != "mb_source.png":
        p["7"]["inputs"].pop("depth")  # the example depth map belongs to the example source
        del p["6"]
    p["8"]["inputs"].update(seed=seed, steps=steps)
    return p


def anydressing(seed: int, garments: int = 2, weights: bool = True, regions: bool = True, masks: bool = False,
                size: tuple[int, int] = (128, 192), steps: int = 2) -> dict:
    """workflows/api/anydressing.json with 1..6 garments (1..3 with the tiny weights: slots upper, lower, hat)."""
    p = with_style_lora(load_api("anydressing"), TINY_LORA)
    p["1"]["inputs"]["ckpt_name"] = TINY_CKPT
    p["12"]["inputs"]["control_net_name"] = TINY_CONTROLNET
    ex = p["7"]["inputs"]
    ex["garment_weights"] = TINY_GARMENTS if weights else "none (training-free)"
    ex["max_side"] = 128
    for key in [k for k in ex if k.startswith(("garment_", "region_", "mask_")) and k != "garment_weights"]:
        del ex[key]
    images = ("3", "4")
    for i in range(1, garments + 1):
        ex[f"garment_{i}"] = [images[(i - 1) % 2], 0]
        if masks:
            ex[f"mask_{i}"] = [add_node(p, _load_mask("upper_mask.png")), 0]  # resized to the garment
        ex[f"slot_{i}"] = GARMENT_SLOTS[i - 1]
    if regions:
        ex["region_1"] = ["5", 0]
        if garments >= 2:
            ex["region_2"] = ["6", 0]
    else:
        del p["5"], p["6"]
    if garments < 2:
        del p["4"]
    p["14"]["inputs"].update(width=size[0], height=size[1])
    p["15"]["inputs"].update(seed=seed, steps=steps)
    return p


def hands(seed: int, size: tuple[int, int] = (128, 192), trained: bool = False, steps: int = 2,
              resolution: int = 64) -> dict:
    p = load_api("hands")
    p["1"]["inputs"]["ckpt_name"] = TINY_CKPT
    p["4"]["inputs"]["control_net_name"] = TINY_CONTROLNET
    p["5"]["inputs"].update(resolution=resolution, steps=2, width=size[0], height=size[1], seed=seed)
    p["9"]["inputs"].update(seed=seed + 1, steps=steps, unmasked_last_steps=min(2, steps - 1))  # must stay below steps
    if trained:
        p["5"]["inputs"]["hand_generator"] = [add_node(p, {"class_type": "HumanRef_HandGeneratorLoader",
                                                           "inputs": {"hand_generator_name": TINY_HANDS}}), 0]
    return p


def plain_txt2img(seed: int, size: tuple[int, int] = (64, 96), steps: int = 3, prefix: str = "soak_plain") -> dict:
    """The unpatched graph: references without its HumanRef nodes, a SaveLatent next to the image."""
    p = load_api("references")
    for nid in ("2", "3", "4", "5", "6", "7", "8", "9"):
        del p[nid]
    p["1"]["inputs"]["ckpt_name"] = TINY_CKPT
    p["13"]["inputs"].update(model=["1", 0], seed=seed, steps=steps)
    p["12"]["inputs"].update(width=size[0], height=size[1])
    p["15"]["inputs"]["filename_prefix"] = prefix
    save_latent(p, "13", prefix)
    return p


BUILDERS: dict[str, Callable[..., dict]] = {
    "references": references, "parts2whole": parts2whole, "mimicbrush": mimicbrush,
    "anydressing": anydressing, "hands": hands,
}

# the sizes the soak cycles through (all multiples of 64 for the latent grids of the tiny UNet)
SIZES = ((64, 96), (64, 64), (128, 128), (96, 64), (64, 128))


@dataclass
class Job:
    workflow: str
    options: dict

    def prompt(self, vae: Optional[str] = FAST_VAE) -> dict:
        prompt = same_texts(BUILDERS[self.workflow](**self.options))
        return use_vae(prompt, vae) if vae else prompt

    def describe(self) -> str:
        return self.workflow + "(" + ", ".join(f"{k}={v}" for k, v in self.options.items()) + ")"


def warmup_rounds() -> list[list[Job]]:
    """Two rounds that run every code path the soak takes once: each workflow at the largest settings the soak
    uses, then each workflow's other variants (writer timing, trained or training-free, weights, crop, no pose).
    ComfyUI and the allocator settle on their working set here; the memory baseline is taken after them."""
    return [[
        Job("references", dict(seed=1000, refs=6, masks=True, size=(128, 128))),
        Job("parts2whole", dict(seed=1001, parts=6, masks=True, size=(128, 128))),
        Job("mimicbrush", dict(seed=1002, keep_shape=True)),
        Job("anydressing", dict(seed=1003, garments=6, weights=False, regions=True, masks=True, size=(128, 128))),
        Job("hands", dict(seed=1004, size=(128, 192), trained=True)),
    ], [
        Job("references", dict(seed=1005, refs=1, masks=False, size=(64, 64), timing="once at t=0",
                                       mode="strict", labels=1)),
        Job("parts2whole", dict(seed=1006, parts=1, masks=False, size=(64, 64), pose=False, labels=1)),
        Job("mimicbrush", dict(seed=1007, source="soak_source_small.png", mask="soak_mask_small.png",
                               writer="once at t=0 (fast)", crop_to_mask=True)),
        Job("anydressing", dict(seed=1008, garments=3, weights=True, regions=False, size=(64, 64))),
        Job("hands", dict(seed=1009, size=(64, 96), trained=False)),
    ]]


def soak_round(r: int) -> list[Job]:
    """Round r (1, 2, ...): every workflow once, settings varied by r."""
    size = SIZES[r % len(SIZES)]
    return [
        Job("references", dict(seed=r, refs=1 + r % 6, masks=r % 2 == 0, size=size,
                                       timing=("every step", "once at t=0")[r % 2],
                                       mode=("concat", "strict", "blend")[r % 3], labels=1 + r % 2)),
        Job("parts2whole", dict(seed=r, parts=1 + (r + 2) % 6, masks=r % 3 != 0,
                                size=((64, 96), (64, 64), (128, 128), (96, 64))[r % 4], pose=r % 2 == 1,
                                labels=2 - r % 2)),
        Job("mimicbrush", dict(seed=r, source=("mb_source.png", "soak_source_small.png")[r % 2],
                               mask=("mb_mask.png", "soak_mask_small.png")[r % 2],
                               writer="every step (exact)" if r % 3 == 1 else "once at t=0 (fast)",
                               keep_shape=r % 4 == 0, crop_to_mask=r % 3 == 0)),
        Job("anydressing", dict(seed=r, garments=1 + r % 3 if r % 2 else 1 + r % 6, weights=r % 2 == 1,
                                regions=r % 3 != 1, masks=r % 4 == 2, size=size)),
        Job("hands", dict(seed=r, size=((64, 96), (96, 128), (128, 128))[r % 3], trained=r % 3 == 2)),
    ]


WARMUP_ROUNDS = 2


def soak_plan(prompts: int = 50) -> list[list[Job]]:
    """Rounds of five: the two warm-up rounds, then soak rounds 1, 2, ... (prompts: a multiple of 5, >= 15)."""
    if prompts % len(WORKFLOWS) or prompts < (WARMUP_ROUNDS + 1) * len(WORKFLOWS):
        raise ValueError(f"prompts must be a multiple of {len(WORKFLOWS)} and at least "
                         f"{(WARMUP_ROUNDS + 1) * len(WORKFLOWS)}")
    return warmup_rounds() + [soak_round(r) for r in range(1, prompts // len(WORKFLOWS) - WARMUP_ROUNDS + 1)]


# ----------------------------------------------------------------------------------------------- inputs
def upload_inputs(client: Any) -> None:
    """The example inputs under their own names, plus a smaller MimicBrush source and mask (another size)."""
    from PIL import Image

    for path in sorted(INPUTS.glob("*.png")):
        client.upload_image(str(path), overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, small in (("mb_source.png", "soak_source_small.png"), ("mb_mask.png", "soak_mask_small.png")):
            image = Image.open(INPUTS / name)
            image.resize((320, 240), Image.BICUBIC if name == "mb_source.png" else Image.NEAREST).save(
                os.path.join(tmp, small))
            client.upload_image(os.path.join(tmp, small), overwrite=True)


# ----------------------------------------------------------------------------------------------- server side
def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process in KiB, from /proc/<pid>/status (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def wait_all(client: Any, prompt_ids: list[str], timeout: float, on_done: Optional[Callable[[str, dict], None]] = None
             ) -> dict[str, dict]:
    """Poll /history until every prompt has a status; returns {prompt_id: history entry}."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    while len(done) < len(prompt_ids):
        if time.monotonic() > deadline:
            missing = [p for p in prompt_ids if p not in done]
            raise TimeoutError(f"{len(missing)} of {len(prompt_ids)} prompts unfinished after {timeout:.0f} s")
        for pid in prompt_ids:
            if pid in done:
                continue
            entry = client.history(pid)
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                done[pid] = entry
                if on_done:
                    on_done(pid, entry)
        time.sleep(0.25)
    return done


def wait_idle(client: Any, timeout: float = 30.0) -> bool:
    """True once the server answers with an empty queue (an error or interrupt event can reach the client a
    moment before the prompt leaves queue_running); False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        queue = client.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def failed(entry: dict) -> Optional[str]:
    """None when a history entry completed successfully, else the server's error text."""
    status = entry.get("status") or {}
    if status.get("status_str") == "success" and status.get("completed"):
        return None
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message')}"
    return f"status {status}"


def output_files(entry: dict) -> list[dict]:
    files = []
    for node_out in (entry.get("outputs") or {}).values():
        for kind in ("images", "latents"):
            files.extend(node_out.get(kind) or [])
    return files


def fetch_outputs(client: Any, entry: dict) -> dict[str, bytes]:
    """{filename: bytes} of a finished prompt's saved images and latents."""
    return {f["filename"]: client.view(f["filename"], f.get("subfolder", ""), f.get("type", "output"))
            for f in output_files(entry)}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_one(client: Any, prompt: dict, timeout: float = 300.0) -> dict:
    """Queue one prompt and wait; raises RuntimeError with the server's message when it fails."""
    pid = client.queue_prompt(prompt)
    entry = wait_all(client, [pid], timeout)[pid]
    err = failed(entry)
    if err:
        raise RuntimeError(err)
    return entry


def plain_outputs(client: Any, seed: int, vae: Optional[str] = FAST_VAE) -> tuple[dict[str, bytes], dict]:
    """Run the unpatched graph; ({"latent": .latent bytes, "image": PNG bytes}, the history entry)."""
    prompt = same_texts(plain_txt2img(seed))
    entry = run_one(client, use_vae(prompt, vae) if vae else prompt)
    files = fetch_outputs(client, entry)
    latent = [v for k, v in files.items() if k.endswith(".latent")]
    image = [v for k, v in files.items() if k.endswith(".png")]
    if len(latent) != 1 or len(image) != 1:
        raise RuntimeError(f"the unpatched prompt saved {sorted(files)}")
    return {"latent": latent[0], "image": image[0]}, entry


def png_pixels(data: bytes) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def cached_nodes(entry: dict) -> list[str]:
    """The node ids ComfyUI took from its cache for a finished prompt (its execution_cached message)."""
    for kind, data in (entry.get("status") or {}).get("messages") or []:
        if kind == "execution_cached":
            return list(data.get("nodes") or [])
    return []


def execution_seconds(entry: dict) -> Optional[float]:
    msgs = {k: d for k, d in (entry.get("status") or {}).get("messages") or []}
    t0 = msgs.get("execution_start", {}).get("timestamp")
    t1 = (msgs.get("execution_success") or msgs.get("execution_error") or {}).get("timestamp")
    return (t1 - t0) / 1000.0 if t0 and t1 else None


@dataclass
class SoakResult:
    prompts: int
    failures: list[str] = field(default_factory=list)
    rss_start_kib: int = 0
    rss_first_round_kib: int = 0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    hwm_kib: int = 0
    rss_samples_kib: list[int] = field(default_factory=list)
    plain_identical: bool = False
    plain: dict = field(default_factory=dict)
    seconds: float = 0.0
    warmup_seconds: float = 0.0
    soak_seconds: float = 0.0
    per_workflow: dict = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)

    @property
    def growth(self) -> float:
        return self.rss_end_kib / self.rss_warm_kib - 1.0

    def as_json(self) -> dict:
        mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
        return {
            "prompts": self.prompts, "completed": self.prompts - len(self.failures), "failures": self.failures,
            "warmup_prompts": WARMUP_ROUNDS * len(WORKFLOWS),
            "vmrss_mib": {"after_start": mib(self.rss_start_kib), "after_first_round": mib(self.rss_first_round_kib),
                          "after_warmup": mib(self.rss_warm_kib),
                          "after_soak": mib(self.rss_end_kib), "peak_vmhwm": mib(self.hwm_kib)},
            "growth_after_warmup": round(self.growth, 5), "growth_max": GROWTH_MAX,
            "growth_after_first_round": round(self.rss_end_kib / self.rss_first_round_kib - 1.0, 5),
            "vmrss_mib_after_each_soak_prompt": [mib(k) for k in self.rss_samples_kib],
            "unpatched_bit_identical": self.plain_identical, "unpatched": self.plain,
            "seconds": {"total": round(self.seconds, 1), "warmup": round(self.warmup_seconds, 1),
                        "soak": round(self.soak_seconds, 1)},
            "execution_seconds_per_workflow": self.per_workflow,
            "jobs": self.jobs,
        }


def run_soak(client: Any, pid: int, prompts: int = 50, log: Callable[[str], None] = print,
             timeout: float = 1800.0, vae: Optional[str] = FAST_VAE) -> SoakResult:
    """The soak on a fresh server (process id ``pid``) reached through ``client`` (humanref.cli.client).

    The warm-up rounds (ten prompts) are queued back to back and awaited; the unpatched prompt runs and the
    server's VmRSS is read when it is idle; the other prompts are then queued back to back in one go, the
    unpatched prompt runs again, and VmRSS is read once more. The unpatched output must not change.
    """
    start = time.monotonic()
    result = SoakResult(prompts)
    upload_inputs(client)
    result.rss_start_kib = rss_kib(pid)["VmRSS"]
    before, _ = plain_outputs(client, seed=4242, vae=vae)  # the fresh server's unpatched output
    rounds = soak_plan(prompts)
    times: dict[str, list[float]] = {w: [] for w in WORKFLOWS}

    def run_batch(jobs: list[Job], sample: bool) -> None:
        ids = [client.queue_prompt(job.prompt(vae)) for job in jobs]  # queued back to back

        def done(prompt_id: str, entry: dict) -> None:
            if sample:
                result.rss_samples_kib.append(rss_kib(pid)["VmRSS"])

        entries = wait_all(client, ids, timeout, on_done=done)
        for job, prompt_id in zip(jobs, ids):
            result.jobs.append(job.describe())
            err = failed(entries[prompt_id])
            if err:
                result.failures.append(f"{job.describe()}: {err}")
            seconds = execution_seconds(entries[prompt_id])
            if seconds is not None:
                times[job.workflow].append(seconds)

    t0 = time.monotonic()
    run_batch(rounds[0], sample=False)
    result.rss_first_round_kib = rss_kib(pid)["VmRSS"]
    for jobs in rounds[1:WARMUP_ROUNDS]:
        run_batch(jobs, sample=False)
    result.warmup_seconds = time.monotonic() - t0
    # Idle memory depends on what the last prompt left in ComfyUI's output cache (a bank, a second UNet), so
    # both baselines are read after the same unpatched prompt, which evicts the previous prompt's outputs.
    warm_plain, _ = plain_outputs(client, seed=4242, vae=vae)
    result.rss_warm_kib = rss_kib(pid)["VmRSS"]
    warm = sum(len(jobs) for jobs in rounds[:WARMUP_ROUNDS])
    log(f"warm-up: {warm} prompts in {result.warmup_seconds:.1f} s, VmRSS {result.rss_warm_kib / 1024:.1f} MiB "
        f"(after the first round {result.rss_first_round_kib / 1024:.1f} MiB)")
    t0 = time.monotonic()
    run_batch([job for jobs in rounds[WARMUP_ROUNDS:] for job in jobs], sample=True)
    result.soak_seconds = time.monotonic() - t0
    after, after_entry = plain_outputs(client, seed=4242, vae=vae)
    mem = rss_kib(pid)
    result.rss_end_kib, result.hwm_kib = mem["VmRSS"], mem["VmHWM"]
    log(f"soak: {prompts - warm} prompts in {result.soak_seconds:.1f} s, VmRSS "
        f"{result.rss_end_kib / 1024:.1f} MiB ({100 * result.growth:+.2f}%), {len(result.failures)} failed")
    result.plain_identical = all(before["latent"] == o["latent"] and png_pixels(before["image"]) == png_pixels(
        o["image"]) for o in (warm_plain, after))
    result.plain = {"latent_sha256_before": digest(before["latent"]), "latent_sha256_after": digest(after["latent"]),
                    "image_pixels_sha256_before": digest(png_pixels(before["image"])),
                    "image_pixels_sha256_after": digest(png_pixels(after["image"])),
                    "cached_nodes_after": sorted(cached_nodes(after_entry), key=int)}
    result.seconds = time.monotonic() - start
    result.per_workflow = {w: {"runs": len(v), "mean": round(sum(v) / len(v), 2), "max": round(max(v), 2)}
                           for w, v in times.items() if v}
    return result


# ----------------------------------------------------------------------------------------------- models
def tiny_taesd_state_dicts(seed: int = 0) -> tuple[dict, dict]:
    """(encoder, decoder) state dicts of ComfyUI's TAESD layout with random weights (fan-in scaled)."""
    import comfy.taesd.taesd as taesd
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for module in (taesd.Encoder(latent_channels=4), taesd.Decoder(latent_channels=4)):
        sd = {}
        for key, tensor in module.state_dict().items():
            fan_in = max(1, tensor[0].numel()) if tensor.ndim > 1 else 1
            scale = (1.0 / fan_in) ** 0.5 if tensor.ndim > 1 else 0.0
            sd[key] = (torch.randn(tensor.shape, generator=g) * scale).contiguous()
        out.append(sd)
    return out[0], out[1]


def soak_models(tiny_models: str, dest: str) -> str:
    """dest/: every folder of a tiny-models folder (symlinked) plus vae_approx/ with a tiny synthetic TAESD."""
    from safetensors.torch import save_file

    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(tiny_models)):
        link = os.path.join(dest, name)
        if name != "vae_approx" and not os.path.lexists(link):
            os.symlink(os.path.join(os.path.abspath(tiny_models), name), link)
    approx = os.path.join(dest, "vae_approx")
    os.makedirs(approx, exist_ok=True)
    encoder, decoder = tiny_taesd_state_dicts()
    save_file(encoder, os.path.join(approx, "taesd_encoder.safetensors"))
    save_file(decoder, os.path.join(approx, "taesd_decoder.safetensors"))
    return dest
