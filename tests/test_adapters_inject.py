"""apply_lamda: step-0 equality, trainable counts, targets, Conv1D, LaMDA++ ranks, and its errors."""

import pytest
import torch

from lamda_edge import ConfigError, LaMDAConfig, apply_lamda
from lamda_edge.adapters import lamda_layers, make_lamda_linear, trainable_parameter_count
from lamda_edge.errors import ModelError

CASES = [
    pytest.param(arch, base, init, id=f"{arch}-{base}-{init}")
    for arch in ("llama", "qwen2", "bert")
    for base in ("fp32", "nf4")
    for init in ("principal", "minor")
]


@pytest.mark.parametrize("arch, base, init", CASES)
def test_step_zero_output_equals_the_base_model(tiny, tol, arch, base, init, ids):
    model = tiny.model(arch, base)
    before = tiny.output(model, ids)
    apply_lamda(model, LaMDAConfig(rank=4, init=init))
    after = tiny.output(model, ids)
    tol.assert_outputs_close(after, before, base)


def test_random_init_leaves_the_base_exact(tiny, ids):
    model = tiny.model("llama")
    before = tiny.output(model, ids)
    apply_lamda(model, LaMDAConfig(rank=4, init="random"))
    torch.testing.assert_close(tiny.output(model, ids), before, atol=0, rtol=0)
    for _, layer in lamda_layers(model):
        eye = torch.eye(4)
        torch.testing.assert_close(layer.lamda_A @ layer.lamda_A.T, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lamda_B.T @ layer.lamda_B, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_trainable_count_is_r2_plus_dout_r_then_r2(tiny, arch):
    model = tiny.model(arch)
    apply_lamda(model, LaMDAConfig(rank=4))
    layers = [layer for _, layer in lamda_layers(model)]
    assert trainable_parameter_count(model) == sum(4 * 4 + layer.out_features * 4 for layer in layers)
    for layer in layers:
        layer.freeze_b_columns(layer.rank)
    assert trainable_parameter_count(model) == sum(4 * 4 for _ in layers)


def test_all_linear_skips_the_head_and_targets_match_suffixes(tiny):
    model = tiny.model("llama")
    apply_lamda(model, LaMDAConfig(rank=2))
    names = [n for n, _ in lamda_layers(model)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    model = tiny.model("llama")
    apply_lamda(model, LaMDAConfig(rank=2, target_modules=("q_proj", "v_proj")))
    assert sorted({n.split(".")[-1] for n, _ in lamda_layers(model)}) == ["q_proj", "v_proj"]


def test_gpt2_conv1d_is_converted_exactly(tiny, tol, ids):
    model = tiny.model("gpt2")
    before = tiny.output(model, ids)
    apply_lamda(model, LaMDAConfig(rank=4, target_modules=("c_attn", "c_proj", "c_fc")))
    torch.testing.assert_close(tiny.output(model, ids), before, atol=tol.fp32, rtol=0)
    assert len(lamda_layers(model)) == 2 * 4


def test_modules_to_save_train_in_full(tiny):
    model = tiny.model("bert")
    apply_lamda(model, LaMDAConfig(rank=2, modules_to_save=("classifier",)))
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


def test_energy_allocation_gives_per_layer_ranks_within_budget(tiny):
    model = tiny.model("llama")
    cfg = LaMDAConfig(rank=4, rank_allocation="energy")
    apply_lamda(model, cfg)
    ranks = [layer.rank for _, layer in lamda_layers(model)]
    lo, hi = cfg.rank_bounds
    assert len(set(ranks)) > 1
    assert all(lo <= r <= hi for r in ranks)
    assert 0.95 * len(ranks) * 16 <= sum(r * r for r in ranks) <= len(ranks) * 16


def test_no_match_lists_the_linear_names(tiny):
    model = tiny.model("llama")
    with pytest.raises(ModelError) as info:
        apply_lamda(model, LaMDAConfig(target_modules=("query",)))
    assert "q_proj" in str(info.value) and "down_proj" in str(info.value)


def test_rank_larger_than_a_layer_allows(tiny):
    model = tiny.model("llama")
    with pytest.raises(ConfigError, match="larger than layer"):
        apply_lamda(model, LaMDAConfig(rank=40, max_rank=80))


def test_applying_twice_is_refused(tiny):
    model = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=2))
    with pytest.raises(ModelError, match="already"):
        apply_lamda(model, LaMDAConfig(rank=2))


def test_unknown_modules_to_save(tiny):
    with pytest.raises(ModelError, match="modules_to_save"):
        apply_lamda(tiny.model("llama"), LaMDAConfig(rank=2, modules_to_save=("head_that_is_not_there",)))


def test_make_lamda_linear_nf4_error_is_below_plain_nf4():
    """Spectral residual quantization of a full-precision weight beats plain NF4 (docs/method.md, 4-bit base)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 96, generator=g))
    V, _ = torch.linalg.qr(torch.randn(128, 96, generator=g))
    sigma = 1.0 / torch.arange(1, 97).float()  # a decaying spectrum, like pretrained weights
    weight = (U * sigma) @ V.T + 0.002 * torch.randn(96, 128, generator=g)  # (d_out, d_in)
    layer, report = make_lamda_linear(weight, None, 8, LaMDAConfig(rank=8), quantize="nf4")
    assert report["quant_error"] < report["plain_nf4_error"]
    merged = layer.base_weight() + layer.delta_weight()
    assert float((merged - weight).norm() / weight.norm()) == pytest.approx(report["quant_error"], rel=1e-4)


def test_randomized_svd_is_seeded_close_to_full_and_leaves_the_global_rng_alone():
    from lamda_edge.adapters.spectral import randomized_svd, spectral_init

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(160, 160, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 160, generator=g))
    weight = (U * torch.arange(1, 161).float().pow(-0.7)) @ V.T  # (160, 200), decaying spectrum
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = randomized_svd(weight, 8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, randomized_svd(weight, 8, seed=3)))
    torch.testing.assert_close(first[1], torch.linalg.svdvals(weight)[:8], atol=1e-5, rtol=1e-5)
    init = spectral_init(weight, 8, "principal", scaling=2.0, svd="randomized")
    assert init.svd_error is not None
    torch.testing.assert_close(init.residual + 2.0 * init.B @ init.S @ init.A, weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name,names,children,expected",
    [
        pytest.param("model.layers.0.self_attn.q_proj", ("q_proj",), False, True, id="suffix"),
        pytest.param("q_proj", ("q_proj",), False, True, id="exact"),
        pytest.param("model.layers.0.self_attn.xq_proj", ("q_proj",), False, False, id="partial-part"),
        pytest.param("model.layers.0.self_attn", ("self_attn.q_proj",), False, False, id="longer-name"),
        pytest.param("classifier.dense", ("classifier",), False, False, id="child-without-flag"),
        pytest.param("classifier.dense", ("classifier",), True, True, id="child-with-flag"),
    ],
)
def test_matches_module(name, names, children, expected):
    from lamda_edge.adapters.inject import matches_module

    assert matches_module(name, names, include_children=children) is expected
