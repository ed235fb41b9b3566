"""lamda-edge: LaMDA / LaMDA++ fine-tuning on a 4-bit base, in the least memory, shipped to devices as ONNX.

The public names load on first use (PEP 562): `import lamda_edge` (and so `lamda-edge devices` and `plan`) imports
no torch; `from lamda_edge import apply_lamda` loads the adapters (and torch) then.
"""

import logging

# bitsandbytes suggests `pip install kernels` on import, which would fetch a kernel from a model hub; we never do.
# The filter goes in before anything imports bitsandbytes (transformers may, on import).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.msg)

from lamda_edge.errors import ConfigError, LamdaEdgeError  # noqa: E402
from lamda_edge.lazy import lazy_names  # noqa: E402

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "AdapterState": "lamda_edge.adapters",
    "LaMDAConfig": "lamda_edge.adapters.config",
    "LaMDALinear": "lamda_edge.adapters",
    "PMBScheduler": "lamda_edge.adapters",
    "adapter_state": "lamda_edge.adapters",
    "allocate_ranks": "lamda_edge.adapters",
    "apply_lamda": "lamda_edge.adapters",
    "lamda_layers": "lamda_edge.adapters",
    "load_adapter": "lamda_edge.adapters",
    "merge_and_unload": "lamda_edge.adapters",
    "param_groups": "lamda_edge.adapters",
    "save_adapter": "lamda_edge.adapters",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)


def load_lamda_model(model_path, config, quantize="auto", device=None, **kwargs):
    """Load a local transformers folder with a frozen base (NF4 on CUDA, full precision on a CPU by default) and
    LaMDA adapters; see `lamda_edge.load.loader`."""
    from lamda_edge.load.loader import load_lamda_model as _load

    return _load(model_path, config, quantize=quantize, device=device, **kwargs)


__all__ = [
    "AdapterState",
    "ConfigError",
    "LaMDAConfig",
    "LaMDALinear",
    "LamdaEdgeError",
    "PMBScheduler",
    "adapter_state",
    "allocate_ranks",
    "apply_lamda",
    "lamda_layers",
    "load_adapter",
    "load_lamda_model",
    "merge_and_unload",
    "param_groups",
    "save_adapter",
]
