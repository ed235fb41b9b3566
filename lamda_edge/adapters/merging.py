"""Merge: fold the adapter into plain linear weights, `W_merged = W_base + s * B S A`, computed in float32.

A 4-bit base is dequantized first; the merged weight is float (the base's compute dtype), never re-quantized.
`merge` is idempotent and `unmerge` restores the exact base layer; `merge_and_unload` drops the adapters.
"""

from __future__ import annotations

from torch import nn

from lamda_edge.adapters.inject import lamda_layers
from lamda_edge.adapters.state import STATE_ATTR


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter into its layer in place (`LaMDALinear.merge`, which keeps the base for `unmerge`)."""
    for _, layer in lamda_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: every layer gets its original base layer back and the adapter path is active again."""
    for _, layer in lamda_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every `LaMDALinear` with a plain `nn.Linear` holding the merged weight; returns the model."""
    for name, layer in lamda_layers(model):
        model.set_submodule(name, layer.base_layer if layer.merged else layer.merged_linear())
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    return model
