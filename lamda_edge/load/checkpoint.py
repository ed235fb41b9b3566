"""A model folder's safetensors files (single or sharded), read one tensor at a time, and the map from the model's
state-dict keys to the checkpoint's (base-model prefix both ways, legacy LayerNorm names).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lamda_edge.errors import ModelError
from lamda_edge.files import check_safetensors, read_json

MODEL_FIX = "restore the model folder (copy or convert it again)"
# Renames of old checkpoints that transformers applies on load (its "legacy" conversion mapping).
LEGACY_SUFFIXES = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))


class Checkpoint:
    """The safetensors files of a model folder (single file or sharded with an index), read one tensor at a time."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        files = weight_files(model_dir)
        if not files:
            found = sorted(p.name for p in model_dir.iterdir())[:10]
            raise ModelError(
                f"{model_dir} holds no safetensors weights (files: {found}); lamda-edge never loads pickled "
                "weights. Fix: load it once with transformers and save_pretrained(safe_serialization=True)"
            )
        check_model_weights(model_dir, files)
        self.files = files
        self._handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
        self.where = {key: f for f, h in self._handles.items() for key in h.keys()}

    def get(self, key: str) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype."""
        return self._handles[self.where[key]].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, ModelError, MODEL_FIX).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index}: `weight_map` should map tensor names to files. Fix: {MODEL_FIX}")
        return sorted({model_dir / str(f) for f in weight_map.values()})
    return sorted(model_dir.glob("*.safetensors"))


def check_model_weights(model_dir: Path, files: list[Path] | None = None) -> None:
    """`ModelError` naming the file when a weights file is missing, truncated or has a corrupt header."""
    files = weight_files(model_dir) if files is None else files
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"the weights index of {model_dir} names missing shards: {missing[:3]}. Fix: {MODEL_FIX}")
    for file in files:
        check_safetensors(file, ModelError, MODEL_FIX)


def key_map(model: nn.Module, checkpoint_keys) -> tuple[dict[str, str], list[str]]:
    """{model state-dict key: checkpoint key}, and the checkpoint keys that match nothing.

    Handles the base-model prefix both ways (a `BertModel` checkpoint into `BertForSequenceClassification`, and
    back) and the legacy LayerNorm gamma/beta names.
    """
    model_keys = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping, unused = {}, []
    for ckpt_key in checkpoint_keys:
        key = ckpt_key
        for old, new in LEGACY_SUFFIXES:
            if key.endswith(old):
                key = key[: -len(old)] + new
        candidates = [key]
        if prefix:
            candidates += [f"{prefix}.{key}", key.removeprefix(prefix + ".")]
        hit = next((c for c in candidates if c in model_keys), None)
        if hit is None:
            unused.append(ckpt_key)
        else:
            mapping[hit] = ckpt_key
    return mapping, unused
