"""Generate from an exported GGUF file with a real llama.cpp build; compare greedy tokens with `lamda-edge generate`.

Usage:
    pip install llama-cpp-python        # builds llama.cpp from source (cmake, g++); not a lamda-edge dependency
    lamda-edge export --adapter runs/demo --output runs/demo-gguf --format gguf --gguf-type q8_0
    python tools/gguf_llamacpp.py --gguf runs/demo-gguf/model.q8_0.gguf --onnx runs/demo-onnx [--adapter runs/demo]
        [--json out.json]

For each prompt (the default job's task: its system prompt, a word problem): the chat prompt's token ids as
`lamda-edge generate` builds them (transformers' tokenizer and chat template from the ONNX export) and as llama.cpp
tokenizes the same text from the GGUF metadata; then greedy tokens (no repetition guard, stopped at end of turn or
--max-new-tokens) from llama.cpp on the same ids and from each ONNX graph given (`model.onnx` is the fp32 merged
model; `lamda-edge generate` runs `model.int8.onnx` / `model.int4.onnx` when the export has one) and, with
--adapter, from the merged PyTorch model (transformers' greedy `generate`). Prints one line per prompt and file, and
a summary: identical runs, and the mean length of the common prefix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = [
    "Sara has 5 bags with 8 apples in each bag. She eats 6 apples. How many apples does she have now?",
    "A train travels 60 km each hour for 3 hours, then 40 km in the next hour. How far did it travel?",
    "Tom buys 4 notebooks at 3 dollars each and a pen for 2 dollars. How much does he spend?",
    "A class has 28 students. 13 are girls. How many boys are in the class?",
    "Mia reads 12 pages a day. How many pages does she read in 2 weeks?",
]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def llama_cpp_greedy(llm, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """llama.cpp's greedy tokens after `ids` (end-of-turn included when hit) and its decode tokens/s."""
    out, t = [], time.perf_counter()
    llm.reset()
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token in eos or len(out) >= max_new_tokens:
            break
    return out, len(out) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, nargs="+", help="GGUF file(s) written by export --format gguf")
    parser.add_argument("--onnx", required=True, help="the same adapter's `lamda-edge export` folder")
    parser.add_argument("--onnx-files", nargs="+", default=["model.onnx", "model.int8.onnx"])
    parser.add_argument("--adapter", help="also compare with the merged PyTorch model of this adapter")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp and ONNX Runtime threads (on a loaded machine, 2 llama.cpp threads spin-wait)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from llama_cpp import Llama

    from lamda_edge.demo.task import SYSTEM_PROMPT
    from lamda_edge.runtime.generate import OnnxGenerator

    onnx_files = [name for name in args.onnx_files if (Path(args.onnx) / name).is_file()]
    gens = {name: OnnxGenerator(Path(args.onnx), name, threads=args.threads) for name in onnx_files}
    first = gens[onnx_files[0]]
    eos = set(first.eos)
    results = {"prompts": [], "gguf": args.gguf, "onnx": onnx_files, "max_new_tokens": args.max_new_tokens}
    onnx_tokens = {}
    for i, prompt in enumerate(PROMPTS):
        ids = first.encode(prompt, system=SYSTEM_PROMPT)
        for name, gen in gens.items():
            result = gen.generate("", max_new_tokens=args.max_new_tokens, prompt_ids=ids, stop=None)
            onnx_tokens[i, name] = (result.token_ids, result.tokens_per_s)
    if args.adapter:
        from lamda_edge.export.genai import torch_greedy
        from lamda_edge.export.merged import load_merged

        merged = load_merged(None, Path(args.adapter))[0]
        onnx_files.append("pytorch")
        for i, prompt in enumerate(PROMPTS):
            t = time.perf_counter()
            tokens = torch_greedy(merged, first.encode(prompt, system=SYSTEM_PROMPT), args.max_new_tokens, eos)
            onnx_tokens[i, "pytorch"] = (tokens, len(tokens) / (time.perf_counter() - t))
        del merged
    for path in args.gguf:
        llm = Llama(model_path=path, n_ctx=512, n_threads=args.threads, n_batch=512, verbose=False)
        for i, prompt in enumerate(PROMPTS):
            ids = first.encode(prompt, system=SYSTEM_PROMPT)
            text = first.tokenizer.decode(ids)
            cpp_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            got, speed = llama_cpp_greedy(llm, ids, args.max_new_tokens, eos)
            row = {"gguf": Path(path).name, "prompt": i, "prompt_tokens": len(ids), "same_prompt_ids": cpp_ids == ids,
                   "llama_cpp_tokens": got, "llama_cpp_text": first.tokenizer.decode(got, skip_special_tokens=True),
                   "llama_cpp_tokens_per_s": speed}
            for name in onnx_files:
                want, onnx_speed = onnx_tokens[i, name]
                row[name] = {"tokens": want, "identical": want == got, "common_prefix": common_prefix(want, got),
                             "tokens_per_s": onnx_speed}
            results["prompts"].append(row)
            print(f"{row['gguf']} prompt {i}: prompt ids {'equal' if row['same_prompt_ids'] else 'DIFFER'}; "
                  + "; ".join(f"vs {n}: {'identical' if row[n]['identical'] else 'differs'} "
                              f"(common prefix {row[n]['common_prefix']}/{len(got)})" for n in onnx_files)
                  + f"; llama.cpp {speed:.1f} tok/s: {row['llama_cpp_text'][:70]!r}", flush=True)
        del llm
    for path in args.gguf:
        rows = [r for r in results["prompts"] if r["gguf"] == Path(path).name]
        for name in onnx_files:
            same = sum(r[name]["identical"] for r in rows)
            prefix = sum(r[name]["common_prefix"] for r in rows) / len(rows)
            print(f"summary {Path(path).name} vs {name}: {same}/{len(rows)} identical, mean common prefix "
                  f"{prefix:.1f} tokens, prompt ids equal {sum(r['same_prompt_ids'] for r in rows)}/{len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
