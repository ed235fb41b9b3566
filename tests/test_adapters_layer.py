"""LaMDALinear: forward, what autograd keeps, and the frozen A."""

import pytest
import torch
from torch import nn

from lamda_edge.adapters.layer import LaMDALinear
from lamda_edge.adapters.spectral import spectral_init


def _layer(dropout=0.0, d_in=48, d_out=40, rank=4):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    init = spectral_init(base.weight, rank, "principal", scaling=2.0)
    with torch.no_grad():
        base.weight.copy_(init.residual)
    return LaMDALinear.from_factors(base, init.A, init.S, init.B, alpha=2.0 * rank, dropout=dropout)


def _saved_shapes(layer, x):
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.dtype, t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return shapes


@pytest.mark.parametrize("dropout", [pytest.param(0.0, id="no-dropout"), pytest.param(0.1, id="dropout")])
def test_adapter_path_saves_only_r_dimensional_activations(dropout):
    layer = _layer(dropout).train()
    x = torch.randn(3, 7, 48, requires_grad=True)  # x needs grad, as in the middle of a network
    weight_ptrs = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}
    activations = [(s, dt) for s, dt, ptr in _saved_shapes(layer, x) if ptr not in weight_ptrs]
    r = layer.rank
    for shape, dtype in activations:
        if dtype == torch.bool:  # the dropout mask is the only full-width thing allowed
            assert dropout > 0 and shape == (3, 7, 48)
        else:
            assert shape[-1] == r, f"adapter path saved a {shape} activation"
    masks = [s for s, dt in activations if dt == torch.bool or s[-1] == 48]
    assert len(masks) == (1 if dropout > 0 else 0)


def test_frozen_b_saves_nothing_for_b():
    layer = _layer().train()
    layer.freeze_b_columns(layer.rank)
    x = torch.randn(5, 48, requires_grad=True)
    weight_ptrs = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}
    activations = [s for s, _, ptr in _saved_shapes(layer, x) if ptr not in weight_ptrs]
    assert activations == [(5, 4)]  # only A x, for S's gradient


def test_a_is_a_buffer_and_s_b_are_parameters():
    layer = _layer()
    names = {n for n, _ in layer.named_parameters()}
    assert "lamda_A" not in names and {"lamda_S", "lamda_B"} <= names
    assert "lamda_A" in dict(layer.named_buffers())
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


def test_forward_equals_base_plus_scaled_path():
    layer = _layer()
    with torch.no_grad():
        layer.lamda_S.add_(torch.randn_like(layer.lamda_S))
    x = torch.randn(2, 48)
    expected = layer.base_layer(x) + layer.scaling * x @ layer.lamda_A.T @ layer.lamda_S.T @ layer.lamda_B.T
    torch.testing.assert_close(layer(x), expected)


def test_dropout_gradient_uses_the_same_mask():
    layer = _layer(dropout=0.25).train()
    x = torch.randn(6, 48, requires_grad=True)
    torch.manual_seed(123)
    layer(x).sum().backward()
    torch.manual_seed(123)
    keep = torch.rand_like(x) >= 0.25  # the mask the forward drew
    h = (x * keep / 0.75).detach().requires_grad_(True)
    ref = layer.scaling * h @ layer.lamda_A.T @ layer.lamda_S.T @ layer.lamda_B.T  # the adapter path alone
    ref.sum().backward()
    base_grad = torch.ones(6, 40) @ layer.base_layer.weight
    torch.testing.assert_close(x.grad, base_grad + h.grad * keep / 0.75)


@pytest.mark.parametrize("dropout", [pytest.param(0.0, id="no-dropout"), pytest.param(0.1, id="dropout")])
def test_backward_under_bf16_autocast(dropout):
    layer = _layer(dropout).train()
    x = torch.randn(4, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert layer.lamda_S.grad is not None and layer.lamda_S.grad.dtype == torch.float32


def test_from_factors_copies_float32_factors_onto_the_base_device():
    torch.manual_seed(0)
    base = nn.Linear(48, 40, dtype=torch.bfloat16)
    A, S, B = torch.randn(4, 48, dtype=torch.float64), torch.randn(4, 4), torch.randn(40, 4, dtype=torch.bfloat16)
    layer = LaMDALinear.from_factors(base, A, S, B, alpha=8.0, dropout=0.1)
    assert (layer.rank, layer.scaling, layer.dropout) == (4, 2.0, 0.1)
    for name, value in (("lamda_A", A), ("lamda_S", S), ("lamda_B", B)):
        got = getattr(layer, name)
        assert got.dtype == torch.float32 and got.device == base.weight.device
        assert torch.equal(got, value.float()) and got.data_ptr() != value.data_ptr()  # a copy, not an alias
    assert layer.base_layer is base and not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param(((4, 47), (4, 4), (40, 4)), id="A-d_in"),
        pytest.param(((4, 48), (4, 4), (41, 4)), id="B-d_out"),
        pytest.param(((4, 48), (4, 4), (40, 3)), id="B-rank"),
    ],
)
def test_from_factors_refuses_factors_that_do_not_fit(shapes):
    from lamda_edge.errors import ModelError

    A, S, B = (torch.zeros(s) for s in shapes)
    with pytest.raises(ModelError, match="do not fit a rank-4 layer 40 x 48"):
        LaMDALinear.from_factors(nn.Linear(48, 40), A, S, B, alpha=8.0)


