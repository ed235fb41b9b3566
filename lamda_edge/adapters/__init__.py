"""The LaMDA method: the adapter layer, spectral init, injection, B freezing, LaMDA++ ranks, merge, adapter files.

    config.py   LaMDAConfig (no torch)           layer.py   LaMDALinear: x -> A -> S -> B, merge/unmerge
    spectral.py SVD init and the residual        inject.py  find targets, build adapted layers, apply_lamda
    freeze.py   PMBScheduler (B's columns)       ranks.py   LaMDA++ rank allocation
    merging.py  model-level merge loops          io.py      adapter files with a base-model fingerprint
    bnb.py      bitsandbytes NF4 bases           state.py   AdapterState, the one attribute on the model
    optim_groups.py  param_groups: a learning rate per group (S per rank, B, the rest)

The names below load on first use (PEP 562), so that `lamda_edge.adapters.config` can be read without torch.
"""

from lamda_edge.lazy import lazy_names

# public name -> the module that defines it
_LAZY = {
    "AdapterState": "state",
    "LaMDALinear": "layer",
    "PMBScheduler": "freeze",
    "adapter_state": "state",
    "allocate_ranks": "ranks",
    "apply_lamda": "inject",
    "find_targets": "inject",
    "lamda_layers": "inject",
    "layer_ranks": "inject",
    "load_adapter": "io",
    "make_lamda_linear": "inject",
    "merge": "merging",
    "merge_and_unload": "merging",
    "param_groups": "optim_groups",
    "read_adapter_config": "io",
    "save_adapter": "io",
    "trainable_parameter_count": "inject",
    "unmerge": "merging",
}

__getattr__, __dir__ = lazy_names(__name__, {name: f"{__name__}.{module}" for name, module in _LAZY.items()})

__all__ = sorted(_LAZY)
