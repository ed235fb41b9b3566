"""Where one training step's time goes: lamda-edge's step against a PEFT LoRA step, by kind of work (issue 13).

One optimizer step (forward, backward, AdamW) of the default model (SmolLM2-135M) on one batch of the default
job's sequences, under torch.profiler, after `--warmup` unprofiled steps. LaMDA is profiled after t_i (B wholly
frozen, only S trains), the state of 70% of a run. Each method runs in its own process; they take turns.

The profile's self times are put into buckets by the op and its input shapes:

    bucket          ops
    --------------  -------------------------------------------------------------------------------------------
    base linears    matmuls whose smallest dimension is larger than the adapter rank (the frozen weights, fwd+bwd)
    adapter         matmuls with a dimension equal to the rank (x A^T, S, B and their backward), dropout masks
    head + loss     the output head's matmuls (a dimension equal to the vocabulary) and the cross-entropy
    attention       scaled_dot_product_attention and its backward, masks
    optimizer       AdamW's foreach ops
    copies/casts    copy_, to, contiguous, cat
    other           everything else (norms, activations, adds, embedding, ...)

Each turn also times one fp32 matmul of the base's largest shape (1024 x 576 @ 576 x 1536) in its own process:
the CPU's matmul limit that the step's matmul GFLOP per second are compared with (fp32: the precision `train`
picks on a CPU without native bf16).

    PYTHONPATH=. .venv/bin/python tools/profile_train_step.py --threads 1
    PYTHONPATH=. .venv/bin/python tools/profile_train_step.py --methods lamda --top 25   # the top ops too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_speed import METHODS, REPO, TARGETS  # noqa: E402  (the benchmark's methods, targets, sys.path)

BUCKETS = ("base linears", "adapter", "head + loss", "attention", "optimizer", "copies/casts", "other")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def bucket(name: str, shapes: list, rank: int, vocab: int) -> str:
    """The bucket of one profiled op from its name and input shapes."""
    dims = {d for s in shapes if isinstance(s, (list, tuple)) for d in s}
    if "scaled_dot_product" in name or "attention" in name or "flash" in name:
        return "attention"
    if "cross_entropy" in name or "log_softmax" in name or "nll_loss" in name:
        return "head + loss"
    if name in MATMULS:
        if vocab in dims:
            return "head + loss"
        if rank in dims:
            return "adapter"
        return "base linears"
    if "_foreach" in name or "adam" in name.lower():
        return "optimizer"
    if "bernoulli" in name or "rand" in name or "dropout" in name:
        return "adapter"
    if name in {"aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::cat", "aten::clone"}:
        return "copies/casts"
    return "other"


def worker(method: str, batch: int, seq: int, rank: int, warmup: int, top: int) -> dict:
    """Profile one step of `method` in this process; returns seconds per bucket and the top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_edge.demo.default_model import default_model_path
    from lamda_edge.demo.task import make_task
    from lamda_edge.load.device import resolve_precision
    from lamda_edge.train.data import PackingCollator, PaddingCollator

    precision = resolve_precision("auto", torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model_dir = default_model_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = list(make_task(tokenizer, n_train=batch, n_eval=1, seq_len=seq).train)
    torch.manual_seed(0)
    if method.startswith("lamda"):
        from lamda_edge import LaMDAConfig, lamda_layers, load_lamda_model
        from lamda_edge.planner.memory import DEFAULT_CHUNK_ROWS
        from lamda_edge.train.trainer import LossModel

        lm = load_lamda_model(model_dir, LaMDAConfig(rank=rank), quantize=None, device="cpu",
                              compute_dtype=dtype, progress=False, gradient_checkpointing=False)
        for _, layer in lamda_layers(lm):
            layer.freeze_b_columns(layer.rank)  # after t_i: only S trains
        model = LossModel(lm, DEFAULT_CHUNK_ROWS)
        collator = PackingCollator() if method == "lamda-packed" else PaddingCollator.for_tokenizer(tokenizer)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                          task_type="CAUSAL_LM"))
        collator = PaddingCollator.for_tokenizer(tokenizer)
    model.train()
    inputs = collator(examples)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(**inputs)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from lamda_edge.train.packed_attention import packed_attention

    with packed_attention(model, enabled=method == "lamda-packed"):  # what `train` does with packing
        for _ in range(warmup):
            step()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
    wall = time.perf_counter() - start
    vocab = model_config_vocab(model)
    seconds, ops, flops = defaultdict(float), [], 0
    for event in prof.key_averages(group_by_input_shape=True):
        flops += matmul_flops(event.key, list(event.input_shapes or [])) * event.count
        if event.self_cpu_time_total <= 0:
            continue
        kind = bucket(event.key, list(event.input_shapes or []), rank, vocab)
        seconds[kind] += event.self_cpu_time_total / 1e6
        ops.append((event.self_cpu_time_total / 1e6, event.key, str(event.input_shapes)[:90], event.count, kind))
    ops.sort(reverse=True)
    tokens = int(inputs["attention_mask"].sum()) if inputs.get("attention_mask") is not None \
        else int(inputs["input_ids"].numel())
    return {"method": method, "wall_s": wall, "seconds": dict(seconds), "tokens": tokens, "matmul_flops": flops,
            "precision": precision,
            "threads": torch.get_num_threads(), "rows": list(inputs["input_ids"].shape), "top": ops[:top]}


