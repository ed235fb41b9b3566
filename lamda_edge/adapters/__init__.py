"""The LaMDA method: the adapter layer, spectral init, injection, B freezing, LaMDA++ ranks, merge, adapter files."""

from lamda_edge.adapters.freeze import PMBScheduler
from lamda_edge.adapters.inject import apply_lamda, find_targets, lamda_layers, layer_ranks, make_lamda_linear
from lamda_edge.adapters.io import load_adapter, read_adapter_config, save_adapter
from lamda_edge.adapters.layer import LaMDALinear
from lamda_edge.adapters.merge import merge, merge_and_unload, unmerge
from lamda_edge.adapters.ranks import allocate_ranks
from lamda_edge.adapters.state import AdapterState, adapter_state


def trainable_parameter_count(model) -> int:
    """Number of parameters that currently require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "AdapterState",
    "LaMDALinear",
    "PMBScheduler",
    "adapter_state",
    "allocate_ranks",
    "apply_lamda",
    "find_targets",
    "lamda_layers",
    "layer_ranks",
    "load_adapter",
    "make_lamda_linear",
    "merge",
    "merge_and_unload",
    "read_adapter_config",
    "save_adapter",
    "trainable_parameter_count",
    "unmerge",
]
