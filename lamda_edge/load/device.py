"""Every device and dtype decision in one place: where a run goes, in which precision, with which base, and how its
peak memory is read.

    'auto' | 'cpu' | 'cuda'           ──> torch.device            (CUDA when available)
    precision 'auto' | fp32/bf16/fp16 ──> compute dtype           (bf16 where the GPU or CPU multiplies it natively)
    quantize 'auto' | 'nf4' | 'none'  ──> 'nf4' or None           (NF4 on CUDA; bitsandbytes' CPU path is slow)

Each function imports torch when it runs, not this module: `lamda-edge plan --config run.yaml` resolves the run's
base (`resolve_quantize`) without loading torch.
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING

from lamda_edge.errors import ConfigError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}


def configure_cpu_threads(environ=None) -> int:
    """Choose torch's CPU threads before torch loads (OpenMP reads its environment once); returns the count.

    - `OMP_NUM_THREADS`, when set, is the user's choice and is kept; otherwise the cores this process may run on
      (`os.sched_getaffinity`: a container's or `taskset`'s limit, not the machine's count).
    - `OMP_WAIT_POLICY=PASSIVE` unless set: a waiting thread sleeps instead of spinning. On a loaded 2-core machine
      (load average 11) spinning threads made a training step 12.8x slower than 1 thread; passive waits ran at
      1.01x (tools/bench_threads.py; docs/benchmarks.md, "CPU threads on a loaded machine").

    The CLI calls this for commands that compute (train, export, generate); the Python API leaves threads to the
    caller (`torch.set_num_threads`, or these variables set before importing torch).
    """
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env["OMP_NUM_THREADS"] = str(threads)
    return threads


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or 'auto' -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N' or a torch.device as given.

    A CUDA device without an index gets the current one; CUDA where there is none is a `ConfigError`.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {device}, but CUDA is not available here. Fix: use `device=cpu`")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): then bf16 runs about 2x fp32 here."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that have it, fp16 on older ones (T4), bf16 on CPUs that multiply it natively, else
    fp32; an explicit choice is checked against the device."""
    import torch

    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16 else "fp16"
        if precision == "bf16" and not bf16:
            raise ConfigError("`precision`=bf16 but this GPU has no bf16 (e.g. a T4). Fix: use `precision=fp16`")
        return precision
    if precision == "fp16":
        raise ConfigError("`precision`=fp16 needs a GPU. Fix: use `precision=fp32` (or bf16) on the CPU")
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def resolve_compute_dtype(compute_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The loader's dtype: as given (a torch dtype or a name), else bf16 on GPUs that have it, fp16 on older GPUs
    (e.g. T4), fp32 on CPU."""
    import torch

    if isinstance(compute_dtype, str):
        if compute_dtype not in DTYPE_NAMES:
            raise ConfigError(f"`compute_dtype` should be one of {sorted(DTYPE_NAMES)}, got {compute_dtype!r}")
        return getattr(torch, DTYPE_NAMES[compute_dtype])
    if compute_dtype is not None:
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"`compute_dtype` should be float32, bfloat16 or float16, got {compute_dtype}")
        return compute_dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_quantize(quantize: str | None, device: torch.device | str) -> str | None:
    """'auto' -> 'nf4' on CUDA, None on CPU (bitsandbytes dequantizes every 4-bit weight at every CPU call);
    'none' -> None. `device` is a torch.device or its type ('cpu', 'cuda')."""
    if quantize == "auto":
        return "nf4" if getattr(device, "type", device) == "cuda" else None
    return None if quantize == "none" else quantize


class PeakMemory:
    """Peak memory of a stretch of work: the CUDA allocator's peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.kind = "process_peak_rss_lifetime"

    def peak_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
