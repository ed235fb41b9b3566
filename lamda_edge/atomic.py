"""Atomic file writes: write to a temporary name in the same folder, flush to disk, then rename into place.

A crash leaves either the old file or the new one, never half of one. The file is created with mode 0666 less
the umask, as `open()` and the Trainer's own files are (not `mkstemp`'s 0600).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` to produce the file, then rename it onto `path`.

    The temporary name keeps `path`'s suffix, so writers that pick a format from it (matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) would leave their own mode
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def pid_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine (or might: one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_leftovers(folder: Path, prefix: str) -> list[Path]:
    """The entries `<prefix><pid>` in `folder` whose process is gone: what a killed run left behind.

    Folders built beside their target carry the builder's pid in their name (`.out.tmp-1234`), so the next run can
    tell a leftover from a build in progress.
    """
    found = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            found.append(path)
    return found
