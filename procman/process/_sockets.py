"""Socket helpers that import nothing heavy: the early start uses them at launch.

Free TCP ports (from :mod:`buildtools._ports`), and the private folder where
managed llama-servers listen on Unix sockets (and keep their key files): a
folder only this user can enter, so no other local user can reach a server
behind the router's back.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys

from buildtools._ports import can_bind, pick_free_port

__all__ = ["can_bind", "home", "new_socket_path", "pick_free_port", "private_dir"]

#: sun_path holds 108 bytes with the terminating NUL
SOCKET_PATH_MAX = 107
#: what a socket's file name adds to its folder: "/", 24 of the name, "-", 8 hex, ".sock"
_NAME_ROOM = 39


def home() -> str:
    """``buildtools.paths.home()`` without its imports (pathlib and tempfile, ~30 ms);
    a unit test keeps the two equal."""
    if explicit := os.environ.get("LLAMACTL_HOME"):
        return os.path.expanduser(explicit)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(xdg, "llamactl")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/llamactl")
    return os.path.expanduser("~/.cache/llamactl")


def _owned_private(path: str) -> bool:
    """Create ``path`` (0700) or take it if it is our own folder; tighten its mode."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    st = os.lstat(path)  # lstat: a symlink planted by someone else is not our folder
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return True


def private_dir() -> str:
    """The folder for private sockets and key files: ``<home>/run``, or where a socket's
    path fits in ``sun_path`` when the home's path is too long (``$XDG_RUNTIME_DIR``,
    then ``/tmp/llamactl-<uid>``). Raises OSError if none can be made private."""
    candidates = [os.path.join(home(), "run")]
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(runtime, "llamactl"))
    scratch = os.environ.get("TMPDIR") or "/tmp"  # noqa: S108 - owner and mode are checked
    candidates.append(os.path.join(scratch, f"llamactl-{os.getuid()}"))
    for path in candidates:
        if len(os.fsencode(path)) + _NAME_ROOM > SOCKET_PATH_MAX:
            continue
        with contextlib.suppress(OSError):
            if _owned_private(path):
                return path
    raise OSError(f"no private folder for sockets: tried {', '.join(candidates)}")


def new_socket_path(name: str) -> str:
    """A fresh socket path in :func:`private_dir` (llama-server takes a ``.sock`` host)."""
    return os.path.join(private_dir(), f"{name[:24]}-{os.urandom(4).hex()}.sock")
