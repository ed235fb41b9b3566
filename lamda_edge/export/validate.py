"""Export validation: PyTorch and ONNX Runtime on the same inputs, every output compared, every mismatch collected.

Each output passes when max|PyTorch - ONNX Runtime| <= atol + rtol * max|PyTorch|; a check that fails is listed in
`result["mismatches"]` (names, shapes, differences), and the caller raises one error listing them all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lamda_edge.export.graph import (
    DecoderWithCache,
    EncoderLogits,
    decoder_example,
    decoder_io_names,
    encoder_example,
    encoder_io_names,
)
from lamda_edge.runtime.decoder import OnnxDecoder, perplexity
from lamda_edge.runtime.session import session

# Every output passes when max|PyTorch - ONNX Runtime| <= atol + rtol * max|PyTorch|: 1e-4 absolute on the
# tiny test models; the rtol term lets a deep model's float32 rounding through. Measured against a float64
# evaluation of the same merged weights (tools/fp32_rounding.py; SmolLM2-135M + an NF4-trained adapter, prefill
# B=2 T=8, max|logit| 34.1): PyTorch fp32 is 1.35e-3 off float64, ONNX Runtime 4.7e-4, and they differ by 1.8e-3
# (5.3e-5 of max|logit|): summation order, not a different model. rtol 1e-4 leaves 2x room over that.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (3e-2, 1e-3)}  # (atol, rtol)
# A low-bit graph (int4/int8 of merged weights or of the residual, the genai builder's int4/fp16) cannot equal PyTorch;
# it is labelled re-quantized with its measured greedy-token agreement, and it must still be the same model, or the
# export fails: held-out perplexity at most REQUANTIZED_MAX_PPL_RATIO x PyTorch's. SmolLM2-135M merged int4 costs
# 34.0 -> 45.3 (1.33x, docs/benchmarks.md); a graph of other weights is far off. (Greedy agreement is no floor: on
# the tiny test models, whose logits are nearly flat, a correct int4 graph agrees on 17% of the tokens.)
REQUANTIZED_MAX_PPL_RATIO = 1.5


def requantized_problems(graph: str, ppl_reference: float | None, ppl_graph: float | None) -> list[str]:
    """What makes a low-bit `graph` another model than PyTorch's (empty: it passed the quality floor)."""
    if ppl_reference is None or ppl_graph <= REQUANTIZED_MAX_PPL_RATIO * ppl_reference:
        return []
    return [f"{graph}: held-out perplexity {ppl_graph:.3f} > {REQUANTIZED_MAX_PPL_RATIO:g} x PyTorch's "
            f"{ppl_reference:.3f}"]


def quality_words(agreement: float, ppl_reference: float | None = None, ppl_graph: float | None = None,
                  what: str = "greedy tokens") -> str:
    """'greedy tokens 88% of PyTorch's, perplexity 45.300 vs 34.000' for a summary line (`what`: "classes (argmax)" for
    a classifier)."""
    text = f"{what} {agreement:.0%} of PyTorch's"
    if ppl_reference is not None:
        text += f", perplexity {ppl_graph:.3f} vs {ppl_reference:.3f}"
    return text


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
