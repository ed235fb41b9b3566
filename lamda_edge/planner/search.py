"""The search: given a device, a model shape and what the user pinned, pick rank, batch size and accumulation.

    budget  = device usable memory
    peak    = tensor peak (memory.estimate) * (1 + fragmentation margin) + runtime overhead
    fits    = peak <= budget

Rank: the LaMDA++ base rank `r0` (the budget `sum r_l^2 <= L r0^2` that energy allocation distributes); the
first of 16, 8, 4 that fits (adapter memory is small, so this rarely binds). Batch size: the largest that fits,
up to the target effective batch. Gradient checkpointing: off when the same batch fits without it (4N instead of
6N FLOP per token), else on for the fewest blocks that make it fit (partial checkpointing: each block left out
saves its recompute); always on with activation offload (what it offloads is the checkpointed inputs).
Accumulation: ceil(target / batch). Nothing fits: `DoesNotFitError` (exit 3) with the smallest changes that would
fit. Every estimate is closed-form, so a 70B shape plans in milliseconds.

Headroom: a plan that fits by less than max(3% of usable, 256 MiB) is "tight" (the estimate's own error, a
driver update or a longer batch can tip it over); the search prefers comfortable choices (a smaller batch, then
checkpointing on) and takes a tight one only when nothing comfortable fits, naming the next safer choice beside it.
`max_seq_len` binary-searches the longest context that fits at batch 1 (the long-context frontier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lamda_edge.errors import ConfigError, DoesNotFitError
from lamda_edge.families import export_support
from lamda_edge.planner.memory import DEFAULT_CHUNK_ROWS, Estimate, TrainSetup, checkpointed_block_count, estimate
from lamda_edge.planner.profiles import GIB, MIB, DeviceProfile, ModelShape, load_devices, load_models

RANKS = (16, 8, 4)
MAX_BATCH = 64
MFU = {"cuda": 0.35, "jetson": 0.30, "cpu": 0.50}  # assumed fraction of peak FLOP/s a LoRA-style step reaches
HEADROOM_FRACTION = 0.03  # a plan with less headroom than this share of usable memory ...
HEADROOM_FLOOR = 256 * MIB  # ... or than this, whichever is larger, is "tight"
MAX_SEQ_LEN = 1 << 22  # the frontier search's upper end (4M tokens)


def headroom_margin(device: DeviceProfile) -> int:
    """The headroom below which a plan is "tight": max(3% of usable memory, 256 MiB)."""
    return max(int(HEADROOM_FRACTION * device.usable_bytes), HEADROOM_FLOOR)


def headroom_verdict(device: DeviceProfile, peak: int) -> str:
    """"comfortable" when the plan leaves at least `headroom_margin`, "tight" when it fits by less, else
    "does not fit"."""
    headroom = device.usable_bytes - peak
    if headroom < 0:
        return "does not fit"
    return "comfortable" if headroom >= headroom_margin(device) else "tight"


@dataclass
class Plan:
    """A planned configuration and its memory verdict."""

    device: DeviceProfile
    model: ModelShape
    setup: TrainSetup
    estimate: Estimate
    grad_accum: int
    target_batch: int
    budget_bytes: int
    peak_bytes: int
    speed: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    safer_choice: dict | None = None  # when tight: the next safer choice and its headroom
    request: dict = field(default_factory=dict)  # what `plan` was asked (the comparison plans the same job)
    compare: dict | None = None  # the same job with PEFT LoRA / QLoRA (planner/compare.py), when asked

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    @property
    def headroom_verdict(self) -> str:
        return headroom_verdict(self.device, self.peak_bytes)

    def to_json(self) -> dict:
        """The `plan --json` object of DESIGN.md."""
        s = self.setup
        out = {
            "device": self.device.name,
            "model": self.model.name,
            "fits": self.fits,
            "rank": s.rank,
            "batch_size": s.batch_size,
            "grad_accum": self.grad_accum,
            "effective_batch": s.batch_size * self.grad_accum,
            "seq_len": s.seq_len,
            "quantize": s.quantize,
            "gradient_checkpointing": s.gradient_checkpointing,
            "checkpoint_layers": checkpointed_block_count(s, self.model.num_blocks),
            "activation_offload": s.activation_offload,
            "chunk_rows": s.chunk_rows,
            "compute_dtype": s.compute_dtype,
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
            "tensor_peak_bytes": self.estimate.tensor_peak_bytes,
            "peak_phase": self.estimate.peak_phase,
            "runtime_overhead_bytes": self.device.runtime_overhead_bytes,
            "fragmentation_margin": self.device.fragmentation_margin,
            "headroom_bytes": self.budget_bytes - self.peak_bytes,
            "headroom_margin_bytes": headroom_margin(self.device),
            "headroom_verdict": self.headroom_verdict,
            "safer_choice": self.safer_choice,
            "host_offload_bytes": self.estimate.host_offload_bytes,
            "trainable_params": self.estimate.trainable_params,
            "breakdown": dict(self.estimate.breakdown),
            "estimate": dict(self.speed),
        }
        out["exportable"], out["export_note"] = export_support(self.model.model_type, self.model.architecture)
        if self.compare is not None:
            out["compare"] = self.compare
        out.update(self.measured)
        return out


def peak_bytes(device: DeviceProfile, est: Estimate) -> int:
    """Tensor peak plus the fragmentation margin and the runtime's overhead (the number compared to the budget)."""
    return int(est.tensor_peak_bytes * (1 + device.fragmentation_margin) + device.runtime_overhead_bytes)


