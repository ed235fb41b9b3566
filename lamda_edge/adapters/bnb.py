"""bitsandbytes 4-bit (NF4) layers: detect, dequantize, quantize, and guard the CPU repacking trap.

bitsandbytes is imported lazily: a plain (unquantized) base never needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from lamda_edge.errors import ConfigError, require

QUANTIZE = ("nf4", None)


def _bnb():
    return require("bitsandbytes", package="bitsandbytes")


def is_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` (checked by class name so bitsandbytes need not be imported)."""
    return any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight (d_out, d_in) of a plain `nn.Linear` or a bitsandbytes `Linear4bit`."""
    if not is_linear4bit(module):
        return module.weight.detach().float()
    functional = _bnb().functional
    weight = module.weight
    return functional.dequantize_4bit(weight.data, weight.quant_state).float()


def quantize_nf4(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    compress_statistics: bool = True,
) -> nn.Module:
    """Build a frozen NF4 `Linear4bit` holding `weight` (d_out, d_in), quantized on `device`."""
    bnb = _bnb()
    d_out, d_in = weight.shape
    device = torch.device(device) if device is not None else weight.device
    layer = bnb.nn.Linear4bit(
        d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype,
        compress_statistics=compress_statistics, quant_type="nf4", device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().to(torch.float32).contiguous(), requires_grad=False, quant_type="nf4",
        compress_statistics=compress_statistics, module=layer,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
    layer = layer.to(device)  # quantization happens on the move to the device
    disable_cpu_repack(layer)
    return layer


def nf4_from_packed(
    packed: torch.Tensor, quant_state: dict[str, torch.Tensor], bias: torch.Tensor | None,
    compute_dtype: torch.dtype, device: torch.device | str,
) -> nn.Module:
    """Rebuild a frozen NF4 `Linear4bit` from packed 4-bit data and its packed quant state (no quantization)."""
    bnb = _bnb()
    d_out, d_in = (int(s) for s in _unpacked_shape(quant_state))
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit.from_prequantized(packed, quant_state, requires_grad=False, device=device,
                                                       module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device, compute_dtype), requires_grad=False)
    disable_cpu_repack(layer)
    return layer


def _unpacked_shape(quant_state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The (d_out, d_in) shape stored in a packed bitsandbytes quant state."""
    from bitsandbytes.utils import unpack_tensor_to_dict

    packed = next(v for k, v in quant_state.items() if k.startswith("quant_state."))
    return tuple(unpack_tensor_to_dict(packed)["shape"])


def check_quantize(quantize) -> None:
    """Raise `ConfigError` unless `quantize` is a base this module builds: 'nf4' or None (plain)."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"`quantize` should be 'nf4' or None, got {quantize!r}")


def build_base(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quantize: str | None,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    quant_state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The frozen base layer of an adapted linear layer, on `device` (default: `weight`'s):

        quantize=None                     nn.Linear in `compute_dtype` holding `weight` (d_out, d_in)
        quantize="nf4"                    Linear4bit: `weight` (float) quantized to NF4 on the device
        quantize="nf4", quant_state=...   Linear4bit from packed NF4 `weight` and its packed quant state (the cache)
    """
    check_quantize(quantize)
    device = torch.device(device) if device is not None else weight.device
    if quantize == "nf4":
        if quant_state is not None:
            return nf4_from_packed(weight, quant_state, bias, compute_dtype, device)
        return quantize_nf4(weight, bias, compute_dtype, device)
    d_out, d_in = weight.shape
    base = nn.Linear(d_in, d_out, bias=bias is not None, dtype=compute_dtype, device=device)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    return base.requires_grad_(False)


def disable_cpu_repack(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking CPU `Linear4bit` weights in place (DESIGN.md, known traps).

    On CPUs with AVX512-BF16, an eval-mode no-grad forward silently repacks the packed weight; dequantizing or
    merging afterwards then gives wrong weights. Call this before any such forward.
    """
    for module in model.modules():
        if is_linear4bit(module):
            module.support_avx512bf16_for_cpu = False
    return model
