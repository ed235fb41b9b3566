"""The quality benchmark's LaMDA models, exported to ONNX (fp32 and int4) and measured on the same test split.

For each task (spam, moby, gsm; see tools/bench_quality.py) and seed:

    train LaMDA exactly as bench_quality does ──> save the adapter ──> lamda_edge.export.pipeline (--int4)
      └─> the task's metric on the same test split, four ways:
            adapter   PyTorch, LaMDA layers unmerged (the number bench_quality reports)
            merged    PyTorch, the merged transformers folder the export wrote (OUT/merged)
            fp32      ONNX Runtime, OUT/model.onnx
            int4      ONNX Runtime, OUT/model.int4.onnx (merged, then MatMulNBits round-to-nearest, block 32)
            int4-nf4  ONNX Runtime, the adapter unmerged, residual base NF4 (MatMulBnb4) + fp32 LaMDA path
            int4-nbits  the same with the residual as MatMulNBits int4;  int8: MatMulNBits bits=8

`--base` also exports the untrained base model of moby and gsm the same way (what int4 costs without training;
spam's base has no trained head, so it is skipped there). `--quantize nf4` trains LaMDA on an NF4 base (the
spectral residual in bitsandbytes NF4, as `lamda-edge train --quantize nf4` does) instead of bench_quality's
float32 base: "adapter" is then the PyTorch NF4 model, and int4-nf4 computes exactly that model.

Usage:
    .venv/bin/python tools/bench_exported.py --tasks spam moby gsm --seeds 0 --threads 1 --out exported.jsonl
    .venv/bin/python tools/bench_exported.py --tasks gsm spam moby --seeds 0 --threads 1 --quantize nf4 --out nf4.jsonl
    .venv/bin/python tools/bench_exported.py --quick --tasks spam      # smoke test (a minute or two)

Through ONNX Runtime, classification and perplexity call the graph like the PyTorch model; GSM answers come from
`lamda_edge.runtime.generate.OnnxGenerator` (greedy, one problem at a time, KV cache), stopped at end-of-turn
or once text follows the `#### n` line (as `lamda_edge.demo.task` stops them), after at most 112 new tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
import bench_quality as bq  # noqa: E402

BACKENDS = ("adapter", "merged", "fp32", "int4", "int4-nf4", "int4-nbits", "int8")
# issue 11's graphs, built from the adapter unmerged (lamda_edge.export.nf4.write_variants): the residual base as
# NF4 (MatMulBnb4) / MatMulNBits int4 / int8, the LaMDA path in fp32. "int4" stays the merged round-to-nearest graph.
VARIANT_FILES = {"int4-nf4": ("nf4", "model.int4-nf4.onnx"), "int4-nbits": ("int4", "model.int4-nbits.onnx"),
                 "int8": ("int8", "model.int8.onnx")}
METRICS = {"spam": "accuracy", "moby": "perplexity", "gsm": "exact_match"}
TASK_STEPS = {"gsm": 10}  # the published GSM runs use 10 steps (docs/benchmarks.md)


# ---- ONNX Runtime sessions called like the PyTorch models ---------------------------------------------------------


class OnnxClassifier:
    """An exported encoder classifier, called as `model(**encoded).logits` (B, num_labels)."""

    def __init__(self, sess):
        self.sess = sess
        self.names = [i.name for i in sess.get_inputs()]

    def eval(self):
        return self

    def __call__(self, **encoded):
        feeds = {n: encoded[n].numpy().astype(np.int64) for n in self.names}
        (logits,) = self.sess.run(["logits"], feeds)
        return SimpleNamespace(logits=torch.from_numpy(logits))


class OnnxCausalLM:
    """An exported decoder, called as `model(input_ids=ids).logits` (B, T, V) in one prefill."""

    def __init__(self, decoder):
        self.decoder = decoder

    def eval(self):
        return self

    def __call__(self, input_ids):
        logits, _ = self.decoder.step(input_ids.numpy(), self.decoder.empty_past(input_ids.shape[0]))
        return SimpleNamespace(logits=torch.from_numpy(logits))


def onnx_gsm(generator, tok, gsm, max_new_tokens: int = 112) -> dict:
    """bench_quality's GSM metrics (exact match, format rate, answer loss) with an exported decoder.

    Greedy answers come from `lamda_edge.runtime.generate.OnnxGenerator`, stopped at end-of-turn or, as
    `lamda_edge.demo.task` stops them, once text follows the `#### n` line (the answer is decided and out of format).
    """
    from lamda_edge.demo.task import PAST_FINAL_RE, in_format, is_correct, problem_messages

    def decided(new_ids: list[int]) -> bool:
        return bool(PAST_FINAL_RE.search(tok.decode(new_ids[-24:], skip_special_tokens=True)))

    correct = formatted = 0
    for problem in gsm.eval_problems:
        prompt = tok.apply_chat_template(problem_messages(problem["question"]), tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out = generator.generate("", max_new_tokens=max_new_tokens, prompt_ids=ids, stop=decided)
        text = tok.decode(out.token_ids, skip_special_tokens=True)
        correct += is_correct(text, problem, gsm.scorer)
        formatted += in_format(text, out.stopped_by == "eos")
    n = len(gsm.eval_problems)
    return {"metric": "exact_match", "value": correct / n, "format_rate": formatted / n,
            "answer_loss": onnx_answer_loss(generator.decoder, gsm.eval), "n_test": n}


def onnx_answer_loss(decoder, dataset) -> float:
    """Mean cross-entropy of the reference answers (labels != -100), teacher-forced, one prefill per example."""
    total, count = 0.0, 0
    for i in range(len(dataset)):
        item = dataset[i]
        logits = torch.from_numpy(decoder.full_logits(item["input_ids"]))[:-1]  # (T-1, V) predicting ids[1:]
        labels = item["labels"][1:]  # (T-1,), -100 outside the answer
        keep = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


def evaluate_onnx(task: str, path: Path, tok, test, s: dict, threads: int | None) -> dict:
    from lamda_edge.runtime.generate import OnnxDecoder, OnnxGenerator
    from lamda_edge.runtime.session import session

    if task == "gsm":
        return onnx_gsm(OnnxGenerator(path.parent, onnx_file=path.name, threads=threads), tok, test)
    sess = session(path, threads)
    if task == "spam":
        return bq.classify_accuracy(OnnxClassifier(sess), tok, test, s["seq_len"])
    return bq.block_perplexity(OnnxCausalLM(OnnxDecoder(sess)), test)


# ---- one task -------------------------------------------------------------------------------------------------------


def run_task(task: str, seed: int | None, s: dict, cache: Path, work: Path, threads: int | None,
             block_size: int = 32, quantize: str | None = None) -> dict:
    """Train (seed given; on an NF4 base with `quantize="nf4"`) or take the base model (seed None), export, and
    measure every backend."""
    from transformers import AutoTokenizer

    from lamda_edge.export import ExportOptions, export
    from lamda_edge.export.merged import load_reference

    t0 = time.perf_counter()
    name = (f"{task}-base" if seed is None else f"{task}-s{seed}") + f"-b{block_size}"
    if quantize:
        name += f"-{quantize}"
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    model_dir = bq.task_model_dir(task)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    _, test = bq.task_data(task, tok, s, cache, random.Random(0))
    result: dict = {"task": task, "seed": seed, "model": "base" if seed is None else "lamda", "steps": s["steps"],
                    "metric": METRICS[task], "block_size": block_size, "quantize": quantize}
    if seed is None:
        options = ExportOptions(output=folder / "onnx", model=model_dir, int4=True, block_size=block_size)
    else:
        trained = bq.run_one(task, "lamda", seed, s, cache, adapter_dir=folder / "adapter", quantize=quantize)
        result.update(rank=trained["rank"], trainable_end=trained["trainable_end"], adapter=_metric_fields(trained))
        _progress(name, "adapter", result["adapter"], t0)
        options = ExportOptions(output=folder / "onnx", adapter=folder / "adapter", int4=True, block_size=block_size,
                                int4_method="merged")
    t = time.perf_counter()
    report = export(options, log=lambda *_: None)
    result["export_seconds"] = time.perf_counter() - t
    result["fp32_max_abs_diff"] = report["validation"]["max_abs_diff"]["logits"]
    sizes = report["sizes_bytes"]
    result.update(fp32_bytes=sizes["model.onnx"], int4_bytes=sizes["model.int4.onnx"])

    merged = load_reference(folder / "onnx" / "merged")
    result["merged"] = _metric_fields(bq.evaluate(task, merged, tok, test, s))
    _progress(name, "merged", result["merged"], t0)
    del merged
    graphs = [("fp32", "model.onnx"), ("int4", "model.int4.onnx")]
    if seed is not None:
        from lamda_edge.export.merged import load_adapted
        from lamda_edge.export.nf4 import write_variants

        adapter_model, _, _ = load_adapted(None, folder / "adapter")
        kind = "encoder" if task == "spam" else "decoder"
        write_variants(adapter_model, kind, folder / "onnx", dict(VARIANT_FILES.values()), block_size)
        del adapter_model
        for backend, (_, file) in VARIANT_FILES.items():
            result[f"{backend}_bytes"] = (folder / "onnx" / file).stat().st_size
            graphs.append((backend, file))
    for backend, file in graphs:
        result[backend] = _metric_fields(evaluate_onnx(task, folder / "onnx" / file, tok, test, s, threads))
        _progress(name, backend, result[backend], t0)
    result["seconds"] = time.perf_counter() - t0
    return result


def _progress(run: str, backend: str, metrics: dict, t0: float) -> None:
    """One stderr line per measured backend, so a long run shows (and a killed one keeps) what it has measured."""
    print(f"[{run}] {backend}: {json.dumps(metrics)} at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _metric_fields(measured: dict) -> dict:
    return {k: measured[k] for k in ("value", "format_rate", "answer_loss") if k in measured}


# ---- report ---------------------------------------------------------------------------------------------------------


def _fmt(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric in ("accuracy", "exact_match") else f"{value:.2f}"


def _model(r: dict) -> str:
    """The model column: base, lamda (float32 base) or lamda-nf4 (trained on an NF4 base)."""
    return r["model"] + (f"-{r['quantize']}" if r.get("quantize") else "")


def table(results: list[dict]) -> str:
    lines = ["| task | model | seed | metric | " + " | ".join(BACKENDS) + " | fp32 max abs logit diff | int4 block | "
             "int4 MB (x fp32) | int4-nf4 / int4-nbits / int8 MB |",
             "|---|---|---:|---|" + "---:|" * len(BACKENDS) + "---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            continue
        metric = r["metric"]
        cells = [_fmt(metric, r[b]["value"]) if b in r else "-" for b in BACKENDS]
        lines.append(f"| {r['task']} | {_model(r)} | {'-' if r['seed'] is None else r['seed']} | {metric} | "
                     + " | ".join(cells) + f" | {r['fp32_max_abs_diff']:.2g} | {r.get('block_size', 32)} | "
                     f"{r['int4_bytes'] / 1e6:.1f} "
                     f"({r['int4_bytes'] / r['fp32_bytes']:.2f}) | "
                     + (" / ".join(f"{r[f'{b}_bytes'] / 1e6:.1f}" for b in VARIANT_FILES) if "int8_bytes" in r
                        else "-") + " |")
    gsm = [r for r in results if r.get("task") == "gsm" and "error" not in r]
    if gsm:
        lines += ["", "| GSM model | seed | int4 block | " + " | ".join(f"{b} format / answer loss" for b in BACKENDS)
                  + " |", "|---|---:|---:|" + "---|" * len(BACKENDS)]
        for r in gsm:
            cells = [f"{r[b]['format_rate']:.0%} / {r[b]['answer_loss']:.3f}" if b in r else "-" for b in BACKENDS]
            lines.append(f"| {_model(r)} | {'-' if r['seed'] is None else r['seed']} | {r.get('block_size', 32)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="bench_quality's tiny settings (a smoke test)")
    p.add_argument("--tasks", nargs="+", default=["spam", "moby", "gsm"], choices=sorted(bq.SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--base", action="store_true", help="also export and measure the untrained base (moby, gsm)")
    p.add_argument("--work", default=None, help="folder for adapters and exports (default: a temp folder)")
    p.add_argument("--block-size", type=int, default=32, help="int4 quantization block (the export's --block-size)")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none",
                   help="the base LaMDA trains on: none (float32, bench_quality's setting) or nf4")
    bc.add_record_arguments(p)
    a = p.parse_args(argv)
    if a.report:
        return bc.report(bc.read_results(a.report), table, a.markdown)
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-exported-"))
    mode = "quick" if a.quick else "full"
    print(json.dumps({"machine": bc.machine_info(), "mode": mode, "work": str(work)}), flush=True)
    jobs = [dict(task=t, seed=sd) for t in a.tasks for sd in a.seeds]
    if a.base and a.quantize == "none":  # the untrained base is the same whatever the adapter trains on
        jobs += [dict(task=t, seed=None) for t in a.tasks if t != "spam"]

    def one(task, seed):
        s = dict(bq.SETTINGS[task][mode])
        if not a.quick and task in TASK_STEPS:
            s["steps"] = TASK_STEPS[task]
        return run_task(task, seed, s, Path(a.cache), work, a.threads or None, a.block_size,
                        None if a.quantize == "none" else a.quantize)

    return bc.run_jobs(jobs, one, mode, a.out, a.markdown, table)


if __name__ == "__main__":
    sys.exit(main())
