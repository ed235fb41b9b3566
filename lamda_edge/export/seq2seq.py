"""ONNX graphs of an encoder-decoder (BART): an encoder, a first-step decoder and a decoder with a KV cache, under the
file, input and output names that optimum's `ORTModelForSeq2SeqLM` uses.

    encoder_model.onnx           input_ids (B, S), attention_mask (B, S)  ->  last_hidden_state (B, S, H)
    decoder_model.onnx           encoder_attention_mask (B, S), input_ids (B, T), encoder_hidden_states (B, S, H)
                             ->  logits (B, T, V), present.N.decoder.key/value (B, h, T, D),
                                 present.N.encoder.key/value (B, h, S, D)   (the cross-attention past, computed once)
    decoder_with_past_model.onnx encoder_attention_mask (B, S), input_ids (B, T),
                                 past_key_values.N.decoder.key/value (B, h, P, D), .encoder.key/value (B, h, S, D)
                             ->  logits (B, T, V), present.N.decoder.key/value (B, h, P+T, D)

The self-attention past grows by T at each call; the cross-attention past comes from the first decoder call and is
fed back unchanged. `validate_seq2seq` checks every output of every graph against PyTorch (one error lists all).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lamda_edge.export.graph import _export
from lamda_edge.export.validate import _feeds, _tolerance, compare
from lamda_edge.runtime.session import session

ENCODER_FILE, DECODER_FILE, DECODER_PAST_FILE = "encoder_model.onnx", "decoder_model.onnx", \
    "decoder_with_past_model.onnx"
FILES = (ENCODER_FILE, DECODER_FILE, DECODER_PAST_FILE)


def _kv(layers: int, prefix: str, parts=("decoder", "encoder")) -> list[str]:
    return [f"{prefix}.{i}.{part}.{kind}" for i in range(layers) for part in parts for kind in ("key", "value")]


def io_names(layers: int) -> dict[str, tuple[list[str], list[str]]]:
    """graph file -> (input names, output names), optimum's."""
    return {
        ENCODER_FILE: (["input_ids", "attention_mask"], ["last_hidden_state"]),
        DECODER_FILE: (["encoder_attention_mask", "input_ids", "encoder_hidden_states"],
                       ["logits", *_kv(layers, "present")]),
        DECODER_PAST_FILE: (["encoder_attention_mask", "input_ids", *_kv(layers, "past_key_values")],  # ids (B, 1)
                            ["logits", *_kv(layers, "present", ("decoder",))]),
    }


class Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Decoder(nn.Module):
    """Flat tensors in and out; `with_past`: the self- and cross-attention pasts come in (cross reused as is)."""

    def __init__(self, model: nn.Module, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past
        self.layers = model.config.decoder_layers

    def forward(self, encoder_attention_mask, input_ids, *rest):
        from transformers import DynamicCache, EncoderDecoderCache

        own, cross = DynamicCache(), DynamicCache()
        if self.with_past:
            for i in range(self.layers):
                own.update(rest[4 * i], rest[4 * i + 1], i)  # (B, h, P, D)
                cross.update(rest[4 * i + 2], rest[4 * i + 3], i)  # (B, h, S, D)
            # the cross-attention reads its keys/values from the past; only the shape of the states is used
            states = rest[2].new_zeros(input_ids.shape[0], rest[2].shape[2], self.model.config.d_model)
        else:
            states = rest[0]  # (B, S, H)
        out = self.model(decoder_input_ids=input_ids, encoder_outputs=(states,),
                         attention_mask=encoder_attention_mask, cache=EncoderDecoderCache(own, cross), use_cache=True)
        cache = out.get("cache") or out.get("past_key_values")
        flat = []
        for i in range(self.layers):
            flat += [cache.self_attention_cache.layers[i].keys, cache.self_attention_cache.layers[i].values]
            if not self.with_past:
                flat += [cache.cross_attention_cache.layers[i].keys, cache.cross_attention_cache.layers[i].values]
        return (out.logits, *flat)


def examples(model: nn.Module, batch: int = 2, source: int = 7, target: int = 3, seed: int = 0) -> dict:
    """graph file -> example inputs in `io_names` order (row 0 of the source padded at its end)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, source), generator=g)
    mask = torch.ones(batch, source, dtype=torch.long)
    mask[0, source // 2 + 1:] = 0
    with torch.no_grad():
        states = Encoder(model)(ids, mask)
        first = torch.randint(0, vocab, (batch, target), generator=g)
        out = Decoder(model, False)(mask, first, states)
    step = torch.randint(0, vocab, (batch, 1), generator=g)
    return {ENCODER_FILE: [ids, mask], DECODER_FILE: [mask, first, states], DECODER_PAST_FILE: [mask, step, *out[1:]]}


def export_seq2seq(model: nn.Module, folder: Path) -> None:
    """Write the three graphs into `folder` (dynamic batch, source, target and past axes)."""
    layers = model.config.decoder_layers
    names = io_names(layers)
    batch, source = torch.export.Dim("batch"), torch.export.Dim("encoder_sequence_length")
    target, past = torch.export.Dim("decoder_sequence_length"), torch.export.Dim("past_decoder_sequence_length")
    args = examples(model)
    shapes = {
        ENCODER_FILE: {"input_ids": {0: batch, 1: source}, "attention_mask": {0: batch, 1: source}},
        DECODER_FILE: {"encoder_attention_mask": {0: batch, 1: source}, "input_ids": {0: batch, 1: target},
                       "rest": ({0: batch, 1: source},)},
        DECODER_PAST_FILE: {"encoder_attention_mask": {0: batch, 1: source}, "input_ids": {0: batch},  # T = 1
                            "rest": tuple({0: batch, 2: past if part == "decoder" else source}
                                          for _ in range(layers) for part in ("decoder", "encoder") for _ in "kv")},
    }
    modules = {ENCODER_FILE: Encoder(model), DECODER_FILE: Decoder(model, False),
               DECODER_PAST_FILE: Decoder(model, True)}
    for name in FILES:
        _export(modules[name], tuple(args[name]), folder / name, *names[name], shapes[name])


def validate_seq2seq(model: nn.Module, folder: Path, tol: tuple[float, float]) -> dict:
    """Every output of every graph against PyTorch, on shapes other than the export's examples."""
    names = io_names(model.config.decoder_layers)
    modules = {ENCODER_FILE: Encoder(model), DECODER_FILE: Decoder(model, False),
               DECODER_PAST_FILE: Decoder(model, True)}
    result = {"tolerance": _tolerance(tol), "cases": [], "max_abs_diff": {}, "mismatches": []}
    for batch, source, target in ((2, 9, 4), (1, 3, 1)):
        args = examples(model, batch, source, target, seed=source)
        for name in FILES:
            inputs, outputs = names[name]
            with torch.no_grad():
                ref = modules[name](*args[name])
            ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
            compare(f"{name}(B={batch},S={source},T={target})", outputs, ref, session(folder / name),
                    _feeds(inputs, args[name]), tol, result)
    return result
