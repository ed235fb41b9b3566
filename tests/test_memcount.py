"""LiveTensorCounter: exact live-storage bytes, cross-checked against torch.profiler's raw memory records."""

from __future__ import annotations

import pytest
import torch

from lamda_edge.planner.live_tensors import LiveTensorCounter, register_bytes


def _mlp(d_in: int, d_hidden: int, d_out: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(), torch.nn.Linear(d_hidden, d_out))


def _profiler_peak(fn) -> int:
    """Peak of the running sum of the profiler's raw allocation records (bytes above the start)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    cur = peak = 0
    for _, size in sorted(sizes):
        cur += size
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("batch,d_out", [pytest.param(8, 500, id="b8-v500"), pytest.param(32, 300, id="b32-v300")])
def test_counter_matches_profiler_on_a_training_step(batch, d_out):
    model = _mlp(64, 128, d_out)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, 64), torch.randint(0, d_out, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # create the optimizer state first, so both measure the same steady-state step
    counter = LiveTensorCounter().register(model, opt, x, y)
    resident = counter.current_bytes
    with counter:
        step()
    counted = counter.peak_bytes - resident
    profiled = _profiler_peak(step)
    assert counted > 0
    assert abs(counted - profiled) <= max(64, 0.001 * profiled), (counted, profiled)
    assert counter.current_bytes == resident  # everything the step made and dropped was released


def test_register_counts_weights_grads_optimizer_state_once():
    model = _mlp(16, 32, 8)
    n_param = sum(p.numel() * p.element_size() for p in model.parameters())
    counter = LiveTensorCounter()
    assert register_bytes(counter, model) == n_param
    assert register_bytes(counter, model, [model]) == 0  # already counted
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    added = register_bytes(counter, model, opt)
    # grads (n_param) + exp_avg + exp_avg_sq (2 * n_param) + one fp32 step scalar per parameter tensor
    n_tensors = len(list(model.parameters()))
    assert added == 3 * n_param + 4 * n_tensors


def test_views_and_inplace_do_not_double_count_and_peak_resets():
    counter = LiveTensorCounter()
    with counter:
        a = torch.zeros(1000)  # 4000 B
        v = a.view(10, 100)
        a.add_(1.0)
        b = v[1:3]
        assert counter.current_bytes == 4000
        c = a * 2  # another 4000 B
        assert counter.current_bytes == 8000
        del c
        assert counter.current_bytes == 4000
        assert counter.peak_bytes == 8000
        counter.reset_peak()
        assert counter.peak_bytes == 4000
    del a, v, b
    assert counter.current_bytes == 0
