"""What the benchmarks share: the machine and code they ran on, timing, peak memory and the ComfyUI set-up.

The scripts import it as ``_env``: run as ``python bench/<name>.py``, their own folder is first on ``sys.path``.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from humanref.pipelines.comfy_env import comfyui_path, import_comfy

REPO = Path(__file__).resolve().parents[1]


def on_cuda() -> bool:
    return torch.cuda.is_available()


def setup_comfy(path: Optional[str] = None) -> str:
    """ComfyUI importable (``--comfyui``, $COMFYUI_PATH or /opt/ComfyUI), on the GPU when there is one."""
    return import_comfy(path, cpu=not on_cuda())


# ---------------------------------------------------------------------------------------------- the run
def git_head(paths: Sequence[str] = ()) -> Optional[str]:
    """HEAD of this checkout, with ``-dirty`` when ``paths`` (default: the whole tree) have changes; None
    without git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *paths],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def comfyui_version(path: Optional[str] = None) -> Optional[str]:
    """``__version__`` of ComfyUI's comfyui_version.py, read as text (no import needed)."""
    try:
        with open(os.path.join(comfyui_path(path), "comfyui_version.py"), encoding="utf-8") as f:
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, comfyui: Optional[str] = None, dirty_paths: Sequence[str] = (), **extra: Any) -> dict:
    """The fields every benchmark JSON records about its run on ``device`` (cpu, cuda, ...); a script adds its own
    through ``extra``."""
    gpu = device.startswith("cuda")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "comfyui": comfyui_version(comfyui),
        "humanref_commit": git_head(dirty_paths),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if gpu else cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ timing
def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def now() -> float:
    """A wall clock that waits for queued CUDA work first."""
    sync()
    return time.perf_counter()


def time_once(fn: Callable[[], Any]) -> float:
    t0 = now()
    fn()
    return now() - t0


def time_both(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): CPU time is far less disturbed by other processes on a shared CPU."""
    c0, t0 = time.process_time(), now()
    fn()
    t1 = now()
    return t1 - t0, time.process_time() - c0


def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of one region: CUDA max_memory_allocated, or the RSS high-water mark (VmHWM) on Linux CPU."""

    def __init__(self) -> None:
        self.can_reset_rss = False
        if not on_cuda():
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset_rss = True
            except OSError:
                pass

    @staticmethod
    def _status(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> dict:
        if on_cuda():
            torch.cuda.reset_peak_memory_stats()
            return {"allocated": torch.cuda.memory_allocated()}
        if self.can_reset_rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return {"rss": self._status("VmRSS")}

    def stop(self, start: dict) -> dict:
        if on_cuda():
            peak = torch.cuda.max_memory_allocated()
            return {"cuda_max_allocated_bytes": peak, "cuda_peak_above_start_bytes": peak - start["allocated"]}
        hwm = self._status("VmHWM") if self.can_reset_rss else None
        out = {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if hwm is not None:
            out["peak_rss_bytes"] = hwm
            if start.get("rss") is not None:
                out["peak_rss_above_start_bytes"] = hwm - start["rss"]
        return out
