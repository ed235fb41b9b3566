"""Forward + backward time of one adapted linear: the LaMDA path against the frozen base alone (issue 13, item 1).

Compares `LaMDALinear.forward` with the path before issue 13 (x cast to fp32, a full-size `delta * scaling` and its
cast back) and with the base linear alone, on SmolLM2-135M's MLP shape (576 -> 1536, bf16 weights), rank 16,
activations (4, 232, 576) under bf16 autocast, as the default job trains (`--dtype float32`: fp32 weights, no
autocast, as on a CPU without bf16). Backward takes a random upstream gradient, as in training (the gradient of a
`.sum()` is an expanded tensor that every transposed matmul must copy first, which inflated the first measurement).
"after t_i" is the same layer with B frozen, the state of the last 70% of a run. The variants take turns; medians.

    PYTHONPATH=. .venv/bin/python tools/bench_adapter_path.py --repeats 12 --threads 1 [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lamda_edge.adapters.layer import LaMDALinear


def before_issue_13(layer: LaMDALinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter path as it was: x to fp32, three fp32 matmuls, a full-size scaled copy cast back."""
    out = layer.base_layer(x)
    h = x.to(torch.float32)  # (..., d_in) copy
    delta = F.linear(F.linear(F.linear(h, layer.lamda_A), layer.lamda_S), layer.lamda_B)  # (..., d_out) fp32
    return out + (delta * layer.scaling).to(out.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--inner", type=int, default=5, help="forward+backward passes per timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    layer = LaMDALinear(torch.nn.Linear(576, 1536, bias=False).to(dtype), rank=16, alpha=32.0)
    with torch.no_grad():
        for t in (layer.lamda_A, layer.lamda_S, layer.lamda_B):
            t.normal_()

    def after_freeze(x: torch.Tensor) -> torch.Tensor:
        layer.lamda_B.requires_grad_(False)
        try:
            return layer(x)
        finally:
            layer.lamda_B.requires_grad_(True)

    variants = {"LaMDA path (now)": layer, "LaMDA path after t_i (B frozen)": after_freeze,
                "LaMDA path before issue 13": lambda x: before_issue_13(layer, x),
                "frozen base alone": layer.base_layer}
    x0 = torch.randn(4, 232, 576, dtype=dtype)
    grad_out = torch.randn(4, 232, 1536, dtype=dtype)  # (..., d_out): a dense upstream gradient, as in training
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            x = x0.clone().requires_grad_(True)
            start = time.perf_counter()
            for _ in range(args.inner):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    y = fn(x)
                y.backward(grad_out)
            times[name].append((time.perf_counter() - start) / args.inner * 1e3)
    base = statistics.median(times["frozen base alone"])
    print("| variant | fwd+bwd ms (median) | min - max | adapter overhead ms | x base |\n|---|---:|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.1f} | {min(ts):.1f} - {max(ts):.1f} | {med - base:.1f} | {med / base:.3f} |")
    print(f"\n{args.dtype}, {args.threads} thread(s), {args.repeats} turns of {args.inner} passes; "
          f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