def matmul_limit(m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 20) -> dict:
    """GFLOP/s of this CPU's fp32 matmul at the base's largest shape (SmolLM2's MLP, 1024 rows), median of repeats."""
    import statistics

    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return {"method": "matmul", "gflops": 2 * m * k * n / statistics.median(times[2:]) / 1e9,
            "threads": torch.get_num_threads()}


def matmul_flops(name: str, shapes: list) -> int:
    """2 m k n of one mm / addmm / bmm call from its input shapes (0 for any other op)."""
    if name == "aten::addmm" and len(shapes) >= 3:
        shapes = shapes[1:]  # the bias first
    if name not in ("aten::mm", "aten::addmm", "aten::bmm") or len(shapes) < 2 or not shapes[0] or not shapes[1]:
        return 0
    (*batch, m, k), n = shapes[0], shapes[1][-1]
    return 2 * m * k * n * (batch[0] if batch else 1)


def model_config_vocab(model) -> int:
    """The vocabulary size of a (wrapped) transformers model."""
    for obj in (model, getattr(model, "lm", None)):
        config = getattr(obj, "config", None)
        if config is not None and getattr(config, "vocab_size", None):
            return int(config.vocab_size)
    raise SystemExit("no vocab_size on the model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    ap.add_argument("--repeats", type=int, default=1, help="turns of every method")
    ap.add_argument("--top", type=int, default=0, help="also print this many top ops per method")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker:
        job = json.loads(opts.worker)
        print(json.dumps(matmul_limit() if job["method"] == "matmul" else worker(**job)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results, limits = [], []
    for _ in range(opts.repeats):
        for method in [*opts.methods, "matmul"]:
            job = dict(method=method, batch=opts.batch, seq=opts.seq, rank=opts.rank, warmup=opts.warmup,
                       top=opts.top)
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                  text=True, env=env, cwd=str(REPO))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1])
            result["load"] = os.getloadavg()[0]
            if method == "matmul":
                limits.append(result["gflops"])
                continue
            results.append(result)
            print(f"{method}: step {result['wall_s']:.2f} s under the profiler (load {result['load']:.1f})",
                  file=sys.stderr, flush=True)
    header = " | ".join(BUCKETS)
    print(f"| method | step s | tokens | matmul GFLOP | {header} |\n|---|---:|---:|---:|" + "---:|" * len(BUCKETS))
    for r in results:
        cells = " | ".join(f"{r['seconds'].get(b, 0.0):.2f}" for b in BUCKETS)
        print(f"| {r['method']} (load {r['load']:.1f}) | {r['wall_s']:.2f} | {r['tokens']} | "
              f"{r['matmul_flops'] / 1e9:.1f} | {cells} |")
    print(f"\nbatch {opts.batch} x seq <= {opts.seq}, rank {opts.rank}, {results[0]['precision']}, "
          f"{results[0]['threads']} thread(s); seconds of self CPU time per bucket (under the profiler); matmul "
          "GFLOP: 2 m k n over every mm/addmm/bmm of the step (attention kernels not counted)")
    print("fp32 matmul limit (1024 x 576 @ 576 x 1536, median of 20, each turn): "
          + ", ".join(f"{g:.1f}" for g in limits) + " GFLOP/s")
    for r in results:
        if r["top"]:
            print(f"\n{r['method']}: top ops (self s, op, input shapes, calls, bucket)")
            for s, name, shapes, count, kind in r["top"]:
                print(f"  {s:7.3f}  {name:32s} {count:5d}  {kind:13s} {shapes}")
    if opts.out:
        Path(opts.out).write_text(json.dumps({"options": vars(opts), "results": results, "matmul_gflops": limits},
                                             indent=1))


if __name__ == "__main__":
    main()
