"""init="random-residual": a random adapter (S = 0) over the spectral residual base, the principal part kept as a
frozen low-rank term (lamda_edge/adapters/spectral.py, layer.py): step 0, merge, save/load, freezing, counts, the
NF4 error and the prepared-layer cache."""

import copy

import pytest
import torch

from lamda_edge import LaMDAConfig, PMBScheduler, apply_lamda, load_adapter, merge_and_unload, save_adapter
from lamda_edge.adapters import lamda_layers, make_lamda_linear, param_groups, trainable_parameter_count
from lamda_edge.adapters.bnb import dequantize_weight
from lamda_edge.adapters.layer import LaMDALinear
from lamda_edge.errors import ModelError

HYBRID = LaMDAConfig(rank=4, init="random-residual")
CASES = [pytest.param(a, b, id=f"{a}-{b}") for a in ("llama", "bert") for b in ("fp32", "nf4")]


def _weight(d_out=96, d_in=128, seed=0):
    """A weight with a decaying spectrum, like pretrained weights, (d_out, d_in)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d_in, d_out, generator=g))
    sigma = 1.0 / torch.arange(1, d_out + 1).float()
    return (U * sigma) @ V.T + 0.002 * torch.randn(d_out, d_in, generator=g)


@pytest.mark.parametrize("arch, base", CASES)
def test_step_zero_output_equals_the_base_model(tiny, tol, arch, base, ids):
    model = tiny.model(arch, base)
    before = tiny.output(model, ids)
    apply_lamda(model, HYBRID)
    tol.assert_outputs_close(tiny.output(model, ids), before, base)
    for _, layer in lamda_layers(model):
        assert layer.frozen_rank == 4 and torch.count_nonzero(layer.lamda_S) == 0


def test_the_adapter_is_randoms_and_the_base_holds_the_principal_part(tiny):
    """Same seed: the same A, B (and S = 0) as init="random"; the frozen part is principal's s B S A, and the
    base is principal's residual."""
    layers = {init: dict(lamda_layers(apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4, init=init))))
              for init in ("random", "principal", "random-residual")}
    for name, hybrid in layers["random-residual"].items():
        random, principal = layers["random"][name], layers["principal"][name]
        for key in ("lamda_A", "lamda_S", "lamda_B"):
            assert torch.equal(getattr(hybrid, key), getattr(random, key)), key
        torch.testing.assert_close(hybrid.frozen_U @ hybrid.frozen_Vt, principal.delta_weight(), atol=1e-5, rtol=0)
        assert torch.equal(hybrid.base_layer.weight, principal.base_layer.weight)
        assert random.frozen_rank == principal.frozen_rank == 0


def test_on_a_full_precision_base_it_computes_what_random_computes(tiny, tol, ids):
    random = tiny.move(apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4, init="random")), b_scale=0.1).eval()
    hybrid = tiny.move(apply_lamda(tiny.model("llama"), HYBRID), b_scale=0.1).eval()
    tol.assert_outputs_close(tiny.output(hybrid, ids), tiny.output(random, ids))


@pytest.mark.parametrize("arch, base", CASES)
def test_merge_and_unload_equals_the_adapter_forward(tiny, tol, arch, base, ids):
    model = tiny.move(apply_lamda(tiny.model(arch, base), HYBRID), b_scale=0.1).eval()
    before = tiny.output(model, ids)
    without_frozen = copy.deepcopy(model)
    for _, layer in lamda_layers(without_frozen):
        layer.frozen_U = None
        layer.frozen_Vt = None
    assert float((tiny.output(without_frozen, ids) - before).norm() / before.norm()) > 1e-2  # the part matters
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LaMDALinear) for m in merged.modules())
    torch.testing.assert_close(tiny.output(merged, ids), before, atol=tol.fp32, rtol=0)


def test_merge_then_unmerge_restores_and_adds_the_frozen_part_once(tiny, tol, ids):
    model = tiny.move(apply_lamda(tiny.model("llama"), HYBRID), b_scale=0.1).eval()
    before = tiny.output(model, ids)
    for _, layer in lamda_layers(model):
        layer.merge()
    torch.testing.assert_close(tiny.output(model, ids), before, atol=tol.fp32, rtol=0)
    for _, layer in lamda_layers(model):
        layer.unmerge()
    torch.testing.assert_close(tiny.output(model, ids), before, atol=0, rtol=0)


def test_save_and_load_reproduce_outputs_and_the_file_holds_no_base(tiny, tmp_path, ids):
    model = tiny.move(apply_lamda(tiny.model("llama"), HYBRID), b_scale=0.1).eval()
    expected = tiny.output(model, ids)
    save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "lamda_adapter.safetensors"))
    assert saved and not any("frozen_U" in k or "frozen_Vt" in k for k in saved)  # rebuilt from the base weights
    fresh = tiny.model("llama")
    load_adapter(fresh, tmp_path / "adapter")
    assert all(layer.frozen_rank == 4 for _, layer in lamda_layers(fresh))
    torch.testing.assert_close(tiny.output(fresh, ids), expected, atol=0, rtol=0)