def speed_estimate(device: DeviceProfile, model: ModelShape, setup: TrainSetup, est: Estimate,
                   dataset_tokens: int) -> dict:
    """Throughput from the profile's FLOP/s and bandwidth: an estimate, not a measurement.

    FLOP per token with frozen weights: forward 2P, input gradients 2P, recompute 2P under checkpointing (P the
    linear-layer parameters), plus attention 4 L T (n_h d) per pass. Each micro-batch also streams the weights
    once per pass; the step takes the longer of compute and memory traffic.
    """
    P = model.parameter_count()
    passes = 2 + checkpointed_block_count(setup, model.num_blocks) / model.num_blocks  # recompute: 1 per block
    attn = 4 * model.num_blocks * setup.seq_len * model.num_attention_heads * model.head_dim / 2  # causal half
    flop_per_token = passes * (2 * P + attn)
    tflops = device.peak_tflops
    if setup.compute_dtype == "fp32" and device.fp32_tflops:
        tflops = device.fp32_tflops
    compute_s = flop_per_token * setup.tokens / (tflops * 1e12 * MFU[device.kind])
    weight_bytes = sum(v for k, v in est.resident.items() if k in ("base_weights", "base_weights_nf4", "embeddings"))
    memory_s = passes * weight_bytes / (device.memory_bandwidth_gbs * 1e9)
    step_s = max(compute_s, memory_s)
    tok_s = setup.tokens / step_s if step_s else float("inf")
    return {
        "label": "estimate from the profile's peak FLOP/s and bandwidth, not a measurement",
        "tokens_per_second": round(tok_s, 1),
        "seconds_per_micro_batch": round(step_s, 4),
        "dataset_tokens": dataset_tokens,
        "hours_per_epoch": round(dataset_tokens / tok_s / 3600, 3) if tok_s else None,
        "bound": "compute" if compute_s >= memory_s else "memory bandwidth",
    }


def _try(device, model, setup) -> tuple[Estimate, int]:
    est = estimate(model, _unpadded_single(setup))
    return est, peak_bytes(device, est)


def _unpadded_single(setup: TrainSetup) -> TrainSetup:
    """A batch of one sequence has nothing to pad: its attention mask is all ones, which transformers drops for
    SDPA (no (T, T) mask, GQA without repeat_kv). Only batches of two or more carry the padding mask."""
    return replace(setup, padding_mask=False) if setup.padding_mask and setup.batch_size == 1 else setup


