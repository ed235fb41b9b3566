"""The planner on a real GPU: `plan --measure` over a grid of configurations, predicted against measured.

Usage (on a machine with a CUDA GPU; tools/gpu_acceptance.sh runs it after the CUDA tests):
    python tools/gpu_acceptance.py [--work runs/gpu-acceptance] [--out docs/planner-accuracy.md]
        [--only N ...] [--bench-md FILE]
    python tools/gpu_acceptance.py --dry-run [--out FILE]   # the config list and the table, no GPU (CI checks it)

Each configuration runs `lamda-edge plan --device auto --model <folder> --json --measure` in its own process
(a fresh CUDA context), on models with random weights made from configs saved with `save_pretrained` (no
download): a SmolLM2-135M-shaped one and a Llama shape (h1024, 8 layers, 32k vocabulary). The grid spans seq_len
256-4096, checkpointing on/off, an NF4 or bf16 base, activation offload on/off. Per configuration it records:

    predicted tensor peak   planner.memory.estimate (the `tensor_peak_bytes` of plan --json)
    max_memory_allocated    torch.cuda.max_memory_allocated over the measured steps
    predicted peak          tensor peak x (1 + fragmentation margin) + runtime overhead (`peak_bytes`)
    nvidia-smi              the GPU's memory.used at its highest while the process ran, minus before it started
                            (the process total: CUDA context, allocator cache, everything)

and writes one table into the `gpu` section of docs/planner-accuracy.md (target: tensor peak within 10% of
max_memory_allocated in every configuration), with the speed benchmark's CUDA rows when `--bench-md` names
tools/bench_memory.py's markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _doc_sections import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# config.json fields of the two model shapes (random weights; memory depends only on shapes)
MODELS = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-h1024-L8": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=False),
}
# (model, batch, seq_len, checkpointing, base, activation offload); rank 16, bf16 compute
GRID = [
    ("smollm2-135m-shape", 4, 256, True, "nf4", False),
    ("smollm2-135m-shape", 4, 256, False, "nf4", False),
    ("smollm2-135m-shape", 2, 1024, True, "bf16", False),
    ("smollm2-135m-shape", 1, 4096, True, "nf4", False),
    ("smollm2-135m-shape", 1, 4096, True, "nf4", True),
    ("llama-h1024-L8", 2, 512, True, "nf4", False),
    ("llama-h1024-L8", 2, 512, False, "bf16", False),
    ("llama-h1024-L8", 1, 2048, True, "nf4", True),
    ("llama-h1024-L8", 1, 2048, True, "nf4", False),
    ("llama-h1024-L8", 4, 1024, True, "bf16", True),
]


def save_model_configs(work: Path) -> dict[str, Path]:
    """config.json of each shape, written by transformers' `save_pretrained` (no weights: random ones at load)."""
    from transformers import LlamaConfig

    out = {}
    for name, fields in MODELS.items():
        folder = work / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        LlamaConfig(**fields, max_position_embeddings=8192).save_pretrained(folder)
        out[name] = folder
    return out


def plan_argv(folder: Path, batch: int, seq: int, ckpt: bool, base: str, offload: bool) -> list[str]:
    argv = ["plan", "--device", "auto", "--model", str(folder), "--seq-len", str(seq), "--batch-size", str(batch),
            "--target-batch", str(batch), "--rank", "16", "--checkpointing", "on" if ckpt else "off",
            "--quantize", "nf4" if base == "nf4" else "none", "--precision", "bf16", "--json", "--measure",
            "--measure-steps", "3"]
    return argv + (["--activation-offload"] if offload else [])


