"""Validate the planner's memory model against real training steps on this machine.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python tools/validate_planner.py [--out docs/planner-accuracy.md] [--quick]
        [--no-offload]
    OMP_NUM_THREADS=1 .venv/bin/python tools/validate_planner.py --peft [--peft-1b]   # PEFT LoRA / QLoRA rows

Runs a grid of configurations (tiny and small Llama-shaped models built from configs with random weights;
batch, seq_len, rank, gradient checkpointing on/off, NF4 on/off, fp32/bf16, chunked or full loss). For each,
it predicts the tensor peak with `lamda_edge.planner.memory.estimate` and measures it with
`lamda_edge.planner.measure.measure` (on CPU: `LiveTensorCounter`, exact live tensor bytes; on CUDA: the
allocator's peak), then writes the table with the median and worst absolute error to its section of the
markdown file (the page's other sections, the frontier and the GPU run, stay).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from lamda_edge.planner.measure import measure
from lamda_edge.planner.memory import TrainSetup, estimate
from lamda_edge.planner.profiles import ModelShape

MODELS = {
    "tiny (h64, L2, V256)": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256),
    "small (h128, L4, V512)": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "wide-vocab (h192, L3, V4096)": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                                         num_attention_heads=6, num_key_value_heads=2, vocab_size=4096),
}

# (model, batch, seq_len, rank, quantize, checkpointing, dtype, chunk_rows, padded[, activation offload]); padded
# rows carry an attention mask (one pad token: the fullest padded batch, the case a plan must cover)
GRID = [
    ("tiny (h64, L2, V256)", 2, 32, 4, None, True, "fp32", 256, True),
    ("tiny (h64, L2, V256)", 2, 32, 4, None, False, "fp32", 256, False),
    ("tiny (h64, L2, V256)", 2, 32, 4, "nf4", True, "fp32", 256, True),
    ("tiny (h64, L2, V256)", 4, 64, 8, None, True, "fp32", None, False),
    ("tiny (h64, L2, V256)", 4, 64, 8, "nf4", False, "bf16", 64, True),
    ("small (h128, L4, V512)", 2, 64, 4, None, True, "fp32", 256, False),
    ("small (h128, L4, V512)", 4, 128, 8, "nf4", True, "fp32", 256, True),
    ("small (h128, L4, V512)", 4, 128, 8, "nf4", False, "fp32", 256, False),
    ("small (h128, L4, V512)", 4, 128, 8, "nf4", True, "bf16", 256, True),
    ("small (h128, L4, V512)", 4, 128, 8, None, False, "bf16", 256, False),
    ("small (h128, L4, V512)", 8, 64, 16, None, True, "bf16", 128, True),
    ("small (h128, L4, V512)", 2, 256, 8, "nf4", True, "fp32", None, False),
    ("small (h128, L4, V512)", 8, 128, 4, None, False, "fp32", 256, True),
    ("small (h128, L4, V512)", 1, 512, 8, "nf4", True, "bf16", 256, False),
    ("wide-vocab (h192, L3, V4096)", 2, 64, 8, None, True, "fp32", 64, True),
    ("wide-vocab (h192, L3, V4096)", 2, 64, 8, None, True, "fp32", None, False),
    ("wide-vocab (h192, L3, V4096)", 4, 128, 8, "nf4", True, "bf16", 256, True),
    ("wide-vocab (h192, L3, V4096)", 4, 128, 16, "nf4", False, "bf16", 256, False),
    ("wide-vocab (h192, L3, V4096)", 4, 64, 8, None, False, "fp32", None, True),
    ("wide-vocab (h192, L3, V4096)", 8, 64, 4, "nf4", True, "fp32", 128, False),
    ("wide-vocab (h192, L3, V4096)", 2, 256, 8, "nf4", True, "bf16", 512, True),
    ("wide-vocab (h192, L3, V4096)", 1, 256, 8, None, False, "bf16", 256, False),
]
# activation offload (lamda_edge/train/offload.py): the device peak, host copies not counted (issue 16)
OFFLOAD_GRID = [
    ("small (h128, L4, V512)", 4, 128, 8, None, True, "fp32", 256, True, True),
    ("small (h128, L4, V512)", 4, 128, 8, "nf4", True, "bf16", 256, False, True),
    ("wide-vocab (h192, L3, V4096)", 2, 256, 8, None, True, "bf16", 128, True, True),
    ("wide-vocab (h192, L3, V4096)", 4, 64, 8, None, False, "fp32", 256, False, True),
]

# PEFT LoRA / QLoRA as PEFT's defaults run them (issue 27): (model, batch, seq_len, rank, quantize, checkpointing,
# checkpoint_layers, dtype, chunk_rows, padded); catalogue names are random weights of that shape. Every method gets
# lamda-edge's chunked loss (the same loss as the LaMDA rows), so the adapter is what differs.
PEFT_GRID = [
    ("tiny (h64, L2, V256)", 2, 64, 4, None, True, None, "fp32", 256, False),
    ("small (h128, L4, V512)", 4, 128, 8, None, True, None, "fp32", 256, True),
    ("small (h128, L4, V512)", 4, 128, 8, "nf4", True, None, "fp32", 256, True),
    ("small (h128, L4, V512)", 4, 128, 8, None, False, None, "fp32", 256, False),
    ("small (h128, L4, V512)", 4, 128, 8, "nf4", False, None, "bf16", 256, True),
    ("small (h128, L4, V512)", 4, 128, 8, "nf4", True, 2, "bf16", 256, False),
    ("small (h128, L4, V512)", 4, 128, 8, None, True, None, "bf16", 256, True),
    ("small (h128, L4, V512)", 8, 64, 16, "nf4", True, None, "bf16", 128, True),
    ("wide-vocab (h192, L3, V4096)", 4, 128, 16, "nf4", True, 1, "fp32", 256, False),
    ("wide-vocab (h192, L3, V4096)", 2, 256, 8, None, False, None, "bf16", None, True),
    ("smollm2-135m", 2, 128, 16, "nf4", True, None, "bf16", 256, True),
    ("smollm2-135m", 2, 128, 16, "nf4", True, 10, "bf16", 256, False),
    ("smollm2-135m", 1, 256, 16, "nf4", False, None, "fp32", 256, False),
    ("smollm2-135m", 2, 128, 16, None, True, None, "fp32", 256, True),
]
# the 1B shape (llama-3.2-1b, random weights): minutes per row on this CPU, behind --peft-1b
PEFT_GRID_1B = [("llama-3.2-1b", 1, 128, 16, "nf4", True, None, "bf16", 256, False),
                ("llama-3.2-1b", 1, 128, 16, "nf4", True, 8, "bf16", 256, False)]


def shape_of(name: str) -> ModelShape:
    if name not in MODELS:
        from lamda_edge.planner.profiles import get_model

        return get_model(name)
    kw = MODELS[name]
    return ModelShape(name=name, architecture="decoder", head_dim=kw["hidden_size"] // kw["num_attention_heads"],
                      tie_word_embeddings=True, **kw)


def run(grid) -> list[dict]:
    rows = []
    for model, batch, seq, rank, quant, ckpt, dtype, chunk, padded, *rest in grid:
        offload = bool(rest and rest[0])
        setup = TrainSetup(batch_size=batch, seq_len=seq, rank=rank, quantize=quant, gradient_checkpointing=ckpt,
                           compute_dtype=dtype, chunk_rows=chunk, padding_mask=padded, activation_offload=offload)
        est = estimate(shape_of(model), setup)
        t0 = time.perf_counter()
        got = measure(shape_of(model), setup, steps=2)
        meas = got["measured_tensor_peak_bytes"]
        rows.append(dict(model=model, batch=batch, seq=seq, rank=rank, quant=quant or "none", ckpt=ckpt, dtype=dtype,
                         chunk=chunk or "full", padded=padded, offload=offload,
                         host=got.get("measured_host_offload_bytes"),
                         predicted_host=est.host_offload_bytes, predicted=est.tensor_peak_bytes, measured=meas,
                         phase=est.peak_phase, error=(est.tensor_peak_bytes - meas) / meas, by=got["measured_by"],
                         seconds=time.perf_counter() - t0))
        r = rows[-1]
        print(f"{model:<30} b{batch:<2} T{seq:<4} r{rank:<2} {r['quant']:<4} ckpt={ckpt!s:<5} {dtype} "
              f"chunk={r['chunk']!s:<4} pad={padded!s:<5} offload={offload!s:<5} pred {r['predicted']:>10} "
              f"meas {meas:>10} "
              f"err {r['error']:+.1%}", flush=True)
    return rows


def run_peft(grid) -> list[dict]:
    """Predict and measure each PEFT LoRA / QLoRA row (one warm-up step, the peak over the next)."""
    import _bench_common as bc
    import torch
    from transformers import LlamaForCausalLM

    from lamda_edge.planner.measure import llama_config

    rows = []
    for model, batch, seq, rank, quant, ckpt, layers, dtype, chunk, padded in grid:
        setup = TrainSetup(batch_size=batch, seq_len=seq, rank=rank, quantize=quant, gradient_checkpointing=ckpt,
                           checkpoint_layers=layers, compute_dtype=dtype, chunk_rows=chunk, padding_mask=padded,
                           method="lora")
        shape = shape_of(model)
        est = estimate(shape, setup)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        built = LlamaForCausalLM(llama_config(shape)).to(bc.DTYPES[dtype])
        built = bc.peft_lora(built, rank, quant, bc.DTYPES[dtype], "cpu", ckpt, layers)
        got = measure(shape, setup, steps=2, device="cpu", model=built)
        del built
        meas = got["measured_tensor_peak_bytes"]
        blocks = shape.num_blocks
        rows.append(dict(model=model, method="QLoRA" if quant else "LoRA", batch=batch, seq=seq, rank=rank,
                         ckpt=("off" if not ckpt else f"{layers} of {blocks}" if layers else "on"), dtype=dtype,
                         chunk=chunk or "full", padded=padded, predicted=est.tensor_peak_bytes, measured=meas,
                         phase=est.peak_phase, error=(est.tensor_peak_bytes - meas) / meas, by=got["measured_by"],
                         seconds=time.perf_counter() - t0))
        r = rows[-1]
        print(f"{model:<30} {r['method']:<5} b{batch:<2} T{seq:<4} r{rank:<2} ckpt={r['ckpt']:<8} {dtype} "
              f"chunk={r['chunk']!s:<4} pad={padded!s:<5} pred {r['predicted']:>11} meas {meas:>11} "
              f"err {r['error']:+.1%}", flush=True)
    return rows


def write_peft(rows: list[dict], out: Path, command: str) -> None:
    """The PEFT section of `out` (`<!-- BEGIN peft-grid -->`); the page's other sections stay."""
    import peft
    import torch
    from _doc_sections import replace_section

    errs = [abs(r["error"]) for r in rows]
    lines = [
        "## CPU: PEFT LoRA and QLoRA, predicted vs measured tensor peak (issue 27)",
        "",
        "Generated by `tools/validate_planner.py --peft`; do not edit by hand. The planner prices PEFT LoRA and",
        "QLoRA for `plan`'s comparison (`TrainSetup(method=\"lora\")`; NF4 base = QLoRA). Each row runs real steps of",
        "PEFT with its defaults (`LoraConfig(r, alpha=2r, dropout=0)` on all linear layers, fp32 adapters; QLoRA:",
        "bitsandbytes NF4 `Linear4bit` + `prepare_model_for_kbit_training`, whose fp32 upcast of the embeddings and",
        "norms makes every activation fp32), AdamW over A and B, and lamda-edge's chunked loss (the same loss as the",
        "LaMDA rows above). Partial checkpointing (`k of L`): only the lowest k blocks recompute, as the planner",
        "chooses it. Random weights of each shape (catalogue names: that catalogue shape); the peak is measured",
        "like the LaMDA rows (one warm-up step, then the peak of live tensor bytes over the next).",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch "
        f"{torch.__version__}, peft {peft.__version__}",
        f"- measured by: {rows[0]['by'] if rows else ''}",
        f"- configurations: {len(rows)}",
        f"- median |error|: **{statistics.median(errs):.1%}**, worst |error|: **{max(errs):.1%}** "
        "(targets: median <= 5%, worst <= 10%)",
        "",
        "| model | method | batch | seq_len | rank | ckpt | dtype | loss rows | padded | predicted (KiB) "
        "| measured (KiB) | error | peak phase |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['seq']} | {r['rank']} | {r['ckpt']} | "
                     f"{r['dtype']} | {r['chunk']} | {'yes' if r['padded'] else 'no'} | "
                     f"{r['predicted'] / 1024:,.1f} | {r['measured'] / 1024:,.1f} | {r['error']:+.1%} | "
                     f"{r['phase']} |")
    replace_section(out, "peft-grid", "\n".join(lines), title="Planner accuracy")


