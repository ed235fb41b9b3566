"""The human-readable plan: breakdown, budget, headroom, verdict, and the (estimated) speed."""

from __future__ import annotations

from lamda_edge.families import export_support
from lamda_edge.planner.memory import checkpointed_block_count
from lamda_edge.planner.profiles import GIB, MIB
from lamda_edge.planner.search import headroom_margin


def _fmt(n: float) -> str:
    return f"{n / GIB:8.2f} GiB" if abs(n) >= GIB else f"{n / MIB:8.1f} MiB"


def _checkpointing(setup, num_blocks: int) -> str:
    """'off', 'on', or 'on (k of L blocks)' for partial checkpointing."""
    if not setup.gradient_checkpointing:
        return "off"
    k = checkpointed_block_count(setup, num_blocks)
    return "on" if k == num_blocks else f"on ({k} of {num_blocks} blocks)"


def format_plan(plan) -> str:
    """A table a person reads at a glance."""
    s, d, m = plan.setup, plan.device, plan.model
    lines = [
        f"plan: {m.name} on {d.name} ({d.description})",
        f"  rank {s.rank}  batch_size {s.batch_size}  grad_accum {plan.grad_accum} (effective "
        f"{s.batch_size * plan.grad_accum})  seq_len {s.seq_len}  base {s.quantize or 'unquantized'}  "
        f"compute {s.compute_dtype}  checkpointing {_checkpointing(s, m.num_blocks)}  "
        f"loss {'chunked ' + str(s.chunk_rows) + ' rows' if s.chunk_rows else 'full logits'}"
        + ("  activation offload on" if s.activation_offload else ""),
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
        f"    {'headroom':<24}{_fmt(plan.budget_bytes - plan.peak_bytes)}  ({plan.headroom_verdict}: "
        f"tight below {_fmt(headroom_margin(d)).strip()})",
    ]
    if s.activation_offload:
        lines.append(f"    {'host (offloaded)':<24}{_fmt(plan.estimate.host_offload_bytes)}  (pinned host memory, "
                     "not in the budget)")
    lines += ["", f"  verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}"
              + (f", {plan.headroom_verdict}" if plan.fits else "")]
    if plan.safer_choice:
        c = plan.safer_choice
        lines.append(f"  safer choice: {c['change']} -> headroom {_fmt(c['headroom_bytes']).strip()} "
                     f"({c['headroom_verdict']})")
    sp = plan.speed
    if sp:
        lines.append(f"  speed (estimate, not measured): ~{sp['tokens_per_second']:,.0f} tokens/s, "
                     f"~{sp['hours_per_epoch']:.2f} h per epoch of {sp['dataset_tokens']:,} tokens "
                     f"({sp['bound']} bound)")
    if plan.compare is not None:
        from lamda_edge.planner.compare import describe

        lines += describe(plan.compare, plan)
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


def format_frontier(options: dict, rows: list[dict]) -> str:
    """`plan --max-seq-len`: the longest context at batch 1 per device, as the frontier tables people compare."""
    ckpt = "on" if options["gradient_checkpointing"] else "off"
    peft = "PEFT QLoRA" if options["quantize"] == "nf4" else "PEFT LoRA"
    lines = [
        f"longest context at batch 1: {options['model']}, rank {options['rank']}, base "
        f"{options['quantize'] or 'unquantized'}, checkpointing {ckpt}, "
        f"activation offload {'on' if options['activation_offload'] else 'off'}, loss "
        f"{'chunked ' + str(options['chunk_rows']) + ' rows' if options['chunk_rows'] else 'full logits'}",
        "",
        f"  {'device':<22}{'total':>10}{'usable':>10}{'max seq_len':>14}{peft:>14}",
    ]
    for r in rows:
        longest, theirs = (f"{n:,}" if n else "does not fit" for n in (r["max_seq_len"], r.get("peft_max_seq_len")))
        lines.append(f"  {r['device']:<22}{r['total_bytes'] / GIB:>6.2f} GiB{r['usable_bytes'] / GIB:>6.2f} GiB"
                     f"{longest:>14}{theirs:>14}")
    lines += ["", "  predicted by the memory model (not measured on a GPU); one sequence per step, no padding;",
              f"  {peft}: the same with PEFT's defaults (A and B train, each LoRA layer keeps its input"
              + (", fp32 upcast of embeddings and norms)" if options["quantize"] == "nf4" else ")")]
    return "\n".join(lines)
