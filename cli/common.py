"""What the runner's commands share: exit statuses, the default server, which pack copy a server loads."""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_SERVER = "http://127.0.0.1:8188"


def pack_copy_note(server) -> str:
    """Which copy of HumanRef the private server loads (one copy only: see cli.server.installed_copy)."""
    from ..version import __version__
    from .server import PACK_ROOT

    if server.installed is None:
        return f"HumanRef {__version__}: this copy ({PACK_ROOT}) is loaded into the server"
    folder, version = server.installed
    if folder == str(PACK_ROOT):
        return f"HumanRef {version}: the copy installed in ComfyUI's custom_nodes ({folder}), which is this one"
    note = (f"HumanRef {version} is installed in ComfyUI's custom_nodes ({folder}): the server loads that copy "
            f"only, not this one ({PACK_ROOT})")
    if version != __version__:
        note += f"; note the versions differ (this one is {__version__})"
    return note
