"""A user's files, read and written with typed errors: every way a file can be wrong ends in one line that names the
file and the fix (exit 2), never a traceback.

    read_json / read_yaml   missing, not UTF-8, malformed, nested too deeply, not a mapping  -> `error(...)`
    check_safetensors       truncated or corrupt header (safetensors checks that the data covers the file)
    check_torch_archive     a torch.save file (optimizer, scheduler, RNG state): truncated or failing its checksums
    check_output_folder     an output path that is, or sits under, a file
    os_error                an OSError from the user's environment (disk full, read-only, no permission) -> message

`error` is the `LamdaEdgeError` subclass the caller's layer raises (ModelError for a model or adapter, ConfigError
for a run config, ProfileError for a profile, TrainingError for a checkpoint). Importing this module is cheap.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from lamda_edge.errors import ConfigError, LamdaEdgeError, ModelError

# errno -> what it means for the user, and the fix
OS_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free disk space there (or choose another folder)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free disk space there (or choose another folder)"),
    errno.EFBIG: ("the file is larger than this system allows (ulimit -f)",
                  "raise the limit (`ulimit -f unlimited`) or choose another folder"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose a path under a folder"),
    errno.EISDIR: ("it is a folder, not a file", "pass a file"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}


def read_text(path: str | os.PathLike, error: type[LamdaEdgeError], fix: str) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark is dropped); `error` when missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist (or is not a file). Fix: {fix}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}). Fix: re-save it as UTF-8, "
                    f"or {fix}") from exc
    except OSError as exc:
        raise error(os_error(exc, f"cannot read {path}")) from exc


def read_json(path: str | os.PathLike, error: type[LamdaEdgeError] = ModelError, fix: str = "restore the file",
              mapping: bool = True) -> Any:
    """The JSON value in `path`; `error` (naming the file and `fix`) when it is missing, not UTF-8, malformed,
    nested too deeply, or (with `mapping`) not an object."""
    import json

    path = Path(path)
    text = read_text(path, error, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); it may be "
                    f"truncated or corrupt. Fix: {fix}") from exc
    except RecursionError as exc:
        raise error(f"{path} is nested too deeply to read as JSON. Fix: {fix}") from exc
    if mapping and not isinstance(value, dict):
        raise error(f"{path} should hold a JSON object, got {type(value).__name__}. Fix: {fix}")
    return value


def read_yaml(path: str | os.PathLike, error: type[LamdaEdgeError] = ConfigError, fix: str = "fix the file") -> Any:
    """The YAML value in `path` (None for an empty file); `error` when missing, not UTF-8 or malformed."""
    import yaml

    path = Path(path)
    text = read_text(path, error, fix)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1} column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path} is not valid YAML ({problem}{at}). Fix: {fix}") from exc
    except RecursionError as exc:
        raise error(f"{path} is nested too deeply to read as YAML. Fix: {fix}") from exc


def check_safetensors(path: str | os.PathLike, error: type[LamdaEdgeError] = ModelError,
                      fix: str = "restore the file") -> None:
    """Raise `error` when `path` is not a readable safetensors file (missing, truncated, corrupt header).

    safetensors checks on open that the header parses and that its tensors exactly cover the file, so a truncated
    or extended file fails here; flipped bytes inside tensor data are not detected (that needs a content hash).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist (or is not a file). Fix: {fix}")
    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path} is not a readable safetensors file ({_first_line(exc)}); it may be truncated or "
                    f"corrupt. Fix: {fix}") from exc


def check_torch_archive(path: str | os.PathLike, error: type[LamdaEdgeError], fix: str) -> None:
    """Raise `error` when a `torch.save` file is missing, truncated or corrupt, without unpickling anything: the
    file is a zip archive with a CRC-32 per member, and `testzip` reads every member against it."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist (or is not a file). Fix: {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise error(f"{path} is truncated or corrupt ({_first_line(exc)}). Fix: {fix}") from exc
    if bad is not None:
        raise error(f"{path} is corrupt (member {bad} fails its checksum). Fix: {fix}")


def check_output_folder(path: str | os.PathLike, flag: str = "--output") -> None:
    """Raise `ConfigError` when output folder `path` is a file or would sit under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder. Fix: choose another {flag}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path} would sit under {parent}, which is a file. Fix: choose another "
                                  f"{flag}")
            return


# torch.save's words for a write the OS refused (its C++ stream does not pass errno on)
TORCH_WRITE_WORDS = ("unexpected pos", "iostream error", "file write failed")


def write_failure(exc: BaseException, folder: str | os.PathLike | None = None) -> str | None:
    """What went wrong when writing a file failed for a reason of the user's environment (the disk is full, ...),
    else None. torch.save and safetensors report a failed write as RuntimeError / SafetensorError: safetensors with
    the OS's words inside, torch.save often without ("basic_ios::clear: iostream error", "unexpected pos"). For
    those: a file-size limit (`ulimit -f`) that a file in `folder` reached, or that torch's words meet when no
    folder is known, is the cause (EFBIG); else, for a caller that knows `exc` came from writing into `folder`, a
    nearly full disk there; otherwise it is not the environment's doing (None)."""
    if isinstance(exc, OSError):
        return OS_ERRORS[exc.errno][0] if exc.errno in OS_ERRORS else None
    text = str(exc)
    for code, (cause, _) in OS_ERRORS.items():
        if os.strerror(code) in text or f"os error {code})" in text:
            return cause
    limit = _file_size_limit()
    if limit is not None and (folder is None and any(words in text for words in TORCH_WRITE_WORDS)
                              or folder is not None and _reached(folder, limit)):
        return OS_ERRORS[errno.EFBIG][0]
    if folder is None:
        return None
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return OS_ERRORS[errno.ENOSPC][0] if free < 16 * 2**20 else None


def write_fix(cause: str) -> str:
    """The fix of a `write_failure` cause."""
    return next((fix for known, fix in OS_ERRORS.values() if known == cause), "check the output folder")


def _file_size_limit() -> int | None:
    """The process's file-size limit in bytes (RLIMIT_FSIZE, `ulimit -f`), None when unlimited (or no such limit)."""
    try:
        import resource
    except ImportError:  # not on this system (Windows)
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _reached(folder: str | os.PathLike, limit: int) -> bool:
    """Whether a file under `folder` is `limit` bytes or more: a write there was refused for the size limit."""
    try:
        return any(path.is_file() and path.stat().st_size >= limit for path in Path(folder).rglob("*"))
    except OSError:
        return False


def os_error(exc: OSError, doing: str = "") -> str:
    """One line for an OSError of the user's environment: what was being done, the file, the cause, the fix."""
    cause, fix = OS_ERRORS.get(exc.errno, (exc.strerror or str(exc), "check the path and try again"))
    name = exc.filename if exc.filename is not None else ""
    what = doing or (f"cannot use {name}" if name else "a file operation failed")
    file = f" ({name})" if name and str(name) not in what else ""
    return f"{what}{file}: {cause}. Fix: {fix}"


def is_user_os_error(exc: BaseException) -> bool:
    """True for an OSError caused by the user's environment (full disk, permissions, paths), not by a bug."""
    return isinstance(exc, OSError) and exc.errno in OS_ERRORS


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
