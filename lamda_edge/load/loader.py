"""Load a local transformers folder as a frozen 4-bit (NF4) base with LaMDA adapters from the full-precision weights.

Spectral residual quantization (docs/method.md, "With a 4-bit base"): for every targeted linear layer the SVD is taken
on the original weight W, the adapter gets the principal part, and only the residual is quantized:

    W ──SVD──> U_r diag(sigma_r) V_r^T  ──> adapter: B = U_r, S = diag(sigma_r) / s, A = V_r^T
      └──────> W_res = W - U_r diag(sigma_r) V_r^T ──> NF4 ──> frozen base Q(W_res)

and the report compares ||W - (Q(W_res) + s B S A)|| / ||W|| with plain NF4's ||W - Q(W)|| / ||W||.

Preparation streams: the model skeleton is built without weights (parameters on the meta device), then tensors
are read one at a time from the safetensors files: a targeted weight goes through SVD -> residual -> NF4 -> device
and is dropped; every other tensor is placed on the device in the compute dtype. A 7B model is never held in full
precision on the GPU. The prepared layers are cached on disk (`lamda_edge.load.cache`), so the next load of the
same weights and config skips the SVDs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from lamda_edge.adapters.bnb import check_quantize, disable_cpu_repack
from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.adapters.inject import (
    HEAD_NAMES,
    _is_conv1d,
    check_rank,
    find_targets,
    finish_injection,
    layer_ranks,
    make_lamda_linear,
    matches_module,
    weight_fingerprint,
)
from lamda_edge.adapters.spectral import singular_values
from lamda_edge.adapters.state import adapter_state
from lamda_edge.errors import ConfigError, ModelError, require
from lamda_edge.files import read_json
from lamda_edge.load.cache import (
    CACHE_FORMAT,
    build_layer,
    cache_key,
    default_cache_dir,
    discard_entry,
    layer_tensors,
    read_entry,
    write_entry,
)
from lamda_edge.load.checkpoint import MODEL_FIX, Checkpoint, key_map
from lamda_edge.load.device import PeakMemory, resolve_compute_dtype, resolve_device, resolve_quantize
from lamda_edge.progress import track
from lamda_edge.tasks import AUTO, CAUSAL_LM, SEQ2SEQ, SEQUENCE_CLASSIFICATION, TASKS, task_of_config

logger = logging.getLogger(__name__)



# ---- choices: device, dtype, task ----------------------------------------------------------------------------------


def resolve_task(hf_config, task: str | None) -> str:
    """'causal-lm', 'sequence-classification' or 'seq2seq', from `task` or the config (`task_of_config`, then the
    model type). `task='seq2seq'` on a decoder-only model, or another task on an encoder-decoder, is refused."""
    model_type = getattr(hf_config, "model_type", None)
    encoder_decoder = bool(getattr(hf_config, "is_encoder_decoder", False))
    if task is not None and task != AUTO:
        if task not in TASKS:
            raise ConfigError(f"`task` should be one of {(AUTO, *TASKS)}, got {task!r}")
        if task == SEQ2SEQ and not encoder_decoder:
            raise ConfigError(f"`task`='seq2seq' needs an encoder-decoder model; {model_type!r} is decoder-only or "
                              "an encoder. Fix: use task=causal-lm (prompt/completion data) or an encoder-decoder "
                              "model such as BART")
        if task == CAUSAL_LM and encoder_decoder:
            raise ConfigError(f"`task`='causal-lm' on the encoder-decoder {model_type!r}. Fix: use task=seq2seq "
                              "with {\"source\", \"target\"} data")
        return task
    found = task_of_config(hf_config)
    if found is not None:
        return found
    from transformers.models.auto import modeling_auto as auto

    archs = list(getattr(hf_config, "architectures", None) or [])
    seq_cls = model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if seq_cls and model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # an encoder (BERT-like): classify
        return SEQUENCE_CLASSIFICATION
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CAUSAL_LM
    if seq_cls:
        return SEQUENCE_CLASSIFICATION
    raise ModelError(
        f"cannot tell what model type {model_type!r} (architectures {archs}) is for; lamda-edge loads causal LMs, "
        "sequence-classification encoders and encoder-decoders. Fix: pass task='causal-lm', "
        "task='sequence-classification' or task='seq2seq'"
    )


# ---- memory --------------------------------------------------------------------------------------------------------


# ---- building the model --------------------------------------------------------------------------------------------


def _auto_class(task: str):
    import transformers

    if task == CAUSAL_LM:
        return transformers.AutoModelForCausalLM
    if task == SEQ2SEQ:
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForSequenceClassification


def build_skeleton(hf_config, task: str, compute_dtype: torch.dtype) -> nn.Module:
    """The model with its parameters on the meta device (no memory) and its buffers real, on the CPU."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return _auto_class(task).from_config(hf_config, dtype=compute_dtype)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"transformers cannot build a {task} model of type {hf_config.model_type!r}: {exc}") from exc


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, device: torch.device) -> None:
    """Put `value` at state-dict `key` of `model` as a frozen parameter (or buffer), in the skeleton's dtype."""
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    current = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    dtype = current.dtype if current is not None and value.is_floating_point() else value.dtype
    if current is not None and tuple(current.shape) != tuple(value.shape):
        raise ModelError(f"checkpoint tensor for {key} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(current.shape)}; the folder's config.json does not match its weights")
    value = value.to(device=device, dtype=dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _meta_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]


