"""``python -m humanref train ...``: the hand generator and garment-weights trainers, and the dataset validator.

The trainers run on Accelerate: ``python -m humanref train ...`` is one process, ``accelerate launch -m humanref
train ...`` runs as many as the launcher starts (every process runs this same command; the main one prints,
logs and writes the files). Only the standard library at import time; torch, diffusers and ComfyUI are imported
by the commands.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "python -m humanref train"

DESCRIPTION = """\
Train the weights no paper released, into the files the nodes load.

  python -m humanref train hand-generator --data DIR --base SD15_CHECKPOINT --out FILE [options]
      Fine-tune an SD1.5 checkpoint into a hand generator (15-channel UNet + mask head, paper defaults:
      512x512, batch 32, lr 1e-5, L = L_LDM + 0.5 MSE(mask)). FILE goes to models/hand_generator/.

  python -m humanref train garments --data DIR --base SD15_CHECKPOINT --slots upper,lower --out FILE [options]
      Train AnyDressing garment weights for an SD1.5 checkpoint (per-slot q/k/v LoRA of the writer,
      W'_k/W'_v of the dressing attention; paper defaults: 768x576, lr 5e-5, localization loss 0.01,
      texture loss 0.001 for t <= 350). FILE goes to models/garment_weights/.

  python -m humanref train validate-data hand|garments DIR [--slots upper,lower]
      Check a dataset folder and list every problem (also done before every training run).

  accelerate launch [--multi_gpu --num_processes N ...] -m humanref train hand-generator|garments ...
      The same trainers on several GPUs or machines (data parallel; --batch-size is per process).

