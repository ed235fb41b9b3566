"""Our outputs in the tools HF users already have (lamda_edge/export/portable.py; issue 18 items 1-2).

- The export folder loads in optimum as written: `ORTModelForCausalLM.from_pretrained(OUT)` (default graph,
  `file_name=model.onnx`, `file_name=model.int4.onnx`), and its greedy tokens equal `lamda-edge generate`'s.
- The merged folder reads the same under transformers 4.57 (what optimum-onnx installs) and 5.x: equal logits for
  a model whose RoPE base is not 4.x's default (10000), the same tokenizer ids and chat text.

The transformers-4 side runs in a second environment through tools/check_old_transformers.py: its python is
$LAMDA_EDGE_COMPAT_PYTHON (.ci/run builds one: torch==2.13.0, optimum-onnx, onnxruntime). Without it these tests
skip and say so; .ci/run sets $LAMDA_EDGE_COMPAT_SKIP with the reason when that environment cannot be installed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lamda_edge.export.portable import portable_config, portable_tokenizer_config

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "check_old_transformers.py"
GRAPHS = ("default", "model.onnx", "model.int4.onnx")
NEW_TOKENS = 8
TEXT = "What is twelve times seven? It is 84.\n#### 84"
IDS = [5, 17, 42, 99, 3, 250, 7, 120, 64, 11, 200, 31]  # below the tiny tokenizer's 300


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def old_python() -> str:
    """The python of the transformers-4 environment, or a skip that says why there is none."""
    reason = os.environ.get("LAMDA_EDGE_COMPAT_SKIP")
    if reason:
        pytest.skip(f"no transformers-4 environment: {reason}")
    python = os.environ.get("LAMDA_EDGE_COMPAT_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("CI must set LAMDA_EDGE_COMPAT_PYTHON (or LAMDA_EDGE_COMPAT_SKIP with a reason): see .ci/run")
        pytest.skip("no transformers-4 environment: set LAMDA_EDGE_COMPAT_PYTHON to a python with optimum-onnx "
                    "(python -m venv V && V/bin/pip install torch==2.13.0 optimum-onnx onnxruntime)")
    return python


def run_old(python: str, export_dir: Path, out: Path, ids: list[int], graphs=(), prompt_ids=()) -> dict:
    """Run tools/check_old_transformers.py under `python`; returns its result.json plus the logits (T, V)."""
    cmd = [python, str(SCRIPT), str(export_dir), str(out), "--ids", ",".join(map(str, ids)), "--text", TEXT,
           "--new-tokens", str(NEW_TOKENS)]
    if graphs:
        cmd += ["--prompt-ids", ",".join(map(str, prompt_ids))] + [arg for g in graphs for arg in ("--graph", g)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    result = json.loads((out / "result.json").read_text())
    result["logits"] = np.load(out / "logits.npy")
    return result


def new_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """Logits (T, V) of the merged folder under this environment's transformers 5."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def tokenizer_facts(folder: Path) -> tuple[list[int], str | None]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    chat = (tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
            if tok.chat_template else None)
    return tok(TEXT, add_special_tokens=False)["input_ids"], chat


# ---- the files, without a second environment -------------------------------------------------------------------


@pytest.mark.parametrize("rope, legacy", [
    pytest.param({"rope_type": "default", "rope_theta": 100000.0}, {"rope_theta": 100000.0}, id="default-rope"),
    pytest.param({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}}, id="llama3-rope"),
])
def test_config_gets_the_legacy_rope_keys_beside_the_new(rope, legacy):
    written = portable_config({"model_type": "llama", "rope_parameters": rope, "dtype": "float32"})
    assert written["rope_parameters"] == rope  # transformers 5's own key unchanged
    assert {k: written[k] for k in legacy} == legacy
    assert "rope_scaling" in legacy or "rope_scaling" not in written  # 5.x would prefer rope_scaling if it were set
    assert written["torch_dtype"] == "float32"


def test_tokenizer_config_names_a_class_both_versions_know():
    written = portable_tokenizer_config({"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<x>"]},
                                        chat_template="{{ messages }}")
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert written["additional_special_tokens"] == ["<x>"] and "extra_special_tokens" not in written
    assert written["chat_template"] == "{{ messages }}"
    assert portable_tokenizer_config({"tokenizer_class": "GPT2Tokenizer"})["tokenizer_class"] == "GPT2Tokenizer"


