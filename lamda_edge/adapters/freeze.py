"""Gradual freezing of B (the paper's PMB, second projection matrix; docs/method.md): after each optimizer step,
freeze B's columns in descending-singular-value order.

After optimizer step t, the first ceil(r * t / t_i) columns of every B are frozen (bitwise: their values are
restored after each step, so AdamW momentum and weight decay cannot move them). From step t_i on B is wholly
frozen: it leaves the optimizer and its gradient and optimizer state are freed.
"""

from __future__ import annotations

import math

from torch import nn

from lamda_edge.adapters.inject import lamda_layers
from lamda_edge.adapters.state import STATE_ATTR
from lamda_edge.errors import ConfigError


def _drop_from_optimizer(optimizer, param) -> None:
    """Remove `param` from the optimizer's groups and free its state."""
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not param]
    optimizer.state.pop(param, None)


def wholly_frozen_step(rank: int, freeze_steps: int) -> int:
    """The optimizer step after which all `rank` columns of B are frozen: the smallest t with
    ceil(r * t / t_i) >= r, i.e. floor(t_i * (r - 1) / r) + 1 (at most t_i; rank 16, t_i 18: step 17)."""
    return min(freeze_steps, freeze_steps * (rank - 1) // rank + 1)


def _resolve_t_i(model: nn.Module, freeze_steps: int | None, total_steps: int | None) -> int:
    """The scheduler's t_i: the argument, the config's `freeze_b_steps`, or the config's share of `total_steps`."""
    state = getattr(model, STATE_ATTR, None)
    configured = state.config.freeze_b_steps if state is not None else None
    if freeze_steps is not None:
        if configured is not None and configured != freeze_steps:
            raise ConfigError(f"PMBScheduler got freeze_steps={freeze_steps}, but the model's LaMDAConfig sets "
                              f"freeze_b_steps={configured}. Fix: give t_i once (in the config, or here)")
        return freeze_steps
    if configured is not None:
        return configured
    if state is not None and total_steps is not None:
        return state.config.resolved_freeze_b_steps(total_steps)
    raise ConfigError("PMBScheduler needs t_i: the model's LaMDAConfig has freeze_b_steps=None (a share of the run) "
                      "and no total_steps was given. Fix: PMBScheduler(model, total_steps=N), or set "
                      "LaMDAConfig(freeze_b_steps=...)")


class PMBScheduler:
    """Drives the PMB schedule: PMB is the paper's name for B (d_out x r), the second Projection Matrix (A, the
    first, is PMA). Call `.step(optimizer)` after each optimizer step."""

    def __init__(self, model: nn.Module, freeze_steps: int | None = None, total_steps: int | None = None):
        """t_i is `freeze_steps`, else the model's `LaMDAConfig.freeze_b_steps`, else its fraction of
        `total_steps` (`LaMDAConfig.resolved_freeze_b_steps`). A `freeze_steps` that contradicts a t_i set in the
        config is an error: t_i is given once."""
        self.layers = [layer for _, layer in lamda_layers(model)]
        if not self.layers:
            raise ConfigError("PMBScheduler needs a model with LaMDA layers; call apply_lamda first")
        freeze_steps = _resolve_t_i(model, freeze_steps, total_steps)
        if not isinstance(freeze_steps, int) or freeze_steps < 1:
            raise ConfigError(f"`freeze_b_steps` should be a positive integer, got {freeze_steps!r}")
        self.freeze_steps = freeze_steps
        self.steps_done = 0

    def columns_frozen(self, rank: int, step: int) -> int:
        """ceil(r * t / t_i), capped at r."""
        return min(rank, math.ceil(rank * step / self.freeze_steps))

    def step(self, optimizer=None) -> None:
        """Advance one optimizer step and freeze the columns the schedule calls for."""
        self.steps_done += 1
        self._apply(optimizer)

    def _apply(self, optimizer) -> None:
        for layer in self.layers:
            was_trainable = layer.lamda_B.requires_grad
            wholly = layer.freeze_b_columns(self.columns_frozen(layer.rank, self.steps_done))
            if wholly and was_trainable and optimizer is not None:
                _drop_from_optimizer(optimizer, layer.lamda_B)

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "freeze_steps": self.freeze_steps}

    def load_state_dict(self, state: dict, optimizer=None) -> None:
        """Restore the schedule (the frozen values themselves come back with the model's state dict)."""
        self.freeze_steps = int(state["freeze_steps"])
        self.steps_done = int(state["steps_done"])
        for layer in self.layers:
            layer._frozen_b_values = None
        self._apply(optimizer)
