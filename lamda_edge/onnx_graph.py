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

import inspect
from pathlib import Path

import torch
from torch import nn

from lamda_edge.errors import ModelError, require

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ENCODER_TYPES = ("bert", "roberta")
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: bigger models keep their weights in model.onnx.data
OPSET = 18


def model_kind(model: nn.Module) -> str:
    """'decoder' or 'encoder' for a model the exporter handles; `ModelError` naming the supported types otherwise."""
    model_type = getattr(model.config, "model_type", None)
    arch = type(model).__name__
    if model_type in DECODER_TYPES and arch.endswith("ForCausalLM"):
        return "decoder"
    if model_type in ENCODER_TYPES and arch.endswith("ForSequenceClassification"):
        return "encoder"
    raise ModelError(
        f"cannot export {arch} (model_type={model_type!r}) to ONNX. Supported: causal LMs of types "
        f"{', '.join(DECODER_TYPES)} and sequence classifiers of types {', '.join(ENCODER_TYPES)}. "
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

        cache = DynamicCache(config=self.model.config)
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
    import contextlib
    import io
    import warnings

    module.eval()
    chatter = io.StringIO()  # the exporter prints its progress and warns about axis names: keep the CLI quiet
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
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


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug records (stack, FX node, class path): ~40% of a small graph's bytes."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


def quantize_int4(src: Path, dst: Path, block_size: int = 32, accuracy_level: int | None = 4,
                  embeddings: bool = True, symmetric: bool = True, keep_tied_head: bool = False) -> dict:
    """Weight-only 4-bit quantization (ONNX Runtime's MatMulNBits quantizer, blocks along the input).

    Every MatMul with a constant weight becomes MatMulNBits; with `embeddings`, the token embedding Gather becomes
    GatherBlockQuantized too (a tied lm_head is exported as a separate transposed copy, so both are quantized,
    unless `keep_tied_head` leaves that copy in float). `symmetric=False` gives blocks a zero point.
    Returns the count of each quantized op type.
    """
    onnx = require("onnx", "onnx")
    quantizer_mod = require("onnxruntime.quantization.matmul_nbits_quantizer", "onnx")
    import logging

    # ERROR: it warns that it lifts the opset to 21 for int4 Gather data; validate_int4 runs the result anyway
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    axes = (("MatMul", 0), ("Gather", 1))[:len(ops)]  # quantize along the input dim / the hidden dim
    kw = dict(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
              op_types_to_quantize=ops, quant_axes=axes)
    model = onnx.load(str(src))
    folded = _fold_transposed_weights(model)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in folded]
    quantizer = quantizer_mod.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude if keep_tied_head else [],
                                                   algo_config=quantizer_mod.DefaultWeightOnlyQuantConfig(**kw), **kw)
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):  # the quantizer divides by all-zero blocks' scale 0
        quantizer.process()
    big = quantizer.model.model.ByteSize() > EXTERNAL_DATA_BYTES
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=big)
    counts = {}
    for node in quantizer.model.model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts.get("MatMulNBits"):
        raise ModelError(f"int4 quantization of {src} changed no MatMul (ops after: {counts})")
    return counts


