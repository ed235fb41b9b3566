"""End to end: what partial checkpointing buys (issue 27, item 4).

Trains LaMDA (lamda-edge, float base as the CPU path runs it) and PEFT LoRA with the same loop
(`_bench_common.train_step`: AdamW, the project's chunked loss, the same random token batch), each with the number
of checkpointed blocks the planner gives it under one memory budget (`lamda-edge plan ... --device budget.yaml`:
the plan's own line for LaMDA, the "same job with PEFT LoRA" line for PEFT). Only the adapter and the checkpointed
block count differ. Each run is its own process; runs alternate A B A B; `uptime`'s load average is printed before
each. Reported: tokens/s per run (steps after one warm-up and one measured step), and the step peak above the
resident bytes by `LiveTensorCounter` (one step).

Usage:
    PYTHONPATH=$PWD python tools/bench_e2e_checkpointing.py \\
        --model-dir ~/.cache/lamda-edge/models/smollm2-135m-instruct \\
        --batch-size 4 --seq-len 128 --lamda-layers 15 --peft-layers 24 --steps 20 --rounds 2 --out e2e.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402


def worker(args: dict) -> dict:
    from lamda_edge.load.loader import checkpointed_blocks
    from lamda_edge.planner.live_tensors import LiveTensorCounter, register_bytes

    layers = args["checkpoint_layers"]
    method = args["method"]
    built = bc.build(method, Path(args["model_dir"]), args["rank"], lr=1e-4, compute_dtype=args["compute_dtype"],
                     checkpointing=layers > 0, seed=0, lamda_quantize=None)
    model = built.model
    blocks = checkpointed_blocks(model)
    for block in blocks[layers:]:
        block.gradient_checkpointing = False
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args["batch_size"], args["seq_len"]), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    chunk_rows = 256
    bc.train_step(built, batch, chunk_rows, 0)  # warm-up: creates the optimizer state
    gc.collect()
    counter = LiveTensorCounter()
    register_bytes(counter, model)
    register_bytes(counter, built.optimizer)
    register_bytes(counter, batch)
    resident = counter.current_bytes
    counter.reset_peak()
    with counter:
        bc.train_step(built, batch, chunk_rows, 1)
    peak_above = counter.peak_bytes - resident
    times = []
    for step in range(args["steps"]):
        t0 = time.perf_counter()
        bc.train_step(built, batch, chunk_rows, 2 + step)
        times.append(time.perf_counter() - t0)
    tokens = args["batch_size"] * args["seq_len"]
    return {"method": method, "checkpoint_layers": layers, "num_blocks": len(blocks),
            "resident_bytes": resident, "step_peak_above_bytes": int(peak_above),
            "tokens_per_s": tokens * len(times) / sum(times), "step_seconds": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--compute-dtype", default="bf16", choices=sorted(bc.DTYPES))
    ap.add_argument("--lamda-layers", type=int, required=False, help="blocks the plan checkpoints for LaMDA")
    ap.add_argument("--peft-layers", type=int, required=False, help="blocks the plan gives PEFT LoRA")
    ap.add_argument("--peft-method", default="lora", choices=("lora", "qlora"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    common = {"model_dir": str(Path(a.model_dir).expanduser()), "batch_size": a.batch_size, "seq_len": a.seq_len,
              "rank": a.rank, "compute_dtype": a.compute_dtype, "steps": a.steps}
    jobs = [("lamda-b", a.lamda_layers), (a.peft_method, a.peft_layers)]
    results = []
    for rnd in range(a.rounds):
        for method, layers in jobs:
            load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            print(f"[round {rnd}] {method} k={layers}: {load}", flush=True)
            r = bc.run_worker(Path(__file__), {**common, "method": method, "checkpoint_layers": layers})
            r.update(round=rnd, uptime=load)
            results.append(r)
            if "error" in r:
                print(f"  failed: {r['error']}", flush=True)
                continue
            print(f"  {r['tokens_per_s']:.1f} tokens/s, step peak above resident "
                  f"{bc.mib(r['step_peak_above_bytes'])} MiB, resident {bc.mib(r['resident_bytes'])} MiB", flush=True)
    for method, layers in jobs:
        tps = [r["tokens_per_s"] for r in results if r["method"] == method and "error" not in r]
        if not tps:
            continue
        print(f"{method} k={layers}: median {statistics.median(tps):.1f} tokens/s "
              f"(runs {', '.join(f'{t:.1f}' for t in tps)})")
    if a.out:
        bc.write_atomic(a.out, json.dumps({"args": vars(a), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
