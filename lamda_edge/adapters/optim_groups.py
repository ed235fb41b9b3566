"""Optimizer parameter groups with a learning rate per group (docs/method.md, "Learning rates per parameter group").

    group              params                                  lr
    lamda_S/r<k>       S (r x r) of every layer of rank k       lr * config.s_lr_multiplier(k)   (256 / k by default)
    lamda_B            B (d_out x r) while it trains            lr * config.b_lr_multiplier()    (0.25 by default)
    other              modules_to_save, matrices               lr
    other_no_decay     modules_to_save, biases and norms       lr, weight_decay 0

S starts at diag(sigma)/s, B and A are orthonormal: one rate for both moves S, relative to its size, far less than
B. The groups are always the same, in the same order, for the same model (a group may be empty: B once wholly
frozen leaves the optimizer), so an optimizer state saved mid-run loads into the groups of a resumed run.

    >>> optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))

With `s_lr_scale=1.0, b_lr_scale=1.0` in the `LaMDAConfig` every group has the one rate, as in the paper. Both
multiples are times `config.rate_scale` (1 unless `lamda-edge train` scales them for a small batch).
"""

from __future__ import annotations

from torch import nn

from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.adapters.inject import lamda_layers
from lamda_edge.adapters.state import adapter_state
from lamda_edge.errors import ConfigError


def param_groups(model: nn.Module, lr: float, config: LaMDAConfig | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """The optimizer parameter groups of a LaMDA model: S per rank, B, and the other trainable parameters.

    Args:
        model: a model with LaMDA layers (`apply_lamda` or `load_lamda_model`).
        lr: the base learning rate (the rate of `other`; S and B get their multiples of it).
        config: the multipliers' source; default: the model's own `LaMDAConfig`.
        weight_decay: for every group but `other_no_decay` (parameters with fewer than 2 dimensions).

    Returns:
        A list of dicts with `name`, `params`, `lr` and `weight_decay`, for any `torch.optim` optimizer.

    Raises:
        ConfigError: `lr` is not a positive number, or the model has no LaMDA layers.
    """
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ConfigError(f"`lr` should be a positive number, got {lr!r}; try 1e-3")
    layers = lamda_layers(model)
    if not layers:
        raise ConfigError("param_groups needs a model with LaMDA layers; call apply_lamda first")
    config = config if config is not None else adapter_state(model).config
    s_groups: dict[int, list] = {}
    b_params = []
    for _, layer in layers:
        if layer.lamda_S.requires_grad:
            s_groups.setdefault(layer.rank, []).append(layer.lamda_S)
        if layer.lamda_B.requires_grad:
            b_params.append(layer.lamda_B)
    adapter_ids = {id(p) for _, layer in layers for p in (layer.lamda_S, layer.lamda_B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    groups = [{"name": f"lamda_S/r{rank}", "params": params, "lr": lr * config.s_lr_multiplier(rank),
               "weight_decay": weight_decay} for rank, params in sorted(s_groups.items())]
    groups.append({"name": "lamda_B", "params": b_params, "lr": lr * config.b_lr_multiplier(),
                   "weight_decay": weight_decay})
    groups.append({"name": "other", "params": [p for p in others if p.ndim >= 2], "lr": lr,
                   "weight_decay": weight_decay})
    groups.append({"name": "other_no_decay", "params": [p for p in others if p.ndim < 2], "lr": lr,
                   "weight_decay": 0.0})
    return groups