def _init_missing(model: nn.Module, config: LaMDAConfig, device: torch.device) -> list[str]:
    """Initialize modules the checkpoint does not hold (a new classification head); raise for anything else."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    created = []
    for name, module in model.named_modules():
        meta = [n for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"]
        if not meta:
            continue
        is_head = (module is head or name.split(".")[-1] in HEAD_NAMES
                   or matches_module(name, config.modules_to_save, include_children=True))
        if not is_head:
            raise ModelError(
                f"the checkpoint holds no weights for {name} ({', '.join(meta)}); its layout does not match "
                f"{type(model).__name__}. Fix: re-save the model with transformers' save_pretrained"
            )
        for pname in meta:
            p = module._parameters[pname]
            module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model._init_weights(module)
        module.to(device)
        created.append(name)
    if created:
        untrained = [n for n in created if not matches_module(n, config.modules_to_save)]
        logger.warning("newly initialized (not in the checkpoint): %s", ", ".join(created))
        if untrained:
            logger.warning("these new modules are not in `modules_to_save`, so they will not train: %s; add them "
                           "to modules_to_save (e.g. modules_to_save=['classifier'])", ", ".join(untrained))
    return created


def _skeleton_and_targets(hf_config, task, compute_dtype, checkpoint: Checkpoint, config: LaMDAConfig):
    """(empty model, {model key: checkpoint key}, targeted (name, module) pairs)."""
    model = build_skeleton(hf_config, task, compute_dtype)
    keys, unused = key_map(model, checkpoint.where)
    if unused:
        logger.info("checkpoint tensors not used by %s: %s", type(model).__name__, ", ".join(unused[:8]))
    return model, keys, find_targets(model, config)


def _load_the_rest(model, keys: dict[str, str], target_names: list[str], checkpoint: Checkpoint,
                   config: LaMDAConfig, device: torch.device) -> list[str]:
    """Everything but the targeted layers, in the compute dtype on `device`; tie, init new heads, move buffers.

    Returns the names of the modules that were newly initialized (not in the checkpoint).
    """
    prefixes = tuple(n + "." for n in target_names)
    for model_key, ckpt_key in keys.items():
        if not model_key.startswith(prefixes):
            _set_tensor(model, model_key, checkpoint.get(ckpt_key), device)
    checkpoint.close()
    if hasattr(model, "tie_weights"):  # as from_pretrained: tie a missing head to the embeddings (or equal copies)
        try:
            model.tie_weights(missing_keys=set(_meta_parameters(model)))
        except AttributeError as exc:  # a tied parameter was replaced by a LaMDA layer (lm_head targeted)
            logger.warning("could not tie the weights of %s: %s", type(model).__name__, exc)
    created = _init_missing(model, config, device)
    for module in model.modules():  # non-persistent buffers (rotary tables, position ids) were built on the CPU
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[bname] = buf.to(device)
    return created


def _target_shape(module: nn.Module) -> tuple[int, int]:
    if _is_conv1d(module):  # GPT-2 Conv1D stores (d_in, d_out)
        d_in, d_out = module.weight.shape
        return d_out, d_in
    return module.out_features, module.in_features


def _read_target(checkpoint: Checkpoint, keys: dict[str, str], name: str, module: nn.Module):
    """(weight (d_out, d_in) in its stored dtype on CPU, bias or None) of a targeted layer."""
    wkey = f"{name}.weight"
    if wkey not in keys:
        raise ModelError(f"the checkpoint has no weight for the targeted layer {name}")
    weight = checkpoint.get(keys[wkey])
    if _is_conv1d(module):
        weight = weight.T
    bias = checkpoint.get(keys[f"{name}.bias"]) if f"{name}.bias" in keys else None
    return weight, bias


def _overall(reports: dict, norms: dict, key: str) -> float | None:
    """sqrt(sum_l (err_l ||W_l||)^2 / sum_l ||W_l||^2): the relative error over all targeted weights together."""
    if not reports or any(r.get(key) is None for r in reports.values()):
        return None
    num = sum((reports[n][key] * norms[n]) ** 2 for n in reports)
    den = sum(norms[n] ** 2 for n in reports)
    return float((num / den) ** 0.5) if den > 0 else 0.0


def _prepare_layers(model, targets, checkpoint, keys, config, quantize, compute_dtype, device, progress):
    """Stream, factor, quantize and install every targeted layer. Returns (ranks, fingerprints, reports, norms)."""
    svd_device = device if device.type == "cuda" else torch.device("cpu")
    spectra_seconds = 0.0
    if config.rank_allocation == "energy":  # LaMDA++ needs every spectrum before the first rank is known
        spectra = {}
        for name, module in track(targets, "spectra (LaMDA++)", progress):
            weight, _ = _read_target(checkpoint, keys, name, module)
            start = time.perf_counter()
            spectra[name] = singular_values(weight.to(svd_device, torch.float32)).cpu()
            spectra_seconds += time.perf_counter() - start
            del weight
        ranks = layer_ranks(config, spectra)
    else:
        ranks = {name: config.rank for name, _ in targets}
    for name, module in targets:
        check_rank(name, ranks[name], _target_shape(module))
    fingerprints, reports, norms = {}, {}, {}
    for name, module in track(targets, "prepare LaMDA layers", progress):
        weight, bias = _read_target(checkpoint, keys, name, module)
        fingerprints[name] = weight_fingerprint(weight)
        norms[name] = float(weight.float().norm())
        layer, reports[name] = make_lamda_linear(weight, bias, ranks[name], config, quantize, compute_dtype, device,
                                                 name=name)
        model.set_submodule(name, layer)
        del weight, bias, layer
    return ranks, fingerprints, reports, norms, spectra_seconds


def load_lamda_model(
    model_path: str | os.PathLike,
    config: LaMDAConfig,
    quantize: str | None = "auto",
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
    task: str | None = None,
    num_labels: int | None = None,
    gradient_checkpointing: bool | None = None,
    checkpoint_layers: int | None = None,
) -> nn.Module:
    """Load a local transformers folder with a frozen base (NF4 or plain) and LaMDA adapters from its full weights.

    Args:
        model_path: a folder with config.json and safetensors weights (single file or sharded).
        config: the LaMDA configuration (targets, rank, init, LaMDA++ allocation).
        quantize: "nf4" (bitsandbytes 4-bit base holding the spectral residual), None or "none" (residual in the
            compute dtype), or "auto" (the default, as the CLI's `quantize: auto`): NF4 on CUDA, full precision on
            a CPU, where bitsandbytes dequantizes every 4-bit weight at every call.
        device: where the model goes (default: CUDA if available, else CPU). SVDs run there when it is a GPU.
        compute_dtype: dtype of embeddings, norms, heads and the 4-bit matmuls (default: bf16 on GPUs that have
            it, fp16 on older GPUs, fp32 on CPU).
        cache_dir: folder of the prepared-model cache; None = `$LAMDA_EDGE_CACHE/prepared` or
            `~/.cache/lamda-edge/prepared`; False = no cache.
        progress: show progress bars.
        task: "causal-lm", "sequence-classification" or "seq2seq"; None or "auto" = from the config.
        num_labels: number of classes for a sequence-classification head (default: the config's).
        gradient_checkpointing: enable transformers' non-reentrant gradient checkpointing; None (the default): on
            for an accelerator, off on a CPU. (`lamda-edge train` decides it by plan: off when the batch fits.)
        checkpoint_layers: with checkpointing on, only the lowest this many blocks recompute (None: all).

    Returns:
        The model (eval mode): base frozen, `lamda_S`, `lamda_B` and `modules_to_save` trainable, and
        `model.lamda_state.prepare_report` (per-layer and overall quantization errors vs plain NF4, SVD seconds,
        peak memory of preparation, cache hit or miss).

    Raises:
        ModelError: the folder is not a loadable model; ConfigError: a bad argument;
        MissingDependencyError: bitsandbytes is missing for quantize="nf4".
    """
    start = time.perf_counter()
    model_dir = Path(model_path).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_path} is not a transformers model folder (no config.json); pass a local folder")
    device = resolve_device(device)
    quantize = resolve_quantize(quantize, device)
    check_quantize(quantize)
    if not isinstance(config, LaMDAConfig):
        raise ConfigError(f"`config` should be a LaMDAConfig, got {type(config).__name__}")
    if quantize == "nf4":
        require("bitsandbytes", package="bitsandbytes")
    compute_dtype = resolve_compute_dtype(compute_dtype, device)
    from transformers import AutoConfig

    read_json(model_dir / "config.json", ModelError, MODEL_FIX)  # truncated or corrupt: name the file
    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {model_dir}: {exc}") from exc
    task = resolve_task(hf_config, task)
    if num_labels is not None:
        hf_config.num_labels = num_labels
    peak = PeakMemory(device)
    peak.start()
    checkpoint = Checkpoint(model_dir)
    model, keys, targets = _skeleton_and_targets(hf_config, task, compute_dtype, checkpoint, config)
    root = None if cache_dir is False else Path(cache_dir) if cache_dir else default_cache_dir()
    key = weights_id = None
    cached = None
    if root is not None:
        key, weights_id = cache_key(model_dir, checkpoint.files, config.to_dict(), quantize, compute_dtype, task,
                                    num_labels)
        cached = read_entry(root, key)
        if cached is not None and cached.info.get("targets") != [n for n, _ in targets]:
            cached = None
    spectra_seconds = 0.0
    if cached is not None:
        info = cached.info
        ranks, fingerprints, reports, norms = info["ranks"], info["fingerprints"], info["layers"], info["norms"]
        try:
            for name, _ in targets:
                layer = build_layer(name, cached.layer(name), config.alpha, config.dropout, quantize, compute_dtype,
                                    device)
                model.set_submodule(name, layer)
        except Exception as exc:  # noqa: BLE001 - a damaged entry: start again from the weights
            logger.warning("discarding damaged prepared-model cache %s (%s)", cached.folder, exc)
            discard_entry(cached.folder)
            cached = None
            model, keys, targets = _skeleton_and_targets(hf_config, task, compute_dtype, checkpoint, config)
    if cached is None:
        ranks, fingerprints, reports, norms, spectra_seconds = _prepare_layers(
            model, targets, checkpoint, keys, config, quantize, compute_dtype, device, progress)
    target_names = [n for n, _ in targets]
    created = _load_the_rest(model, keys, target_names, checkpoint, config, device)
    _load_generation_config(model, model_dir)
    finish_injection(model, config, fingerprints, reports)
    disable_cpu_repack(model)
    if gradient_checkpointing is None:  # auto: memory is what an accelerator lacks; on a CPU recompute costs time
        gradient_checkpointing = device.type != "cpu"
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, checkpoint_layers)
    model.eval()
    svd_seconds = 0.0 if cached is not None else spectra_seconds + sum(r["svd_seconds"] for r in reports.values())
    report = {
        "model_path": str(model_dir.resolve()),
        "task": task,
        "quantize": quantize,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "device": str(device),
        "cache": "off" if root is None else ("hit" if cached is not None else "miss"),
        "cache_path": None if root is None else str(root / key),
        "layers": reports,
        "ranks": ranks,
        "quant_error": _overall(reports, norms, "quant_error"),
        "plain_nf4_error": _overall(reports, norms, "plain_nf4_error"),
        "svd_seconds": svd_seconds,
        "new_modules": created,
        "peak_memory_kind": peak.kind,
    }
    if root is not None and cached is None:
        tensors = {}
        for name, layer in model.named_modules():
            if name in ranks:
                tensors.update(layer_tensors(name, layer))
        info = {"format": CACHE_FORMAT, "model_path": report["model_path"], "weights_id": weights_id,
                "targets": target_names, "ranks": ranks, "fingerprints": fingerprints, "layers": reports,
                "norms": norms, "quantize": quantize, "compute_dtype": report["compute_dtype"],
                "lamda_config": config.to_dict()}
        if write_entry(root, key, tensors, info) is None:
            report["cache"] = "miss (not written)"
        del tensors
    report["peak_memory_bytes"] = peak.peak_bytes()
    report["seconds"] = time.perf_counter() - start
    state = adapter_state(model)
    state.prepare_report = report
    state.base = {"base_model": report["model_path"], "quantize": quantize}
    logger.info(
        "prepared %d LaMDA layers of %s (%s, cache %s) in %.1f s: SVD %.1f s, error %s vs plain NF4 %s, peak %.0f MiB",
        len(targets), model_dir.name, quantize or "unquantized", report["cache"], report["seconds"],
        report["svd_seconds"], _fmt(report["quant_error"]), _fmt(report["plain_nf4_error"]),
        report["peak_memory_bytes"] / 2**20,
    )
    return model


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _load_generation_config(model: nn.Module, model_dir: Path) -> None:
    if (model_dir / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable generation_config.json in %s: %s", model_dir, exc)


def enable_gradient_checkpointing(model: nn.Module, layers: int | None = None) -> bool:
    """Turn on transformers' non-reentrant gradient checkpointing; False (with a warning) if the model lacks it.

    `layers`: checkpoint only the lowest `layers` blocks (partial checkpointing: the planner's fewest that make a
    batch fit); the blocks above keep their activations and skip the recompute. None: every block.

    Non-reentrant checkpointing needs no `enable_input_require_grads` (gradients reach the adapters inside a
    checkpointed block even when its input does not require a gradient); transformers adds it anyway.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        logger.warning("%s does not support gradient checkpointing; training keeps all activations",
                       type(model).__name__)
        return False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if layers is not None:
        for block in checkpointed_blocks(model)[layers:]:
            block.gradient_checkpointing = False
    return True


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks that checkpointing can wrap (transformers' `GradientCheckpointingLayer`s), bottom up."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
