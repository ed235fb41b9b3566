"""The search: given a device, a model shape and what the user pinned, pick rank, batch size and accumulation.

    budget  = device usable memory
    peak    = tensor peak (memory.estimate) * (1 + fragmentation margin) + runtime overhead
    fits    = peak <= budget

Rank: the LaMDA++ base rank `r0` (the budget `sum r_l^2 <= L r0^2` that energy allocation distributes); the
first of 16, 8, 4 that fits (adapter memory is small, so this rarely binds). Batch size: the largest that fits,
up to the target effective batch. Gradient checkpointing: off when the same batch fits without it (4N instead of
6N FLOP per token), else on. Accumulation: ceil(target / batch). Nothing fits: `DoesNotFitError` (exit 3)
with the smallest changes that would fit. Every estimate is closed-form, so a 70B shape plans in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lamda_edge.errors import ConfigError, DoesNotFitError
from lamda_edge.families import export_support
from lamda_edge.planner.memory import DEFAULT_CHUNK_ROWS, Estimate, TrainSetup, estimate
from lamda_edge.planner.profiles import GIB, DeviceProfile, ModelShape, load_devices, load_models

RANKS = (16, 8, 4)
MAX_BATCH = 64
MFU = {"cuda": 0.35, "jetson": 0.30, "cpu": 0.50}  # assumed fraction of peak FLOP/s a LoRA-style step reaches


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

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

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
            "chunk_rows": s.chunk_rows,
            "compute_dtype": s.compute_dtype,
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
            "tensor_peak_bytes": self.estimate.tensor_peak_bytes,
            "peak_phase": self.estimate.peak_phase,
            "runtime_overhead_bytes": self.device.runtime_overhead_bytes,
            "fragmentation_margin": self.device.fragmentation_margin,
            "headroom_bytes": self.budget_bytes - self.peak_bytes,
            "trainable_params": self.estimate.trainable_params,
            "breakdown": dict(self.estimate.breakdown),
            "estimate": dict(self.speed),
        }
        out["exportable"], out["export_note"] = export_support(self.model.model_type, self.model.architecture)
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
    passes = 3 if setup.gradient_checkpointing else 2
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
    est = estimate(model, setup)
    return est, peak_bytes(device, est)


def _largest_batch(device, model, setup: TrainSetup, cap: int) -> int:
    """Largest batch in [1, cap] that fits (peak is monotone in batch), 0 if none."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _try(device, model, replace(setup, batch_size=mid))[1] <= device.usable_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(device: DeviceProfile, model: ModelShape, seq_len: int = 512, rank: int | None = None,
         batch_size: int | None = None, target_batch: int = 16, quantize: str | None = "nf4",
         gradient_checkpointing: bool | None = None, chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
         dataset_tokens: int = 10_000_000, compute_dtype: str | None = None) -> Plan:
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
    """
    _check_request(model, rank=rank, batch_size=batch_size, target_batch=target_batch,
                   dataset_tokens=dataset_tokens)
    ranks = [rank] if rank is not None else [r for r in RANKS if r <= max_rank(model)] or [max_rank(model)]
    base = TrainSetup(batch_size=batch_size or 1, seq_len=seq_len, rank=ranks[0], quantize=quantize,
                      compute_dtype=compute_dtype or device.compute_dtype, chunk_rows=chunk_rows,
                      gradient_checkpointing=True if gradient_checkpointing is None else gradient_checkpointing)
    cap = min(max(target_batch, 1), MAX_BATCH)
    chosen = None
    for r in ranks:
        setup = replace(base, rank=r)
        b = batch_size or _largest_batch(device, model, setup, cap)
        if b and _try(device, model, replace(setup, batch_size=b))[1] <= device.usable_bytes:
            chosen = replace(setup, batch_size=b)
            break
    if chosen is None:
        setup = replace(base, rank=ranks[-1], batch_size=batch_size or 1)
        est, peak = _try(device, model, setup)
        raise _does_not_fit(device, model, setup, peak)
    if gradient_checkpointing is None:
        off = replace(chosen, gradient_checkpointing=False)
        if _try(device, model, off)[1] <= device.usable_bytes:
            chosen = off
    if batch_size is None and target_batch % chosen.batch_size:  # reach the target exactly: a divisor of it
        fitting = chosen.batch_size
        chosen = replace(chosen, batch_size=max(b for b in range(1, fitting + 1) if target_batch % b == 0))
    est, peak = _try(device, model, chosen)
    accum = math.ceil(target_batch / chosen.batch_size)
    return Plan(device=device, model=model, setup=chosen, estimate=est, grad_accum=accum, target_batch=target_batch,
                budget_bytes=device.usable_bytes, peak_bytes=peak,
                speed=speed_estimate(device, model, chosen, est, dataset_tokens))


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
