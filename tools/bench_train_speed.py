"""Training speed: lamda-edge's training loop against a transformers Trainer + PEFT LoRA script (issue 13).

Every method trains the default model (SmolLM2-135M) on the same token sequences (the default job's generated
word problems, chat-formatted), with the same batch, sequence length, learning rate and steps, through a
transformers Trainer:

    method            what trains
    ---------------   ------------------------------------------------------------------------------------------
    lamda             lamda-edge's loop: `load_lamda_model` (full-precision base), `LossModel` (chunked loss),
                      `LaMDATrainer`, `LaMDACallback`, padded batches (`PaddingCollator`)
    lamda-packed      the same with `packing: true` (`PackingCollator`: one padding-free row per batch)
    peft-lora         what a PEFT user writes: AutoModelForCausalLM, `LoraConfig(r=16)` on the same linears,
                      the model's own loss, padded batches

Precision: `--precision auto` (the default) is what `lamda-edge train` picks here (bf16 where the CPU multiplies
bf16 natively, AVX512-BF16 or AMX, else fp32), for every method: the base weights in it and, for bf16, autocast.

Each run is its own process (threads are read once, at load); methods take turns (A B C A B C ...). A step's
time runs from `on_step_begin` to `on_step_end`; the first `--warmup` steps are dropped. Tokens are the real
(non-padding) tokens the Trainer counted. Peak RSS is the process's high-water mark.

    PYTHONPATH=. .venv/bin/python tools/bench_train_speed.py --steps 6 --repeats 2 --threads 1
    PYTHONPATH=. .venv/bin/python tools/bench_train_speed.py --quick      # tiny settings, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("lamda", "lamda-packed", "peft-lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _step_timer():
    """A Trainer callback recording each optimizer step's seconds and non-padding tokens."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[tuple[float, int]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((time.perf_counter() - self.start, state.num_input_tokens_seen - self.tokens))

    return StepTimer()


def worker(method: str, steps: int, batch: int, seq: int, rank: int, n_train: int, precision: str = "auto") -> dict:
    """Train `steps` optimizer steps with `method` in this process; returns per-step seconds and tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from lamda_edge.demo.default_model import default_model_path
    from lamda_edge.demo.task import make_task
    from lamda_edge.load.device import resolve_precision
    from lamda_edge.train.data import PackingCollator, PaddingCollator

    precision = resolve_precision(precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    model_dir = default_model_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = make_task(tokenizer, n_train=n_train, n_eval=1, seq_len=seq).train
    out = tempfile.mkdtemp(prefix="bench-speed-")
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=1e-3, lr_scheduler_type="constant", bf16=precision == "bf16",
                             use_cpu=True,
                             report_to="none", disable_tqdm=True, remove_unused_columns=False, save_strategy="no",
                             logging_strategy="no", include_num_input_tokens_seen="non_padding", seed=0,
                             dataloader_num_workers=0)
    timer = _step_timer()
    if method.startswith("lamda"):
        from lamda_edge import LaMDAConfig, load_lamda_model
        from lamda_edge.planner.memory import DEFAULT_CHUNK_ROWS
        from lamda_edge.train.callbacks import LaMDACallback
        from lamda_edge.train.trainer import LaMDATrainer, LossModel

        lm = load_lamda_model(model_dir, LaMDAConfig(rank=rank), quantize=None, device="cpu",
                              compute_dtype=dtype, progress=False, gradient_checkpointing=False)
        collator = PackingCollator() if method == "lamda-packed" else PaddingCollator.for_tokenizer(tokenizer)
        trainer = LaMDATrainer(model=LossModel(lm, DEFAULT_CHUNK_ROWS), args=args, data_collator=collator,
                               train_dataset=data, callbacks=[LaMDACallback(lm, freeze_steps=max(1, steps * 3 // 10)),
                                                              timer])
    else:
        from peft import LoraConfig, get_peft_model

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
        trainer = Trainer(model=model, args=args, data_collator=PaddingCollator.for_tokenizer(tokenizer),
                          train_dataset=data, callbacks=[timer])
    from lamda_edge.train.packed_attention import packed_attention

    with packed_attention(trainer.model, enabled=method == "lamda-packed"):  # what `train` does with packing
        trainer.train()
    return {"method": method, "step_s": [s for s, _ in timer.steps], "tokens": [t for _, t in timer.steps],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads(), "precision": precision}


def run(method: str, opts: argparse.Namespace) -> dict:
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    job = dict(method=method, steps=opts.steps, batch=opts.batch, seq=opts.seq, rank=opts.rank,
               n_train=opts.steps * opts.batch, precision=opts.precision)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=str(REPO))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    kept = slice(opts.warmup, None)
    result["tokens_per_s"] = sum(result["tokens"][kept]) / sum(result["step_s"][kept])
    result["load"] = os.getloadavg()[0]
    print(f"{method}: {result['tokens_per_s']:.1f} tokens/s, steps "
          + " ".join(f"{s:.2f}" for s in result["step_s"]) + f" s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
          f" (load {result['load']:.1f})", file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the rate")
    ap.add_argument("--repeats", type=int, default=2, help="turns of every method")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: what `lamda-edge train` picks on this CPU")
    ap.add_argument("--quick", action="store_true", help="2 steps, batch 2, 1 turn: a smoke test")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker:
        print(json.dumps(worker(**json.loads(opts.worker))))
        return
    if opts.quick:
        opts.steps, opts.batch, opts.repeats, opts.warmup = 2, 2, 1, 1
    loads, results = [os.getloadavg()[0]], {m: [] for m in opts.methods}
    for _ in range(opts.repeats):
        for method in opts.methods:
            results[method].append(run(method, opts))
            loads.append(os.getloadavg()[0])
    base = statistics.median(r["tokens_per_s"] for r in results[opts.methods[-1]])
    print(f"| method | tokens/s (median) | min - max | x {opts.methods[-1]} | peak RSS GiB (max) |\n"
          "|---|---:|---|---:|---:|")
    for method, runs in results.items():
        rates = [r["tokens_per_s"] for r in runs]
        med = statistics.median(rates)
        print(f"| {method} | {med:.1f} | {min(rates):.1f} - {max(rates):.1f} | {med / base:.2f} | "
              f"{max(r['peak_rss_bytes'] for r in runs) / 2**30:.2f} |")
    print(f"\nbatch {opts.batch} x seq <= {opts.seq}, rank {opts.rank}, {opts.steps} steps ({opts.warmup} dropped), "
          f"{opts.threads} thread(s), {results[opts.methods[0]][0]['precision']}, {opts.repeats} turn(s); "
          "load average (1 min): "
          + " ".join(f"{x:.1f}" for x in loads))
    if opts.out:
        Path(opts.out).write_text(json.dumps({"options": vars(opts), "loads": loads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
