"""Command line of the pack: ``python -m humanref run ...`` and ``python -m humanref tiny-models ...``.

Only the standard library and websocket-client at import time; torch and ComfyUI are imported by the
commands that need them.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import Optional, Sequence

from .common import DEFAULT_SERVER, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, pack_copy_note  # noqa: F401

DESCRIPTION = """\
HumanRef command line.

  python -m humanref run WORKFLOW.json [--server URL | --comfyui PATH [--models DIR]]
                         [--set NODE.INPUT=VALUE ...] [--inputs DIR] [--out DIR] [--timeout SECONDS]
      Queue a workflow (API format, or UI format converted through the server's /object_info) on a running
      ComfyUI server, or on a private one started from --comfyui PATH (127.0.0.1, free port, temporary
      folders, this pack installed, stopped at the end); show progress; save the outputs to --out
      (default ./humanref-out). Image files given with --set to LoadImage-like nodes are uploaded.

  python -m humanref batch WORKFLOW.json --table ROWS.csv|ROWS.jsonl --server URL [--server URL ...] --out DIR
  python -m humanref batch WORKFLOW.json --table ROWS.csv --comfyui PATH --workers N [--models DIR] --out DIR
      Run the workflow once per row of a table (NODE.INPUT columns, meant as --set NODE.INPUT=VALUE), spread
      over several servers (shortest queue first; a lost server's rows go to the others), outputs per row and
      a manifest in DIR; a rerun into the same DIR skips the rows already done. See docs/batch.md.

  python -m humanref tiny-models DIR [--comfyui PATH] [--force]
      Write small synthetic models (random weights) for the example workflows into a ComfyUI models
      layout under DIR (DIR/checkpoints/humanref-tiny-sd15.safetensors), e.g. for run --models DIR.

  python -m humanref render WORKFLOW.json PICTURE.png [--scale S]
      Draw a UI-format workflow (nodes, widget values, links) to a PNG, as in the README.

  python -m humanref convert-hand-generator UNET MASK_HEAD OUT.safetensors [--mask-activation clamp|sigmoid]
      Convert a diffusers fine-tuned hand-generator UNet (15-channel conv_in) and its mask-head weights into
      the layout HandGeneratorLoader reads (models/hand_generator/).

  python -m humanref train hand-generator|garments --data DIR --base SD15_CHECKPOINT --out FILE [...]
  python -m humanref train validate-data hand|garments DIR [--slots upper,lower]
      Train a hand generator or AnyDressing garment weights from an SD1.5 checkpoint on a dataset folder
      (checked first), into the files the nodes load; see `python -m humanref train --help`.

Run `python -m humanref COMMAND --help` for every option.
"""

RUN_EPILOG = """\
examples:
  python -m humanref run workflows/api/references.json --server http://127.0.0.1:8188
  python -m humanref run workflows/1-references-portrait-from-photos.json --comfyui /opt/ComfyUI --models ./tiny \\
      --inputs workflows/inputs --set 1.ckpt_name=humanref-tiny-sd15.safetensors --set 13.steps=4
  python -m humanref run wf.json --server http://127.0.0.1:8188 --set 2.image=face.png --set KSampler.seed=7

--set NODE.INPUT=VALUE: NODE is a node id (or a unique title or class type); VALUE is parsed as JSON when it
can be (4, 7.5, true, "text", [\"3\", 0]) and is a string otherwise. A VALUE naming an existing file, given to the
image input of a LoadImage-like node, is uploaded (POST /upload/image) and replaced by the uploaded name.

exit status: 0 done, 1 rejected by the server / a node failed / timeout / server error, 2 bad arguments or
workflow, 130 interrupted. Saved files are printed on stdout, progress and errors on stderr.
"""

BATCH_EPILOG = """\
examples:
  python -m humanref batch workflows/api/references.json --table jobs.csv --inputs workflows/inputs \\
      --server http://10.0.0.5:8188 --server http://10.0.0.6:8188 --out batch-out
  python -m humanref batch workflows/api/references.json --table jobs.jsonl --comfyui /opt/ComfyUI --workers 4

jobs.csv: a header of NODE.INPUT columns (NODE as in --set: id, unique title or class type), one row per prompt:
  id,13.seed,2.image,10.text
  anna,1,faces/anna.png,a woman in a park
A cell means what --set NODE.INPUT=CELL means (JSON when it parses, else text; an image file given to a
LoadImage-like node is uploaded; a relative path is looked up next to the table first); an empty cell leaves the
input as it is. In JSONL each line is an object of the same keys with JSON values. The optional id column names
the rows (else 0001, 0002, ...); columns starting with '#' are notes.

Each finished row is appended to DIR/manifest.jsonl (row, id, status done/failed, server, seed, files, seconds,
error, warnings, attempts); its files are in DIR/ROW_ID/. A rerun with the same --out skips the rows done (same
values, workflow, --set and --inputs, files present) and runs the others, failed ones included.

exit status: 0 every row done, 1 a row failed or was not run (no server left), 2 bad arguments, workflow or
table, 130 interrupted (run the same command again to finish). Saved files are printed on stdout.
"""

TINY_EPILOG = """\
Writes DIR/checkpoints/humanref-tiny-sd15.safetensors (tiny UNet, full-size CLIP-L and VAE, random weights, fp16,
about 400 MB) in ComfyUI's models layout: pass DIR to `run --models DIR` or to an extra_model_paths.yaml. The
images it makes are noise; it exists to run the example workflows end to end on a CPU.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m humanref", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="queue a workflow on a ComfyUI server and save its outputs",
                         description="Queue a ComfyUI workflow (API format, or UI format converted through the "
                                     "server's /object_info), show progress, save the outputs.",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("workflow", help="workflow JSON file (API or UI format)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="URL",
                       help=f"a running ComfyUI server (default {DEFAULT_SERVER} when --comfyui is not given)")
    where.add_argument("--comfyui", metavar="PATH",
                       help="start a private ComfyUI from this folder on 127.0.0.1 (free port, temporary "
                            "input/output/user/temp folders, this pack installed) and stop it at the end")
    run.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override a node input (repeatable)")
    run.add_argument("--out", default="humanref-out", metavar="DIR",
                     help="where to save the outputs (default ./humanref-out)")
    run.add_argument("--models", metavar="DIR",
                     help="with --comfyui: a models folder in ComfyUI's layout (checkpoints/, vae/, ...) to add")
    run.add_argument("--inputs", metavar="DIR",
                     help="upload the images that the workflow's LoadImage-like nodes name, when they exist in DIR")
    run.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                     help="give up on the prompt after this long (default 900)")
    run.add_argument("--start-timeout", type=float, default=180.0, metavar="SECONDS",
                     help="with --comfyui: how long to wait for the server to start (default 180)")
    run.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                     help="with --comfyui: pass --cpu to ComfyUI (default: when torch sees no GPU)")
    run.add_argument("--comfyui-args", default="", metavar="ARGS",
                     help="with --comfyui: more ComfyUI arguments; write it with '=' as they start with '--': "
                          "--comfyui-args='--lowvram --preview-method none'")
    run.add_argument("--server-log", metavar="FILE", help="with --comfyui: keep the server's log in FILE")
    run.add_argument("--print-prompt", action="store_true",
                     help="print the API prompt that would be queued (after conversion and --set) and exit")
    run.add_argument("--save-temp", action="store_true", help="also save temporary outputs (PreviewImage)")

    batch = sub.add_parser("batch", help="run a workflow once per row of a table, over several ComfyUI servers",
                           description="Run a workflow once per row of a CSV or JSONL table (NODE.INPUT columns, "
                                       "each meant as --set NODE.INPUT=VALUE), on one or more ComfyUI servers.",
                           epilog=BATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("workflow", help="workflow JSON file (API or UI format)")
    batch.add_argument("--table", required=True, metavar="FILE",
                       help="the rows: .csv/.tsv (a header of NODE.INPUT columns) or .jsonl (one object per line)")
    batch.add_argument("--server", action="append", metavar="URL",
                       help=f"a running ComfyUI server (repeatable; default {DEFAULT_SERVER} without --comfyui)")
    batch.add_argument("--comfyui", metavar="PATH",
                       help="start --workers private ComfyUI servers from this folder (as run --comfyui does)")
    batch.add_argument("--workers", type=int, metavar="N",
                       help="with --comfyui: how many servers (default: one per GPU, 1 on a CPU machine)")
    batch.add_argument("--out", default="humanref-batch", metavar="DIR",
                       help="outputs per row (DIR/ROW_ID/) and DIR/manifest.jsonl (default ./humanref-batch)")
    batch.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                       help="override a node input for every row (a row's own column wins; repeatable)")
    batch.add_argument("--inputs", metavar="DIR",
                       help="upload the images that the workflow's LoadImage-like nodes name, when they exist in DIR")
    batch.add_argument("--models", metavar="DIR", help="with --comfyui: a models folder in ComfyUI's layout")
    batch.add_argument("--depth", type=int, default=2, metavar="N",
                       help="keep at most N prompts queued on a server, counting everyone's (default 2)")
    batch.add_argument("--retries", type=int, default=0, metavar="N",
                       help="run a row that failed on a server (rejected, node error, timeout) up to N more times, "
                            "on another server when there is one (default 0: reported, not retried)")
    batch.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                       help="a row running longer than this is cancelled and failed (default 900)")
    batch.add_argument("--server-wait", type=float, default=60.0, metavar="SECONDS",
                       help="when no server answers, wait this long for one before giving up (default 60)")
    batch.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="timeout of one HTTP request (default 60)")
    batch.add_argument("--start-timeout", type=float, default=180.0, metavar="SECONDS",
                       help="with --comfyui: how long to wait for each server to start (default 180)")
    batch.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                       help="with --comfyui: pass --cpu to ComfyUI (default: when torch sees no GPU)")
    batch.add_argument("--comfyui-args", default="", metavar="ARGS",
                       help="with --comfyui: more ComfyUI arguments, written with '=': --comfyui-args='--lowvram'")
    batch.add_argument("--server-logs", metavar="DIR", help="with --comfyui: keep each server's log as DIR/sN.log")
    batch.add_argument("--save-temp", action="store_true", help="also save temporary outputs (PreviewImage)")

    tiny = sub.add_parser("tiny-models", help="write small synthetic models for the example workflows",
                          description="Write small synthetic models (random weights) for every example workflow "
                                      "into a ComfyUI models folder layout under DIR.",
                          epilog=TINY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tiny.add_argument("directory", metavar="DIR")
    tiny.add_argument("--comfyui", metavar="PATH",
                      help="ComfyUI folder to import (default: $COMFYUI_PATH or /opt/ComfyUI)")
    tiny.add_argument("--force", action="store_true", help="rewrite files that already exist")
    render = sub.add_parser("render", help="draw a UI-format workflow to a PNG (the README's pictures)")
    render.add_argument("workflow", help="UI-format workflow JSON")
    render.add_argument("png", help="where to write the picture")
    render.add_argument("--scale", type=float, default=0.8, help="picture scale (default 0.8)")
    convert = sub.add_parser("convert-hand-generator", add_help=False,
                             help="convert a diffusers hand-generator UNet + mask head into HumanRef's layout")
    convert.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    train = sub.add_parser("train", add_help=False,
                           help="train a hand generator or garment weights; validate a training dataset")
    train.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _raise_keyboard_interrupt(signum, frame):  # SIGTERM -> the same clean-up as Ctrl-C
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    from .client import ComfyClient, ComfyError, PromptRejected, ServerLost, Unreachable
    from .convert import ConversionError
    from .run import (
        Progress,
        Uploader,
        UsageError,
        apply_sets,
        load_workflow,
        parse_sets,
        save_outputs,
        to_api,
        upload_from_dir,
    )
    from .server import LocalComfyUI, ServerError

    err = sys.stderr
    server = None
    try:
        workflow = load_workflow(args.workflow)
        sets = parse_sets(args.set)
        if args.inputs and not os.path.isdir(args.inputs):
            raise UsageError(f"--inputs {args.inputs} is not a directory")
        if args.comfyui:
            try:
                extra = shlex.split(args.comfyui_args)
            except ValueError as e:
                raise UsageError(f"--comfyui-args: {e}") from None
            server = LocalComfyUI(args.comfyui, models=args.models, cpu=args.cpu, extra_args=extra,
                                  start_timeout=args.start_timeout, log_path=args.server_log)
            print(f"starting ComfyUI from {server.comfyui} ...", file=err, flush=True)
            print(pack_copy_note(server), file=err, flush=True)
            server.start()
            print(f"ComfyUI is up at {server.url} (temporary folder {server.tmp})", file=err, flush=True)
            url = server.url
        else:
            if args.models:
                print("warning: --models is only used with --comfyui (a running server has its own model paths)",
                      file=err)
            url = args.server or DEFAULT_SERVER
        client = ComfyClient(url)
        prompt, ui = to_api(workflow, client, err)
        uploader = Uploader(client, err)
        if args.inputs:
            upload_from_dir(prompt, args.inputs, uploader)
        apply_sets(prompt, sets, uploader)
        if args.print_prompt:
            import json

            print(json.dumps(prompt, indent=2))
            return EXIT_OK
        progress = Progress(prompt, err)
        extra_data = {"extra_pnginfo": {"workflow": ui}} if ui is not None else None
        try:
            result = client.run(prompt, extra_data=extra_data, timeout=args.timeout, on_event=progress,
                                alive=server.alive if server is not None else None)
        finally:
            progress.close()
        saved = save_outputs(client, result, args.out, include_temp=args.save_temp)
        for path in saved:
            print(path)
        for nid, message in result.warnings():
            kind = (prompt.get(nid) or {}).get("class_type", "?")
            print(f"warning: node {nid} ({kind}): {message}", file=err)
        if not saved:
            print("warning: the prompt ran but produced no output files", file=err)
        print(f"done in {result.seconds:.1f} s: {len(saved)} file(s) in {args.out}", file=err)
        return EXIT_OK
    except (UsageError, ConversionError) as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    except PromptRejected as e:
        print(f"error: {e}", file=err)
        return EXIT_FAILED
    except (ComfyError, ServerError) as e:
        print(f"error: {e}", file=err)
        if isinstance(e, ServerLost) and server is not None:
            print("the last lines of its log:\n" + server.log_tail(20), file=err)
        if server is None and isinstance(e, Unreachable):
            print(f"hint: no ComfyUI answers at {args.server or DEFAULT_SERVER}: start ComfyUI first, give its "
                  "address with --server URL, or let this command start a private one from a ComfyUI folder: "
                  "--comfyui /path/to/ComfyUI", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=err)
        return EXIT_INTERRUPTED
    finally:
        if server is not None:
            try:
                server.stop()
            except KeyboardInterrupt:
                server.stop()


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from .tiny_models import write_tiny_models

    try:
        write_tiny_models(os.path.abspath(args.directory), args.comfyui, force=args.force)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert-hand-generator"]:  # its own parser (options may come first, e.g. --help)
        from .convert_hand_generator import main as convert_main

        return convert_main(argv[1:])
    if argv[:1] == ["train"]:  # its own parser with subcommands (training.cli)
        from ..training.cli import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    # SIGTERM and SIGHUP get the same clean-up as Ctrl-C (a private server is always stopped)
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, _raise_keyboard_interrupt)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "batch":
            from .batch import cmd_batch

            return cmd_batch(args)
        if args.command == "render":
            from .render import render_file

            render_file(args.workflow, args.png, args.scale)
            return EXIT_OK
        return cmd_tiny_models(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