def _gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_one(argv: list[str], log: Path) -> dict:
    """One `lamda-edge plan ... --measure` process; its JSON, and nvidia-smi's peak memory.used above before."""
    before = _gpu_used_mib()
    peak = [before]
    done = threading.Event()

    def poll():
        while not done.is_set():
            used = _gpu_used_mib()
            if used is not None and (peak[0] is None or used > peak[0]):
                peak[0] = used
            done.wait(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    proc = subprocess.run([sys.executable, "-m", "lamda_edge.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    done.set()
    watcher.join()
    log.write_text(f"$ lamda-edge {' '.join(argv)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    result["exit_code"] = proc.returncode
    result["seconds"] = time.perf_counter() - t0
    result["nvidia_smi_bytes"] = (peak[0] - before) * 2**20 if before is not None and peak[0] is not None else None
    return result


def dry_result(model: str, batch: int, seq: int, ckpt: bool, base: str, offload: bool) -> dict:
    """What a run returns, from the planner alone (measured = predicted): checks the table without a GPU."""
    from lamda_edge.planner.memory import TrainSetup, estimate
    from lamda_edge.planner.profiles import ModelShape

    shape = ModelShape(name=model, architecture="decoder", **MODELS[model])
    est = estimate(shape, TrainSetup(batch_size=batch, seq_len=seq, rank=16, quantize="nf4" if base == "nf4" else None,
                                     gradient_checkpointing=ckpt, compute_dtype="bf16", activation_offload=offload,
                                     padding_mask=batch > 1))
    return {"exit_code": 0, "tensor_peak_bytes": est.tensor_peak_bytes, "measured_tensor_peak_bytes": None,
            "peak_bytes": None, "nvidia_smi_bytes": None, "host_offload_bytes": est.host_offload_bytes,
            "peak_phase": est.peak_phase, "seconds": 0.0, "dry_run": True}


def _mib(n) -> str:
    return f"{n / 2**20:,.1f}" if isinstance(n, (int, float)) else "n/a"


def render(rows: list[dict], gpu: str, command: str, bench: str | None) -> str:
    errs = [abs(r["error"]) for r in rows if r.get("error") is not None]
    measured = bool(errs)
    lines = [
        "## GPU: predicted vs measured (tools/gpu_acceptance.sh)",
        "",
        "Generated by `tools/gpu_acceptance.py`; do not edit by hand. Each row is `lamda-edge plan --device auto "
        "--model <folder> --json --measure` in its own process (random weights of the shape, rank 16, bf16 "
        "compute, 3 steps: one warm-up, the peak over the other two). *Tensor peak* is the memory model against "
        "`torch.cuda.max_memory_allocated`; *peak* adds the profile's fragmentation margin and runtime overhead and "
        "compares with nvidia-smi's memory.used at its highest while the process ran, minus before it started.",
        "",
        f"- command: `{command}`",
        f"- GPU: {gpu}",
    ]
    if measured:
        lines.append(f"- tensor peak |error|: median **{statistics.median(errs):.1%}**, worst **{max(errs):.1%}** "
                     f"over {len(errs)} configurations (target: within 10% in every one)")
    else:
        lines.append("- **not run on a GPU yet**: this is the dry run's table (predicted numbers only). Until "
                     "tools/gpu_acceptance.sh has run on a CUDA GPU, GPU numbers are predicted, not measured.")
    lines += [
        "",
        "| model | batch | seq_len | ckpt | base | offload | predicted tensor peak (MiB) | max_memory_allocated (MiB) "
        "| error | predicted peak (MiB) | nvidia-smi (MiB) | host offload (MiB, pred / meas) | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = f"{r['error']:+.1%}" if r.get("error") is not None else "n/a"
        host = (f"{_mib(r.get('host_offload_bytes'))} / {_mib(r.get('measured_host_offload_bytes'))}"
                if r["offload"] else "")
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {'on' if r['ckpt'] else 'off'} | {r['base']} | "
                     f"{'on' if r['offload'] else 'off'} | {_mib(r.get('tensor_peak_bytes'))} | "
                     f"{_mib(r.get('measured_tensor_peak_bytes'))} | {err} | {_mib(r.get('peak_bytes'))} | "
                     f"{_mib(r.get('nvidia_smi_bytes'))} | {host} | {r.get('exit_code')} |")
    if bench:
        lines += ["", "Speed and step memory on this GPU (`tools/bench_memory.py --device cuda`, tiny and "
                  "llama-1b-shape, stack b, bf16):", "", bench.strip()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/gpu-acceptance", help="model configs and per-run logs")
    ap.add_argument("--out", default="docs/planner-accuracy.md")
    ap.add_argument("--only", type=int, nargs="+", help="run only these rows of the grid (0-based)")
    ap.add_argument("--bench-md", help="tools/bench_memory.py's markdown, put under the table")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build the config list and write the table "
                    "with predicted numbers only")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    grid = [GRID[i] for i in args.only] if args.only else GRID
    folders = save_model_configs(work)
    rows = []
    for i, (model, batch, seq, ckpt, base, offload) in enumerate(grid):
        config = dict(model=model, batch=batch, seq=seq, ckpt=ckpt, base=base, offload=offload)
        if args.dry_run:
            result = dry_result(model, batch, seq, ckpt, base, offload)
        else:
            result = run_one(plan_argv(folders[model], batch, seq, ckpt, base, offload), work / f"run-{i}.log")
        meas, pred = result.get("measured_tensor_peak_bytes"), result.get("tensor_peak_bytes")
        result["error"] = (pred - meas) / meas if meas and pred else None
        rows.append({**result, **config})
        print(f"{model:<20} b{batch} T{seq:<5} ckpt={ckpt!s:<5} {base:<4} offload={offload!s:<5} pred "
              f"{_mib(pred):>10} MiB meas {_mib(meas):>10} MiB smi {_mib(result.get('nvidia_smi_bytes')):>10} MiB "
              f"exit {result.get('exit_code')}", flush=True)
    if args.dry_run:
        gpu = "none (dry run)"
    else:
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu = (f"{props.name}, {props.total_memory / 2**30:.2f} GiB total, compute capability "
               f"{props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"{platform.platform()}")
    bench = Path(args.bench_md).read_text() if args.bench_md and Path(args.bench_md).is_file() else None
    command = "bash tools/gpu_acceptance.sh" if not args.dry_run else "python tools/gpu_acceptance.py --dry-run"
    (work / "rows.json").write_text(json.dumps(rows, indent=1))
    replace_section(args.out, "gpu", render(rows, gpu, command, bench), title="Planner accuracy")
    print(f"wrote the gpu section of {args.out}")
    failed = [r for r in rows if r.get("exit_code") not in (0,)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
