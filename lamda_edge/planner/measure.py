"""`plan --measure`: run real training steps of a planned configuration and measure their peak.

On CUDA the peak comes from the allocator (`torch.cuda.max_memory_allocated`); on CPU from `LiveTensorCounter`
(exact live tensor bytes). The model is built the way training builds it: the frozen base (NF4 or not) with
LaMDA adapters from `lamda_edge.adapters`, gradient checkpointing (non-reentrant), the chunked loss from
`lamda_edge.train.loss`, AdamW over the trainable parameters. A catalogue shape without local weights gets random
weights of that shape (memory does not depend on the values).

Real weights (a local folder, or `smollm2-135m` -> the built-in default) go through `lamda_edge.load.loader.
load_lamda_model`, the loader `lamda-edge train` uses; random weights go through `make_lamda_linear`, the same
builder of adapted layers. TODO(train): `_train_step` is a plain loop (chunked loss,
backward, AdamW step); switch it to the step of `lamda_edge.train.recipe` (LaMDATrainer) once it exposes one.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

from lamda_edge.adapters import find_targets, lamda_layers, make_lamda_linear
from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.adapters.inject import finish_injection
from lamda_edge.demo.default_model import default_model_path
from lamda_edge.errors import ModelError
from lamda_edge.load.device import resolve_compute_dtype
from lamda_edge.load.loader import enable_gradient_checkpointing, load_lamda_model
from lamda_edge.planner.live_tensors import LiveTensorCounter
from lamda_edge.planner.memory import TrainSetup
from lamda_edge.train.loss import causal_lm_loss, seq2seq_loss
from lamda_edge.train.offload import ActivationOffload


def llama_config(shape):
    """A transformers LlamaConfig with `shape`'s numbers (random weights; memory depends only on shapes)."""
    if shape.architecture != "decoder" or shape.fused_qkv:
        raise ModelError(f"--measure builds Llama-style decoders; {shape.name} is {shape.architecture}"
                         f"{' with fused projections' if shape.fused_qkv else ''}. Give a local model folder instead.")
    return LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings, attention_bias=shape.attention_bias,
        max_position_embeddings=8192, attn_implementation="sdpa",
    )


def build_model(shape, setup: TrainSetup, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """The adapted model for `setup`: local weights when `shape.local_path` is set, else random ones."""
    dtype = resolve_compute_dtype(setup.weight_dtype or setup.compute_dtype, None)
    torch.manual_seed(seed)
    config = LaMDAConfig(rank=setup.rank, init=setup.init)
    if shape.local_path and (Path(shape.local_path) / "config.json").is_file() and any(
            Path(shape.local_path).glob("*.safetensors")):
        # real weights: the loader `lamda-edge train` uses (SVD of the full weights, residual to NF4, checkpointing)
        model = load_lamda_model(shape.local_path, config, quantize=setup.quantize, device=device,
                                 compute_dtype=resolve_compute_dtype(setup.compute_dtype, None), progress=False,
                                 gradient_checkpointing=setup.gradient_checkpointing,
                                 checkpoint_layers=setup.checkpoint_layers)
        model.config.use_cache = False
        model.train()
        return model
    if shape.local_path:  # a config without weights: random weights of its shape
        auto = AutoModelForSeq2SeqLM if shape.architecture == "encoder-decoder" else AutoModelForCausalLM
        model = auto.from_config(AutoConfig.from_pretrained(shape.local_path), dtype=dtype, attn_implementation="sdpa")
    else:
        model = LlamaForCausalLM(llama_config(shape)).to(dtype)
    targets = find_targets(model, config)
    per_block = len(shape.block_linears())
    for i, (name, module) in enumerate(targets):
        rank = setup.ranks[i % per_block] if setup.ranks else min(setup.rank, *module.weight.shape)
        layer, _ = make_lamda_linear(module.weight, module.bias, rank, config, setup.quantize,
                                     resolve_compute_dtype(setup.compute_dtype, None), device, name=name)
        model.set_submodule(name, layer)
    finish_injection(model, config, {}, {})
    if not setup.b_trainable:
        for _, layer in lamda_layers(model):
            layer.lamda_B.requires_grad_(False)
    model.to(device)
    if setup.gradient_checkpointing:
        enable_gradient_checkpointing(model, setup.checkpoint_layers)
    model.config.use_cache = False
    model.train()
    return model


def _train_step(model, batch, optimizer, chunk_rows, offload=None) -> float:
    with offload if offload is not None else contextlib.nullcontext():  # train/offload.py, as LossModel runs it
        loss_fn = seq2seq_loss if getattr(model.config, "is_encoder_decoder", False) else causal_lm_loss
        loss = loss_fn(model, batch, chunk_rows=chunk_rows)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(shape, setup: TrainSetup, steps: int = 2, device: str | None = None, seed: int = 0,
            model: torch.nn.Module | None = None) -> dict:
    """Run `steps` real training steps of `setup` and return the measured peak of live tensor bytes.

    The first step creates AdamW's state; the peak is taken over the later (steady-state) steps, with weights,
    adapters, optimizer state and the batch counted, as the memory model predicts it. `model`: train this model
    instead of building one (tools/validate_planner.py passes PEFT LoRA / QLoRA models this way).

    Returns:
        {"measured_tensor_peak_bytes", "measured_by", "steps", "seconds_per_step", "device"}
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(shape, setup, device, seed) if model is None else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size, (setup.batch_size, setup.seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if setup.padding_mask:
        # a padded batch at its fullest (the worst case a plan must cover): one pad token, so the attention-mask
        # path runs (repeat_kv, SDPA's float mask) while every other position still carries a label
        mask = torch.ones_like(ids)
        mask[0, -1] = 0
        batch["attention_mask"] = mask
        batch["labels"] = batch["labels"].masked_fill(mask == 0, -100)
    offload = ActivationOffload() if setup.activation_offload else None
    _train_step(model, batch, optimizer, setup.chunk_rows, offload)  # warm-up: creates the optimizer state
    steps = max(1, steps - 1)
    if offload is not None:
        offload.reset()
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            _train_step(model, batch, optimizer, setup.chunk_rows, offload)
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        counter = LiveTensorCounter().register(model, optimizer, batch)
        with counter:
            for _ in range(steps):
                _train_step(model, batch, optimizer, setup.chunk_rows, offload)
        peak, how = counter.peak_bytes, "LiveTensorCounter (live storages)"
    out = {
        "measured_tensor_peak_bytes": int(peak),
        "measured_by": how,
        "steps": steps,
        "seconds_per_step": (time.perf_counter() - t0) / steps,
        "device": device,
    }
    if offload is not None:
        out["measured_host_offload_bytes"] = offload.peak_host_bytes  # the offloaded activations' host peak
    return out


def measure_plan(plan, steps: int = 2) -> dict:
    """Measure `plan` (a `search.Plan`) on this machine; `smollm2-135m` uses the built-in default's real weights."""
    from dataclasses import replace

    shape = plan.model
    note = "random weights of the planned shape"
    if shape.local_path is None and shape.name == "smollm2-135m":
        try:
            shape = replace(shape, local_path=str(default_model_path()))
            note = "the built-in SmolLM2-135M-Instruct (Q4_1-round-tripped) weights"
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to random weights of the same shape
            note = f"random weights of the planned shape (default model unavailable: {exc})"
    elif shape.local_path:
        note = f"weights from {shape.local_path}"
    out = measure(shape, plan.setup, steps=steps)
    out["measured_weights"] = note
    return out