def write(rows: list[dict], out: Path, command: str) -> None:
    """The CPU grid's section of `out` (`<!-- BEGIN cpu-grid -->`); the page's other sections stay."""
    import torch
    from _doc_sections import replace_section

    errs = [abs(r["error"]) for r in rows]
    device = rows[0]["by"] if rows else ""
    cpu = platform.processor() or platform.machine()
    lines = [
        "## CPU: predicted vs measured tensor peak",
        "",
        "Generated by `tools/validate_planner.py`; do not edit by hand. Each row runs real LaMDA training steps",
        "(frozen base, LaMDA on all linear layers, AdamW, chunked or full loss from `lamda_edge.train.loss`) of a",
        "Llama-shaped model built from a config with random weights, after one warm-up step that creates the",
        "optimizer state. *Measured* is the peak of live tensor bytes over the next step, with weights, adapters,",
        "optimizer state and the batch counted; *predicted* is `planner.memory.estimate` (first-principles terms,",
        "not fitted to this grid). Error = (predicted - measured) / measured. Offload rows run the forward under",
        "`lamda_edge.train.offload.ActivationOffload`: its host copies are not counted as device memory (as on a",
        "GPU), each copy brought back for backward is; *host* is the offloaded bytes' peak, measured / predicted.",
        "",
        f"- command: `{command}`",
        f"- machine: {cpu}, {os.cpu_count()} CPU threads, torch {torch.__version__}, {platform.platform()}",
        f"- measured by: {device}",
        f"- configurations: {len(rows)} ({sum(r['offload'] for r in rows)} with activation offload)",
        f"- median |error|: **{statistics.median(errs):.1%}**, worst |error|: **{max(errs):.1%}** "
        "(targets: median <= 5%, worst <= 10%)",
        "",
        "| model | batch | seq_len | rank | base | ckpt | dtype | loss rows | padded | offload | predicted (KiB) "
        "| measured (KiB) | error | peak phase | host KiB (meas / pred) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        host = f"{r['host'] / 1024:,.1f} / {r['predicted_host'] / 1024:,.1f}" if r["offload"] else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {r['rank']} | {r['quant']} | "
                     f"{'on' if r['ckpt'] else 'off'} | {r['dtype']} | {r['chunk']} | "
                     f"{'yes' if r['padded'] else 'no'} | {'on' if r['offload'] else 'off'} | "
                     f"{r['predicted'] / 1024:,.1f} | "
                     f"{r['measured'] / 1024:,.1f} | {r['error']:+.1%} | {r['phase']} | {host} |")
    lines += [
        "",
        "Not covered here: CUDA allocator rounding and caching (the device profiles' fragmentation margin) and",
        "the runtime's own memory (their runtime overhead): the GPU section below covers them once it has run.",
    ]
    replace_section(out, "cpu-grid", "\n".join(lines), title="Planner accuracy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/planner-accuracy.md")
    ap.add_argument("--quick", action="store_true", help="only the first 4 configurations")
    ap.add_argument("--no-offload", action="store_true", help="leave out the activation-offload rows")
    ap.add_argument("--peft", action="store_true",
                    help="only the PEFT LoRA / QLoRA grid (the planner's comparison), into its own section")
    ap.add_argument("--peft-1b", action="store_true", help="with --peft: add the 1B-shape rows (minutes each)")
    args = ap.parse_args(argv)
    if args.peft:
        rows = run_peft(PEFT_GRID + (PEFT_GRID_1B if args.peft_1b else []))
        write_peft(rows, Path(args.out), "OMP_NUM_THREADS=1 python tools/validate_planner.py --peft"
                   + (" --peft-1b" if args.peft_1b else ""))
        errs = sorted(abs(r["error"]) for r in rows)
        print(f"median |error| {statistics.median(errs):.1%}, worst {errs[-1]:.1%} -> {args.out}")
        return 0
    grid = (GRID[:4] if args.quick else GRID) + ([] if args.no_offload else OFFLOAD_GRID)
    rows = run(grid)
    flags = " --quick" if args.quick else ""
    write(rows, Path(args.out), f"OMP_NUM_THREADS=1 python tools/validate_planner.py{flags}"
          + (" --no-offload" if args.no_offload else ""))
    errs = sorted(abs(r["error"]) for r in rows)
    print(f"median |error| {statistics.median(errs):.1%}, worst {errs[-1]:.1%} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
