"""Adapter save and load: `lamda_adapter.safetensors` (A, S, B, B's frozen-column count, modules_to_save) and
`lamda_adapter.json` (the LaMDAConfig, per-layer ranks, a fingerprint of the base model, and the sha256 of the
tensor file); the names and the torch-free readers are in `files.py`.

Loading onto a base whose architecture, shapes or targeted weights differ fails with `AdapterMismatchError`; a
tensor file whose bytes differ from the recorded sha256 fails with `CorruptFileError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.adapters.files import (  # noqa: F401  (re-exported: the file names and readers live there)
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    LEGACY_NAMES,
    WEIGHTS_NAME,
    adapter_files,
    is_adapter_folder,
    read_adapter_config,
    verify_adapter,
)
from lamda_edge.adapters.inject import apply_lamda, lamda_layers, matches_module
from lamda_edge.adapters.state import STATE_ATTR, AdapterState, adapter_state
from lamda_edge.atomic import write_atomic
from lamda_edge.errors import AdapterMismatchError, CorruptFileError, ModelError
from lamda_edge.integrity import sha256_file
from lamda_edge.tasks import CAUSAL_LM, SEQ2SEQ, SEQUENCE_CLASSIFICATION, task_of_architectures

LAYER_TENSORS = ("lamda_A", "lamda_S", "lamda_B", "lamda_B_frozen")


def model_fingerprint(model: nn.Module) -> dict:
    """Architecture, targeted layer shapes, and hashes of the targeted pretrained weights (taken at injection)."""
    config = getattr(model, "config", None)
    state = getattr(model, STATE_ATTR, None)
    return {
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "shapes": {name: [layer.out_features, layer.in_features] for name, layer in lamda_layers(model)},
        "weights": dict(state.fingerprint) if state is not None else {},
    }


def fingerprint_id(fingerprint: dict) -> str:
    """A short portable identity of a base model: the hash of its fingerprint (architecture, shapes, weight hashes),
    the same wherever the folder lies."""
    import hashlib

    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _saved_modules(model: nn.Module, config: LaMDAConfig) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in model.named_modules():
        if matches_module(name, config.modules_to_save):
            for pname, param in module.named_parameters():
                tensors[f"{name}.{pname}"] = param.detach()
    return tensors


def _task_of(model: nn.Module) -> dict:
    """What the adapter was trained as: the task, and the classes of a classifier's new head.

    A classifier is often trained on a bare encoder folder (config without a head), so the export must not read
    these from the base model's config.
    """
    if task_of_architectures([type(model).__name__]) == SEQUENCE_CLASSIFICATION:
        return {"task": SEQUENCE_CLASSIFICATION, "num_labels": int(model.config.num_labels)}
    if getattr(model.config, "is_encoder_decoder", False):
        return {"task": SEQ2SEQ}
    return {"task": CAUSAL_LM}


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the adapter of `model` into folder `path` (created if needed), atomically file by file.

    Args:
        model: a model with LaMDA layers (from `apply_lamda` or `load_lamda_model`).
        path: output folder.
        metadata: extra JSON fields, e.g. {"base_model": "/path/to/base", "base_name": "my-base",
            "quantize": "nf4"}. The config also records `base_id` (`fingerprint_id`) and `weights_sha256`.
    """
    layers = lamda_layers(model)
    if not layers:
        raise ModelError("save_adapter: the model has no LaMDA layers; call apply_lamda first")
    config = adapter_state(model).config
    tensors = {f"{name}.{key}": getattr(layer, key).detach() for name, layer in layers for key in LAYER_TENSORS}
    tensors.update(_saved_modules(model, config))
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **(metadata or {}),
        **_task_of(model),
        "lamda_config": config.to_dict(),
        "ranks": {name: layer.rank for name, layer in layers},
        "modules_to_save": list(config.modules_to_save),
        "fingerprint": fingerprint,
        "base_id": fingerprint_id(fingerprint),
    }

    def write_weights(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        info["weights_sha256"] = sha256_file(tmp)

    write_atomic(out / WEIGHTS_NAME, write_weights)
    write_atomic(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    for legacy in LEGACY_NAMES:  # a re-save over an old folder: one adapter, under our names only
        (out / legacy).unlink(missing_ok=True)
    return out


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{file} is damaged: not a readable safetensors file ({exc}). Fix: use an intact "
                               "copy of the adapter, or train it again") from exc


def check_fingerprint(model: nn.Module, saved: dict, where: str) -> None:
    """Raise `AdapterMismatchError` listing every difference between the model and a saved fingerprint."""
    current = model_fingerprint(model)
    problems = []
    for key in ("architecture", "model_type"):
        if saved.get(key) != current.get(key):
            problems.append(f"{key}: adapter {saved.get(key)!r}, model {current.get(key)!r}")
    if saved.get("shapes") != current["shapes"]:
        names = sorted(set(saved.get("shapes", {})) ^ set(current["shapes"]))[:5] or [
            n for n in current["shapes"] if saved["shapes"].get(n) != current["shapes"][n]][:5]
        problems.append(f"targeted layer shapes differ (e.g. {', '.join(names)})")
    saved_w, current_w = saved.get("weights", {}), current["weights"]
    if saved_w and current_w and saved_w != current_w:
        names = [n for n in saved_w if current_w.get(n) != saved_w[n]][:5]
        problems.append(f"the base model's weights differ (e.g. {', '.join(names)})")
    if problems:
        raise AdapterMismatchError(
            f"the adapter in {where} was trained on another base model: " + "; ".join(problems)
            + ". Fix: load it onto the base model it was trained from."
        )


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load the adapter in folder `path` onto `model` (applying LaMDA first if the model has none).

    The tensor file is checked against the sha256 the config records first (`verify_adapter`).

    Returns:
        The adapter's JSON config.
    """
    info = verify_adapter(path)
    config = LaMDAConfig.from_dict(info["lamda_config"])
    if not lamda_layers(model):
        apply_lamda(model, config)
    ranks = {name: layer.rank for name, layer in lamda_layers(model)}
    if ranks != info["ranks"]:
        diff = [n for n in set(ranks) | set(info["ranks"]) if ranks.get(n) != info["ranks"].get(n)][:5]
        raise AdapterMismatchError(f"the adapter in {path} has other layers or ranks than the model (e.g. {diff})")
    check_fingerprint(model, info["fingerprint"], str(path))
    tensors = _load_tensors(adapter_files(path)[1])
    modules = dict(model.named_modules())
    missing, wrong_shape = [], []
    for name, layer in lamda_layers(model):
        sub = {key: tensors.get(f"{name}.{key}") for key in LAYER_TENSORS}
        missing += [f"{name}.{k}" for k, v in sub.items() if v is None]
        if not missing:
            layer.load_state_dict(sub, strict=False)
    for key in set(tensors) - {f"{n}.{k}" for n, _ in lamda_layers(model) for k in LAYER_TENSORS}:
        owner, _, pname = key.rpartition(".")
        if owner not in modules:
            missing.append(key)
            continue
        target = getattr(modules[owner], pname)
        if target.shape != tensors[key].shape:  # e.g. a classifier head with another number of classes
            wrong_shape.append(f"{key} of shape {tuple(tensors[key].shape)}, the model {tuple(target.shape)}")
            continue
        with torch.no_grad():
            target.copy_(tensors[key])
    if wrong_shape:
        raise AdapterMismatchError(f"the adapter in {path} has " + "; ".join(sorted(wrong_shape))
                                   + ". Fix: load the model as the adapter was trained (task, num_labels)")
    if missing:
        raise AdapterMismatchError(f"the adapter in {path} does not fit this model: tensors {missing[:5]} missing")
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        setattr(model, STATE_ATTR, AdapterState(config, {}, {}))
    else:
        state.config = config
    return info
