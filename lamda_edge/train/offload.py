"""Activation offload: what autograd saves for backward waits in host memory instead of on the GPU.

The equivalent of `torch.autograd.graph.save_on_cpu(pin_memory=True)` that also counts its host bytes. Wrapped
around the forward (model body + chunked loss), with gradient checkpointing on:

    forward   block i input ──pack──> host (pinned)        every checkpointed block keeps only its input,
                                                           saved by the checkpoint outside its own hooks
    backward  host ──unpack──> device copy ─> recompute block i ─> its gradients ─> copy freed

so the device holds one block's input at a time instead of all L of them (and the final norm's input and the loss
chunks' inputs wait in host memory too). Without checkpointing everything autograd saves goes to the host.
Parameters and tensors under `min_bytes` stay where they are (copying the weights every step would gain nothing);
a tensor saved twice (RMSNorm's input, by `pow` and by `mul`) is copied once.

On a CPU (tests, `plan --measure` here) the host copy is made outside any `TorchDispatchMode`, so
`LiveTensorCounter` counts it as host memory, not device memory, and unpacking makes a counted copy, as the GPU's
copy back would be: the measured peak then behaves as on a GPU. On unified memory (Jetson) it frees nothing;
the run config refuses it there.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

MIN_OFFLOAD_BYTES = 1024  # smaller saved tensors stay on the device (their copies cost more than they free)


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s strides are a permutation of a contiguous layout (no gaps, no overlap)."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


class _Bytes:
    """Live host bytes and their peak, shared with the finalizers of the host copies."""

    __slots__ = ("live", "peak", "total")

    def __init__(self) -> None:
        self.live = self.peak = self.total = 0

    def add(self, n: int) -> None:
        self.live += n
        self.total += n
        self.peak = max(self.peak, self.live)

    def free(self, n: int) -> None:
        self.live -= n


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """A context manager: tensors autograd saves inside it are copied to host memory (pinned when CUDA is used)
    and copied back to their device when backward needs them.

    Attributes:
        host_bytes: the host bytes alive now (offloaded tensors whose backward has not run yet).
        peak_host_bytes: the largest `host_bytes` since creation or `reset()`.
        offloaded_bytes: all bytes copied to the host since creation or `reset()`.
    """

    def __init__(self, pin_memory: bool | None = None, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self._bytes = _Bytes()
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.min_bytes = min_bytes
        counted = self._bytes

        copies = WeakIdKeyDictionary()  # tensor -> (version, its packed copy): one host copy per tensor

        def pack(tensor: torch.Tensor):
            nbytes = tensor.numel() * tensor.element_size()
            if isinstance(tensor, torch.nn.Parameter) or nbytes < min_bytes or tensor.layout != torch.strided:
                return tensor
            known = copies.get(tensor)
            if known is not None and known[0] == tensor._version:  # saved twice (RMSNorm's x by pow and mul)
                return known[1]
            pin = self.pin_memory and tensor.is_cuda
            with _disable_current_modes():  # a host copy: not device memory for a LiveTensorCounter
                if _dense(tensor):  # keep the layout (a transposed view stays transposed): the same kernels
                    host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, pin_memory=pin)
                else:
                    host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=pin)
                host.copy_(tensor)
            counted.add(nbytes)
            weakref.finalize(host, counted.free, nbytes)
            packed = (tensor.device, host)
            copies[tensor] = (tensor._version, packed)
            return packed

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            if device.type == "cpu":
                return host.clone()  # a "device" copy, as on a GPU (counted by a LiveTensorCounter)
            return host.to(device, non_blocking=self.pin_memory)

        super().__init__(pack, unpack)

    @property
    def host_bytes(self) -> int:
        return self._bytes.live

    @property
    def peak_host_bytes(self) -> int:
        return self._bytes.peak

    @property
    def offloaded_bytes(self) -> int:
        return self._bytes.total

    def reset(self) -> None:
        """Start counting the peak and the total anew (the live bytes stay)."""
        self._bytes.peak = self._bytes.live
        self._bytes.total = 0


def offload_context(enabled: bool, pin_memory: bool | None = None):
    """`ActivationOffload()` when `enabled`, else a context that does nothing."""
    import contextlib

    return ActivationOffload(pin_memory) if enabled else contextlib.nullcontext()
