"""`AdapterState`: what lamda-edge records about an adapted model, kept as one attribute, `model.lamda_state`.

    apply_lamda / load_lamda_model ──> model.lamda_state = AdapterState(config, fingerprint, layer_reports, ...)
    save_adapter, load_adapter, the training run's adapter metadata ──> adapter_state(model) / model.lamda_state
    merge_and_unload ──> removed
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.errors import ModelError

STATE_ATTR = "lamda_state"


@dataclass
class AdapterState:
    """The adapter's config and what injection and loading found out about the base model."""

    config: LaMDAConfig
    fingerprint: dict[str, str]  # targeted layer name -> hash of its pretrained weight (checked by load_adapter)
    layer_reports: dict[str, dict]  # layer name -> rank, SVD seconds and error, NF4 errors (make_lamda_linear)
    prepare_report: dict | None = None  # load_lamda_model's report (errors, cache, peak memory); None otherwise
    base: dict | None = None  # {"base_model": folder, "quantize": "nf4" | None} when loaded by load_lamda_model


def adapter_state(model: nn.Module) -> AdapterState:
    """The `AdapterState` of `model`; raises `ModelError` when it has none (no `apply_lamda` or load yet)."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, AdapterState):
        raise ModelError(f"{type(model).__name__} has no LaMDA adapter state. Fix: call apply_lamda(model, config) "
                         "or load it with load_lamda_model")
    return state