@pytest.fixture(scope="module")
def rope_export(tmp_path_factory, tiny, run_export):
    """A tiny Llama whose RoPE base is 100000 (transformers 4.x's default is 10000), exported with --int4."""
    base = tmp_path_factory.mktemp("rope-llama")
    tiny.save(base, "llama", rope_theta=100000.0)
    out = tmp_path_factory.mktemp("exports") / "rope-onnx"
    run_export(out, model=base, int4=True)
    return base, out


def test_export_folder_holds_the_loader_files_beside_the_graphs(rope_export):
    from transformers import AutoConfig

    base, out = rope_export
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.onnx", "model.int4.onnx"):
        assert (out / name).is_file(), name
    assert (out / "config.json").read_bytes() == (out / "merged" / "config.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["rope_parameters"]["rope_theta"] == 100000.0
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    # transformers 5 reads the rewritten files as it read the base's own
    assert AutoConfig.from_pretrained(out).rope_parameters == AutoConfig.from_pretrained(base).rope_parameters
    assert tokenizer_facts(out) == tokenizer_facts(base)
    np.testing.assert_array_equal(new_logits(out / "merged", IDS), new_logits(base, IDS))


# ---- the second environment: transformers 4.57 and optimum -------------------------------------------------------


def test_optimum_loads_the_export_and_old_transformers_read_it_the_same(rope_export, old_python, tmp_path, tol):
    from lamda_edge.runtime.generate import OnnxGenerator

    base, out = rope_export
    gen = OnnxGenerator(out, "model.onnx")
    prompt = gen.encode("what is twelve times seven?")
    old = run_old(old_python, out, tmp_path / "old", IDS, GRAPHS, prompt)
    assert old["transformers"].startswith("4."), old["transformers"]
    assert old["rope_theta"] == 100000.0  # not 4.x's default 10000
    np.testing.assert_allclose(old["logits"], new_logits(out / "merged", IDS), atol=tol.fp32, rtol=0)
    assert (old["text_ids"], old["chat_text"]) == tokenizer_facts(out / "merged")
    for graph in GRAPHS:
        ours = OnnxGenerator(out, "model.onnx" if graph == "default" else graph)
        want = ours.generate("", max_new_tokens=NEW_TOKENS, prompt_ids=prompt).token_ids
        assert old["optimum"][graph] == want, f"{graph}: optimum {old['optimum'][graph]} vs generate {want}"


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("arch, rope", [
    pytest.param("llama", LLAMA3_ROPE, id="llama3-scaled-rope"),
    pytest.param("qwen2", {"rope_type": "default", "rope_theta": 1e6}, id="qwen2"),
])
def test_merged_folder_logits_equal_under_transformers_4_and_5(arch, rope, tiny, old_python, tmp_path, tol):
    from transformers import AutoModelForCausalLM

    from lamda_edge.export.merged import save_merged

    base = tmp_path / "base"
    tiny.save(base, arch)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))  # a RoPE 4.x must be told
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert model.config.rope_parameters == rope
    save_merged(model, base, tmp_path / "export" / "merged")
    old = run_old(old_python, tmp_path / "export", tmp_path / "old", IDS)
    assert old["rope_theta"] == rope["rope_theta"]
    np.testing.assert_allclose(old["logits"], new_logits(base, IDS), atol=tol.fp32, rtol=0)


@pytest.mark.slow
def test_real_smollm2_reads_the_same_under_transformers_4_and_5(old_python, tmp_path, monkeypatch):
    """SmolLM2-135M (rope_theta 100000): the merged folder's logits and tokenizer under 4.57 equal 5.x's."""
    from lamda_edge.demo.default_model import default_model_path
    from lamda_edge.export.merged import load_reference, save_merged

    monkeypatch.delenv("LAMDA_EDGE_CACHE")  # the one converted copy in the user's cache, as `train` makes it
    base = default_model_path(progress=False)
    save_merged(load_reference(base), base, tmp_path / "export" / "merged")
    ids = [1, 504, 314, 3849, 2431, 4601, 30, 1205, 314, 9141, 29, 1]
    old = run_old(old_python, tmp_path / "export", tmp_path / "old", ids)
    assert old["rope_theta"] == 100000.0
    logits = new_logits(base, ids)
    np.testing.assert_allclose(old["logits"], logits, atol=1e-4 + 1e-4 * float(np.abs(logits).max()), rtol=0)
    assert (old["text_ids"], old["chat_text"]) == tokenizer_facts(tmp_path / "export" / "merged")