def _largest_batch(device, model, setup: TrainSetup, cap: int, limit: int) -> int:
    """Largest batch in [1, cap] whose peak is at most `limit` bytes (peak is monotone in batch), 0 if none."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _try(device, model, replace(setup, batch_size=mid))[1] <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _choose(device, model, base: TrainSetup, ranks: list[int], batch_size: int | None, cap: int,
            limit: int) -> TrainSetup | None:
    """The first rank (largest first) with a batch whose peak is at most `limit`: the pinned batch, else the
    largest up to `cap`; None if none."""
    for r in ranks:
        setup = replace(base, rank=r)
        b = batch_size or _largest_batch(device, model, setup, cap, limit)
        if b and _try(device, model, replace(setup, batch_size=b))[1] <= limit:
            return replace(setup, batch_size=b)
    return None


def plan(device: DeviceProfile, model: ModelShape, seq_len: int = 512, rank: int | None = None,
         batch_size: int | None = None, target_batch: int = 16, quantize: str | None = "nf4",
         gradient_checkpointing: bool | None = None, chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
         dataset_tokens: int = 10_000_000, compute_dtype: str | None = None,
         activation_offload: bool = False, checkpoint_layers: int | None = None, method: str = "lamda",
         init: str = "principal") -> Plan:
    """Pick what was not pinned so the step fits `device`; raise `DoesNotFitError` (exit 3) if nothing does.

    Args:
        device: the device profile.
        model: the model shape.
        seq_len: tokens per sequence.
        rank: pin the LaMDA(++) base rank, or None to choose.
        batch_size: pin the micro-batch size, or None for the largest that fits (up to `target_batch`).
        target_batch: effective batch to reach with gradient accumulation.
        quantize: "nf4" (4-bit base) or None.
        gradient_checkpointing: pin on/off, or None to switch it off when the same batch fits without it.
        chunk_rows: rows per chunk of the chunked loss, None for the full-logits loss.
        dataset_tokens: tokens in one epoch, for the time estimate.
        compute_dtype: "fp32", "bf16" or "fp16"; None = the device's default (`DeviceProfile.compute_dtype`).
        activation_offload: saved activations wait in host memory (train/offload.py); refused on unified memory.
        checkpoint_layers: pin how many of the lowest blocks checkpoint, or None: all of them when checkpointing is
            pinned on, the fewest that fit when the planner decides it.
        method: "lamda", or "lora" to plan the same job with PEFT LoRA / QLoRA (planner/compare.py).
        init: LaMDA's init (`LaMDAConfig.init`); "random-residual" adds its frozen float32 low-rank term.
    """
    request = dict(seq_len=seq_len, rank=rank, batch_size=batch_size, target_batch=target_batch, quantize=quantize,
                   gradient_checkpointing=gradient_checkpointing, chunk_rows=chunk_rows, compute_dtype=compute_dtype,
                   activation_offload=activation_offload, checkpoint_layers=checkpoint_layers, init=init)
    check_offload(device, activation_offload)
    _check_request(model, rank=rank, batch_size=batch_size, target_batch=target_batch,
                   dataset_tokens=dataset_tokens)
    ranks = [rank] if rank is not None else [r for r in RANKS if r <= max_rank(model)] or [max_rank(model)]
    base = TrainSetup(batch_size=batch_size or 1, seq_len=seq_len, rank=ranks[0], quantize=quantize,
                      compute_dtype=compute_dtype or device.compute_dtype, chunk_rows=chunk_rows,
                      gradient_checkpointing=True if gradient_checkpointing is None else gradient_checkpointing,
                      activation_offload=activation_offload, checkpoint_layers=checkpoint_layers, method=method,
                      init=init)
    cap = min(max(target_batch, 1), MAX_BATCH)
    comfortable = device.usable_bytes - headroom_margin(device)
    # comfortable first; a tight plan only when nothing comfortable fits
    chosen = _choose(device, model, base, ranks, batch_size, cap, comfortable)
    if chosen is None:
        chosen = _choose(device, model, base, ranks, batch_size, cap, device.usable_bytes)
    if chosen is None:
        setup = replace(base, rank=ranks[-1], batch_size=batch_size or 1)
        est, peak = _try(device, model, setup)
        raise _does_not_fit(device, model, setup, peak)
    if gradient_checkpointing is None and not activation_offload:  # offload moves the checkpointed inputs: keep it
        off = replace(chosen, gradient_checkpointing=False)
        limit = device.usable_bytes if _try(device, model, chosen)[1] > comfortable else comfortable
        if _try(device, model, off)[1] <= limit:
            chosen = off
        elif checkpoint_layers is None:
            chosen = _fewest_checkpointed(device, model, chosen, limit)
    if batch_size is None and target_batch % chosen.batch_size:  # reach the target exactly: a divisor of it
        fitting = chosen.batch_size
        chosen = replace(chosen, batch_size=max(b for b in range(1, fitting + 1) if target_batch % b == 0))
    chosen = _unpadded_single(chosen)
    est, peak = _try(device, model, chosen)
    accum = math.ceil(target_batch / chosen.batch_size)
    return Plan(device=device, model=model, setup=chosen, estimate=est, grad_accum=accum, target_batch=target_batch,
                budget_bytes=device.usable_bytes, peak_bytes=peak,
                speed=speed_estimate(device, model, chosen, est, dataset_tokens),
                safer_choice=safer_choice(device, model, chosen, target_batch),
                request={**request, "dataset_tokens": dataset_tokens})


def _fewest_checkpointed(device: DeviceProfile, model: ModelShape, setup: TrainSetup, limit: int) -> TrainSetup:
    """Partial checkpointing: `setup` with the fewest checkpointed blocks whose peak stays within `limit` (the
    peak falls as blocks are added: each keeps its input instead of its saved set). Every block when only that
    fits; each block left out skips its recompute (1/L of a forward)."""
    lo, hi = 1, model.num_blocks  # hi always fits (it is `setup` itself)
    while lo < hi:
        mid = (lo + hi) // 2
        if _try(device, model, replace(setup, checkpoint_layers=mid))[1] <= limit:
            hi = mid
        else:
            lo = mid + 1
    return setup if hi >= model.num_blocks else replace(setup, checkpoint_layers=hi)


def safer_choice(device: DeviceProfile, model: ModelShape, setup: TrainSetup, target_batch: int) -> dict | None:
    """For a tight plan, the next safer choice: half the batch (twice the accumulation), else checkpointing on,
    else activation offload (discrete GPUs), else half the seq_len; None when the plan is comfortable.

    Returns:
        {"change", "batch_size", "grad_accum", "gradient_checkpointing", "activation_offload", "seq_len",
        "peak_bytes", "headroom_bytes", "headroom_verdict"} for the first change that gains headroom.
    """
    if headroom_verdict(device, _try(device, model, setup)[1]) == "comfortable":
        return None
    steps = []
    if setup.batch_size > 1:
        b = setup.batch_size // 2
        steps.append((f"--batch-size {b} (grad_accum {math.ceil(target_batch / b)})", replace(setup, batch_size=b)))
    if not setup.gradient_checkpointing:
        steps.append(("--checkpointing on", replace(setup, gradient_checkpointing=True)))
    if not setup.activation_offload and not device.unified_memory:
        steps.append(("--activation-offload", replace(setup, activation_offload=True)))
    if setup.seq_len > 16:
        steps.append((f"--seq-len {setup.seq_len // 2}", replace(setup, seq_len=setup.seq_len // 2)))
    current = _try(device, model, setup)[1]
    for change, safer in steps:
        peak = _try(device, model, safer)[1]
        if peak < current:
            return {"change": change, "batch_size": safer.batch_size,
                    "grad_accum": math.ceil(target_batch / safer.batch_size),
                    "gradient_checkpointing": safer.gradient_checkpointing,
                    "activation_offload": safer.activation_offload, "seq_len": safer.seq_len, "peak_bytes": peak,
                    "headroom_bytes": device.usable_bytes - peak, "headroom_verdict": headroom_verdict(device, peak)}
    return None


def check_offload(device: DeviceProfile, activation_offload: bool) -> None:
    """Activation offload moves saved activations from device to host memory; on unified memory (Jetson, the host
    CPU) both are the same memory, so it frees nothing: refused (`ConfigError`, exit 2)."""
    if activation_offload and device.unified_memory:
        raise ConfigError(f"`activation_offload` on {device.name}: its memory is unified (CPU and GPU share one "
                          "pool), so moving saved activations to host memory frees nothing and only adds copies. "
                          "Fix: leave activation_offload off (use gradient checkpointing, a shorter seq_len or a "
                          "smaller batch), or plan for a discrete GPU profile")


def max_seq_len(device: DeviceProfile, model: ModelShape, rank: int = 16, quantize: str | None = "nf4",
                gradient_checkpointing: bool = True, chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
                compute_dtype: str | None = None, activation_offload: bool = False, padding_mask: bool = False,
                upper: int = MAX_SEQ_LEN, method: str = "lamda") -> int:
    """The longest seq_len that fits `device` at batch 1 (binary search; the peak grows with seq_len), 0 if
    none. The rank is capped by the model's narrowest linear; without padding, as a long-context run packs its
    sequences (`padding_mask=False`: no (T, T) mask). `method="lora"`: the same for PEFT LoRA / QLoRA."""
    check_offload(device, activation_offload)
    setup = TrainSetup(batch_size=1, seq_len=1, rank=min(rank, max_rank(model)), quantize=quantize,
                       gradient_checkpointing=gradient_checkpointing, chunk_rows=chunk_rows,
                       compute_dtype=compute_dtype or device.compute_dtype, activation_offload=activation_offload,
                       padding_mask=padding_mask, method=method)
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _try(device, model, replace(setup, seq_len=mid))[1] <= device.usable_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_rank(model: ModelShape) -> int:
    """The largest rank every adapted linear of `model` allows: the smallest of their smaller dimensions."""
    return min(min(lin.d_in, lin.d_out) for lin in model.block_linears())


def _check_request(model: ModelShape, **values) -> None:
    """Pinned values must be positive integers (leaving one out is how to ask the planner to choose), and a pinned
    rank must fit every adapted linear (the loader refuses a larger one)."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            flag = name.replace("_", "-")
            choose = f", or leave --{flag} out to let the planner choose" if name in ("rank", "batch_size") else ""
            raise ConfigError(f"`{name}` should be a positive integer, got {value!r}. Fix: pass --{flag} >= 1"
                              f"{choose}")
    rank, largest = values.get("rank"), max_rank(model)
    if rank is not None and rank > largest:
        narrow = min(model.block_linears(), key=lambda lin: min(lin.d_in, lin.d_out))
        raise ConfigError(f"`rank` {rank} is larger than {model.name}'s {narrow.name} allows (weight "
                          f"{narrow.d_out} x {narrow.d_in}, so at most {largest}). Fix: pass --rank {largest} or "
                          "less, or leave it out to let the planner choose")


