"""The same job with PEFT LoRA / QLoRA: what `plan` shows under a LaMDA plan (issue 27).

    LaMDA plan (device, model, seq_len, rank, batch)
        └── the same request with method="lora"  (memory.py prices PEFT's defaults: A and B train, each LoRA layer
            keeps its input x, QLoRA's fp32 upcast), at LaMDA's batch first: its peak, the blocks it must
            checkpoint, its estimated speed; else at the largest batch that fits it; else "does not fit"

On an NF4 base the comparison is QLoRA (`prepare_model_for_kbit_training`), on a float base PEFT LoRA. Both use the
plan's loss (chunked or not), so the difference is the adapter and PEFT's upcast. Everything here is arithmetic on
the memory model (no torch); the speeds are the planner's estimates, not measurements.
"""

from __future__ import annotations

from dataclasses import replace

from lamda_edge.errors import DoesNotFitError
from lamda_edge.planner.memory import checkpointed_block_count, estimate
from lamda_edge.planner.profiles import GIB
from lamda_edge.planner.search import _unpadded_single, peak_bytes, plan

LABEL = "estimate from the memory model and the profile's FLOP/s, not a measurement"


def method_name(quantize: str | None) -> str:
    """'PEFT QLoRA' on an NF4 base, 'PEFT LoRA' on a float one."""
    return "PEFT QLoRA" if quantize == "nf4" else "PEFT LoRA"


def compare_with_peft(lamda_plan) -> dict:
    """Plan `lamda_plan`'s job with PEFT LoRA / QLoRA at the same rank; the `plan --json` `compare` object.

    Returns:
        {"method", "label", "fits", "same_batch", and when it fits: "batch_size", "grad_accum", "rank",
        "gradient_checkpointing", "checkpoint_layers", "num_blocks", "peak_bytes", "tensor_peak_bytes",
        "headroom_bytes", "tokens_per_second", "peak_bytes_at_lamda_settings" (PEFT at exactly the plan's batch and
        checkpointing) and "upcast_bytes_at_lamda_settings" (the part of it that is PEFT's fp32 upcast),
        "lamda_vs_peft" (the differences); when it does not fit: "does_not_fit" (the job)}
    """
    s, L = lamda_plan.setup, lamda_plan.model.num_blocks
    request = {**lamda_plan.request, "rank": s.rank, "compute_dtype": s.compute_dtype, "method": "lora"}
    name = method_name(s.quantize)
    other, same_batch = None, True
    try:
        other = plan(lamda_plan.device, lamda_plan.model, **{**request, "batch_size": s.batch_size})
    except DoesNotFitError:
        same_batch = False
        if lamda_plan.request.get("batch_size") is None:  # the batch was the planner's: let it pick PEFT's own
            try:
                other = plan(lamda_plan.device, lamda_plan.model, **request)
            except DoesNotFitError:
                other = None
    out = {"method": name, "label": LABEL, "fits": bool(other and other.fits), "same_batch": same_batch}
    if other is None:
        pinned = "" if lamda_plan.request.get("batch_size") is None else f", batch {s.batch_size}"
        out["does_not_fit"] = f"seq_len {s.seq_len}, rank {s.rank}{pinned}, on {lamda_plan.device.name}"
        return out
    o = other.setup
    ours_k, theirs_k = checkpointed_block_count(s, L), checkpointed_block_count(o, L)
    ours_speed, theirs_speed = lamda_plan.speed.get("tokens_per_second"), other.speed.get("tokens_per_second")
    out.update({
        "batch_size": o.batch_size, "grad_accum": other.grad_accum, "rank": o.rank,
        "gradient_checkpointing": o.gradient_checkpointing, "checkpoint_layers": theirs_k, "num_blocks": L,
        "peak_bytes": other.peak_bytes, "tensor_peak_bytes": other.estimate.tensor_peak_bytes,
        "headroom_bytes": other.budget_bytes - other.peak_bytes, "tokens_per_second": theirs_speed,
        "trainable_params": other.estimate.trainable_params,
    })
    # PEFT at exactly the LaMDA plan's settings (batch, checkpointing): the adapter's own difference in memory
    at_ours = peak_bytes(lamda_plan.device, estimate(lamda_plan.model, _unpadded_single(replace(s, method="lora"))))
    no_upcast = replace(s, method="lora", fp32_upcast=False)
    out["peak_bytes_at_lamda_settings"] = at_ours
    # how much of the difference is PEFT's fp32 upcast (QLoRA only), not the adapter
    without = peak_bytes(lamda_plan.device, estimate(lamda_plan.model, _unpadded_single(no_upcast)))
    out["upcast_bytes_at_lamda_settings"] = at_ours - without
    out["lamda_vs_peft"] = {
        "fewer_checkpointed_blocks": theirs_k - ours_k if same_batch else None,
        "tokens_per_second_ratio": round(ours_speed / theirs_speed, 3) if ours_speed and theirs_speed else None,
        "peak_bytes_saved_at_lamda_settings": at_ours - lamda_plan.peak_bytes,
    }
    return out


def describe(compare: dict, lamda_plan) -> list[str]:
    """The text lines under the plan: the same job with PEFT, and what LaMDA's plan buys over it."""
    name, s, L = compare["method"], lamda_plan.setup, lamda_plan.model.num_blocks
    if not compare["fits"]:
        return [f"  the same job with {name} ({compare['does_not_fit']}): does not fit, even checkpointing every "
                "block (estimate)"]
    k, theirs = compare["checkpoint_layers"], compare["tokens_per_second"]
    ckpt = f"checkpointing {k} of {L} blocks" if k else "no checkpointing"
    batch = "" if compare["same_batch"] else (f" only at batch {compare['batch_size']} "
                                              f"(grad_accum {compare['grad_accum']})")
    lines = [f"  the same job with {name}{batch}: peak {compare['peak_bytes'] / GIB:.2f} GiB, {ckpt}, "
             f"~{theirs:,.0f} tokens/s (est.)"]
    diff = compare["lamda_vs_peft"]
    ours_k, ours = checkpointed_block_count(s, L), lamda_plan.speed.get("tokens_per_second")
    saved = diff["peak_bytes_saved_at_lamda_settings"]
    if saved > 0:
        need = compare["peak_bytes_at_lamda_settings"] / GIB
        upcast = compare["upcast_bytes_at_lamda_settings"]
        of_which = f" ({upcast / GIB:.2f} GiB of it PEFT's fp32 upcast, the rest the adapter)" if upcast else ""
        lines.append(f"  at this plan's batch and checkpointing {name} would need {need:.2f} GiB: LaMDA needs "
                     f"{saved / GIB:.2f} GiB less{of_which}")
    if compare["same_batch"] and (diff["fewer_checkpointed_blocks"] or 0) > 0:
        lines.append(f"  LaMDA checkpoints {diff['fewer_checkpointed_blocks']} fewer blocks at batch {s.batch_size} "
                     f"({ours_k} of {L} instead of {k}): ~{ours:,.0f} against ~{theirs:,.0f} tokens/s "
                     f"(est., {diff['tokens_per_second_ratio']:.2f}x)")
    elif not compare["same_batch"]:
        lines.append(f"  LaMDA fits batch {s.batch_size}, {name} only {compare['batch_size']}: ~{ours:,.0f} against "
                     f"~{theirs:,.0f} tokens/s (est.)")
    return lines