def _fold_transposed_weights(model) -> set[str]:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T as its own initializer), so that the quantizer sees a weight.

    Returns the names of the new initializers (a tied lm_head's weight, when there is one).

    A tied lm_head is exported as a Transpose of the embedding matrix, which the Gather also reads: without this
    the int4 graph keeps the head in fp32 (SmolLM2-135M: 198 MB instead of ~90 MB).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    folded = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        tr = producer[node.input[1]]
        perm = [list(a.ints) for a in tr.attribute if a.name == "perm"]
        if tr.op_type != "Transpose" or tr.input[0] not in inits or perm not in ([], [[1, 0]]):
            continue
        if tr.input[0] not in folded:
            weight = numpy_helper.to_array(inits[tr.input[0]])
            if weight.ndim != 2:
                continue
            folded[tr.input[0]] = f"{tr.input[0]}.transposed"
            model.graph.initializer.append(numpy_helper.from_array(weight.T.copy(), folded[tr.input[0]]))
        node.input[1] = folded[tr.input[0]]
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Transpose" and not set(n.output) & used]
    for node in dead:
        model.graph.node.remove(node)
    return set(folded.values())


def onnx_files(folder: Path, name: str) -> list[Path]:
    """The files an ONNX model `name` occupies in `folder` (the graph and its external data, if any)."""
    return [p for p in (folder / name, folder / f"{name}.data") if p.exists()]


# ---- validation ----------------------------------------------------------------------------------------------------


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session for `path`."""
    ort = require("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(case: str, names: list[str], expected: list, sess, feeds: dict, tol: tuple[float, float],
            result: dict) -> list:
    """Run `sess` on `feeds`; check each output named in `names` against `expected` (torch tensors).

    Appends one entry per output to result["cases"], updates result["max_abs_diff"], and adds a line to
    result["mismatches"] for every missing/extra output, shape difference, or max |diff| above
    `atol + rtol * max|expected|` with `tol = (atol, rtol)`.
    Returns the ONNX outputs in the order of `names` (None where missing).
    """
    import numpy as np

    got_names = [o.name for o in sess.get_outputs()]
    missing, extra = [n for n in names if n not in got_names], [n for n in got_names if n not in names]
    if missing or extra:
        result["mismatches"].append(f"{case}: output names differ: missing {missing}, unexpected {extra}")
    got = dict(zip(got_names, sess.run(None, feeds)))
    for name, ref in zip(names, expected):
        if name not in got:
            continue
        ref = ref.detach().float().numpy()
        out = got[name].astype(np.float32)
        entry = {"case": case, "output": name, "shape_torch": list(ref.shape), "shape_onnx": list(out.shape)}
        if ref.shape != out.shape:
            result["mismatches"].append(f"{case}: {name} shape {list(out.shape)} != PyTorch {list(ref.shape)}")
        else:
            diff = float(np.abs(ref - out).max()) if ref.size else 0.0
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            allowed = tol[0] + tol[1] * scale
            entry.update(max_abs_diff=diff, max_abs_torch=scale, allowed=allowed)
            result["max_abs_diff"][name] = max(result["max_abs_diff"].get(name, 0.0), diff)
            if not diff <= allowed:  # also catches NaN
                result["mismatches"].append(f"{case}: {name} max |diff| {diff:.3g} > tolerance {allowed:.3g} "
                                            f"({tol[0]:g} + {tol[1]:g} * max|PyTorch| {scale:.3g})")
        result["cases"].append(entry)
    return [got.get(n) for n in names]


def validate_decoder(model: nn.Module, path: Path, tol: tuple[float, float]) -> dict:
    """Check the decoder graph at prefill (P=0), decode (T=1, past from PyTorch's prefill) and chunk shapes."""
    inputs, outputs = decoder_io_names(model.config.num_hidden_layers)
    sess = session(path)
    wrapper = DecoderWithCache(model).eval()
    result = {"tolerance": _tolerance(tol), "cases": [], "max_abs_diff": {}, "mismatches": []}
    got_inputs = sorted(i.name for i in sess.get_inputs())
    if got_inputs != sorted(inputs):
        result["mismatches"].append(f"input names {got_inputs} != expected {sorted(inputs)}")
        return result
    prefill = decoder_example(model.config, batch=2, seq=8, past=0, seed=1)
    with torch.no_grad():
        ref = wrapper(*prefill)
    compare("prefill(B=2,T=8,P=0)", outputs, ref, sess, _feeds(inputs, prefill), tol, result)
    step = decoder_example(model.config, batch=2, seq=1, past=8, seed=2)
    step = step[:3] + list(ref[1:])  # the next token after PyTorch's own prefill cache
    chunk = decoder_example(model.config, batch=1, seq=3, past=5, seed=3)
    for case, args in (("decode(B=2,T=1,P=8)", step), ("chunk(B=1,T=3,P=5)", chunk)):
        with torch.no_grad():
            ref = wrapper(*args)
        compare(case, outputs, ref, sess, _feeds(inputs, args), tol, result)
    return result


def validate_encoder(model: nn.Module, path: Path, tol: tuple[float, float]) -> dict:
    """Check the classifier graph on two batch/sequence shapes (one with a padded row)."""
    inputs, outputs = encoder_io_names(model)
    sess = session(path)
    result = {"tolerance": _tolerance(tol), "cases": [], "max_abs_diff": {}, "mismatches": []}
    for batch, seq in ((2, 7), (1, 3)):
        args = encoder_example(model, inputs, batch=batch, seq=seq, seed=seq)
        with torch.no_grad():
            ref = EncoderLogits(model, inputs)(*args)
        compare(f"B={batch},T={seq}", outputs, [ref], sess, _feeds(inputs, args), tol, result)
    return result


def validate_int4(model: nn.Module, fp_path: Path, int4_path: Path, held_out: torch.Tensor | None) -> dict:
    """What int4 costs: held-out perplexity (decoders) or argmax agreement (classifiers), and max |logit diff|."""
    import numpy as np

    fp, q = session(fp_path), session(int4_path)
    if held_out is not None:  # (1, T) token ids
        from lamda_edge.serve import OnnxDecoder, perplexity

        with torch.no_grad():
            logits = model(input_ids=held_out).logits[0].numpy()  # (T, V)
        fp_logits, q_logits = OnnxDecoder(fp).full_logits(held_out), OnnxDecoder(q).full_logits(held_out)
        ids = held_out[0].numpy()
        return {"held_out_tokens": int(ids.size), "ppl_pytorch": perplexity(logits, ids),
                "ppl_onnx": perplexity(fp_logits, ids), "ppl_int4": perplexity(q_logits, ids),
                "max_abs_logit_diff_int4": float(np.abs(q_logits - logits).max())}
    inputs, _ = encoder_io_names(model)
    args = encoder_example(model, inputs, batch=64, seq=16, seed=7)
    with torch.no_grad():
        ref = EncoderLogits(model, inputs)(*args).numpy()
    got = q.run(None, _feeds(inputs, args))[0]
    got_fp = fp.run(None, _feeds(inputs, args))[0]
    return {"examples": int(ref.shape[0]), "agreement_onnx": float((got_fp.argmax(-1) == ref.argmax(-1)).mean()),
            "agreement_int4": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "max_abs_logit_diff_int4": float(np.abs(got - ref).max())}


def _tolerance(tol: tuple[float, float]) -> dict:
    return {"atol": tol[0], "rtol": tol[1], "rule": "max|diff| <= atol + rtol * max|PyTorch| per output and case"}


def _feeds(names: list[str], tensors: list[torch.Tensor]) -> dict:
    return {n: t.detach().numpy() for n, t in zip(names, tensors)}
