"""The onnxruntime-genai format: its model builder turns the merged transformers folder into a device-ready graph.

    OUT/merged/ ──> python -m onnxruntime_genai.models.builder -i OUT/merged -o OUT -p int4 -e cpu
                ──> OUT/model.onnx (+ .data), OUT/genai_config.json, tokenizer files

Validated like the plain export, against the merged PyTorch model: greedy tokens for a fixed prompt and held-out
perplexity (and the max |logit| difference) go into export-report.json. At fp32 the greedy tokens must match and
the logits must agree within `FP32_LOGIT_TOL`; at int4/fp16 the graph is re-quantized: never reported as equal, it
carries its measured agreement and must pass the quality floor of `validate.requantized_problems`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lamda_edge.errors import ExportValidationError, ModelError, require
from lamda_edge.export.validate import quality_words, requantized_problems
from lamda_edge.runtime.decoder import held_out_ids, perplexity
from lamda_edge.runtime.generate import GenaiGenerator

FP32_LOGIT_TOL = 1e-3  # the builder fuses attention (GroupQueryAttention): looser than the plain export's 1e-4
GREEDY_PROMPT = "What is twelve times seven?"
GREEDY_TOKENS = 16


def build(merged_dir: Path, out: Path, precision: str = "int4", execution_provider: str = "cpu") -> float:
    """Run the onnxruntime-genai model builder on `merged_dir` into `out`; return the seconds it took."""
    require("onnxruntime_genai", "genai", package="onnxruntime-genai")
    cache = out / ".genai-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged_dir), "-o", str(out),
           "-p", precision, "-e", execution_provider, "-c", str(cache)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise ModelError(f"the onnxruntime-genai builder failed (exit {proc.returncode}) on {merged_dir}: {tail}\n"
                         f"command: {' '.join(cmd)}")
    return time.perf_counter() - t


def torch_greedy(model, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """transformers' greedy `generate` on `model` for prompt `ids`: the new tokens (eos included when hit)."""
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None,
                             pad_token_id=next(iter(sorted(eos)), 0), top_k=None, top_p=None, temperature=None)
    return out[0, len(ids):].tolist()


def build_and_validate(merged_dir: Path, out: Path, precision: str, execution_provider: str, reference, tokenizer,
                       text: str, report: dict, log=print) -> None:
    """Build the genai folder in `out` and fill report["genai"], report["sizes_bytes"], report["validation"]."""
    report["timings_s"]["genai_build"] = build(merged_dir, out, precision, execution_provider)
    gen = GenaiGenerator(out)
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.name.startswith(gen.onnx_file)}
    report["sizes_bytes"] = sizes
    log(f"built the onnxruntime-genai {precision} model ({sum(sizes.values()) / 1e6:.1f} MB) in "
        f"{report['timings_s']['genai_build']:.1f}s")
    if execution_provider != "cpu":
        report["validation"] = {"skipped": f"execution provider {execution_provider} is not checked on this machine",
                                "mismatches": []}
        report["ok"] = True
        return

    t = time.perf_counter()
    prompt_ids = gen.encode(GREEDY_PROMPT)
    want = torch_greedy(reference, prompt_ids, GREEDY_TOKENS, gen.eos)
    got = gen.generate("", max_new_tokens=GREEDY_TOKENS, prompt_ids=prompt_ids).token_ids
    same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    ids = held_out_ids(tokenizer, text, reference)
    with torch.no_grad():
        logits = reference(input_ids=ids).logits[0].numpy()  # (T, V)
    genai_logits = gen.full_logits(ids)
    diff = float(np.abs(genai_logits - logits).max())
    forced = gen.full_logits(np.array([prompt_ids + want]))[len(prompt_ids) - 1:-1].argmax(-1)  # teacher-forced
    agreement = float((forced == np.array(want)).mean()) if want else 1.0
    result = {"precision": precision, "graph": gen.onnx_file, "greedy_prompt": GREEDY_PROMPT,
              "greedy_tokens_pytorch": want, "greedy_tokens_genai": got, "greedy_match": want == got,
              "greedy_matching_prefix": same, "greedy_agreement_genai": agreement,
              "held_out_tokens": int(ids.shape[1]), "ppl_pytorch": perplexity(logits, ids[0].numpy()),
              "ppl_genai": perplexity(genai_logits, ids[0].numpy()), "max_abs_logit_diff": diff, "mismatches": []}
    words = quality_words(agreement, result["ppl_pytorch"], result["ppl_genai"])
    if precision == "fp32":
        result["tolerance"] = FP32_LOGIT_TOL
        if want != got:
            result["mismatches"].append(f"greedy tokens differ from step {same}: genai {got} vs PyTorch {want}")
        if not diff <= FP32_LOGIT_TOL:
            result["mismatches"].append(f"held-out logits max |diff| {diff:.3g} > tolerance {FP32_LOGIT_TOL:g}")
        state = "equal to" if not result["mismatches"] else "DIFFERS from"
        result["check"] = f"onnxruntime-genai's builder graph, {state} PyTorch (logits within {FP32_LOGIT_TOL:g})"
    else:  # re-quantized by the builder: never called equal, held to the quality floor
        result["mismatches"] += requantized_problems(f"{gen.onnx_file} (genai builder, {precision})",
                                                     result["ppl_pytorch"], result["ppl_genai"])
        result["check"] = (f"re-quantized by onnxruntime-genai's builder ({precision}), not equal to PyTorch by "
                           f"design: {words}")
    report["timings_s"]["validate"] = time.perf_counter() - t
    report["validation"] = result
    report["ok"] = not result["mismatches"]
    if result["mismatches"]:
        raise ExportValidationError("onnxruntime-genai disagrees with PyTorch:\n  "
                                    + "\n  ".join(result["mismatches"]))
    log(f"genai ({precision}) vs PyTorch: {words}, greedy run {'equal' if want == got else f'equal for {same} tokens'}"
        f", max |logit diff| {diff:.3g}")