@pytest.mark.parametrize("quantize", [pytest.param(None, id="plain"), pytest.param("nf4", id="nf4")])
def test_layer_merge_is_idempotent_and_unmerge_restores_the_base_object(quantize):
    from lamda_edge.adapters.bnb import build_base, dequantize_weight

    torch.manual_seed(0)
    weight, bias = torch.randn(40, 48), torch.randn(40)
    init = spectral_init(weight, 4, "principal", scaling=2.0)
    base = build_base(init.residual, bias, quantize, torch.float32, "cpu")
    layer = LaMDALinear.from_factors(base, init.A, init.S, init.B, alpha=8.0).eval()
    with torch.no_grad():  # move S and B away from their init, or merge proves nothing
        layer.lamda_S.add_(0.5 * torch.randn(4, 4))
        layer.lamda_B.add_(0.1 * torch.randn(40, 4))
    x = torch.randn(5, 48)
    with torch.no_grad():
        before = layer(x)
    expected = dequantize_weight(base) + 2.0 * layer.lamda_B.detach() @ layer.lamda_S.detach() @ layer.lamda_A
    layer.merge()
    assert layer.merged and layer.unmerged_base is base and type(layer.base_layer) is nn.Linear
    assert torch.equal(layer.base_layer.weight, expected)  # W_base + s * B S A, in float32
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    merged_base = layer.base_layer
    layer.merge()
    assert layer.base_layer is merged_base
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    assert not layer.merged and layer.base_layer is base and layer.unmerged_base is None
    layer.unmerge()
    assert layer.base_layer is base
    with torch.no_grad():
        assert torch.equal(layer(x), before)


def test_frozen_b_count_is_read_without_touching_the_buffer():
    """The backward hook reads a Python int (no device sync per layer on CUDA), kept beside the saved buffer."""
    layer = _layer().train()
    layer.freeze_b_columns(2)
    assert int(layer.lamda_B_frozen) == layer.frozen_b_columns == 2
    layer._buffers["lamda_B_frozen"] = torch.empty((), dtype=torch.long, device="meta")  # int() of it would raise
    layer(torch.randn(3, 48)).sum().backward()
    assert layer.frozen_b_columns == 2
    assert torch.equal(layer.lamda_B.grad[:, :2], torch.zeros(40, 2)) and layer.lamda_B.grad[:, 2:].abs().sum() > 0


def test_loading_a_state_dict_sets_the_frozen_b_count():
    source = _layer()
    source.freeze_b_columns(3)
    layer = _layer()
    assert layer.frozen_b_columns == 0
    layer.load_state_dict(source.state_dict())
    assert layer.frozen_b_columns == 3 and layer.lamda_B.requires_grad
    layer.load_state_dict({"lamda_B_frozen": torch.tensor(4)}, strict=False)
    assert layer.frozen_b_columns == 4 and not layer.lamda_B.requires_grad


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_forward_and_gradients_equal_the_formula(dtype, rtol):
    """y = W x + b + s B S A x, and S's and B's gradients, against float64 math: fp32 within 1e-5, bf16 within
    bf16 rounding (the lean path casts the r x d factors, never the activations)."""
    layer = _layer()
    with torch.no_grad():
        layer.lamda_S.add_(0.3 * torch.randn_like(layer.lamda_S))
        layer.lamda_B.add_(0.3 * torch.randn_like(layer.lamda_B))
    layer.base_layer.to(dtype)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1))
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    y.float().square().sum().backward()
    W, b = (t.detach().double() for t in (layer.base_layer.weight, layer.base_layer.bias))
    A = layer.lamda_A.double()
    S = layer.lamda_S.detach().double().requires_grad_(True)
    B = layer.lamda_B.detach().double().requires_grad_(True)
    x64 = x.to(dtype).double()
    want = x64 @ W.T + b + layer.scaling * (x64 @ A.T @ S.T @ B.T)
    want.square().sum().backward()
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())
    for got, ref in ((layer.lamda_S.grad, S.grad), (layer.lamda_B.grad, B.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())
