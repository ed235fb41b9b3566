"""ONNX graphs: a decoder with a KV cache and an encoder classifier, exported by `torch.onnx.export(dynamo=True)`.

optimum's exporter does not import with transformers 5 (see DESIGN.md), so the graphs are built here, keeping the
input and output names that optimum uses so that other tools load the result:

    decoder:  input_ids (B, T), attention_mask (B, P+T), position_ids (B, T),
              past_key_values.N.key / .value (B, H_kv, P, D)
          ->  logits (B, T, V), present.N.key / .value (B, H_kv, P+T, D)
    encoder:  input_ids (B, T), attention_mask (B, T)[, token_type_ids (B, T)]  ->  logits (B, num_labels)

Prefill (P = 0) and decode (T = 1) run through the same graph. `validate_*` run PyTorch and ONNX Runtime on the
same inputs and collect every mismatch (names, shapes, max |diff|); `quantize_int4` is ONNX Runtime's MatMulNBits
weight-only quantizer.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path

import torch
from torch import nn

from lamda_edge.errors import ModelError, require
from lamda_edge.families import DECODER_TYPES, ENCODER_TYPES, EXPORTED, SEQ2SEQ_TYPES

EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: bigger models keep their weights in model.onnx.data
OPSET = 18
# "torchvision is not installed. Skipping torchvision::nms" (four times per export): the op registry's, not ours
QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration",)
MODEL_FILE = "model.onnx"  # the fp32 (or fp16) graph of an export folder


def model_kind(model: nn.Module) -> str:
    """'decoder', 'encoder' or 'seq2seq' (export/seq2seq.py) for a model the exporter handles; `ModelError` naming
    the supported types otherwise."""
    model_type = getattr(model.config, "model_type", None)
    arch = type(model).__name__
    if model_type in DECODER_TYPES and arch.endswith("ForCausalLM"):
        return "decoder"
    if model_type in ENCODER_TYPES and arch.endswith("ForSequenceClassification"):
        return "encoder"
    if model_type in SEQ2SEQ_TYPES and arch.endswith("ForConditionalGeneration"):
        return "seq2seq"
    raise ModelError(
        f"cannot export {arch} (model_type={model_type!r}) to ONNX. Supported: {EXPORTED}. "
        "Fix: export one of those, or use `--format genai` for the architectures onnxruntime-genai builds."
    )


def kv_geometry(config) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """optimum's input and output names for a decoder with `num_layers` layers of KV cache."""
    kv = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv]
    outputs = ["logits"] + [f"present.{n}" for n in kv]
    return inputs, outputs


def encoder_io_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Input names (token_type_ids when the model takes them) and output names of an encoder classifier."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        names.append("token_type_ids")
    return names, ["logits"]


class DecoderWithCache(nn.Module):
    """Flat tensors in and out: fills a `DynamicCache` from the past keys/values and returns logits + presents."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # full layers only: a sliding-window layer's past keeps every token, the window lives in the attention mask
        # (a cropped past would change shape with its length; the graph's past grows by T at every call)
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)  # (B, H_kv, P, D) each
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = out.get("cache") or out.get("past_key_values")  # transformers 5.24 names it `cache`
        flat = []
        for layer in present.layers:
            flat += [layer.keys, layer.values]  # (B, H_kv, P+T, D)
        return (out.logits, *flat)  # logits (B, T, V)


class EncoderLogits(nn.Module):
    """Keyword inputs -> logits only (B, num_labels)."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.input_names, inputs))).logits


def decoder_example(config, batch: int = 2, seq: int = 3, past: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Example inputs in the order of `decoder_io_names` (random past, full attention mask)."""
    layers, kv_heads, head_dim = kv_geometry(config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, head_dim, generator=g) for _ in range(2 * layers)]
    return [ids, mask, pos, *kv]


def export_decoder(model: nn.Module, path: Path) -> None:
    """Export a causal LM with a KV cache to `path` (dynamic batch, sequence and past axes)."""
    layers = model.config.num_hidden_layers
    inputs, outputs = decoder_io_names(layers)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence_length")
    past = torch.export.Dim("past_sequence_length")
    total = torch.export.Dim("total_sequence_length")
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layers)),
    }
    _export(DecoderWithCache(model), tuple(decoder_example(model.config)), path, inputs, outputs, shapes)


def export_encoder(model: nn.Module, path: Path) -> None:
    """Export a sequence classifier to `path` (dynamic batch and sequence axes)."""
    inputs, outputs = encoder_io_names(model)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    example = encoder_example(model, inputs, batch=2, seq=5)
    shapes = {"inputs": tuple({0: batch, 1: seq} for _ in inputs)}
    _export(EncoderLogits(model, inputs), tuple(example), path, inputs, outputs, shapes)


def encoder_example(model: nn.Module, names: list[str], batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    """Example encoder inputs in the order of `names` (random ids, last tokens of row 0 masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 + 1:] = 0
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
    return [by_name[n] for n in names]


def _export(module, args, path: Path, inputs, outputs, dynamic_shapes) -> None:
    require("onnxscript", "onnx")
    import io
    import warnings

    module.eval()
    chatter = io.StringIO()  # the exporter prints its progress and warns about axis names: keep the CLI quiet
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter), _quiet(*QUIET_LOGGERS):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, None, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET,
                                        verbose=False)
        except Exception as exc:  # torch.export's errors are long; keep the cause, name the model
            raise ModelError(f"torch.onnx.export failed for {type(module.model).__name__}: "
                             f"{type(exc).__name__}: {str(exc)[:2000]}\n{chatter.getvalue()[-2000:]}") from exc
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    _strip_debug_metadata(path)


@contextlib.contextmanager
def _quiet(*names: str):
    """Raise the named loggers to ERROR for the duration (what they warn about is not the user's concern)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug records (stack, FX node, class path): ~40% of a small graph's bytes."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


def onnx_files(folder: Path, name: str) -> list[Path]:
    """The files an ONNX model `name` occupies in `folder` (the graph and its external data, if any)."""
    return [p for p in (folder / name, folder / f"{name}.data") if p.exists()]


def onnx_size(folder: Path, name: str) -> int:
    """Bytes an ONNX model `name` occupies in `folder`, its external data included."""
    return sum(p.stat().st_size for p in onnx_files(folder, name))
