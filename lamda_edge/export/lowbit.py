"""`--int4` / `--int8`: which low-bit graph is written, how it is built, and what it is checked against.

    method "nf4"    the adapter unmerged on its NF4 residual base (MatMulBnb4 with bitsandbytes' own codes) plus
                    the fp32 LaMDA path: for an NF4-trained adapter exactly what training computed, checked against
                    the PyTorch NF4 model with the fp32 tolerance rule; a full-precision base is NF4-quantized here
    method "nbits"  the same unmerged graph with the residual as MatMulNBits int4 (round-to-nearest, symmetric)
    method "merged" the merged fp32 graph re-quantized with MatMulNBits int4 (every MatMul + the embedding): the
                    behaviour before issue 11, and the only one for a model exported without an adapter
    --int8          the unmerged graph with the residual as MatMulNBits bits=8 (merged graph without an adapter)

Every graph gets its size, held-out perplexity and greedy-token agreement with the PyTorch model in the report.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from lamda_edge.errors import ConfigError, ExportValidationError
from lamda_edge.export import nf4
from lamda_edge.export.graph import MODEL_FILE, EncoderLogits, encoder_example, encoder_io_names, onnx_size
from lamda_edge.export.merged import load_adapted
from lamda_edge.export.quantize import quantize_int4
from lamda_edge.export.validate import (
    TOLERANCE,
    _feeds,
    quality_words,
    requantized_problems,
    validate_decoder,
    validate_encoder,
)
from lamda_edge.runtime.decoder import OnnxDecoder, held_out_ids, perplexity
from lamda_edge.runtime.session import session

METHODS = ("auto", "nf4", "nbits", "merged")
# auto for an adapter trained on a full-precision base: the NF4 residual beat MatMulNBits int4 residual on Moby-Dick
# (92.9 vs 97.7) and the built-in paragraph (81.0 vs 83.6); docs/benchmarks.md, "Export: int4 as trained"
FULL_PRECISION_AUTO = "nf4"
INT4_FILE, INT8_FILE = "model.int4.onnx", "model.int8.onnx"
GREEDY_PROMPT = "What is twelve times seven?"
GREEDY_TOKENS = 24


def resolve_method(method: str, adapter, quantize: str | None) -> str:
    """The concrete int4 method for `method` ("auto" resolved by how the adapter's base was held in training)."""
    if method not in METHODS:
        raise ConfigError(f"`int4_method` should be one of {METHODS}, got {method!r}")
    if adapter is None:
        if method in ("nf4", "nbits"):
            raise ConfigError(f"--int4-method {method} quantizes an adapter's residual base and keeps the adapter "
                              "path exact; without --adapter there is none. Fix: pass --adapter, or use "
                              "--int4-method merged (or auto)")
        return "merged"
    if method == "auto":
        return "nf4" if quantize == "nf4" else FULL_PRECISION_AUTO
    return method


def build(options, tmp: Path, reference, tokenizer, text: str, kind: str, report: dict, log,
          stage=lambda name: None) -> None:
    """Write model.int4.onnx or model.int8.onnx into `tmp` and fill report["int4"] / report["int8"]; `stage(name)`
    names each step as it starts (the progress bar shows it)."""
    timings, sizes = report["timings_s"], report["sizes_bytes"]
    quantize = (report.get("source") or {}).get("quantize")
    bits, out_name = (8, INT8_FILE) if options.int8 else (4, INT4_FILE)
    key = "int8" if options.int8 else "int4"
    method = "nbits8" if options.int8 else resolve_method(options.int4_method, options.adapter, quantize)
    ids = held_out_ids(tokenizer, text, reference) if kind == "decoder" else None
    requantized = _requantized_adapter_note(options, method, quantize)
    if requantized:
        log(f"note: {requantized}")
    stage(f"{key}: writing {out_name} ({method})")
    t = time.perf_counter()
    if options.adapter is None or method == "merged":
        pytorch, built = reference, None
        ops = quantize_int4(tmp / MODEL_FILE, tmp / out_name, options.block_size, bits=bits,
                            embeddings=bits == 4)
        parity = None
        method = "merged" if bits == 4 else "merged-nbits8"
    else:
        pytorch, _, _ = load_adapted(options.model, options.adapter)  # the adapter as training held it
        scheme = {"nf4": "nf4", "nbits": "int4", "nbits8": "int8"}[method]
        built = nf4.write_variants(pytorch, kind, tmp, {scheme: out_name}, options.block_size)[scheme]
        ops = built["ops"]
        parity = None
        if scheme == "nf4":  # the graph must compute what the NF4 model computes, to float rounding
            stage(f"{key}: checking {out_name} against the NF4 model")
            as_trained = nf4.nf4_reference(copy.deepcopy(pytorch))
            check = validate_decoder if kind == "decoder" else validate_encoder
            parity = check(as_trained, tmp / out_name, TOLERANCE["fp32"])
            parity["against"] = ("the PyTorch NF4 model as trained" if quantize == "nf4" else
                                 "the PyTorch adapter model with its residual base NF4-quantized (bitsandbytes)")
            del as_trained
    timings[key] = time.perf_counter() - t
    sizes[out_name] = onnx_size(tmp, out_name)
    block = built["block_size"] if built else options.block_size
    result = {"method": method, "file": out_name, "ops": ops, "block_size": block,
              "size_ratio": sizes[out_name] / sizes[MODEL_FILE]}
    stage(f"{key}: " + ("perplexity and greedy agreement" if kind == "decoder" else "class agreement")
          + " of both graphs")
    result.update(quality(pytorch, tmp / MODEL_FILE, tmp / out_name, ids, tokenizer, kind, suffix=key))
    if parity is not None:
        result["parity"] = parity
    result["check"], result["mismatches"] = _verdict(result, key, parity)
    report[key] = result
    report["graphs"] = {MODEL_FILE: {"size_bytes": sizes[MODEL_FILE], **result.pop("fp32_graph")},
                        out_name: {"size_bytes": sizes[out_name], **result.pop("lowbit_graph")}}
    log(f"{key} ({method}): {sizes[out_name] / 1e6:.1f} MB ({result['size_ratio']:.2f}x of {options.dtype}); "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith(("ppl", "agree", "greedy_agree"))))
    problems = result["mismatches"] + (parity["mismatches"] if parity is not None else [])
    if problems:
        report["ok"] = False
        against = parity["against"] if parity is not None and parity["mismatches"] else "PyTorch"
        cause = f"\n{requantized}" if requantized and result["mismatches"] else ""
        raise ExportValidationError(f"the {key} graph disagrees with {against} in {len(problems)} check(s):\n  "
                                    + "\n  ".join(problems) + cause
                                    + f"\nreport: {options.output}.export-report.json")