Dataset folder formats, the losses, resuming, several GPUs and the outputs: docs/training.md. Run
`python -m humanref train COMMAND --help` for every option.
"""


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _add_common(p: argparse.ArgumentParser, batch: int, lr: float, steps: int, sample_steps: int,
                sample_cfg: float) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="the dataset folder (README: Training)")
    p.add_argument("--base", required=True, metavar="CHECKPOINT",
                   help="SD1.5 single-file checkpoint (.safetensors; ldm keys), read offline")
    p.add_argument("--out", required=True, metavar="FILE", help="the trained .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument("--work-dir", metavar="DIR",
                   help="checkpoints, sample grids and log.jsonl (default ./humanref-training/<FILE's name>)")
    p.add_argument("--batch-size", type=_positive_int, default=batch,
                   help=f"per step and process (effective batch = batch x accumulation x processes; default {batch})")
    p.add_argument("--gradient-accumulation", type=_positive_int, default=1, metavar="N",
                   help="accumulate N batches per optimizer step (effective batch = batch x N; default 1)")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr:g})")
    p.add_argument("--lr-warmup-steps", type=int, default=0, metavar="N", help="linear warm-up (default 0)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1.0)")
    p.add_argument("--max-steps", type=_positive_int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="probability of training a sample with an empty caption (default 0)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu, cuda, cuda:1 (one process; with several, Accelerate "
                        "gives each its GPU)")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="autocast dtype on CUDA (auto: bf16 where supported, else fp16); the CPU runs fp32")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (default: on with CUDA, off on the CPU)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading processes (default min(4, CPUs))")
    p.add_argument("--seed", type=int, default=0, help="data order, noise, augmentation (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="N",
                   help="save a checkpoint every N steps, 0 = never (default 1000)")
    p.add_argument("--keep-checkpoints", type=_positive_int, default=3, metavar="N", help="keep the last N (default 3)")
    p.add_argument("--resume", metavar="PATH",
                   help="continue from a checkpoint: 'latest' (in --work-dir), a checkpoints folder or a "
                        "step_N.safetensors file")
    p.add_argument("--sample-every", type=int, default=500, metavar="N",
                   help="write a sample grid every N steps (and at the end), 0 = never (default 500)")
    p.add_argument("--sample-count", type=int, default=4, metavar="N", help="samples in a grid (default 4)")
    p.add_argument("--sample-steps", type=_positive_int, default=sample_steps,
                   help=f"DDIM steps of the sample grid (default {sample_steps})")
    p.add_argument("--sample-cfg", type=float, default=sample_cfg,
                   help=f"CFG scale of the sample grid (default {sample_cfg:g})")
    p.add_argument("--log-every", type=int, default=10, metavar="N", help="print losses every N steps (default 10)")
    p.add_argument("--skip-validation", action="store_true", help="do not check the dataset first")
    p.add_argument("--validate-only", action="store_true", help="check the dataset, print the report and stop")
    p.add_argument("--comfyui", metavar="PATH",
                   help="ComfyUI folder (its CLIP/VAE loaders; default $COMFYUI_PATH or /opt/ComfyUI)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    hand = sub.add_parser("hand-generator", help="train a hand generator (models/hand_generator/)",
                          description="Fine-tune an SD1.5 checkpoint into HumanRef's hand generator: 15-channel "
                                      "conv_in (4 latent + 11 hand condition) and the mask head on the VAE decoder.")
    _add_common(hand, batch=32, lr=1e-5, steps=30000, sample_steps=20, sample_cfg=7.0)
    hand.add_argument("--resolution", type=int, default=512, help="side of the square training crops (default 512)")
    hand.add_argument("--crop", default="auto", choices=("auto", "none"),
                      help="auto: square crops around the hands, both hands in one crop when they are close, "
                           "else one hand at random (paper); none: the image's centre square (default auto)")
    hand.add_argument("--crop-scale", type=float, default=1.5,
                      help="crop side / longest side of the hand's keypoint box (default 1.5, as the node)")
    hand.add_argument("--heatmap-sigma", type=float, default=0.0,
                      help="finger heatmap sigma in crop pixels, 0 = resolution / 64 (default, as the node)")
    hand.add_argument("--min-confidence", type=float, default=0.3, help="keypoints below are missing (default 0.3)")
    hand.add_argument("--mask-source", default="auto", choices=("auto", "files", "keypoints"),
                      help="the mask target: files (masks/), keypoints (drawn silhouette), auto = files when "
                           "masks/ exists (default auto)")
    hand.add_argument("--mask-weight", type=float, default=0.5, help="lambda of the mask loss (default 0.5)")
    hand.add_argument("--mask-dropout", type=float, default=0.5,
                      help="probability of zero-filling the condition's mask channel (default 0.5)")
    hand.add_argument("--mask-input", default="x0-estimate", choices=("x0-estimate", "clean"),
                      help="latent the mask head reads in training: the UNet's one-step estimate (the mask loss "
                           "trains the UNet too; default) or the clean latent (head only)")
    hand.add_argument("--mask-activation", default="clamp", choices=("clamp", "sigmoid"),
                      help="clamp: L2 on the head's raw output, clamped at inference (default); sigmoid")
    hand.add_argument("--mask-head-lr", type=float, default=None, help="learning rate of the mask head (default --lr)")
    hand.add_argument("--conv-in-init", default="random", choices=("random", "zeros"),
                      help="the 11 new conv_in channels: random (paper; N(0, std of the pretrained ones)) or zeros")
    hand.add_argument("--rgb-shift", type=float, default=20.0, help="max RGB shift in 0..255 units (default 20)")
    hand.add_argument("--brightness", type=float, default=0.2, help="max brightness change (default 0.2)")
    hand.add_argument("--contrast", type=float, default=0.2, help="max contrast change (default 0.2)")
    hand.add_argument("--augment-p", type=float, default=0.5,
                      help="probability of each colour augmentation, 0 = none (default 0.5)")

    garments = sub.add_parser("garments", help="train AnyDressing garment weights (models/garment_weights/)",
                              description="Train per-slot LoRAs of the garment writer and the dressing projections "
                                          "W'_k/W'_v for an SD1.5 checkpoint (the reader stays frozen).")
    _add_common(garments, batch=4, lr=5e-5, steps=100000, sample_steps=30, sample_cfg=6.0)
    garments.add_argument("--slots", required=True, help="comma list of garment slots, e.g. upper,lower")
    garments.add_argument("--height", type=int, default=768, help="training height (default 768)")
    garments.add_argument("--width", type=int, default=576, help="training width (default 576)")
    garments.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32; the paper does not say)")
    garments.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank: scale 1)")
    garments.add_argument("--dressing-scale", type=float, default=1.0,
                          help="lambda of the dressing attention in training (default 1.0; the node's 0.7 is the "
                               "paper's inference value)")
    garments.add_argument("--localization-weight", type=float, default=0.01,
                          help="weight of the instance-level localization loss (default 0.01)")
    garments.add_argument("--texture-weight", type=float, default=0.001,
                          help="weight of the edge-weighted high-frequency loss (default 0.001)")
    garments.add_argument("--texture-max-timestep", type=int, default=350,
                          help="the texture loss applies for t <= this (default 350)")
    garments.add_argument("--canny-low", type=float, default=0.1, help="Canny low threshold (default 0.1)")
    garments.add_argument("--canny-high", type=float, default=0.2, help="Canny high threshold (default 0.2)")
    garments.add_argument("--sample-dressing-scale", type=float, default=0.7,
                          help="lambda of the sample grid (default 0.7, as the node)")

    validate = sub.add_parser("validate-data", help="check a dataset folder and list every problem")
    validate.add_argument("kind", choices=("hand", "garments"))
    validate.add_argument("directory", metavar="DIR")
    validate.add_argument("--slots", help="garments: comma list of slots, e.g. upper,lower")
    validate.add_argument("--min-confidence", type=float, default=0.3, help="hand: keypoint confidence (default 0.3)")
    return parser


def _report(kind: str, directory: str, slots: Optional[str], min_confidence: float):
    from .anydressing.data import parse_slots, validate_garment_dataset
    from .hands.data import validate_hand_dataset

    if kind == "hand":
        report = validate_hand_dataset(directory, min_confidence)
    else:
        if not slots:
            raise ValueError("garments datasets need --slots, e.g. --slots upper,lower")
        report = validate_garment_dataset(directory, parse_slots(slots))
    print(report.format())
    return report


def _loop_config(args: argparse.Namespace, work_dir: str):
    from .loop import LoopConfig

    return LoopConfig(work_dir=work_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                      lr_warmup_steps=args.lr_warmup_steps, gradient_accumulation=args.gradient_accumulation,
                      max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay, device=args.device,
                      mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                      workers=args.workers, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      keep_checkpoints=args.keep_checkpoints, sample_every=args.sample_every,
                      sample_count=args.sample_count, log_every=args.log_every, resume=args.resume)


def _check_out(args: argparse.Namespace) -> str:
    out = os.path.abspath(args.out)
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: the trained file must end in .safetensors")
    if os.path.exists(out) and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; give --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        raise ValueError(f"--out {args.out}: the folder {os.path.dirname(out)} does not exist")
    return out


def _work_dir(args: argparse.Namespace, out: str) -> str:
    if args.work_dir:
        return os.path.abspath(args.work_dir)
    return os.path.abspath(os.path.join("humanref-training", os.path.basename(out)[: -len(".safetensors")]))


def _say(text: str) -> None:
    """A line on stderr from the main process only (every process of a launched run runs the command)."""
    from .loop import is_main_process

    if is_main_process():
        print(text, file=sys.stderr)


def _usable_samples(skip_validation: bool, scan: Callable[[], tuple[list, Any]], validate: Callable[[], Any]
                    ) -> Optional[list]:
    """The samples to train on (all that passed the validator), or None once the report has said why not."""
    if skip_validation:
        samples, report = scan()
        if report.errors:
            _say(report.format())
            return None
        return samples
    report = validate()
    _say(report.format())
    if not report.ok:
        _say("error: fix the dataset first (nothing was trained)")
        return None
    usable = set(report.samples)
    return [s for s in scan()[0] if s.name in usable]


def cmd_hand(args: argparse.Namespace) -> int:
    from .augment import ColorAugment
    from .hands.data import HandDataConfig, hand_samples, validate_hand_dataset
    from .hands.trainer import HandTrainConfig

    out = None if args.validate_only else _check_out(args)  # before the (long) validation pass
    train_config = HandTrainConfig(lr=args.lr, mask_head_lr=args.mask_head_lr, mask_weight=args.mask_weight,
                                   mask_input=args.mask_input, mask_activation=args.mask_activation,
                                   conv_in_init=args.conv_in_init, caption_dropout=args.caption_dropout,
                                   resolution=args.resolution, sample_steps=args.sample_steps,
                                   sample_cfg=args.sample_cfg)
    augment = None if args.augment_p <= 0 else ColorAugment(args.rgb_shift / 255.0, args.brightness, args.contrast,
                                                              args.augment_p)
    samples = _usable_samples(args.skip_validation, lambda: hand_samples(args.data),
                              lambda: validate_hand_dataset(args.data, args.min_confidence))
    if samples is None:
        return EXIT_FAILED
    if args.validate_only:
        return EXIT_OK
    mask_source = args.mask_source
    if mask_source == "auto":
        mask_source = "files" if all(s.mask for s in samples) else "keypoints"
    data_config = HandDataConfig(resolution=args.resolution, crop=args.crop, crop_scale=args.crop_scale,
                                 sigma=args.heatmap_sigma or None, min_confidence=args.min_confidence,
                                 mask_source=mask_source, mask_dropout=args.mask_dropout, augment=augment)
    from ..pipelines.comfy_env import import_comfy
    from .base import load_base
    from .hands.data import HandDataset, collate
    from .hands.trainer import HandTask
    from .loop import pin_process_device, train

    loop = _loop_config(args, _work_dir(args, out))
    loop.check()
    device = pin_process_device(args.device)
    import_comfy(args.comfyui, cpu=device.type == "cpu")
    dataset = HandDataset(samples, data_config, seed=args.seed)
    base = load_base(args.base)
    task = HandTask(base, train_config, seed=args.seed)
    summary = train(task, dataset, collate, loop, out, metadata={"mask_source": mask_source})
    _finish(task, summary)
    return EXIT_OK


def cmd_garments(args: argparse.Namespace) -> int:
    from .anydressing.data import GarmentDataConfig, garment_samples, parse_slots, validate_garment_dataset
    from .anydressing.trainer import GarmentTrainConfig

    out = None if args.validate_only else _check_out(args)
    slots = parse_slots(args.slots)
    train_config = GarmentTrainConfig(slots=slots, rank=args.rank, alpha=args.alpha, lr=args.lr,
                                      dressing_scale=args.dressing_scale,
                                      localization_weight=args.localization_weight,
                                      texture_weight=args.texture_weight,
                                      texture_max_timestep=args.texture_max_timestep, canny_low=args.canny_low,
                                      canny_high=args.canny_high, caption_dropout=args.caption_dropout,
                                      height=args.height, width=args.width, sample_steps=args.sample_steps,
                                      sample_cfg=args.sample_cfg, sample_dressing_scale=args.sample_dressing_scale)
    data_config = GarmentDataConfig(args.height, args.width)
    samples = _usable_samples(args.skip_validation, lambda: garment_samples(args.data, slots),
                              lambda: validate_garment_dataset(args.data, slots))
    if samples is None:
        return EXIT_FAILED
    if args.validate_only:
        return EXIT_OK
    from ..pipelines.comfy_env import import_comfy
    from .anydressing.data import GarmentDataset
    from .anydressing.trainer import GarmentTask, collate
    from .base import load_base
    from .loop import pin_process_device, train

    loop = _loop_config(args, _work_dir(args, out))
    loop.check()
    device = pin_process_device(args.device)
    import_comfy(args.comfyui, cpu=device.type == "cpu")
    dataset = GarmentDataset(samples, slots, data_config)
    base = load_base(args.base)
    task = GarmentTask(base, train_config, seed=args.seed)
    summary = train(task, dataset, collate, loop, out)
    _finish(task, summary)
    return EXIT_OK


def _finish(task, summary: dict) -> None:
    """The file's path on stdout (main process), the note on long captions, the process group closed."""
    from .loop import end_processes, is_main_process

    n = getattr(task.text, "truncated", 0)
    if n:
        _say(f"note: {n} caption(s) were longer than CLIP's 77 tokens and were truncated")
    if is_main_process():
        print(summary["out"])
    end_processes()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "validate-data":
            report = _report(args.kind, args.directory, args.slots, args.min_confidence)
            return EXIT_OK if report.ok else EXIT_FAILED
        if args.command == "hand-generator":
            return cmd_hand(args)
        return cmd_garments(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
