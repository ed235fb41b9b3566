"""The adapter folder's files, read without torch: their names, the JSON config, and the tensor file's check.

    lamda_adapter.json          format, LaMDAConfig, ranks, base model (folder, name, fingerprint and its id),
                                the sha256 of the tensor file ("weights_sha256")
    lamda_adapter.safetensors   the tensors (written by `io.save_adapter`)

The names are our own: PEFT's `adapter_config.json` / `adapter_model.safetensors`, used before, made PEFT and
transformers take the folder (or a model folder holding it) for a PEFT adapter, whose schema it is not. Folders
written with those names still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lamda_edge.errors import CorruptFileError, ModelError
from lamda_edge.integrity import check_hash

CONFIG_NAME = "lamda_adapter.json"
WEIGHTS_NAME = "lamda_adapter.safetensors"
LEGACY_NAMES = ("adapter_config.json", "adapter_model.safetensors")  # before issue 18: PEFT's names, read only
FORMAT = "lamda-edge-adapter"
FORMAT_VERSION = 1


def adapter_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config file, tensor file) of the adapter folder `path`: our names, else the legacy (PEFT-like) ones."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / LEGACY_NAMES[0]).is_file():
        return folder / LEGACY_NAMES[0], folder / LEGACY_NAMES[1]
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True when `path` holds an adapter config under our name or the legacy one."""
    return adapter_files(path)[0].is_file()


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON config of an adapter folder (raises `ModelError` when it is not one, `CorruptFileError` when it
    cannot be parsed)."""
    file, _ = adapter_files(path)
    if not file.is_file():
        raise ModelError(f"{path} is not a lamda-edge adapter folder: {CONFIG_NAME} is missing. Fix: pass the "
                         "folder that `lamda-edge train` saved the adapter to")
    try:
        info = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{file} is damaged: not valid JSON ({exc}). Fix: use an intact copy of the "
                               "adapter, or train it again") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ModelError(f"{file} is not a lamda-edge adapter config (format={found!r})")
    broken = [key for key in ("lamda_config", "ranks", "fingerprint") if not isinstance(info.get(key), dict)]
    if broken:
        raise CorruptFileError(f"{file} lacks {', '.join(f'`{key}`' for key in broken)} (or holds no mapping "
                               "there). Fix: use an intact copy of the adapter, or train it again")
    return info


def verify_adapter(path: str | os.PathLike) -> dict:
    """Read the adapter config of `path` and check its tensor file against the recorded sha256; returns the config.

    An adapter saved before hashes were recorded has nothing to check against and passes.
    """
    info = read_adapter_config(path)
    _, weights = adapter_files(path)
    expected = info.get("weights_sha256")
    if expected is not None:
        check_hash(weights, expected, "use an intact copy of the adapter (or a checkpoint's), or train it again")
    elif not weights.is_file():
        raise CorruptFileError(f"{weights} is missing. Fix: use an intact copy of the adapter, or train it again")
    return info