def _requantized_adapter_note(options, method: str, quantize: str | None) -> str:
    """Why a 4-bit graph of an adapter trained on a full-precision base cannot be the trained model, and the fixes
    ("" when the graph is what training computed, or there is no adapter)."""
    if options.adapter is None or options.int8 or quantize == "nf4":
        return ""
    return (f"this adapter was trained on a full-precision base (quantize: {quantize or 'none'}), so --int4 "
            f"({method}) quantizes weights the adapter never saw at 4 bits: the graph will not compute what was "
            "trained, and on small models it can lose much of the fine-tune (SmolLM2-135M's default job: held-out "
            "perplexity 1.73x). Fix: --int8 keeps it (about half the fp32 "
            "graph's size); for a 4-bit graph that is exactly the trained model, train on the NF4 base "
            "(`lamda-edge train --quantize nf4`, the default on CUDA), then export with --int4")


def _verdict(result: dict, key: str, parity: dict | None) -> tuple[str, list[str]]:
    """(what the low-bit graph is, in words; the quality-floor problems): never 'equal' for a re-quantized graph."""
    greedy = f"greedy_agreement_{key}" in result
    agreement = result[f"greedy_agreement_{key}"] if greedy else result.get(f"agreement_{key}")
    ppl = (result.get("ppl_pytorch"), result.get(f"ppl_{key}"))
    problems = requantized_problems(result["file"], *ppl)
    words = quality_words(agreement, *ppl, what="greedy tokens" if greedy else "classes (argmax)")
    if parity is not None:
        state = "equal to" if not parity["mismatches"] else "DIFFERS from"
        return f"{state} {parity['against']} (fp32 tolerance); vs the fp32 model: {words}", problems
    return f"re-quantized ({result['method']}), not equal to PyTorch by design: {words}", problems


