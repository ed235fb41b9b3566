"""Adapter files: `adapter_model.safetensors` (A, S, B, B's frozen-column count, modules_to_save) and
`adapter_config.json` (the LaMDAConfig, per-layer ranks, and a fingerprint of the base model).

Loading onto a base whose architecture, shapes or targeted weights differ fails with `AdapterMismatchError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.adapters.inject import apply_lamda, lamda_layers, matches_module
from lamda_edge.adapters.state import STATE_ATTR, AdapterState, adapter_state
from lamda_edge.atomic import write_atomic
from lamda_edge.errors import AdapterMismatchError, ModelError
from lamda_edge.files import check_safetensors, read_json
from lamda_edge.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, task_of_architectures

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "lamda-edge-adapter"
FORMAT_VERSION = 1
LAYER_TENSORS = ("lamda_A", "lamda_S", "lamda_B", "lamda_B_frozen")
ADAPTER_FIX = "restore the adapter folder (copy it again, or train again)"


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
    return {"task": CAUSAL_LM}


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the adapter of `model` into folder `path` (created if needed), atomically file by file.

    Args:
        model: a model with LaMDA layers (from `apply_lamda` or `load_lamda_model`).
        path: output folder.
        metadata: extra JSON fields, e.g. {"base_model": "/path/to/base", "quantize": "nf4"}.
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
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **(metadata or {}),
        **_task_of(model),
        "lamda_config": config.to_dict(),
        "ranks": {name: layer.rank for name, layer in layers},
        "modules_to_save": list(config.modules_to_save),
        "fingerprint": model_fingerprint(model),
    }
    write_atomic(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    write_atomic(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return out


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON config of an adapter folder (raises `ModelError` when it is not one)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ModelError(f"{path} is not a lamda-edge adapter folder: {CONFIG_NAME} is missing")
    info = read_json(file, ModelError, ADAPTER_FIX)
    if info.get("format") != FORMAT:
        raise ModelError(f"{file} is not a lamda-edge adapter config (format={info.get('format')!r})")
    broken = [key for key in ("lamda_config", "ranks", "fingerprint") if not isinstance(info.get(key), dict)]
    if broken:
        raise ModelError(f"{file} lacks {', '.join(f'`{key}`' for key in broken)} (or holds no mapping there). "
                         f"Fix: {ADAPTER_FIX}")
    return info


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

    Returns:
        The adapter's JSON config.
    """
    info = read_adapter_config(path)
    config = LaMDAConfig.from_dict(info["lamda_config"])
    if not lamda_layers(model):
        apply_lamda(model, config)
    ranks = {name: layer.rank for name, layer in lamda_layers(model)}
    if ranks != info["ranks"]:
        diff = [n for n in set(ranks) | set(info["ranks"]) if ranks.get(n) != info["ranks"].get(n)][:5]
        raise AdapterMismatchError(f"the adapter in {path} has other layers or ranks than the model (e.g. {diff})")
    check_fingerprint(model, info["fingerprint"], str(path))
    check_safetensors(Path(path) / WEIGHTS_NAME, ModelError, ADAPTER_FIX)
    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
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
