"""AdapterState: one attribute (`model.lamda_state`), set by injection, read by `adapter_state`, dropped on unload."""

import pytest

import lamda_edge
from lamda_edge import AdapterState, LaMDAConfig, adapter_state, apply_lamda, merge_and_unload
from lamda_edge.errors import ModelError


def test_apply_lamda_records_one_state(tiny):
    config = LaMDAConfig(rank=4)
    model = apply_lamda(tiny.model("llama"), config)
    state = adapter_state(model)
    assert isinstance(state, AdapterState) and model.lamda_state is state
    assert state.config is config
    names = [name for name, _ in lamda_edge.lamda_layers(model)]
    assert sorted(state.fingerprint) == sorted(state.layer_reports) == sorted(names)
    assert all(report["rank"] == 4 for report in state.layer_reports.values())
    assert state.prepare_report is None and state.base is None  # only load_lamda_model sets these
    for old in ("lamda_config", "lamda_fingerprint", "lamda_report", "lamda_prepare_report", "lamda_base"):
        assert not hasattr(model, old)


def test_a_model_without_adapters_has_no_state(tiny):
    with pytest.raises(ModelError, match="no LaMDA adapter state.*apply_lamda"):
        adapter_state(tiny.model("llama"))


def test_merge_and_unload_removes_the_state(tiny):
    model = merge_and_unload(apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4)))
    assert not hasattr(model, "lamda_state")
    with pytest.raises(ModelError, match="no LaMDA adapter state"):
        adapter_state(model)