def quality(pytorch, fp_path: Path, q_path: Path, held_out, tokenizer, kind: str, suffix: str = "int4") -> dict:
    """Perplexity (or argmax agreement) and greedy-token agreement of the fp32 and low-bit graphs vs `pytorch`."""
    fp, q = session(fp_path), session(q_path)
    if kind != "decoder":
        inputs, _ = encoder_io_names(pytorch)
        args = encoder_example(pytorch, inputs, batch=64, seq=16, seed=7)
        with torch.no_grad():
            ref = EncoderLogits(pytorch, inputs)(*args).float().numpy()
        got = q.run(None, _feeds(inputs, args))[0]
        got_fp = fp.run(None, _feeds(inputs, args))[0]
        agree_fp = float((got_fp.argmax(-1) == ref.argmax(-1)).mean())
        agree_q = float((got.argmax(-1) == ref.argmax(-1)).mean())
        return {"examples": int(ref.shape[0]), "agreement_onnx": agree_fp, f"agreement_{suffix}": agree_q,
                f"max_abs_logit_diff_{suffix}": float(np.abs(got - ref).max()),
                "fp32_graph": {"agreement": agree_fp}, "lowbit_graph": {"agreement": agree_q}}
    with torch.no_grad():
        logits = pytorch(input_ids=held_out).logits[0].float().numpy()  # (T, V)
    fp_logits, q_logits = OnnxDecoder(fp).full_logits(held_out), OnnxDecoder(q).full_logits(held_out)
    ids = held_out[0].numpy()
    prompt = tokenizer(GREEDY_PROMPT, add_special_tokens=False)["input_ids"]
    want = greedy(pytorch, prompt, GREEDY_TOKENS)
    fp_agree, q_agree = greedy_agreement(fp, prompt, want), greedy_agreement(q, prompt, want)
    ppl_fp, ppl_q = perplexity(fp_logits, ids), perplexity(q_logits, ids)
    return {"held_out_tokens": int(ids.size), "ppl_pytorch": perplexity(logits, ids), "ppl_onnx": ppl_fp,
            f"ppl_{suffix}": ppl_q, f"max_abs_logit_diff_{suffix}": float(np.abs(q_logits - logits).max()),
            "greedy_tokens_pytorch": want, f"greedy_agreement_{suffix}": q_agree, "greedy_agreement_onnx": fp_agree,
            "fp32_graph": {"ppl": ppl_fp, "greedy_agreement": fp_agree},
            "lowbit_graph": {"ppl": ppl_q, "greedy_agreement": q_agree}}


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens of a PyTorch causal LM after `prompt` (full recompute each step: any model, no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def greedy_agreement(sess, prompt: list[int], tokens: list[int]) -> float:
    """Fraction of PyTorch's greedy tokens the graph also picks, teacher-forced on PyTorch's continuation."""
    logits = OnnxDecoder(sess).full_logits(np.array([prompt + tokens]))
    picks = logits[len(prompt) - 1:-1].argmax(-1)
    return float((picks == np.array(tokens)).mean())