def test_lamda_stays_lamda_frozen_a_and_term_trainable_s_b_frozen_after_t_i(tiny):
    """Trainable: r^2 + d_out r per layer, then sum r^2 after t_i; A and the frozen term never move."""
    model = apply_lamda(tiny.model("llama"), HYBRID)
    layers = [layer for _, layer in lamda_layers(model)]
    assert trainable_parameter_count(model) == sum(4 * 4 + layer.out_features * 4 for layer in layers)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("frozen" in n or "lamda_A" in n for n in names)
    kept = {id(layer): (layer.lamda_A.clone(), layer.frozen_U.clone(), layer.frozen_Vt.clone()) for layer in layers}
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2), weight_decay=0.1)
    scheduler = PMBScheduler(model, 2)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step(optimizer)
        optimizer.zero_grad()
    assert trainable_parameter_count(model) == sum(4 * 4 for _ in layers)
    for layer in layers:
        assert torch.count_nonzero(layer.lamda_S) > 0  # S left 0
        for before, now in zip(kept[id(layer)], (layer.lamda_A, layer.frozen_U, layer.frozen_Vt)):
            assert torch.equal(before, now)


def test_nf4_error_is_principals_and_below_plain_nf4():
    """The same residual is quantized as under "principal", so the same error against W0, below plain NF4; the
    report's number is the error of what the layer computes."""
    weight = _weight()
    hybrid, report = make_lamda_linear(weight, None, 8, LaMDAConfig(rank=8, init="random-residual"), "nf4")
    _, principal = make_lamda_linear(weight, None, 8, LaMDAConfig(rank=8), "nf4")
    _, random = make_lamda_linear(weight, None, 8, LaMDAConfig(rank=8, init="random"), "nf4")
    assert report["quant_error"] == pytest.approx(principal["quant_error"], rel=1e-4)
    assert report["quant_error"] < report["plain_nf4_error"]
    assert random["quant_error"] == pytest.approx(random["plain_nf4_error"], rel=1e-6)  # random: W0 quantized
    merged = hybrid.base_weight() + hybrid.delta_weight()
    assert float((merged - weight).norm() / weight.norm()) == pytest.approx(report["quant_error"], rel=1e-4)
    assert report["frozen_rank"] == 8


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["plain", "nf4"])
def test_cached_layer_is_identical_to_the_prepared_one(quantize):
    from lamda_edge.load.cache import build_layer, layer_tensors

    fresh, _ = make_lamda_linear(_weight(40, 48), torch.randn(40), 4, HYBRID, quantize, torch.float32, "cpu")
    cached = build_layer("m.q", layer_tensors("m.q", fresh), HYBRID.alpha, HYBRID.dropout, quantize, torch.float32,
                         torch.device("cpu"))
    assert cached.frozen_rank == 4
    assert torch.equal(dequantize_weight(cached.base_layer), dequantize_weight(fresh.base_layer))
    for name, value in fresh.state_dict().items():
        assert torch.equal(cached.state_dict()[name], value), name
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(cached.eval()(x), fresh.eval()(x))


def test_a_frozen_part_of_the_wrong_shape_is_refused():
    layer, _ = make_lamda_linear(_weight(40, 48), None, 4, LaMDAConfig(rank=4), None)
    with pytest.raises(ModelError, match=r"does not fit a 40 x 48 layer"):
        layer.set_frozen_part(torch.zeros(40, 4), torch.zeros(3, 48))


@pytest.mark.parametrize("init", ["random", "random-residual"])
def test_every_layer_draws_its_own_random_subspace(tiny, init):
    """The random factors come from the seed and the layer's name: layers of one shape do not share A or B (they
    once did: every q_proj read the same r input directions), and the same seed gives the same factors again."""
    config = LaMDAConfig(rank=4, init=init, seed=3)
    layers = dict(lamda_layers(apply_lamda(tiny.model("llama"), config)))
    again = dict(lamda_layers(apply_lamda(tiny.model("llama"), config)))
    other_seed = dict(lamda_layers(apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4, init=init, seed=4))))
    first, second = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert layers[first].lamda_A.shape == layers[second].lamda_A.shape
    # the subspaces differ: the overlap of two random 4-dim subspaces is far from the identity's 1.0
    overlap = torch.linalg.matrix_norm(layers[first].lamda_A @ layers[second].lamda_A.T) / 2.0
    assert overlap < 0.9
    assert not torch.equal(layers[first].lamda_B, layers[second].lamda_B)
    for name, layer in layers.items():
        assert torch.equal(layer.lamda_A, again[name].lamda_A) and torch.equal(layer.lamda_B, again[name].lamda_B)
        assert not torch.equal(layer.lamda_A, other_seed[name].lamda_A)
