"""`export --format gguf`: write the GGUF file, read it back with transformers' GGUF loader, check it, add a Modelfile.

    merged model ──gguf_file.write_gguf──> OUT/model.<type>.gguf ──transformers (gguf_file=, the folder alone)──>
        model + tokenizer read back ──> held-out logits, perplexity, greedy tokens, tokenization vs the merged model
    OUT/Modelfile (export/modelfile.py): `ollama create NAME -f Modelfile`

The checks (report["validation"], `mismatches` lists every failure):
- f16: the file holds the merged weights rounded to float16, so its logits are compared with the merged model's at
  those same weights: within `F16_LOGIT_TOL`. The difference from the fp32 merged model is reported beside it.
- q8_0: held-out perplexity within `Q8_PPL_REL` of the fp32 merged model's.
- q4_0: re-quantized, never called equal: held to the quality floor of `validate.requantized_problems`.
- every type: the tokenizer read from the file encodes the held-out text and a chat prompt to the same ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from pathlib import Path

import numpy as np
import torch

from lamda_edge.errors import ExportValidationError
from lamda_edge.export.genai import GREEDY_PROMPT, GREEDY_TOKENS, torch_greedy
from lamda_edge.export.gguf_file import write_gguf
from lamda_edge.export.modelfile import MODELFILE, write_modelfile
from lamda_edge.export.validate import quality_words, requantized_problems
from lamda_edge.runtime.decoder import held_out_ids, perplexity

F16_LOGIT_TOL = 1e-3  # max |logit diff| of the read-back file vs the merged model at float16-rounded weights
Q8_PPL_REL = 0.01  # |ppl_gguf / ppl_pytorch - 1| for q8_0


def gguf_name(gguf_type: str) -> str:
    return f"model.{gguf_type}.gguf"


def read_back(path: Path):
    """(model, tokenizer) that transformers builds from the GGUF file at `path` alone (quietly)."""
    import transformers
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
            folder, name = str(Path(path).parent), Path(path).name
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), tokenizer


def float16_rounded(model):
    """A copy of `model` whose weights went through float16 and back (what an f16 GGUF file stores)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    return rounded


def logits_of(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].numpy()  # (T, V)


def tokenizer_problems(tokenizer, gguf_tokenizer, text: str) -> list[str]:
    """Where the tokenizer read from the file encodes differently from the merged model's."""
    problems = []
    cases = {"held-out text": text}
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": GREEDY_PROMPT}]
        cases["chat prompt"] = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not getattr(gguf_tokenizer, "chat_template", None):
            problems.append("the file's tokenizer has no chat template")
        elif gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) != cases[
                "chat prompt"]:
            problems.append("the file's chat template renders a prompt differently")
    for what, value in cases.items():
        want, got = tokenizer(value)["input_ids"], gguf_tokenizer(value)["input_ids"]
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            problems.append(f"the file's tokenizer encodes the {what} differently from token {at}")
    return problems


