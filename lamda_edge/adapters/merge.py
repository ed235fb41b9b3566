"""Merge: fold the adapter into plain linear weights, `W_merged = W_base + s * B S A`, computed in float32.

A 4-bit base is dequantized first; the merged weight is float (the base's compute dtype), never re-quantized.
`merge` is idempotent and `unmerge` restores the exact base layer; `merge_and_unload` drops the adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from lamda_edge.adapters.bnb import is_linear4bit
from lamda_edge.adapters.inject import lamda_layers
from lamda_edge.adapters.layer import LaMDALinear


def merged_linear(layer: LaMDALinear) -> nn.Linear:
    """A new `nn.Linear` holding W_base + s * B S A (float32 math, then the base's dtype)."""
    base = layer.base_layer
    dtype = (base.compute_dtype or torch.float32) if is_linear4bit(base) else base.weight.dtype
    device = layer.lamda_A.device
    weight = layer.base_weight().to(device) + layer.delta_weight().to(device)  # (d_out, d_in) float32
    merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, dtype=dtype, device=device)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    merged.requires_grad_(False)
    return merged


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter into its layer in place (the original base is kept for `unmerge`). Idempotent."""
    for _, layer in lamda_layers(model):
        if layer.merged:
            continue
        layer._unmerged_base = layer.base_layer
        layer.base_layer = merged_linear(layer)
        layer.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: every layer gets its original base layer back and the adapter path is active again."""
    for _, layer in lamda_layers(model):
        if layer.merged:
            layer.base_layer = layer._unmerged_base
            del layer._unmerged_base
            layer.merged = False
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every `LaMDALinear` with a plain `nn.Linear` holding the merged weight; returns the model."""
    for name, layer in lamda_layers(model):
        model.set_submodule(name, layer.base_layer if layer.merged else merged_linear(layer))
    for attr in ("lamda_config", "lamda_fingerprint", "lamda_report"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
