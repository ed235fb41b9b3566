"""Load an export folder with the tools of the transformers-4 world and write down what they compute.

usage: python tools/check_old_transformers.py EXPORT_DIR OUT_DIR --ids 5,17,42
           [--prompt-ids 3,9 --new-tokens 8 --graph default --graph model.onnx --graph model.int4.onnx]

Runs in a separate environment with transformers 4.x and optimum-onnx (`pip install torch==2.13.0 optimum-onnx
onnxruntime` gives transformers 4.57, optimum 2.1, optimum-onnx 0.1; .ci/run builds one). It does not import
lamda-edge: it is what a user of those tools does with our output.

    EXPORT_DIR/merged  ──> AutoModelForCausalLM (fp32) on --ids ──> OUT_DIR/logits.npy (T, V)
                       ──> AutoTokenizer: ids of a fixed text, the chat template's output
    EXPORT_DIR         ──> optimum ORTModelForCausalLM.from_pretrained(EXPORT_DIR, file_name=GRAPH), greedy
                           generate after --prompt-ids ──> the new tokens per --graph ("default": no file_name)

OUT_DIR/result.json: {"transformers", "optimum_onnx", "rope_theta", "tokenizer_class", "text_ids" (of --text),
"chat_text", "optimum": {graph: [new token ids]}}. tests/test_ecosystem.py compares it with transformers 5 and
`lamda-edge generate`.
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

TEXT = "What is twelve times seven? It is 84.\n#### 84"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--ids", required=True, help="comma-separated token ids for the merged folder's logits")
    parser.add_argument("--prompt-ids", default="", help="comma-separated prompt ids for optimum's greedy tokens")
    parser.add_argument("--text", default=TEXT, help="text whose token ids are written down")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--graph", action="append", default=[],
                        help="graph file to load with optimum ('default': let optimum pick); none: skip optimum")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = args.export_dir / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[int(i) for i in args.ids.split(",")]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].numpy()  # (T, V)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.save(args.out_dir / "logits.npy", logits)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    chat = None
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    result = {"transformers": version("transformers"), "optimum_onnx": version("optimum-onnx"),
              "rope_theta": getattr(model.config, "rope_theta", None),
              "tokenizer_class": type(tokenizer).__name__,
              "text_ids": tokenizer(args.text, add_special_tokens=False)["input_ids"], "chat_text": chat}

    if args.graph:
        result["optimum"] = optimum_greedy(args.export_dir, args.graph, args.prompt_ids, args.new_tokens)
    (args.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def optimum_greedy(folder: Path, graphs: list[str], prompt_ids: str, new_tokens: int) -> dict:
    """{graph: optimum's greedy new tokens after the prompt}, each graph loaded from the folder as it is."""
    from optimum.onnxruntime import ORTModelForCausalLM

    tokens = {}
    prompt = torch.tensor([[int(i) for i in prompt_ids.split(",")]])
    for graph in graphs:
        kwargs = {} if graph == "default" else {"file_name": graph}
        ort_model = ORTModelForCausalLM.from_pretrained(folder, **kwargs)  # the folder as written
        out = ort_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens)
        tokens[graph] = out[0, prompt.shape[1]:].tolist()
    return tokens


if __name__ == "__main__":
    main()
