"""Memory and speed of one training step: PEFT LoRA / LoRA-FA / QLoRA against lamda-edge LaMDA, side by side.

Usage:
    .venv/bin/python tools/bench_memory.py --quick                       # tiny Llama only, 1 round (a minute)
    .venv/bin/python tools/bench_memory.py --models smollm2 tiny --rounds 2 --steps 3 \
        --out bench-memory.json --markdown bench-memory.md               # the published numbers
    .venv/bin/python tools/bench_memory.py --device cuda --models smollm2 llama-1b-shape

Every (model, stack, method) runs in its own process (`--worker`), and the methods run in alternating order
over `--rounds` rounds, so slow drift of a shared machine does not favour one method. Each worker builds the model
(same model, batch, seq_len, rank, dtype and optimizer for every method), runs one warm-up step (creates the
optimizer state), then one step whose peak is counted, then `--steps` timed steps.

What is reported per method:
  trainable    parameters that require a gradient (LaMDA after t_i: exactly the sum of r^2)
  weights      bytes of the model's tensors (parameters, buffers, bitsandbytes quantization constants)
  optimizer    bytes of the optimizer state after the warm-up step
  step peak    the peak of live tensor bytes during one full training step (forward, loss, backward, optimizer
               step), above the resident bytes (weights + optimizer state + batch). On CPU counted exactly by
               `lamda_edge.planner.live_tensors.LiveTensorCounter`; on CUDA `torch.cuda.max_memory_allocated` minus
               `torch.cuda.memory_allocated` before the step.
  step time    median seconds of the timed steps (all rounds pooled); on a shared CPU these are noisy.

Stacks:
  (a) identical settings for all methods: plain cross-entropy (the model's own loss), non-reentrant gradient
      checkpointing on, the same compute dtype. This isolates the adapter.
  (b) each tool's recommended settings: lamda-edge with its chunked loss (`lamda_edge.train.loss`, 256 rows) and
      checkpointing; PEFT as its docs set it up (`get_peft_model` alone for a float base, i.e. no checkpointing;
      `prepare_model_for_kbit_training` with its default checkpointing for QLoRA), plain loss.
  (c) (optional, `--stacks c`) identical settings with lamda-edge's chunked loss for every method, so that the
      adapter's own memory shows once the logits no longer make the peak.
  (d) (optional, `--stacks d`; issue 27) where the adapter's kept activations show: the chunked loss for every
      method, no checkpointing ("none") and partial checkpointing ("partial": the lowest k blocks recompute). The
      partial k is the planner's choice under one budget for all: LaMDA before t_i's predicted tensor peak with
      half of the blocks checkpointed; each NF4 method (LaMDA before/after t_i, QLoRA) gets the fewest blocks whose
      predicted peak (`planner.memory.estimate`, its method) stays within it. The float-base methods (LoRA,
      LoRA-FA; 3x the weights) checkpoint LaMDA's k. Also reported: *kept*, the live bytes after forward + loss
      above the resident ones (what waits for backward).

Usage of (d): --stacks d --methods lamda-b lamda-s qlora lora lorafa --models smollm2 llama-1b-shape
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

METHODS = ("qlora", "lamda-s", "lamda-b", "lamda++", "lora", "lorafa")  # the reference first
LAMDA_ALL = ("lamda-b", "lamda-s", "lamda++")
# model name -> (batch_size, seq_len, rank)
DEFAULTS = {"smollm2": (4, 256, 16), "tiny": (4, 256, 8), "llama-1b-shape": (4, 512, 16)}
LABELS = {
    "lora": "PEFT LoRA (float base)",
    "lorafa": "PEFT LoRA-FA (float base)",
    "qlora": "PEFT QLoRA (NF4 base)",
    "lamda-b": "LaMDA before t_i (S+B, NF4 residual base)",
    "lamda-s": "LaMDA after t_i (S only, NF4 residual base)",
    "lamda++": "LaMDA++ before t_i (S+B, NF4 residual base)",
}


def model_dir(name: str, cache: Path) -> Path:
    if name == "smollm2":
        from lamda_edge.demo.default_model import default_model_path

        return default_model_path(progress=False)
    if name == "tiny":
        return bc.tiny_llama_dir(cache)
    if name == "llama-1b-shape":  # Llama-3.2-1B's shape with random weights (memory depends on shapes only)
        shape = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256}
        return _random_llama_dir(cache, "llama-1b-shape", **shape)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--models: {name!r} is not smollm2, tiny, llama-1b-shape or a local model folder")
    return path


def _random_llama_dir(cache: Path, name: str, **shape) -> Path:
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = cache / name
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=True, **shape)
    tmp = cache / f".tmp-{name}-{os.getpid()}"
    LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)
    return folder


# ---- one method in one process ------------------------------------------------------------------------------------


def worker(args: dict) -> dict:
    from lamda_edge.planner.live_tensors import LiveTensorCounter, register_bytes

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    device = args["device"]
    ours = args["method"].startswith("lamda")
    stack_b = args["stack"] == "b"
    chunk_rows = 256 if (stack_b and ours) or args["stack"] in ("c", "d") else None
    layers = args.get("checkpoint_layers")  # stack (d): 0 = no checkpointing, k = the lowest k blocks
    built = bc.build(args["method"], Path(args["model_dir"]), args["rank"], lr=1e-4,
                     compute_dtype=args["compute_dtype"], checkpointing=layers != 0, device=device,
                     peft_defaults=stack_b and not ours, seed=args["seed"])
    model = built.model
    if layers:
        from lamda_edge.load.loader import checkpointed_blocks

        for block in checkpointed_blocks(model)[layers:]:
            block.gradient_checkpointing = False
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(args["seed"])
    ids = torch.randint(0, vocab, (args["batch_size"], args["seq_len"]), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    bc.train_step(built, batch, chunk_rows, 0)  # warm-up: creates the optimizer state
    gc.collect()
    counter = LiveTensorCounter()
    weights = register_bytes(counter, model)
    optimizer_bytes = register_bytes(counter, built.optimizer)
    batch_bytes = register_bytes(counter, batch)
    resident = counter.current_bytes
    kept = None
    if args["stack"] == "d" and not device.startswith("cuda"):  # what waits for backward after forward + loss
        from lamda_edge.train.loss import causal_lm_loss

        counter.reset_peak()
        with counter:
            loss = causal_lm_loss(model, batch, chunk_rows=chunk_rows)
            kept = counter.current_bytes - resident
        loss.backward()
        del loss
        built.optimizer.zero_grad(set_to_none=True)
        gc.collect()
    if device.startswith("cuda"):
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        bc.train_step(built, batch, chunk_rows, 1)
        sync()
        peak_above, how = torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    else:
        counter.reset_peak()
        with counter:
            bc.train_step(built, batch, chunk_rows, 1)
        peak_above, how = counter.peak_bytes - resident, "LiveTensorCounter"
    times, losses = [], []
    for step in range(args["steps"]):
        sync()
        t0 = time.perf_counter()
        losses.append(bc.train_step(built, batch, chunk_rows, 2 + step))
        sync()
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {
        "model": args["model"], "method": args["method"], "stack": args["stack"], "device": device,
        "batch_size": args["batch_size"], "seq_len": args["seq_len"], "rank": args["rank"],
        "compute_dtype": args["compute_dtype"], "chunked_loss": chunk_rows is not None,
        "checkpointing": _checkpointing_on(model),
        "trainable_params": trainable, "weights_bytes": weights, "optimizer_bytes": optimizer_bytes,
        "batch_bytes": batch_bytes, "resident_bytes": resident, "step_peak_above_bytes": int(peak_above),
        "measured_by": how, "step_seconds": times, "losses": losses,
        "variant": args.get("variant"), "checkpoint_layers": layers, "num_blocks": len(_blocks(model)),
        "kept_bytes": kept,
        "budget_bytes": args.get("budget_bytes"), "predicted_bytes": args.get("predicted_bytes"),
    }
    if "sum_r2" in built.info:
        out["sum_r2"] = built.info["sum_r2"]
        out["ranks"] = sorted(set(built.info["ranks"].values()))
    return out


def _blocks(model) -> list:
    from lamda_edge.load.loader import checkpointed_blocks

    return checkpointed_blocks(model)


# ---- stack (d): the planner's checkpointing choice ------------------------------------------------------------------

D_VARIANTS = ("none", "partial")
NF4_METHODS = ("lamda-b", "lamda-s", "lamda++", "qlora")


def _priced(method: str, setup):
    """`setup` as the planner prices `method` (LoRA-FA is priced as LoRA: the planner does not model it)."""
    from dataclasses import replace

    if method.startswith("lamda"):
        return replace(setup, quantize="nf4", b_trainable=method != "lamda-s")
    return replace(setup, method="lora", quantize="nf4" if method == "qlora" else None)


def planner_layers(folder: Path, methods, batch: int, seq: int, rank: int, dtype: str) -> dict:
    """Stack (d)'s partial checkpointing: {method: (k, predicted tensor peak, budget)} under one budget."""
    from dataclasses import replace

    from lamda_edge.planner.memory import TrainSetup, estimate
    from lamda_edge.planner.profiles import get_model

    shape = get_model(str(folder))
    L = shape.num_blocks
    base = TrainSetup(batch_size=batch, seq_len=seq, rank=rank, compute_dtype=dtype, padding_mask=False)

    def peak(method, k):
        s = replace(base, gradient_checkpointing=k > 0, checkpoint_layers=k or None)
        return estimate(shape, _priced(method, s)).tensor_peak_bytes

    budget = peak("lamda-b", L // 2)
    ours = next(k for k in range(L + 1) if peak("lamda-b", k) <= budget)
    out = {}
    for m in methods:
        k = next((k for k in range(L + 1) if peak(m, k) <= budget), L) if m in NF4_METHODS else ours
        out[m] = (k, peak(m, k), budget)
    return out


# ---- the driver ---------------------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> list[dict]:
    """Pool the rounds: one row per (model, stack, method); memory must agree across rounds."""
    rows: dict[tuple, dict] = {}
    for r in results:
        if "error" in r:
            continue
        key = (r["model"], r["stack"], r.get("variant"), r["method"])
        row = rows.setdefault(key, {**r, "step_seconds": [], "peaks": set()})
        row["step_seconds"] = row["step_seconds"] + r["step_seconds"]
        row["peaks"].add(r["step_peak_above_bytes"])
    out = []
    for row in rows.values():
        row["median_step_s"] = statistics.median(row["step_seconds"]) if row["step_seconds"] else None
        row["peak_varies"] = len(row.pop("peaks")) > 1
        out.append(row)
    for row in out:
        ref = next((o for o in out if o["model"] == row["model"] and o["stack"] == row["stack"]
                    and o.get("variant") == row.get("variant") and o["method"] == "qlora"), None)
        row["peak_vs_qlora"] = row["step_peak_above_bytes"] / ref["step_peak_above_bytes"] if ref else None
        row["kept_vs_qlora"] = (row["kept_bytes"] / ref["kept_bytes"]
                                if ref and ref.get("kept_bytes") and row.get("kept_bytes") is not None else None)
        row["time_vs_qlora"] = (row["median_step_s"] / ref["median_step_s"]
                                if ref and ref["median_step_s"] and row["median_step_s"] else None)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda o: (o["model"], o["stack"], o.get("variant") or "", order.get(o["method"], 99)))


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown_d(rows: list[dict]) -> list[str]:
    """Stack (d)'s tables: one per model and checkpointing variant."""
    lines = []
    for (model, variant) in dict.fromkeys((r["model"], r["variant"]) for r in rows):
        part = [r for r in rows if r["model"] == model and r["variant"] == variant]
        r0 = part[0]
        budget = r0.get("budget_bytes")
        how = ("no checkpointing" if variant == "none" else
               f"partial checkpointing at the planner's choice, budget {bc.mib(budget)} MiB of tensors")
        lines += [f"### {model}, stack (d), {variant}: chunked loss for all, {how}", "",
                  f"batch {r0['batch_size']} x seq_len {r0['seq_len']}, rank {r0['rank']}, {r0['compute_dtype']} "
                  f"compute, {r0['device']}, peak by {r0['measured_by']}", "",
                  "| method | blocks checkpointed | kept after forward MiB | kept / QLoRA | step peak above resident "
                  "MiB | step peak MiB | predicted MiB | median step s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in part:
            total = r["resident_bytes"] + r["step_peak_above_bytes"]
            step = "n/a" if r["median_step_s"] is None else f"{r['median_step_s']:.2f}"
            lines.append(
                f"| {LABELS.get(r['method'], r['method'])} | {r['checkpoint_layers']} of {r['num_blocks']} | "
                f"{bc.mib(r['kept_bytes'])} | {_ratio(r['kept_vs_qlora'])} | {bc.mib(r['step_peak_above_bytes'])}"
                f"{' (varies)' if r['peak_varies'] else ''} | {bc.mib(total)} | {bc.mib(r.get('predicted_bytes'))} | "
                f"{step} |")
        lines.append("")
    return lines


def markdown(rows: list[dict], errors: list[dict]) -> str:
    lines = markdown_d([r for r in rows if r["stack"] == "d"])
    rows = [r for r in rows if r["stack"] != "d"]
    for (model, stack) in dict.fromkeys((r["model"], r["stack"]) for r in rows):
        part = [r for r in rows if r["model"] == model and r["stack"] == stack]
        r0 = part[0]
        title = {"a": "identical settings (plain loss, checkpointing for all)",
                 "b": "recommended settings (ours: chunked loss + checkpointing; PEFT: its defaults)",
                 "c": "identical settings with lamda-edge's chunked loss for all (checkpointing for all)"}[stack]
        lines += [f"### {model}, stack ({stack}): {title}", "",
                  f"batch {r0['batch_size']} x seq_len {r0['seq_len']}, rank {r0['rank']}, {r0['compute_dtype']} "
                  f"compute, {r0['device']}, peak by {r0['measured_by']}", "",
                  "| method | trainable | weights MiB | optimizer MiB | step peak above resident MiB | "
                  "peak / QLoRA | median step s | time / QLoRA | ckpt | chunked loss |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in part:
            trainable = f"{r['trainable_params']:,}"
            if r["method"] == "lamda-s":
                ok = "= sum r^2" if r["trainable_params"] == r.get("sum_r2") else f"!= sum r^2 ({r.get('sum_r2')})"
                trainable += f" ({ok})"
            step = "n/a" if r["median_step_s"] is None else f"{r['median_step_s']:.2f}"
            lines.append(
                f"| {LABELS.get(r['method'], r['method'])} | {trainable} | {bc.mib(r['weights_bytes'])} | "
                f"{bc.mib(r['optimizer_bytes'])} | {bc.mib(r['step_peak_above_bytes'])}"
                f"{' (varies)' if r['peak_varies'] else ''} | {_ratio(r['peak_vs_qlora'])} | {step} | "
                f"{_ratio(r['time_vs_qlora'])} | {'yes' if r['checkpointing'] else 'no'} | "
                f"{'yes' if r['chunked_loss'] else 'no'} |")
        lines.append("")
    for e in errors:
        lines.append(f"- FAILED {e.get('model')} {e.get('method')}: {e['error'][-500:]}")
    return "\n".join(lines)


def _checkpointing_on(model) -> bool:
    """Whether activation checkpointing is on (transformers 5.24's name first: the old one warns)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny Llama only, 1 round, 1 timed step")
    p.add_argument("--models", nargs="+", default=["smollm2", "tiny"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--stacks", nargs="+", default=["a", "b"], choices=["a", "b", "c", "d"],
                   help="a: identical, plain loss; b: each tool's recommended; c: identical with the chunked loss; "
                   "d: chunked loss, no and partial checkpointing (the planner's choice)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--compute-dtype", default="fp32", choices=sorted(bc.DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch/OpenMP threads per worker (0 = torch's default); 1 is fairer on a loaded machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lamda-edge" / "bench"))
    p.add_argument("--out", default=None,
                   help="write all raw results and the machine info as JSON (and OUT.jsonl as workers finish)")
    p.add_argument("--markdown", default=None, help="write the tables as markdown")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if a.quick:
        a.models, a.rounds, a.steps = ["tiny"], 1, 1
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name in a.models:
        bs, sl, rank = DEFAULTS.get(name, (4, 256, 16))
        folder = model_dir(name, cache)
        for stack in a.stacks:
            common = {"model": name, "model_dir": str(folder), "stack": stack, "batch_size": a.batch_size or bs,
                      "seq_len": a.seq_len or sl, "rank": a.rank or rank, "steps": a.steps,
                      "compute_dtype": a.compute_dtype, "device": a.device, "threads": a.threads, "seed": a.seed}
            if stack != "d":
                jobs += [{**common, "method": method} for method in a.methods]
                continue
            choice = planner_layers(folder, a.methods, common["batch_size"], common["seq_len"], common["rank"],
                                    a.compute_dtype)
            for variant in D_VARIANTS:
                for method in a.methods:
                    k, predicted, budget = choice[method] if variant == "partial" else (0, None, None)
                    jobs.append({**common, "method": method, "stack": "d", "variant": variant,
                                 "checkpoint_layers": k, "predicted_bytes": predicted, "budget_bytes": budget})
    results = []
    t0 = time.time()
    for rnd in range(a.rounds):
        order = jobs if rnd % 2 == 0 else list(reversed(jobs))
        for job in order:
            res = bc.run_worker(Path(__file__), job)
            res["round"] = rnd
            results.append(res)
            if a.out:  # the raw record grows as workers finish: an interrupted run keeps what it measured
                with open(a.out + ".jsonl", "a") as fh:
                    fh.write(json.dumps(res) + "\n")
            brief = res.get("error", "")[-300:] or (
                f"peak+{bc.mib(res['step_peak_above_bytes'])} MiB, trainable {res['trainable_params']:,}, "
                f"steps {[round(s, 2) for s in res['step_seconds']]}")
            print(f"[{time.time() - t0:6.0f}s] round {rnd} {job['model']} ({job['stack']}{job.get('variant') or ''}) "
                  f"{job['method']}: {brief}",
                  flush=True)
    rows = summarize(results)
    errors = [r for r in results if "error" in r]
    table = markdown(rows, errors)
    print(table)
    if a.out:
        payload = {"machine": bc.machine_info(), "argv": sys.argv, "results": results,
                   "summary": [{k: v for k, v in r.items() if k != "losses"} for r in rows]}
        bc.write_atomic(a.out, json.dumps(payload, indent=1))
    if a.markdown:
        bc.write_atomic(a.markdown, table + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
