"""The human-readable plan: breakdown, budget, headroom, verdict, and the (estimated) speed."""

from __future__ import annotations

from lamda_edge.families import export_support
from lamda_edge.planner.profiles import GIB, MIB


def _fmt(n: float) -> str:
    return f"{n / GIB:8.2f} GiB" if abs(n) >= GIB else f"{n / MIB:8.1f} MiB"


def format_plan(plan) -> str:
    """A table a person reads at a glance."""
    s, d, m = plan.setup, plan.device, plan.model
    lines = [
        f"plan: {m.name} on {d.name} ({d.description})",
        f"  rank {s.rank}  batch_size {s.batch_size}  grad_accum {plan.grad_accum} (effective "
        f"{s.batch_size * plan.grad_accum})  seq_len {s.seq_len}  base {s.quantize or 'unquantized'}  "
        f"compute {s.compute_dtype}  checkpointing {'on' if s.gradient_checkpointing else 'off'}  "
        f"loss {'chunked ' + str(s.chunk_rows) + ' rows' if s.chunk_rows else 'full logits'}",
        "",
        f"  memory at the peak (phase: {plan.estimate.peak_phase})",
    ]
    for name, value in sorted(plan.estimate.breakdown.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {name:<24}{_fmt(value)}")
    tensor = plan.estimate.tensor_peak_bytes
    lines += [
        f"    {'= tensor peak':<24}{_fmt(tensor)}",
        f"    {'+ fragmentation margin':<24}{_fmt(tensor * d.fragmentation_margin)}  ({d.fragmentation_margin:.0%})",
        f"    {'+ runtime overhead':<24}{_fmt(d.runtime_overhead_bytes)}",
        f"    {'= peak':<24}{_fmt(plan.peak_bytes)}",
        f"    {'budget (usable)':<24}{_fmt(plan.budget_bytes)}",
        f"    {'headroom':<24}{_fmt(plan.budget_bytes - plan.peak_bytes)}",
        "",
        f"  verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}",
    ]
    sp = plan.speed
    if sp:
        lines.append(f"  speed (estimate, not measured): ~{sp['tokens_per_second']:,.0f} tokens/s, "
                     f"~{sp['hours_per_epoch']:.2f} h per epoch of {sp['dataset_tokens']:,} tokens "
                     f"({sp['bound']} bound)")
    if plan.measured:
        meas = plan.measured["measured_tensor_peak_bytes"]
        err = (tensor - meas) / meas if meas else 0.0
        lines.append(f"  measured tensor peak: {_fmt(meas)} ({plan.measured['measured_by']}), "
                     f"predicted {_fmt(tensor)}, error {err:+.1%}")
    exportable, note = export_support(m.model_type, m.architecture)
    if not exportable:
        lines.append(f"  export: {m.name} cannot be exported to ONNX: {note}")
    if d.kind == "jetson":
        lines.append("  jetson: unified memory shared with the CPU; no CPU offload, no paged optimizer, "
                     "PYTORCH_CUDA_ALLOC_CONF without expandable_segments")
    return "\n".join(lines)
