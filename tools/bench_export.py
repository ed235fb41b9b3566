"""Benchmark: decode tokens/s of the exported model on CPU (ONNX Runtime fp32 / int4, onnxruntime-genai int4)
against PyTorch eager `generate`, and file sizes. A benchmark, not a test.

usage:
    .venv/bin/python tools/bench_export.py [--model DIR] [--work DIR] [--new-tokens 64] [--repeats 3]
                                           [--threads 2] [--out bench-export.md] [--skip-genai]
    .venv/bin/python tools/bench_export.py --adapter RUN [...]      # every low-bit variant of a trained adapter

With --adapter (issue 11): PyTorch eager (merged fp32, and the adapter model as trained: NF4 base or not) against
ONNX Runtime fp32, int4 merged round-to-nearest (the behaviour before issue 11), int4 as trained (`--int4-method
nf4`: MatMulBnb4 residual + fp32 LaMDA path), int4 MatMulNBits residual + LaMDA path (`nbits`), and int8
(MatMulNBits bits=8 residual + LaMDA path); held-out perplexity of each on the built-in paragraph (or --eval-text).

--model defaults to the built-in SmolLM2-135M-Instruct folder (`lamda_edge.demo.default_model.default_model_path()`,
Q4_1-round-tripped weights). The model is exported as it is (no adapter: the merged model of a trained adapter has
the same shapes and cost). Every engine decodes the same chat prompt greedily for exactly --new-tokens tokens
(end-of-sequence ignored); decode tokens/s counts the tokens after the first over the time after the prefill; the
engines take turns --repeats times (so changes in machine load hit them alike) and the table shows the median.
Writes a markdown table to --out (its published copy is the Export section of docs/benchmarks.md) and the raw
numbers to <work>/bench-export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

PROMPT = "Explain in two sentences why the sky is blue."


def _mb(n: int) -> float:
    return n / 1e6


class TorchEngine:
    """PyTorch eager fp32 greedy `generate`: decode tokens/s from the time of N tokens minus the time of 1."""

    label = "PyTorch eager fp32 (transformers generate)"

    def __init__(self, folder: Path, prompt_ids: list[int]):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.ids = torch.tensor([prompt_ids])

    def _generate(self, n: int) -> float:
        t = time.perf_counter()
        with self.torch.no_grad():
            self.model.generate(self.ids, attention_mask=self.torch.ones_like(self.ids), do_sample=False,
                                max_new_tokens=n, min_new_tokens=n, top_k=None, top_p=None, temperature=None,
                                pad_token_id=self.model.config.eos_token_id)
        return time.perf_counter() - t

    def run(self, new_tokens: int) -> tuple[float, float]:
        first = self._generate(1)
        return first, (new_tokens - 1) / (self._generate(new_tokens) - first)


class AdapterEngine(TorchEngine):
    """PyTorch eager `generate` on the adapter model as training held it (LaMDA layers unmerged, NF4 or not)."""

    def __init__(self, model, prompt_ids: list[int], label: str):
        import torch

        self.torch, self.model, self.label = torch, model, label
        self.ids = torch.tensor([prompt_ids])


class OrtEngine:
    """A `lamda_edge.runtime.generate` generator (plain ONNX or onnxruntime-genai), end-of-sequence ignored."""

    def __init__(self, gen, label: str, prompt_ids: list[int]):
        self.gen, self.label, self.prompt_ids = gen, label, prompt_ids

    def run(self, new_tokens: int) -> tuple[float, float]:
        result = self.gen.generate("", max_new_tokens=new_tokens, prompt_ids=self.prompt_ids, ignore_eos=True)
        assert len(result.token_ids) == new_tokens, (self.label, len(result.token_ids))
        return result.prefill_s, result.tokens_per_s


def measure(engines: list, new_tokens: int, repeats: int) -> list[dict]:
    """Round-robin over the engines `repeats` times (so load changes hit them alike); median and best of each."""
    for engine in engines:
        engine.run(4)  # warm-up
    runs = {engine.label: [] for engine in engines}
    for _ in range(repeats):
        for engine in engines:
            runs[engine.label].append(engine.run(new_tokens))
    rows = []
    for engine in engines:
        speeds = sorted(r[1] for r in runs[engine.label])
        rows.append({"engine": engine.label, "prefill_s": statistics.median(r[0] for r in runs[engine.label]),
                     "tokens_per_s": statistics.median(speeds), "best_tokens_per_s": speeds[-1], "runs": speeds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="transformers folder (default: the built-in SmolLM2-135M)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lamda-edge-bench-export"), help="scratch folder")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads for every engine (1 is fairer on a loaded machine: PyTorch's OpenMP "
                        "threads stall on each other when the cores are oversubscribed)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench-export.md"))
    parser.add_argument("--skip-genai", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse exports already in --work")
    parser.add_argument("--adapter", type=Path, help="a trained adapter: measure every low-bit variant of it")
    parser.add_argument("--eval-text", type=Path, help="held-out text for perplexity (--adapter)")
    args = parser.parse_args()
    if args.adapter is not None:
        return adapter_variants(args)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from lamda_edge.export.pipeline import ExportOptions, export
    from lamda_edge.runtime.generate import GenaiGenerator, OnnxGenerator

    if args.model is None:
        from lamda_edge.demo.default_model import default_model_path

        args.model = default_model_path()
    onnx_dir, genai_dir = args.work / "onnx", args.work / "genai-int4"
    reports = {}
    for name, folder, opts in (("onnx", onnx_dir, dict(int4=True, block_size=args.block_size)),
                               ("genai", genai_dir, dict(format="genai", precision="int4"))):
        if name == "genai" and args.skip_genai:
            continue
        if not (args.reuse and (folder / "export-report.json").is_file()):
            export(ExportOptions(output=folder, model=args.model, overwrite=True, **opts))
        reports[name] = json.loads((folder / "export-report.json").read_text())

    onnx_gen = OnnxGenerator(onnx_dir, "model.onnx", threads=args.threads)
    prompt_ids = onnx_gen.encode(PROMPT)
    engines = [TorchEngine(onnx_dir / "merged", prompt_ids),
               OrtEngine(onnx_gen, "ONNX Runtime fp32 (model.onnx)", prompt_ids),
               OrtEngine(OnnxGenerator(onnx_dir, "model.int4.onnx", threads=args.threads),
                         f"ONNX Runtime int4 (model.int4.onnx, block {args.block_size})", prompt_ids)]
    if "genai" in reports:
        engines.append(OrtEngine(GenaiGenerator(genai_dir, threads=args.threads),
                                 "onnxruntime-genai int4 (builder -p int4)", prompt_ids))
    rows = measure(engines, args.new_tokens, args.repeats)
    sizes = {
        rows[0]["engine"]: sum(p.stat().st_size for p in (onnx_dir / "merged").glob("*.safetensors")),
        rows[1]["engine"]: reports["onnx"]["sizes_bytes"]["model.onnx"],
        rows[2]["engine"]: reports["onnx"]["sizes_bytes"]["model.int4.onnx"],
    }
    if "genai" in reports:
        sizes[rows[3]["engine"]] = sum(reports["genai"]["sizes_bytes"].values())
    eager, fp32_size = rows[0]["tokens_per_s"], sizes[rows[1]["engine"]]
    int4 = reports["onnx"]["int4"]
    ppl = {rows[0]["engine"]: int4["ppl_pytorch"], rows[1]["engine"]: int4["ppl_onnx"],
           rows[2]["engine"]: int4["ppl_int4"]}
    if "genai" in reports:
        ppl[rows[3]["engine"]] = reports["genai"]["validation"]["ppl_genai"]

    import onnxruntime

    lines = [
        "# Export benchmark: decode speed and size on CPU",
        "",
        f"Model: `{args.model.name}` (SmolLM2-135M-Instruct, Q4_1-round-tripped weights when it is the built-in "
        f"default), exported with `lamda-edge export` (no adapter). Greedy decoding of one chat prompt "
        f"({len(prompt_ids)} prompt tokens), exactly {args.new_tokens} new tokens, {args.threads} "
        f"thread{'s' if args.threads != 1 else ''} per engine, "
        f"median of {args.repeats} turns. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (shared with other jobs while "
        "measured: expect noise). Held-out perplexity on the built-in paragraph "
        f"({reports['onnx']['int4']['held_out_tokens']} tokens). Command: `.venv/bin/python tools/bench_export.py`.",
        "",
        "| engine | decode tokens/s (median) | best | x PyTorch eager | prefill ms | size MB | x fp32 ONNX size "
        "| held-out ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        size = sizes[row["engine"]]
        lines.append(f"| {row['engine']} | {row['tokens_per_s']:.1f} | {row['best_tokens_per_s']:.1f} | "
                     f"{row['tokens_per_s'] / eager:.2f} | "
                     f"{row['prefill_s'] * 1e3:.0f} | {_mb(size):.1f} | {size / fp32_size:.2f} | "
                     f"{ppl[row['engine']]:.3f} |")
    target_speed = rows[2]["tokens_per_s"] / eager
    target_size = sizes[rows[2]["engine"]] / fp32_size
    lines += [
        "",
        f"Targets (issue 6): int4 >= 2x PyTorch eager tokens/s: {target_speed:.2f}x "
        f"({'met' if target_speed >= 2 else 'NOT met'}); int4 <= 0.3x the fp32 ONNX size: {target_size:.2f}x "
        f"({'met' if target_size <= 0.3 else 'NOT met'}).",
        "",
        f"Versions: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
        f"{reports.get('genai', {}).get('versions', {}).get('onnxruntime-genai')}. fp32 ONNX vs PyTorch max |logit "
        f"diff| {reports['onnx']['validation']['max_abs_diff']['logits']:.2e}; the plain int4 graph quantizes every "
        "MatMul (MatMulNBits) and the token embedding (GatherBlockQuantized).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    (args.work / "bench-export.json").write_text(json.dumps({"rows": rows, "sizes_bytes": sizes, "perplexity": ppl},
                                                        indent=2) + "\n")
    print("\n".join(lines))


def adapter_variants(args) -> None:
    """--adapter: build every low-bit graph of the adapter next to one export, then time and score them all."""
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    from lamda_edge.export import graph as onnx_graph
    from lamda_edge.export import nf4
    from lamda_edge.export.merged import load_adapted
    from lamda_edge.export.pipeline import HELD_OUT_TEXT, ExportOptions, export
    from lamda_edge.export.quantize import quantize_int4
    from lamda_edge.runtime.decoder import OnnxDecoder, held_out_ids, perplexity
    from lamda_edge.runtime.generate import OnnxGenerator
    from lamda_edge.runtime.session import session

    folder = args.work / "onnx"
    if not (args.reuse and (folder / "export-report.json").is_file()):  # model.onnx + model.int4.onnx (as trained)
        export(ExportOptions(output=folder, adapter=args.adapter, int4=True, int4_method="nf4", overwrite=True,
                             eval_text=args.eval_text))
    report = json.loads((folder / "export-report.json").read_text())
    files = {"fp32": "model.onnx", "int4-nf4": "model.int4.onnx", "int4-merged": "model.int4-merged.onnx",
             "int4-nbits": "model.int4-nbits.onnx", "int8": "model.int8.onnx"}
    pytorch, _, cfg = load_adapted(None, args.adapter)
    if not (args.reuse and all((folder / f).is_file() for f in files.values())):
        quantize_int4(folder / "model.onnx", folder / files["int4-merged"], args.block_size)
        variants = {"nf4": files["int4-nf4"], "int4": files["int4-nbits"], "int8": files["int8"]}
        if (folder / files["int4-nf4"]).is_file():  # the export's own as-trained graph
            del variants["nf4"]
        nf4.write_variants(pytorch, "decoder", folder, variants, args.block_size)
    labels = {"fp32": "ONNX Runtime fp32 (model.onnx, merged)",
              "int4-merged": f"ONNX Runtime int4 merged round-to-nearest (MatMulNBits block {args.block_size})",
              "int4-nf4": "ONNX Runtime int4 as trained (MatMulBnb4 NF4 residual + LaMDA path)",
              "int4-nbits": f"ONNX Runtime int4 residual (MatMulNBits block {args.block_size}) + LaMDA path",
              "int8": f"ONNX Runtime int8 residual (MatMulNBits bits=8 block {args.block_size}) + LaMDA path"}
    gens = {k: OnnxGenerator(folder, f, threads=args.threads) for k, f in files.items()}
    prompt_ids = gens["fp32"].encode(PROMPT)
    quant = cfg.get("quantize") or "full-precision"
    engines = [TorchEngine(folder / "merged", prompt_ids),
               AdapterEngine(pytorch, prompt_ids, f"PyTorch eager adapter as trained ({quant} base, unmerged)")]
    engines += [OrtEngine(gens[k], labels[k], prompt_ids) for k in files]
    rows = measure(engines, args.new_tokens, args.repeats)
    text = args.eval_text.read_text() if args.eval_text else HELD_OUT_TEXT
    ids = held_out_ids(gens["fp32"].tokenizer, text, pytorch)
    with torch.no_grad():
        ppl_torch = perplexity(pytorch(input_ids=ids).logits[0].float().numpy(), ids[0].numpy())
    ppl = {rows[0]["engine"]: report["int4"]["ppl_onnx"], rows[1]["engine"]: ppl_torch}
    sizes = {rows[0]["engine"]: sum(p.stat().st_size for p in (folder / "merged").glob("*.safetensors")),
             rows[1]["engine"]: None}
    for key, row in zip(files, rows[2:]):
        logits = OnnxDecoder(session(folder / files[key], args.threads)).full_logits(ids)
        ppl[row["engine"]] = perplexity(logits, ids[0].numpy())
        sizes[row["engine"]] = sum(p.stat().st_size for p in onnx_graph.onnx_files(folder, files[key]))
    eager, fp32_size = rows[0]["tokens_per_s"], sizes[rows[2]["engine"]]
    lines = [
        "| engine | decode tokens/s (median) | runs | x PyTorch eager (merged) | prefill ms | size MB "
        "| x fp32 ONNX size | held-out ppl | ppl vs PyTorch adapter |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        size = sizes[row["engine"]]
        size_txt = (f"{_mb(size):.1f} | {size / fp32_size:.2f}" if size else "- | -")
        lines.append(f"| {row['engine']} | {row['tokens_per_s']:.1f} | {' '.join(f'{r:.1f}' for r in row['runs'])} | "
                     f"{row['tokens_per_s'] / eager:.2f} | {row['prefill_s'] * 1e3:.0f} | {size_txt} | "
                     f"{ppl[row['engine']]:.3f} | {100 * (ppl[row['engine']] / ppl_torch - 1):+.2f}% |")
    lines += ["", f"Adapter {args.adapter} ({quant} base); {len(prompt_ids)} prompt tokens, {args.new_tokens} new, "
              f"{args.threads} thread(s), median of {args.repeats} turns (A B C ... repeated); held-out "
              f"{ids.shape[1]} tokens; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; "
              f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    (args.work / "bench-export-adapter.json").write_text(json.dumps(
        {"rows": rows, "sizes_bytes": sizes, "perplexity": ppl, "ppl_pytorch_adapter": ppl_torch,
         "parity_int4": report["int4"].get("parity", {}).get("max_abs_diff"),
         "loadavg": os.getloadavg()}, indent=2, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
