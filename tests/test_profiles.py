"""Every device profile and model shape loads and has sane fields; lookups and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamda_edge.errors import ProfileError
from lamda_edge.planner import profiles
from lamda_edge.planner.profiles import GIB, get_device, get_model

ROOT = profiles.profiles_root()
DEVICE_FILES = sorted((ROOT / "devices").rglob("*.yaml"))
MODEL_FILES = sorted((ROOT / "models").rglob("*.json"))


def test_profiles_are_found():
    assert len(DEVICE_FILES) >= 11
    assert len(MODEL_FILES) >= 17


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in DEVICE_FILES])
def test_device_profile_fields(path: Path):
    dev = profiles._load_device(path)
    assert dev.name == path.stem
    assert 0 < dev.usable_bytes <= dev.total_bytes
    assert 0 <= dev.fragmentation_margin < 0.5
    assert dev.peak_tflops > 0 and dev.memory_bandwidth_gbs > 0
    numeric = ("total_memory_gib", "reserve_gib", "runtime_overhead_mib", "fragmentation_margin",
               "memory_bandwidth_gbs", "peak_tflops")
    for key in numeric:  # every number has a source line
        assert dev.sources.get(key), f"{path}: no source for {key}"
    if dev.kind == "jetson":
        assert dev.unified_memory and not dev.expandable_segments and not dev.cpu_offload and not dev.paged_optimizer


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in MODEL_FILES])
def test_model_shape_fields(path: Path):
    shape = profiles._shape_from_json(json.loads(path.read_text()), path)
    assert shape.name == path.stem and shape.name == shape.name.lower()
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    assert shape.block_linears() and shape.parameter_count() > 1e8


@pytest.mark.parametrize(
    "name,expected,params",
    [
        pytest.param("llama-2-7b", "llama-2-7b", 6.7e9, id="llama-2-7b"),
        pytest.param("llama-3.1-8b", "llama-3.1-8b", 8.0e9, id="llama-3.1-8b"),
        pytest.param("qwen2.5-0.5b", "qwen2.5-0.5b", 0.49e9, id="qwen2.5-0.5b"),
        pytest.param("smollm2-135m", "smollm2-135m", 0.135e9, id="smollm2-135m"),
        pytest.param("llama-2-70b", "llama-2-70b", 69e9, id="llama-2-70b"),
    ],
)
def test_catalogue_parameter_counts_match_the_reported_size(name, expected, params):
    shape = get_model(name)
    assert shape.name == expected
    assert abs(shape.parameter_count() - params) / params < 0.03


@pytest.mark.parametrize("alias,name", [pytest.param("3060", "rtx3060", id="3060"),
                                         pytest.param("orin-nano", "jetson-orin-nano", id="orin-nano"),
                                         pytest.param("RTX4090", "rtx4090", id="upper-case")])
def test_device_aliases(alias, name):
    assert get_device(alias).name == name


def test_orin_nano_budgets_about_six_gib_headless():
    assert abs(get_device("orin-nano").usable_bytes / GIB - 6.0) < 0.3


def test_auto_device_on_a_cpu_machine_is_the_host():
    import torch

    if torch.cuda.is_available():
        assert get_device("auto").name.startswith("auto:")
    else:
        assert get_device("auto").name == "cpu"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ProfileError, match="rtx3060.*t4"):
        get_device("rtx9090")
    with pytest.raises(ProfileError, match="Did you mean `llama-2-7b`"):
        get_model("llama-2-7bb")


def test_local_config_json(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = get_model(str(tmp_path))
    assert (shape.hidden_size, shape.head_dim, shape.local_path) == (64, 16, str(tmp_path))


@pytest.mark.parametrize(
    "edit,message",
    [
        pytest.param({"fragmentation_margin": 2.0}, "fragmentation_margin", id="margin-out-of-range"),
        pytest.param({"peak_tflop": 1.0}, "did you mean `peak_tflops`", id="typo-field"),
        pytest.param({"bf16": "yes"}, "field `bf16` should be bool", id="wrong-type"),
        pytest.param({"reserve_gib": 99.0}, "leaves nothing of total_memory_gib", id="reserve-above-total"),
        pytest.param({"reserve_gib": -0.1}, "`reserve_gib` should be a number of GiB >= 0", id="negative-reserve"),
        pytest.param({"total_memory_gib": 0}, "`total_memory_gib` should be a positive", id="zero-total"),
        pytest.param({"usable_memory_gib": 11.6}, "no longer read: usable memory is total_memory_gib - reserve_gib",
                     id="old-usable-field"),
        pytest.param({"sources": {"total_memory_gib": "x"}}, "no line for `reserve_gib`", id="reserve-unsourced"),
    ],
)
def test_malformed_device_profile_names_file_and_field(tmp_path, edit, message):
    import yaml

    data = yaml.safe_load((ROOT / "devices" / "rtx3060.yaml").read_text())
    data.update(edit)
    path = tmp_path / "rtx3060.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message) as info:
        profiles._load_device(path)
    assert str(path) in str(info.value)


# The budget of every GPU profile: usable = the CUDA total PyTorch reports - the display/OS reserve (GiB).
BUDGETS = {
    "rtx3060": (11.75, 0.4), "rtx3060-8gb": (7.75, 0.4), "rtx4060": (7.75, 0.4), "t4": (14.75, 0.0),
    "rtx4090": (23.65, 0.5), "rtx-a6000": (47.54, 0.4), "h100-80gb": (79.11, 0.0),
    "jetson-orin-nano": (7.4, 1.4), "jetson-orin-nx-16gb": (15.3, 1.8), "jetson-agx-orin-32gb": (30.5, 2.5),
    "jetson-agx-orin-64gb": (61.4, 3.4),
}


@pytest.mark.parametrize("name", [pytest.param(p.stem, id=p.stem) for p in DEVICE_FILES])
def test_budget_arithmetic_of_every_profile(name):
    """usable = total - reserve, to the byte; desktop GeForce cards keep a display reserve, headless datacenter
    cards none; each number has its source line. The host CPU's is psutil's: total - what others hold."""
    import yaml

    dev = get_device(name)
    assert dev.usable_bytes == dev.total_bytes - dev.reserve_bytes
    data = yaml.safe_load(Path(dev.path).read_text())
    assert "usable_memory_gib" not in data
    assert dev.sources.get("total_memory_gib") and dev.sources.get("reserve_gib")
    if name == "cpu":
        assert data["total_memory_gib"] == data["reserve_gib"] == "auto"
        return
    total, reserve = BUDGETS[name]
    assert (data["total_memory_gib"], data["reserve_gib"]) == (total, reserve)
    assert dev.total_bytes == int(total * GIB) and dev.reserve_bytes == int(reserve * GIB)
    assert abs(dev.usable_bytes / GIB - (total - reserve)) < 1e-6
    if dev.kind == "cuda":  # the CUDA total, below the box label (a "12 GB" card reports 11.75 GiB)
        assert "PyTorch reports" in dev.sources["total_memory_gib"] or "torch" in dev.sources["total_memory_gib"]


def test_every_budget_profile_is_tested():
    assert set(BUDGETS) | {"cpu"} == {p.stem for p in DEVICE_FILES}


def test_the_frontier_devices_cover_8_to_80_gb():
    classes = sorted({round(d.total_bytes / GIB / 8) * 8 for d in profiles.load_devices().values()
                      if d.kind == "cuda"})
    assert {8, 16, 24, 48, 80} <= set(classes) and any(11 < d.total_bytes / GIB < 12.5
                                                     for d in profiles.load_devices().values())
