"""merge / unmerge / merge_and_unload, after S and B have moved away from their init."""

import copy

import pytest
import torch

from lamda_edge import LaMDAConfig, apply_lamda, merge_and_unload
from lamda_edge.adapters import lamda_layers, merge, unmerge
from lamda_edge.adapters.layer import LaMDALinear


def _moved(tiny, arch, base, seed=0):
    return tiny.move(apply_lamda(tiny.model(arch, base), LaMDAConfig(rank=4)), seed, b_scale=0.1).eval()


CASES = [pytest.param(a, b, id=f"{a}-{b}") for a in ("llama", "qwen2", "bert") for b in ("fp32", "nf4")]


@pytest.fixture(scope="module")
def moved(tiny):
    """`moved(arch, base)`: a copy of `_moved(arch, base)`, built once per module (each test merges its own copy;
    the kept original never runs a forward pass)."""
    built = {}

    def get(arch, base):
        if (arch, base) not in built:
            built[arch, base] = _moved(tiny, arch, base)
        return copy.deepcopy(built[arch, base])

    return get


@pytest.mark.parametrize("arch, base", CASES)
def test_merge_and_unload_equals_the_adapter_forward(tiny, tol, moved, arch, base, ids):
    model = moved(arch, base)
    before = tiny.output(model, ids)
    init_like = apply_lamda(tiny.model(arch, base), LaMDAConfig(rank=4))
    assert (before - tiny.output(init_like, ids)).abs().max() > 1e-2  # the adapters really moved
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LaMDALinear) for m in merged.modules())
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())  # never silently re-quantized
    torch.testing.assert_close(tiny.output(merged, ids), before, atol=tol.fp32, rtol=0)


@pytest.mark.parametrize("arch, base", CASES)
def test_merge_twice_equals_once_and_unmerge_restores(tiny, tol, moved, arch, base, ids):
    model = moved(arch, base)
    before = tiny.output(model, ids)
    bases = {n: layer.base_layer for n, layer in lamda_layers(model)}
    merge(model)
    once = tiny.output(model, ids)
    merge(model)
    torch.testing.assert_close(tiny.output(model, ids), once, atol=0, rtol=0)
    torch.testing.assert_close(once, before, atol=tol.fp32, rtol=0)
    unmerge(model)
    assert all(layer.base_layer is bases[n] for n, layer in lamda_layers(model))
    torch.testing.assert_close(tiny.output(model, ids), before, atol=0, rtol=0)
