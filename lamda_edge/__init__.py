"""lamda-edge: LaMDA / LaMDA++ fine-tuning on a 4-bit base, in the least memory, shipped to devices as ONNX."""

import logging

# bitsandbytes suggests `pip install kernels` on import, which would fetch a kernel from a model hub; we never do.
# The filter goes in before anything imports bitsandbytes (transformers may, on import).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.msg)

from lamda_edge.adapters import (  # noqa: E402
    AdapterState,
    LaMDALinear,
    PMBScheduler,
    adapter_state,
    allocate_ranks,
    apply_lamda,
    lamda_layers,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from lamda_edge.adapters.config import LaMDAConfig  # noqa: E402
from lamda_edge.errors import ConfigError, LamdaEdgeError  # noqa: E402

__version__ = "0.1.0"


def load_lamda_model(model_path, config, quantize="nf4", device=None, **kwargs):
    """Load a local transformers folder with a frozen (NF4) base and LaMDA adapters; see `lamda_edge.load.loader`."""
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
    "save_adapter",
]
