"""Count the bytes of live tensor storages, exactly, on any device (the CPU truth for the planner).

`LiveTensorCounter` is a `TorchDispatchMode`: every aten op that runs while it is active passes
through it, and every storage that an op's outputs hold and that the counter has not seen yet is
counted (``untyped_storage().nbytes()``) and watched with a finalizer that subtracts it again when
the storage dies. Tensors that already exist when counting starts (weights, optimizer state,
inputs) are counted with `register`. Views and in-place results share a storage and are not
counted twice.

    counter = LiveTensorCounter().register(model, optimizer, batch)
    with counter:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    counter.peak_bytes      # the step's peak of live tensor bytes, weights included

What it does not see: memory a kernel allocates internally without returning it as a tensor
(rare on CPU), the allocator's rounding and caching, and the runtime's own overhead (CUDA
context, Python). `torch.profiler`'s raw memory records agree with it on a CPU training step
(tests/test_memcount.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class _Size:
    """A mutable byte count shared by a storage's table entry and its finalizer (storages can resize)."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class LiveTensorCounter(TorchDispatchMode):
    """Counts the bytes of live tensor storages and their peak.

    Attributes:
        current_bytes: bytes of the counted storages alive now.
        peak_bytes: the largest `current_bytes` seen since creation or the last `reset_peak()`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current_bytes = 0
        self.peak_bytes = 0

    # ---- counting ----------------------------------------------------------------------------------------------

    def _release(self, size: _Size) -> None:
        self.current_bytes -= size.nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.layout != torch.strided or not hasattr(t, "untyped_storage"):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, functional or otherwise storage-less tensors
            return
        nbytes = st.nbytes()
        size = self._live.get(st)
        if size is None:
            size = _Size(nbytes)
            self._live[st] = size
            weakref.finalize(st, self._release, size)
            self.current_bytes += nbytes
        elif size.nbytes != nbytes:  # resize_ on a storage we count
            self.current_bytes += nbytes - size.nbytes
            size.nbytes = nbytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes

    def register(self, *objs) -> LiveTensorCounter:
        """Count tensors that exist already: tensors, modules (parameters, buffers, gradients), optimizers
        (their state), and dicts/lists/tuples of these (a batch). Returns self, for chaining."""
        for obj in objs:
            self._register_one(obj)
        return self

    def _register_one(self, obj) -> None:
        if obj is None:
            return
        if isinstance(obj, torch.Tensor):
            self._track(obj)
            if obj.grad is not None:
                self._track(obj.grad)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                self._register_one(p)
            for b in obj.buffers():
                self._track(b)
            for m in obj.modules():  # bitsandbytes keeps its quantization constants outside parameters/buffers
                qs = getattr(getattr(m, "weight", None), "quant_state", None)
                if qs is not None:
                    self._register_quant_state(qs)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                self._register_one(state)
        elif isinstance(obj, Mapping):
            for v in obj.values():
                self._register_one(v)
        elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
            for v in obj:
                self._register_one(v)
        elif hasattr(obj, "items"):  # e.g. transformers BatchEncoding
            for _, v in obj.items():
                self._register_one(v)

    def _register_quant_state(self, qs) -> None:
        for name in ("absmax", "code"):
            t = getattr(qs, name, None)
            if isinstance(t, torch.Tensor):
                self._track(t)
        if getattr(qs, "state2", None) is not None:  # double quantization
            self._register_quant_state(qs.state2)
        offset = getattr(qs, "offset", None)
        if isinstance(offset, torch.Tensor):
            self._track(offset)

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self.peak_bytes = self.current_bytes

    # ---- the dispatch hook -------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def register_bytes(counter: LiveTensorCounter, *objs) -> int:
    """Bytes that `counter.register(*objs)` adds (for reports: weights vs step)."""
    before = counter.current_bytes
    counter.register(*objs)
    return counter.current_bytes - before
