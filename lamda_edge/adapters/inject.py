"""Injection: find a model's targeted linear layers and replace each with a spectrally initialized `LaMDALinear`."""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from lamda_edge.adapters.bnb import build_base, dequantize_weight, is_linear4bit
from lamda_edge.adapters.config import ALL_LINEAR, LaMDAConfig
from lamda_edge.adapters.layer import LaMDALinear
from lamda_edge.adapters.ranks import allocate_ranks
from lamda_edge.adapters.spectral import energy_score, singular_values, spectral_init
from lamda_edge.adapters.state import STATE_ATTR, AdapterState
from lamda_edge.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

# Output heads are never adapted under "all-linear" (train them with `modules_to_save` instead).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")
FINGERPRINT_SAMPLE = 65536


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2's transposed linear


def is_linear(module: nn.Module) -> bool:
    """A layer LaMDA can wrap: `nn.Linear`, bitsandbytes `Linear4bit`, or GPT-2's `Conv1D` (converted)."""
    return isinstance(module, nn.Linear) or is_linear4bit(module) or _is_conv1d(module)


def lamda_layers(model: nn.Module) -> list[tuple[str, LaMDALinear]]:
    """Every `LaMDALinear` in `model`, with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LaMDALinear)]


def matches_module(name: str, names, include_children: bool = False) -> bool:
    """True when module `name` is one of `names` or ends with `.<one of them>` (a suffix match on whole parts).

    With `include_children`, also when `name` lies inside one of them (starts with `<one of them>.`).
    """
    return any(name == s or name.endswith("." + s) or (include_children and name.startswith(s + ".")) for s in names)


def find_targets(model: nn.Module, config: LaMDAConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config.target_modules` selects; raises `ModelError` listing the choices if none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [(n, m) for n, m in model.named_modules() if n and is_linear(m) and not isinstance(m, LaMDALinear)]
    if config.target_modules == ALL_LINEAR:
        chosen = [
            (n, m) for n, m in linear
            if m is not head and n.split(".")[-1] not in HEAD_NAMES
            and n.split(".")[0] not in HEAD_NAMES  # inside a top-level head (DeBERTa's `pooler.dense`)
            and not matches_module(n, config.modules_to_save, include_children=True)
        ]
    else:
        chosen = [(n, m) for n, m in linear if matches_module(n, config.target_modules)]
    if not chosen:
        kinds = sorted({n.split(".")[-1] for n, _ in linear})
        raise ModelError(
            f"target_modules={config.target_modules!r} matched no linear layer of {type(model).__name__}. "
            f"Linear layer names in this model: {', '.join(kinds) or '(none)'}. "
            f"Fix: set target_modules to some of these, or to '{ALL_LINEAR}'."
        )
    return chosen


def _conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D stores weight as (d_in, d_out); the equivalent nn.Linear holds its transpose."""
    d_in, d_out = module.weight.shape
    linear = nn.Linear(d_in, d_out, bias=module.bias is not None, dtype=module.weight.dtype,
                       device=module.weight.device)
    with torch.no_grad():
        linear.weight.copy_(module.weight.T)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def weight_of(module: nn.Module) -> torch.Tensor:
    """The full weight of a targeted layer in float32, shape (d_out, d_in)."""
    if _is_conv1d(module):
        return module.weight.detach().float().T
    return dequantize_weight(module)


