"""How the CPU thread setting changes a training step's time, or an ONNX decode step's (`--graph`), on a quiet or
a loaded machine (issue 13, item 3).

Each configuration runs in its own process (OpenMP and ONNX Runtime read the wait policy once, at load), the
configurations take turns (A B C A B C ...), and the report gives the median step time with its spread and the
load average.

    PYTHONPATH=. .venv/bin/python tools/bench_threads.py --steps 4 --repeats 2
    PYTHONPATH=. .venv/bin/python tools/bench_threads.py --graph runs/demo-onnx/model.onnx --steps 33 --repeats 2

With `--graph`, a step is one greedy decode token with the KV cache (lamda_edge.runtime's session, which spins
between ops unless OMP_WAIT_POLICY=PASSIVE), after a 32-token prompt; the first token is dropped.

The step is the default job's: the default model (SmolLM2-135M) with LaMDA rank 16 in the precision `train` picks
on this CPU (bf16 base under bf16 autocast where the CPU multiplies bf16 natively, else fp32),
batch 4 x 256 tokens, AdamW on S and B, no checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "2 threads, OpenMP default wait": {"threads": "2", "wait": None},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"threads": "2", "wait": "PASSIVE"},
    "1 thread": {"threads": "1", "wait": None},
}


def child(threads: int, steps: int, batch: int, seq: int) -> dict:
    """Run `steps` training steps in this process; returns each step's seconds."""
    import torch

    from lamda_edge import LaMDAConfig, load_lamda_model
    from lamda_edge.demo.default_model import default_model_path
    from lamda_edge.load.device import resolve_precision

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if resolve_precision("auto", torch.device("cpu")) == "bf16" else torch.float32
    model = load_lamda_model(default_model_path(progress=False), LaMDAConfig(rank=16), quantize=None, device="cpu",
                             compute_dtype=dtype, progress=False, gradient_checkpointing=False)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)  # (B, T)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"step_s": times}


def decode_child(graph: str, threads: int, steps: int) -> dict:
    """Decode `steps` greedy tokens with the KV cache after a 32-token prompt; returns each token's seconds."""
    import numpy as np

    from lamda_edge.runtime.decoder import OnnxDecoder
    from lamda_edge.runtime.session import session

    decoder = OnnxDecoder(session(graph, threads=threads))
    ids = np.random.default_rng(0).integers(0, 1000, (1, 32))  # (1, T)
    past, times = decoder.empty_past(1), []
    for _ in range(steps):
        start = time.perf_counter()
        logits, past = decoder.step(ids, past)
        ids = logits[:, -1:].argmax(-1)  # (1, 1)
        times.append(time.perf_counter() - start)
    return {"step_s": times}


def run_config(name: str, cfg: dict, steps: int, batch: int, seq: int, graph: str | None = None) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS=cfg["threads"])
    env.pop("OMP_WAIT_POLICY", None)
    if cfg["wait"]:
        env["OMP_WAIT_POLICY"] = cfg["wait"]
    cmd = [sys.executable, __file__, "--child", cfg["threads"], "--steps", str(steps), "--batch", str(batch),
           "--seq", str(seq)] + (["--graph", graph] if graph else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    times = json.loads(out.stdout.strip().splitlines()[-1])["step_s"][1:]  # the first step warms up
    print(f"{name}: {' '.join(f'{t:.2f}' for t in times)} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
          flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="steps per process (the first is dropped)")
    ap.add_argument("--repeats", type=int, default=2, help="turns of every configuration")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--graph", help="an exported decoder graph (model.onnx): time ONNX Runtime decode steps instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = (decode_child(args.graph, int(args.child), args.steps) if args.graph else
                  child(int(args.child), args.steps, args.batch, args.seq))
        print(json.dumps(result))
        return
    loads, results = [os.getloadavg()], {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, cfg in CONFIGS.items():
            results[name] += run_config(name, cfg, args.steps, args.batch, args.seq, args.graph)
            loads.append(os.getloadavg())
    print("| configuration | step s (median) | min - max | steps | x 1 thread |\n|---|---:|---|---:|---:|")
    one = statistics.median(results["1 thread"])
    for name, times in results.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.2f} | {min(times):.2f} - {max(times):.2f} | {len(times)} | {med / one:.2f} |")
    print(f"\n{os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}); load average (1 min) during the run: "
          + " ".join(f"{load[0]:.1f}" for load in loads))


if __name__ == "__main__":
    main()
