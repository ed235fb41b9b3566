"""save_adapter / load_adapter: round trip, refusal of another base, and broken folders."""

import json

import pytest
import torch

from lamda_edge import LaMDAConfig, PMBScheduler, apply_lamda, load_adapter, save_adapter
from lamda_edge.adapters import lamda_layers, read_adapter_config
from lamda_edge.errors import AdapterMismatchError, ModelError


def _trained(tiny, arch="llama", cfg=None, seed=0):
    model = apply_lamda(tiny.model(arch), cfg or LaMDAConfig(rank=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lamda_layers(model):
            layer.lamda_S.add_(torch.randn(layer.lamda_S.shape, generator=g))
            layer.lamda_B.add_(0.1 * torch.randn(layer.lamda_B.shape, generator=g))
    return model


@pytest.mark.parametrize(
    "arch, cfg",
    [
        pytest.param("llama", LaMDAConfig(rank=4), id="llama-uniform"),
        pytest.param("qwen2", LaMDAConfig(rank=4, rank_allocation="energy"), id="qwen2-energy"),
        pytest.param("bert", LaMDAConfig(rank=4, modules_to_save=("classifier",)), id="bert-head"),
    ],
)
def test_round_trip_reproduces_outputs(tiny, tmp_path, ids, arch, cfg):
    model = _trained(tiny, arch, cfg)
    if cfg.modules_to_save:
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
    expected = tiny.output(model, ids)
    save_adapter(model, tmp_path / "adapter", metadata={"base_model": "tiny"})
    info = read_adapter_config(tmp_path / "adapter")
    assert info["base_model"] == "tiny" and info["lamda_config"] == cfg.to_dict()
    fresh = tiny.model(arch)  # same seed: the same base model; load_adapter applies LaMDA itself
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(tiny.output(fresh, ids), expected, atol=0, rtol=0)


def test_frozen_state_survives_the_round_trip(tiny, tmp_path):
    model = _trained(tiny)
    scheduler = PMBScheduler(model, 2)
    scheduler.step()
    save_adapter(model, tmp_path / "a")
    fresh = tiny.model("llama")
    load_adapter(fresh, tmp_path / "a")
    for (_, a), (_, b) in zip(lamda_layers(model), lamda_layers(fresh)):
        assert a.frozen_b_columns == b.frozen_b_columns == 2
    scheduler.step()
    save_adapter(model, tmp_path / "b")
    fresh = tiny.model("llama")
    load_adapter(fresh, tmp_path / "b")
    assert all(not layer.lamda_B.requires_grad for _, layer in lamda_layers(fresh))


def test_another_base_is_refused(tiny, tmp_path):
    save_adapter(_trained(tiny), tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="weights differ"):
        load_adapter(tiny.model("llama", seed=1), tmp_path / "a")
    with pytest.raises(AdapterMismatchError):
        load_adapter(tiny.model("qwen2"), tmp_path / "a")


def test_other_ranks_are_refused(tiny, tmp_path):
    save_adapter(_trained(tiny), tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="ranks"):
        load_adapter(apply_lamda(tiny.model("llama"), LaMDAConfig(rank=2)), tmp_path / "a")


def test_a_head_with_other_classes_is_refused(tiny, tmp_path):
    cfg = LaMDAConfig(rank=4, modules_to_save=("classifier",))
    save_adapter(_trained(tiny, "bert", cfg), tmp_path / "a")  # a 3-way head
    assert read_adapter_config(tmp_path / "a")["num_labels"] == 3
    with pytest.raises(AdapterMismatchError, match=r"classifier\.weight of shape \(3, 64\), the model \(2, 64\)"):
        load_adapter(tiny.model("bert", num_labels=2), tmp_path / "a")


def test_not_an_adapter_folder(tiny, tmp_path):
    with pytest.raises(ModelError, match="lamda_adapter.json"):
        load_adapter(tiny.model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "peft"}))  # a PEFT adapter
    with pytest.raises(ModelError, match="not a lamda-edge adapter"):
        load_adapter(tiny.model("llama"), tmp_path)


def test_saving_a_model_without_adapters(tiny, tmp_path):
    with pytest.raises(ModelError, match="apply_lamda"):
        save_adapter(tiny.model("llama"), tmp_path)


def test_damaged_tensor_file_is_refused_naming_it(tiny, tmp_path):
    """64 flipped bytes inside the tensor data: the recorded sha256 catches it (issue 12: it loaded silently)."""
    from lamda_edge.adapters.io import WEIGHTS_NAME
    from lamda_edge.errors import CorruptFileError

    save_adapter(_trained(tiny), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f"{WEIGHTS_NAME} is damaged"):
        load_adapter(tiny.model("llama"), tmp_path)


def test_legacy_file_names_still_load(tiny, tmp_path, ids):
    """Adapters saved before issue 18 (PEFT's file names, no hash) load as before."""
    from lamda_edge.adapters.io import CONFIG_NAME, LEGACY_NAMES, WEIGHTS_NAME

    model = _trained(tiny)
    save_adapter(model, tmp_path)
    info = json.loads((tmp_path / CONFIG_NAME).read_text())
    del info["weights_sha256"], info["base_id"]
    (tmp_path / LEGACY_NAMES[0]).write_text(json.dumps(info))
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / LEGACY_NAMES[1])
    (tmp_path / CONFIG_NAME).unlink()
    fresh = tiny.model("llama")
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(tiny.output(fresh, ids), tiny.output(model, ids), atol=0, rtol=0)


def test_a_model_folder_holding_our_adapter_still_loads_as_a_model(tiny, tmp_path):
    """Our own file names: transformers no longer takes the folder for a PEFT adapter (issue 18, item 3)."""
    from transformers import AutoModelForCausalLM

    tiny.model("llama").save_pretrained(tmp_path)
    save_adapter(_trained(tiny), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "LlamaForCausalLM"