def layer_ranks(config: LaMDAConfig, spectra: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per-layer ranks: `config.rank` everywhere, or LaMDA++'s energy allocation from the singular values."""
    if config.rank_allocation == "uniform":
        return {name: config.rank for name in spectra}
    scores = {name: energy_score(sigma, config.rank) for name, sigma in spectra.items()}
    lo, hi = config.rank_bounds
    return allocate_ranks(scores, config.rank, lo, hi)


def check_rank(name: str, rank: int, shape: tuple[int, int]) -> None:
    if rank > min(shape):
        raise ConfigError(
            f"`rank` {rank} is larger than layer {name} allows (weight shape {tuple(shape)}, so at most "
            f"{min(shape)}). Fix: lower `rank` (or `max_rank` for LaMDA++), or leave this layer out of target_modules."
        )


def make_lamda_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: LaMDAConfig,
    quantize: str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    name: str = "",
) -> tuple[LaMDALinear, dict]:
    """Build one `LaMDALinear` from a full-precision `weight` (d_out, d_in): SVD, adapter init, residual base.

    `name` is the layer's module name: the random inits draw each layer's factors from the seed and it.

    The SVD runs in float32 on `device` when it is a GPU, else where `weight` is. With `quantize="nf4"` only the
    residual is quantized, and the report compares the error against plain NF4 of the whole weight.
    """
    device = torch.device(device) if device is not None else weight.device
    svd_device = device if device.type == "cuda" else weight.device
    W = weight.detach().to(svd_device, torch.float32)  # (d_out, d_in)
    scaling = config.alpha / rank
    init = spectral_init(W, rank, config.init, scaling, svd=config.svd, seed=config.seed, name=name)
    report: dict = {"rank": rank, "svd_seconds": init.svd_seconds, "svd_error": init.svd_error}
    base = build_base(init.residual, bias, quantize, compute_dtype, device)
    layer = LaMDALinear.from_factors(base, init.A, init.S, init.B, config.alpha, config.dropout, init.frozen)
    if init.frozen is not None:
        report["frozen_rank"] = layer.frozen_rank
    if quantize == "nf4":
        approx = layer.base_weight().to(svd_device) + layer.delta_weight().to(svd_device)  # (d_out, d_in)
        plain = dequantize_weight(build_base(W, None, quantize, compute_dtype, device)).to(svd_device)
        norm = W.norm().clamp_min(1e-30)
        report["quant_error"] = float((W - approx).norm() / norm)
        report["plain_nf4_error"] = float((W - plain).norm() / norm)
    return layer, report


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A short hash of a strided sample of `weight` (float32), cheap even for 7B models."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLE)
    sample = flat[::step][:FINGERPRINT_SAMPLE].to("cpu", torch.float32).contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def apply_lamda(model: nn.Module, config: LaMDAConfig) -> nn.Module:
    """Replace each targeted linear layer of `model` with a `LaMDALinear`, in place, and freeze the base.

    Plain bases get the exact residual; a bitsandbytes 4-bit base is dequantized, factored and its residual
    re-quantized (to factor the original full-precision weights, use `lamda_edge.load_lamda_model`).

    Returns:
        The same model, with its `AdapterState` (config, fingerprint, per-layer reports) in `model.lamda_state`.
    """
    if lamda_layers(model):
        raise ModelError("this model already has LaMDA layers; apply_lamda once per model (or merge_and_unload first)")
    targets = find_targets(model, config)
    weights = {name: weight_of(module) for name, module in targets}
    if config.rank_allocation == "energy":
        ranks = layer_ranks(config, {name: singular_values(w) for name, w in weights.items()})
    else:
        ranks = {name: config.rank for name in weights}
    for name, _ in targets:
        check_rank(name, ranks[name], tuple(weights[name].shape))
    fingerprint = {name: weight_fingerprint(w) for name, w in weights.items()}
    reports = {}
    for name, module in targets:
        if _is_conv1d(module):
            module = _conv1d_as_linear(module)
        quantize = "nf4" if is_linear4bit(module) else None
        compute_dtype = module.compute_dtype if quantize else module.weight.dtype
        if compute_dtype is None:
            compute_dtype = torch.float32
        device = module.weight.device
        layer, reports[name] = make_lamda_linear(
            weights.pop(name), module.bias, ranks[name], config, quantize, compute_dtype, device, name=name
        )
        model.set_submodule(name, layer)
    finish_injection(model, config, fingerprint, reports)
    return model


def finish_injection(model: nn.Module, config: LaMDAConfig, fingerprint: dict[str, str], reports: dict) -> None:
    """Freeze everything but S, B and `modules_to_save`, and record the config, fingerprint and reports."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lamda_layers(model):
        layer.lamda_S.requires_grad_(True)
        layer.lamda_B.requires_grad_(layer.frozen_b_columns < layer.rank)
    for name in config.modules_to_save:
        found = [m for n, m in model.named_modules() if matches_module(n, (name,))]
        if not found:
            raise ModelError(f"modules_to_save names {name!r}, which is not a module of {type(model).__name__}")
        for module in found:
            for param in module.parameters():
                param.requires_grad_(True)
    setattr(model, STATE_ATTR, AdapterState(config, fingerprint, reports))


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that currently require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
