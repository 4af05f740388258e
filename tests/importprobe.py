"""Import side-effect probe shared by the security tests of every tier.

Runs a fresh interpreter with an audit hook (PEP 578) installed after the preload modules are imported, then
imports the modules under test and reports every socket operation, every file opened for writing, every
directory made or file removed, and every process started.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Runs in a fresh interpreter: records sockets and writes while importing the given modules.
IMPORT_PROBE = textwrap.dedent("""
    import json, os, sys
    {setup}
    for m in {preload!r}:
        __import__(m)
    events = []
    def hook(event, args):
        if event == "socket.__new__":  # asyncio's own AF_UNIX self-pipe is not network access
            import socket
            if len(args) > 1 and args[1] in (socket.AF_INET, socket.AF_INET6):
                events.append(f"{{event}} {{args[1]}}")
        elif event.startswith("socket."):
            events.append(event)
        elif event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
            if writing:
                events.append(f"open {{path}} {{mode or flags}}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree", "subprocess.Popen", "os.system"):
            events.append(f"{{event}} {{args[0]}}")
    sys.addaudithook(hook)
    for m in {modules!r}:
        __import__(m)
    {after}
    print("EVENTS=" + json.dumps(events))
""")


def probe_import(modules: list[str], preload: list[str] = (), after: str = "", extra_path: str = "",
                 setup: str = "") -> list[str]:
    """Events recorded while importing modules (then running the one-line statement after)."""
    code = IMPORT_PROBE.format(modules=list(modules), preload=list(preload), after=after, setup=setup)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("EVENTS=")][-1]
    return json.loads(line[len("EVENTS="):])