def validate_gguf(path: Path, gguf_type: str, reference, tokenizer, text: str) -> dict:
    """Read `path` back with transformers and check it against the merged `reference` (see module doc)."""
    model, gguf_tokenizer = read_back(path)
    ids = held_out_ids(tokenizer, text, reference)  # (1, T)
    want, got = logits_of(reference, ids), logits_of(model, ids)
    prompt = tokenizer(GREEDY_PROMPT, add_special_tokens=False)["input_ids"]
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    greedy_want, greedy_got = (torch_greedy(m, prompt, GREEDY_TOKENS, eos) for m in (reference, model))
    forced = logits_of(model, torch.tensor([prompt + greedy_want]))[len(prompt) - 1:-1].argmax(-1)  # teacher-forced
    agreement = float((forced == np.array(greedy_want)).mean()) if greedy_want else 1.0
    result = {"precision": gguf_type, "graph": Path(path).name, "reader": "transformers (gguf_file=)",
              "held_out_tokens": int(ids.shape[1]), "max_abs_logit_diff": float(np.abs(got - want).max()),
              "ppl_pytorch": perplexity(want, ids[0].numpy()), "ppl_gguf": perplexity(got, ids[0].numpy()),
              "greedy_prompt": GREEDY_PROMPT, "greedy_tokens_pytorch": greedy_want, "greedy_tokens_gguf": greedy_got,
              "greedy_match": greedy_want == greedy_got, "greedy_agreement_gguf": agreement,
              "mismatches": tokenizer_problems(tokenizer, gguf_tokenizer, text)}
    words = quality_words(agreement, result["ppl_pytorch"], result["ppl_gguf"])
    if gguf_type == "f16":
        diff = float(np.abs(got - logits_of(float16_rounded(reference), ids)).max())
        result.update(max_abs_logit_diff_f16_weights=diff, tolerance=F16_LOGIT_TOL)
        if not diff <= F16_LOGIT_TOL:
            result["mismatches"].append(f"logits differ from the merged model at float16 weights by {diff:.3g} > "
                                        f"{F16_LOGIT_TOL:g}")
        result["check"] = (f"read back by transformers: {'equal to' if not result['mismatches'] else 'DIFFERS from'}"
                           f" the merged model at float16 weights (max |logit diff| {diff:.3g} <= {F16_LOGIT_TOL:g}; "
                           f"{result['max_abs_logit_diff']:.3g} vs fp32)")
    elif gguf_type == "q8_0":
        rel = result["ppl_gguf"] / result["ppl_pytorch"] - 1
        result.update(rel_ppl_diff=rel, tolerance=Q8_PPL_REL)
        if not abs(rel) <= Q8_PPL_REL:
            result["mismatches"].append(f"q8_0 held-out perplexity {result['ppl_gguf']:.3f} is {rel:+.2%} from "
                                        f"PyTorch's {result['ppl_pytorch']:.3f} (bar {Q8_PPL_REL:.0%})")
        result["check"] = f"read back by transformers, Q8_0 blocks: perplexity {rel:+.2%} of PyTorch's; {words}"
    else:
        result["mismatches"] += requantized_problems(f"{Path(path).name} (Q4_0)", result["ppl_pytorch"],
                                                     result["ppl_gguf"])
        result["check"] = f"read back by transformers, re-quantized to Q4_0 (not equal by design): {words}"
    return result


def build_and_validate(reference, merged_dir: Path, tokenizer, text: str, out: Path, gguf_type: str, name: str,
                       report: dict, log=print, stage=lambda name: None) -> None:
    """Write OUT/model.<type>.gguf and OUT/Modelfile, check the file; fill report["gguf"], ["validation"], ...

    Raises:
        ModelError: the model's family, rotary embedding or tokenizer cannot go into a GGUF file.
        ExportValidationError: the file read back disagrees with the merged model (report["validation"] says how).
    """
    timings = report["timings_s"]
    path = out / gguf_name(gguf_type)
    stage(f"writing {path.name}")
    t = time.perf_counter()
    report["gguf"] = write_gguf(reference, merged_dir, tokenizer, path, gguf_type, name)
    report["gguf"]["modelfile"] = write_modelfile(out / MODELFILE, path.name, tokenizer)
    timings["gguf"] = time.perf_counter() - t
    report["sizes_bytes"] = {path.name: report["gguf"]["size_bytes"]}
    types = ", ".join(f"{n} {k}" for k, n in report["gguf"]["tensor_types"].items())
    log(f"wrote {path.name} ({report['gguf']['size_bytes'] / 1e6:.1f} MB: {types}) and Modelfile "
        f"in {timings['gguf']:.1f}s")

    stage("reading the GGUF file back with transformers")
    t = time.perf_counter()
    result = validate_gguf(path, gguf_type, reference, tokenizer, text)
    timings["validate"] = time.perf_counter() - t
    report["validation"] = result
    report["ok"] = not result["mismatches"]
    if result["mismatches"]:
        raise ExportValidationError(f"the GGUF file read back disagrees with the merged model in "
                                    f"{len(result['mismatches'])} check(s):\n  " + "\n  ".join(result["mismatches"]))
    log(f"{path.name}: {result['check']}")