def _does_not_fit(device: DeviceProfile, model: ModelShape, setup: TrainSetup, peak: int) -> DoesNotFitError:
    """The error, with what would fit instead (a shorter seq_len, a smaller catalogue model, another device)."""
    fixes = []
    seq = setup.seq_len
    while seq > 16:
        seq //= 2
        if _try(device, model, replace(setup, seq_len=seq))[1] <= device.usable_bytes:
            fixes.append(f"--seq-len {seq}")
            break
    smaller = sorted((m for m in load_models().values() if m.architecture == model.architecture
                      and m.parameter_count() < model.parameter_count()), key=lambda m: -m.parameter_count())
    for m in smaller:
        if _try(device, m, setup)[1] <= device.usable_bytes:
            fixes.append(f"--model {m.name}")
            break
    bigger = sorted((d for d in load_devices().values() if d.kind != "cpu" and d.usable_bytes > device.usable_bytes),
                    key=lambda d: d.usable_bytes)
    for d in bigger:
        if _try(d, model, replace(setup, compute_dtype=d.compute_dtype))[1] <= d.usable_bytes:
            fixes.append(f"--device {d.name}")
            break
    if setup.quantize is None:
        fixes.insert(0, "quantize the base to NF4 (drop --no-quantize)")
    what = "; or ".join(fixes) if fixes else "no smaller change in the catalogue fits"
    message = (f"{model.name} at seq_len {setup.seq_len}, batch {setup.batch_size}, rank {setup.rank} needs "
               f"{peak / GIB:.2f} GiB on {device.name}, which has {device.usable_bytes / GIB:.2f} GiB usable. "
               f"Smallest change that fits: {what}")
    details = {"device": device.name, "model": model.name, "seq_len": setup.seq_len, "rank": setup.rank,
               "batch_size": setup.batch_size, "budget_bytes": device.usable_bytes, "peak_bytes": peak,
               "smallest_change": fixes[0] if fixes else None, "changes": fixes}
    return DoesNotFitError(message, details)
