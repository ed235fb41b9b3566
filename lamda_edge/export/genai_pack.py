"""`--format genai`: our own validated graph packaged for onnxruntime-genai (no second quantization).

    OUT/model.onnx | model.int4.onnx | model.int8.onnx   (the graph the export validated)
    OUT/genai_config.json   names that graph and its optimum input/output names (past_key_values.%d.key, ...)
    OUT/config.json, tokenizer files   copied from OUT/merged

`onnxruntime_genai.Model(OUT)` loads it; its greedy tokens are checked against `lamda-edge generate`'s loop over the
same graph (OnnxGenerator), and its perplexity against the plain session's. The builder route (the merged folder
re-exported and re-quantized by onnxruntime-genai's model builder) stays available as `genai_builder=True`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lamda_edge.errors import ExportValidationError, require
from lamda_edge.export.genai import torch_greedy
from lamda_edge.export.graph import kv_geometry
from lamda_edge.export.portable import copy_loader_files
from lamda_edge.runtime.decoder import held_out_ids, perplexity
from lamda_edge.runtime.generate import GenaiGenerator, OnnxGenerator

GREEDY_PROMPT = "What is twelve times seven?"
GREEDY_TOKENS = 16


def write_config(out: Path, onnx_file: str, config, generation: dict | None = None) -> dict:
    """Write OUT/genai_config.json for our decoder graph `onnx_file`; returns the config."""
    layers, kv_heads, head_dim = kv_geometry(config)
    generation = generation or {}

    def pick(key, default=None):
        value = generation.get(key, getattr(config, key, None))
        return default if value is None else value

    context = int(getattr(config, "max_position_embeddings", 4096))
    genai = {
        "model": {
            "bos_token_id": pick("bos_token_id", 0),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": onnx_file,
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": pick("eos_token_id", 0),
            "pad_token_id": pick("pad_token_id", pick("eos_token_id", 0)),
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False,  # our presents are past + new
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    (out / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
    return genai


def package_and_validate(out: Path, onnx_file: str, merged_dir: Path, reference, tokenizer, text: str,
                         report: dict, log=print) -> None:
    """Package `out/onnx_file` for onnxruntime-genai and check it against `lamda-edge generate` on the same graph
    (greedy tokens must be equal) and report it against the PyTorch `reference`; fills report["genai"]."""
    import torch

    require("onnxruntime_genai", "genai", package="onnxruntime-genai")
    t = time.perf_counter()
    copy_loader_files(merged_dir, out)
    generation = {}
    if (merged_dir / "generation_config.json").is_file():
        generation = json.loads((merged_dir / "generation_config.json").read_text())
    write_config(out, onnx_file, reference.config, generation)
    plain = OnnxGenerator(out, onnx_file)
    gen = GenaiGenerator(out)
    prompt_ids = gen.encode(GREEDY_PROMPT)
    want = plain.generate("", max_new_tokens=GREEDY_TOKENS, prompt_ids=prompt_ids).token_ids
    got = gen.generate("", max_new_tokens=GREEDY_TOKENS, prompt_ids=prompt_ids).token_ids
    same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    torch_tokens = torch_greedy(reference, prompt_ids, GREEDY_TOKENS, gen.eos)
    ids = held_out_ids(tokenizer, text)[:, :64]
    plain_logits, genai_logits = plain.decoder.full_logits(ids), gen.full_logits(ids)
    with torch.no_grad():
        torch_logits = reference(input_ids=ids).logits[0].float().numpy()
    diff = float(np.abs(genai_logits - plain_logits).max())
    result = {"graph": onnx_file, "greedy_prompt": GREEDY_PROMPT, "greedy_tokens_generate": want,
              "greedy_tokens_genai": got, "greedy_match": want == got, "greedy_matching_prefix": same,
              "greedy_tokens_pytorch": torch_tokens, "greedy_match_pytorch": torch_tokens == got,
              "held_out_tokens": int(ids.shape[1]), "ppl_onnx": perplexity(plain_logits, ids[0].numpy()),
              "ppl_genai": perplexity(genai_logits, ids[0].numpy()),
              "ppl_pytorch": perplexity(torch_logits, ids[0].numpy()), "max_abs_logit_diff_vs_onnx": diff,
              "max_abs_logit_diff": float(np.abs(genai_logits - torch_logits).max()), "mismatches": []}
    if want != got:
        result["mismatches"].append(f"onnxruntime-genai's greedy tokens differ from `lamda-edge generate`'s from "
                                    f"step {same}: {got} vs {want}")
    report["genai"] = result
    report["timings_s"]["genai_package"] = time.perf_counter() - t
    if result["mismatches"]:
        report["ok"] = False
        raise ExportValidationError("onnxruntime-genai disagrees with the validated graph:\n  "
                                    + "\n  ".join(result["mismatches"]))
    log(f"packaged {onnx_file} for onnxruntime-genai: greedy tokens equal `lamda-edge generate`'s, perplexity "
        f"{result['ppl_genai']:.3f} vs {result['ppl_onnx']:.3f}, max |logit diff| {diff:.3g}")
