"""Attention for packed rows: causal SDPA on each example of the row, not a block-diagonal mask over all of it.

A packed row (`PackingCollator`) holds a batch's examples back to back, `position_ids` restarting at 0 for each.
transformers reads the restarts and gives SDPA a (1, 1, N, N) block-diagonal mask: attention then costs N^2 for the
row (the examples attend to every masked-out position too) and the mask keeps SDPA off its causal fast path. Here
each example attends on its own slice with `is_causal=True`: about sum(T_i^2) / 2 work and no mask.

    q, k, v (1, H, N, D) --cut at the restarts--> (1, H, T_i, D) each --causal SDPA--> cat --> (1, N, H, D)

`packed_attention(model)` switches a transformers model to it for a `with` block (training with `packing: true`)
and back. Anything that is not a packed or plain causal row (a padding mask, a KV cache, more than one row) goes
to transformers' own SDPA unchanged. Models with a sliding window or attention softcapping keep transformers'
masks (the per-example slices would ignore the window).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lamda_edge.errors import ModelError

PACKED_SDPA = "lamda_packed_sdpa"
# Causal LMs whose packed rows give the padded batch's loss and gradients (tests/test_loss.py): their attention reads
# the restarts in `position_ids`. GPT-2 does not (its examples would attend to each other), so packing refuses it.
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of the examples in one packed row: position_ids (1, N) restart wherever they do not count up."""
    positions = position_ids[0]  # (N,)
    starts = torch.ones_like(positions, dtype=torch.bool)  # (N,)
    starts[1:] = positions[1:] != positions[:-1] + 1
    bounds = starts.nonzero().squeeze(1).tolist() + [positions.numel()]
    return [end - start for start, end in zip(bounds[:-1], bounds[1:])]


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, N, D), key/value (B, H_kv, N_kv, D) -> ((B, N, H, D), None)."""
    position_ids = kwargs.get("position_ids")
    packed_row = (attention_mask is None and position_ids is not None and query.shape[0] == 1
                  and query.shape[2] == key.shape[2] == position_ids.shape[-1])
    if not packed_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = segment_lengths(position_ids.reshape(1, -1))
    window = kwargs.get("sliding_window")
    if window is not None and max(lengths) > window:
        raise ModelError(f"an example of {max(lengths)} tokens is longer than the attention window ({window}); "
                         "packed attention does not apply the window. Fix: train with packing=false")
    if len(lengths) == 1:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    outputs, start = [], 0
    for length in lengths:
        part = slice(start, start + length)
        out, _ = sdpa_attention_forward(module, query[:, :, part], key[:, :, part], value[:, :, part], None, **kwargs)
        outputs.append(out)  # (1, T_i, H, D)
        start += length
    return torch.cat(outputs, dim=1), None  # (1, N, H, D)


def packed_sdpa_mask(*args, **kwargs):
    """No mask where the row is causal within each example (the attention cuts it); transformers' SDPA mask else."""
    plain = (kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
             and not kwargs.get("q_offset") and not kwargs.get("kv_offset"))
    return None if plain else sdpa_mask(*args, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, packed_sdpa_mask)


def supports_packed_attention(config, longest: int | None = None) -> bool:
    """Whether a model config can take per-example attention: a model type whose packed rows are tested
    (`PACKING_MODEL_TYPES`), SDPA now, no attention softcapping, and no sliding window shorter than `longest`
    (the longest example; unknown: any window refuses)."""
    if getattr(config, "model_type", None) not in PACKING_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", PACKED_SDPA):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and (longest is None or longest > window):
        return False
    return not getattr(config, "attn_logit_softcapping", None)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, enabled: bool = True, longest: int | None = None):
    """Within the block, `model` (a transformers model, or one wrapping it as `.lm`) attends per packed example.

    `longest`: the longest example (the run's seq_len), checked against a sliding window. Yields whether it
    switched (False when disabled or the model does not support it; nothing changes then).
    """
    lm = getattr(model, "lm", model)
    config = getattr(lm, "config", None)
    if not enabled or config is None or not supports_packed_attention(config, longest):
        yield False
        return
    before = config._attn_implementation
    lm.set_attn_implementation(PACKED_SDPA)
    try:
        yield True
    finally:
        lm.set_attn_implementation(before)
