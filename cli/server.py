"""Start a throw-away ComfyUI server on 127.0.0.1 with this pack installed, and stop it again.

Everything the server writes goes into one temporary folder that is removed at the end: input, output, user
and temp directories, the database (in memory), an extra_model_paths YAML whose ``custom_nodes:`` entry points
to a folder holding a symlink ``humanref`` -> the pack root, and the server log. Nothing is written under the
ComfyUI folder or the pack (bytecode writing is off in the server process).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from ..pipelines.comfy_env import comfyui_path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "humanref"

# ComfyUI model folder names mapped into a --models DIR (the pack's own folders come from the pack).
MODEL_FOLDER_NAMES = (
    "checkpoints", "vae", "loras", "clip", "text_encoders", "clip_vision", "controlnet", "diffusion_models",
    "unet", "embeddings", "upscale_models", "style_models", "gligen", "hypernetworks", "photomaker",
    "vae_approx", "model_patches", "latent_upscale_models", "audio_encoders", "configs",
)


class ServerError(RuntimeError):
    """The server could not be started (the message carries the end of its log)."""


def _pack_identity(folder: str) -> Optional[str]:
    """This pack's version if ``folder`` holds a copy of HumanRef (its pyproject names the project), else None."""
    try:
        with open(os.path.join(folder, "pyproject.toml"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    import re

    if not re.search(r'^name\s*=\s*"humanref"\s*$', text, re.M):
        return None
    version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return version.group(1) if version else "unknown"


def installed_copy(comfyui: str) -> Optional[tuple[str, str]]:
    """(folder, version) of a HumanRef already in ``comfyui``/custom_nodes (the README's install), or None.

    ComfyUI loads every folder in its custom_nodes: starting it with our own copy linked in as well would import
    the pack twice (two registrations of the same node ids, the second silently winning).
    """
    root = os.path.join(comfyui, "custom_nodes")
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for name in names:
        folder = os.path.join(root, name)
        if name.endswith(".disabled") or not os.path.isdir(folder):
            continue
        version = _pack_identity(folder)
        if version is not None:
            return os.path.realpath(folder), version
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def own_model_folders() -> tuple[str, ...]:
    try:
        from ..nodes.model_files import MODEL_FOLDERS
    except ImportError:  # run outside the installed package
        return ()
    return tuple(MODEL_FOLDERS)


def needs_cpu_flag() -> bool:
    """True when torch has no GPU backend (ComfyUI then needs --cpu)."""
    try:
        import torch
    except ImportError:
        return True
    if torch.cuda.is_available():
        return False
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started us dies (Linux), so a server is
    not left behind when the runner is killed without a chance to clean up."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


class LocalComfyUI:
    """A ComfyUI server process; use as a context manager, or call start() and stop().

    comfyui: the ComfyUI folder (holding main.py). models: an optional models folder in ComfyUI's layout
    (checkpoints/, vae/, ...), added to the search paths. cpu: pass --cpu (None = when torch has no GPU).
    extra_args: more ComfyUI command-line arguments. log_path: keep the server log there too.
    """

    def __init__(self, comfyui: Optional[str] = None, models: Optional[str] = None, cpu: Optional[bool] = None,
                 extra_args: Sequence[str] = (), start_timeout: float = 180.0, log_path: Optional[str] = None,
                 python: Optional[str] = None, quiet: bool = False):
        self.comfyui = comfyui_path(comfyui)
        self.installed = installed_copy(self.comfyui)  # (folder, version) of a HumanRef in its custom_nodes
        self.models = os.path.abspath(models) if models else None
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.log_path = log_path
        self.python = python or sys.executable
        self.quiet = quiet
        self.host = "127.0.0.1"
        self.port: Optional[int] = None
        self.tmp: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    # ------------------------------------------------------------------ paths
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _dir(self, name: str) -> str:
        assert self.tmp is not None
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def input_dir(self) -> str:
        return self._dir("input")

    @property
    def output_dir(self) -> str:
        return self._dir("output")

    @property
    def server_log(self) -> str:
        assert self.tmp is not None
        return os.path.join(self.tmp, "comfyui.log")

    def _write_config(self) -> str:
        config: dict = {}
        if self.installed is None:  # else ComfyUI loads the copy in its own custom_nodes, and only that one
            custom_nodes = self._dir("custom_nodes")
            link = os.path.join(custom_nodes, PACK_NAME)
            if not os.path.lexists(link):
                os.symlink(str(PACK_ROOT), link, target_is_directory=True)
            config["humanref_pack"] = {"custom_nodes": custom_nodes}
        if self.models:
            entry = {"base_path": self.models}
            for name in MODEL_FOLDER_NAMES + own_model_folders():
                entry[name] = name
            config["humanref_models"] = entry
        path = os.path.join(self.tmp, "extra_model_paths.yaml")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)  # JSON is valid YAML
        return path

    def command(self) -> list[str]:
        cpu = needs_cpu_flag() if self.cpu is None else self.cpu
        cmd = [self.python, os.path.join(self.comfyui, "main.py"),
               "--listen", self.host, "--port", str(self.port),
               "--extra-model-paths-config", self._write_config(),
               "--output-directory", self._dir("output"),
               "--input-directory", self._dir("input"),
               "--user-directory", self._dir("user"),
               "--temp-directory", self._dir("temp"),
               "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        if cpu:
            cmd.append("--cpu")
        return cmd + self.extra_args

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalComfyUI:
        if not os.path.isfile(os.path.join(self.comfyui, "main.py")):
            raise ServerError(f"no ComfyUI at {self.comfyui} (main.py not found): give --comfyui PATH or set "
                              "COMFYUI_PATH")
        if self.models and not os.path.isdir(self.models):
            raise ServerError(f"--models {self.models} is not a directory")
        self.tmp = tempfile.mkdtemp(prefix="humanref-comfyui-")
        try:
            for attempt in range(3):
                self.port = free_port(self.host)
                self._spawn()
                if self._wait_ready():
                    return self
                if "address already in use" not in self.log_tail().lower() or attempt == 2:
                    break
                self._kill()
            raise ServerError(f"ComfyUI did not start (log: {self.log_path or self.server_log}):\n"
                              + self.log_tail())
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the ComfyUI folder or the pack
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.server_log, "ab")
        if os.name == "posix":
            # its own session: Ctrl-C in the terminal reaches only us, and we stop the whole group
            extra: dict = {"start_new_session": True}
            if sys.platform.startswith("linux"):
                extra["preexec_fn"] = _die_with_parent
        else:
            extra = {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        self.proc = subprocess.Popen(self.command(), cwd=self.tmp, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, **extra)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with opener.open(f"{self.url}/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.25)
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.server_log, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (getattr(signal, "SIGKILL", signal.SIGTERM), 10)):
                try:
                    if hasattr(os, "killpg"):
                        os.killpg(proc.pid, sig)  # its own session: the server and anything it started
                    else:
                        proc.terminate() if sig == signal.SIGTERM else proc.kill()
                except (ProcessLookupError, PermissionError):
                    try:
                        proc.send_signal(sig)
                    except (ProcessLookupError, OSError):
                        break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server and remove the temporary folder (keeping the log at log_path if given)."""
        self._kill()
        if self.tmp is not None:
            if self.log_path and os.path.exists(self.server_log):
                try:
                    shutil.copyfile(self.server_log, self.log_path)
                except OSError:
                    pass
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> LocalComfyUI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
