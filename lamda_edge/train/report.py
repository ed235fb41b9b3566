"""What a training run leaves behind besides the adapter: metrics JSON, the loss-curve PNG, the printed summary.

    trainer log history + trainable-parameter counts + peak memory + time ──> metrics.json
                                                                          ──> loss_curve.png (matplotlib, Agg)
                                                                          ──> summary lines on stdout
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamda_edge.adapters import lamda_layers, trainable_parameter_count
from lamda_edge.atomic import write_atomic, write_bytes_atomic

METRICS_NAME = "metrics.json"
PLOT_NAME = "loss_curve.png"
RUN_CONFIG_NAME = "run_config.yaml"


def write_json(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value: Any):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def write_run_config(path: Path, config: dict) -> None:
    import yaml

    plain = json.loads(json.dumps(config, default=_jsonable))
    write_bytes_atomic(path, yaml.safe_dump(plain, sort_keys=False).encode())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of the run: CUDA's max allocated tensor bytes, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda max_memory_allocated (tensor bytes)"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    return {"peak_memory_bytes": int(rss), "peak_memory_kind": "process peak RSS (includes Python and libraries)"}


def split_history(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train log entries with a `loss`, eval entries with an `eval_loss`) from the Trainer's log history."""
    train = [e for e in log_history if "loss" in e and "step" in e]
    evals = [e for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_loss(path: Path, log_history: list[dict], freeze_b_steps: int | None = None, title: str = "") -> Path | None:
    """Draw train loss (and eval loss) against optimizer steps into a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lamda-edge: matplotlib is not installed, no loss plot (pip install 'lamda-edge[plot]')",
              file=sys.stderr)
        return None
    train, evals = split_history(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss", color="tab:blue")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss",
                color="tab:orange")
    if freeze_b_steps:
        ax.axvline(freeze_b_steps, color="gray", linestyle="--", linewidth=1, label=f"B frozen (t_i={freeze_b_steps})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "lamda-edge training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_atomic(path, fig.savefig)
    finally:
        plt.close(fig)
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def adapter_settings(lamda_config) -> dict[str, Any]:
    """What a run's summary and metrics.json say about the adapter: its init and the rates that go with it."""
    return {"method": "LaMDA++" if lamda_config.rank_allocation == "energy" else "LaMDA",
            "init": lamda_config.init, "rank": lamda_config.rank, "alpha": lamda_config.alpha,
            "s_lr_multiplier": lamda_config.s_lr_multiplier(), "b_lr_multiplier": lamda_config.b_lr_multiplier(),
            "rate_scale": lamda_config.rate_scale, "freeze_b_fraction": lamda_config.freeze_b_fraction}


def adapter_words(adapter: dict[str, Any]) -> str:
    """'init principal (S at 16x the learning rate, B at 0.25x)': the adapter's settings in the run's lines; a
    `rate_scale` below 1 is named ('... B at 0.124x: both x0.49 for a small batch')."""
    scale = adapter.get("rate_scale", 1.0)
    scaled = f": both x{scale:.3g} for a small batch" if scale != 1.0 else ""
    return (f"init {adapter['init']} (S at {adapter['s_lr_multiplier']:.3g}x the learning rate, "
            f"B at {adapter['b_lr_multiplier']:.3g}x{scaled})")


def summary_lines(metrics: dict) -> list[str]:
    """Human-readable end-of-run summary."""
    params = metrics.get("trainable_params", {})
    lines = [f"run finished in {metrics['seconds']:.1f} s ({metrics['global_step']} optimizer steps, "
             f"{metrics.get('tokens_per_second', 0):,.0f} tokens/s)"]
    if "train_loss_first" in metrics:
        lines.append(f"train loss {metrics['train_loss_first']:.4f} -> {metrics['train_loss_last']:.4f}")
    if metrics.get("eval"):
        first, last = metrics["eval"][0], metrics["eval"][-1]

        def when(entry: dict) -> str:
            return "before training" if entry["step"] == 0 else f"at step {entry['step']}"

        (name, before), (_, after) = eval_score(first), eval_score(last)
        lines.append(f"eval loss {first['eval_loss']:.4f} {when(first)} -> {last['eval_loss']:.4f} {when(last)} "
                     f"({name} {before} -> {after})")
    if params:
        frozen = params.get("b_frozen_step")
        end = (f"{params['end']:,} from step {frozen} on (B wholly frozen, only S trains; t_i="
               f"{params['freeze_b_steps']})" if frozen else f"{params['end']:,} at the end")
        lines.append(f"trainable parameters: {params['start']:,} at the start, {end}")
    if metrics.get("adapter"):
        adapter = metrics["adapter"]
        lines.append(f"adapter: {adapter['method']} rank {adapter['rank']}, {adapter_words(adapter)}")
    lines.append(f"peak memory: {_mib(metrics['peak_memory_bytes'])} ({metrics['peak_memory_kind']})")
    lines.append(f"output: {metrics['output']} (adapter, {RUN_CONFIG_NAME}, {METRICS_NAME}, {PLOT_NAME})")
    step = next_step(metrics["output"], metrics.get("model_type"), metrics.get("quantize"))
    if step:
        lines.append(f"next: {step}")
    return lines


def next_step(output: str, model_type: str | None, quantize: str | None) -> str | None:
    """The export command that suits a finished run (None when its model type does not export):

    --int4 after an NF4 base (the int4 graph is then exactly the trained model), --int8 after a full-precision base
    (4 bits would quantize weights the adapter never saw: on small models much of the fine-tune is lost), fp32 for
    an encoder-decoder (its only export)."""
    import shlex

    from lamda_edge.families import DECODER_TYPES, ENCODER_TYPES, SEQ2SEQ_TYPES

    command = f"lamda-edge export --adapter {shlex.quote(output)} --output {shlex.quote(output.rstrip('/') + '-onnx')}"
    if model_type in SEQ2SEQ_TYPES:
        return command
    if model_type not in DECODER_TYPES + ENCODER_TYPES:
        return None
    if quantize == "nf4":
        return f"{command} --int4   (int4 as trained: the NF4 base the adapter learned on)"
    return f"{command} --int8   (int8 keeps an adapter trained on a full-precision base; --int4 needs an NF4 one)"


def eval_score(entry: dict) -> tuple[str, str]:
    """An evaluation's score as (name, value in words): a classifier's accuracy, else the perplexity."""
    if "eval_accuracy" in entry:
        return "accuracy", f"{entry['eval_accuracy']:.1%}"
    return "perplexity", f"{entry.get('eval_perplexity', perplexity(entry['eval_loss'])):.2f}"


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged loss does not overflow."""
    return math.exp(min(loss, 50.0))


# ---- during the run --------------------------------------------------------------------------------------------


def lamda_layer_list(lm: nn.Module) -> list:
    """[(name, LaMDALinear)] of a model (imported lazily: the adapters pull in bitsandbytes)."""
    return lamda_layers(lm)


def effective_trainable(lm: nn.Module) -> int:
    """Parameters that still train: everything requiring grad, minus B's frozen columns."""
    frozen = sum(layer.out_features * layer.frozen_b_columns for _, layer in lamda_layer_list(lm)
                 if layer.lamda_B.requires_grad)
    return trainable_parameter_count(lm) - frozen
