"""Content hashes of the files we write, and the checks that read them back.

    adapter folder   lamda_adapter.json records "weights_sha256" of lamda_adapter.safetensors
    checkpoint       manifest.json: {file name: sha256} of every file in it, written last

A file whose bytes no longer match its recorded hash (a flipped bit, a truncated copy, a half-synced disk) is
refused with a `CorruptFileError` naming the file, instead of loading silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lamda_edge.errors import CorruptFileError

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(path: Path, expected: str, fix: str) -> None:
    """Raise `CorruptFileError` when `path` is missing or its sha256 is not `expected`."""
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing. Fix: {fix}")
    actual = sha256_file(path)
    if actual != expected:
        raise CorruptFileError(f"{path} is damaged: its sha256 {actual[:12]}... does not match the recorded "
                               f"{expected[:12]}... Fix: {fix}")


def write_manifest(folder: Path) -> Path:
    """Record the sha256 of every file in `folder` (recursively) in `folder/manifest.json`."""
    from lamda_edge.atomic import write_bytes_atomic

    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST_NAME}
    return write_bytes_atomic(folder / MANIFEST_NAME, (json.dumps({"sha256": files}, indent=1) + "\n").encode())


def manifest_problem(folder: Path) -> str | None:
    """Why `folder` does not match its manifest (the first damaged or missing file), or None when it does.

    A folder without a manifest (written before manifests existed) is not judged here: None.
    """
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != expected:
            return f"{path} does not match its recorded sha256"
    return None
