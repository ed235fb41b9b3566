"""Tests of lamda_edge/export.py (+ onnx_graph.py, genai.py): merge, ONNX export, validation, int4, errors.

Tiny models (hidden 64, 2 layers) with a byte-level BPE tokenizer trained here on a few sentences (`tiny.save`, in
conftest.py); no downloads.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lamda_edge.errors import AdapterMismatchError, ConfigError, ExportValidationError, ModelError

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("llama")
    tiny.save(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, llama_dir, run_export):
    out = tmp_path_factory.mktemp("exports") / "llama-onnx"
    return out, run_export(out, model=llama_dir, int4=True, block_size=32)


def test_decoder_export_matches_pytorch(llama_dir, llama_export, tol):
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    out, report = llama_export
    assert report["ok"] and report["kind"] == "decoder"
    assert report["validation"]["max_abs_diff"]["logits"] <= tol.fp32
    cases = {c["case"].split("(")[0] for c in report["validation"]["cases"]}
    assert cases == {"prefill", "decode", "chunk"}
    sess = ort.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in sess.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert {i.name for i in sess.get_inputs()} >= {"past_key_values.1.key", "past_key_values.1.value"}
    assert [o.name for o in sess.get_outputs()] == ["logits", "present.0.key", "present.0.value",
                                                    "present.1.key", "present.1.value"]
    original = AutoModelForCausalLM.from_pretrained(llama_dir)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # a normal transformers folder
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, atol=0, rtol=0)
    on_disk = json.loads((out / "export-report.json").read_text())
    assert on_disk["validation"]["max_abs_diff"] == report["validation"]["max_abs_diff"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_int4_is_smaller_and_reports_perplexity(llama_export):
    import onnx

    out, report = llama_export
    sizes = report["sizes_bytes"]
    assert sizes["model.int4.onnx"] < 0.6 * sizes["model.onnx"]
    ops = [n.op_type for n in onnx.load(str(out / "model.int4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops  # the token embedding
    assert report["int4"]["ops"]["MatMulNBits"] == 15
    int4 = report["int4"]
    assert int4["block_size"] == 32 and int4["held_out_tokens"] > 50
    assert math.isclose(int4["ppl_onnx"], int4["ppl_pytorch"], rel_tol=1e-4)
    assert int4["ppl_int4"] != int4["ppl_onnx"] and math.isclose(int4["ppl_int4"], int4["ppl_onnx"], rel_tol=0.05)


@pytest.mark.parametrize("dtype", [pytest.param("fp32", id="bert-fp32-int4"), pytest.param("fp16", id="bert-fp16")])
def test_encoder_classifier_export(tiny, tol, run_export, tmp_path, dtype):
    import onnx

    tiny.save(tmp_path / "bert", "bert")
    report = run_export(tmp_path / "out", model=tmp_path / "bert", dtype=dtype, int4=dtype == "fp32")
    assert report["kind"] == "encoder" and report["ok"]
    assert report["validation"]["max_abs_diff"]["logits"] <= {"fp32": tol.fp32, "fp16": tol.fp16}[dtype]
    assert {c["shape_onnx"][1] for c in report["validation"]["cases"]} == {3}  # (B, num_labels)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    weights = [w.data_type for w in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer
               if len(w.dims) == 2 and w.data_type in floats]  # the weight matrices
    assert weights and set(weights) == {onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.FLOAT}
    if dtype == "fp32":
        assert report["int4"]["agreement_onnx"] == 1.0 and 0 <= report["int4"]["agreement_int4"] <= 1


def test_large_models_keep_weights_in_external_data(tiny, tol, run_export, tmp_path, monkeypatch):
    from lamda_edge.export import graph as onnx_graph

    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_BYTES", 0)  # every model counts as over protobuf's 2 GB
    tiny.save(tmp_path / "bert", "bert")
    report = run_export(tmp_path / "out", model=tmp_path / "bert", int4=True)
    assert report["ok"] and report["validation"]["max_abs_diff"]["logits"] <= tol.fp32
    files = {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()}
    assert files["model.onnx.data"] > files["model.onnx"] and "model.int4.onnx.data" in files
    assert report["sizes_bytes"]["model.onnx"] == files["model.onnx"] + files["model.onnx.data"]


def _trained_adapter(tiny, base_dir, adapter_dir):
    """apply_lamda on the saved base, move S and B away from their init, save the adapter; return the model."""
    from transformers import AutoModelForCausalLM

    from lamda_edge import LaMDAConfig, apply_lamda, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    apply_lamda(model, LaMDAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")))
    tiny.move(model, seed=5)
    save_adapter(model, adapter_dir, metadata={"base_model": str(base_dir), "quantize": None})
    return model


def test_adapter_export_matches_adapter_model(tiny, tol, run_export, tmp_path):
    """The adapter path end to end, on Qwen2 (the llama fixture covers Llama): merged == adapter model == ONNX."""
    from transformers import AutoModelForCausalLM

    tiny.save(tmp_path / "qwen2", "qwen2")
    adapted = _trained_adapter(tiny, tmp_path / "qwen2", tmp_path / "adapter")
    report = run_export(tmp_path / "out", adapter=tmp_path / "adapter")  # base model read from the adapter
    assert report["ok"] and report["source"]["base_model"] == str(tmp_path / "qwen2")
    assert report["source"]["model_type"] == "qwen2"
    assert report["validation"]["max_abs_diff"]["logits"] <= tol.fp32
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, plain = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert (want - plain).abs().max() > 100 * tol.fp32  # the adapter moved the model: the check below means something
    torch.testing.assert_close(got, want, atol=tol.fp32, rtol=0)


def test_merge_of_a_4bit_adapter_matches_the_adapter_model(tol, tmp_path, llama_dir):
    """The training path: NF4 residual base from load_lamda_model, S and B moved, merged back to fp32 weights."""
    from lamda_edge import LaMDAConfig, save_adapter
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.export.merged import load_merged
    from lamda_edge.load.loader import load_lamda_model

    adapted = load_lamda_model(llama_dir, LaMDAConfig(rank=4, alpha=8.0), quantize="nf4", device="cpu",
                               compute_dtype=torch.float32, cache_dir=False, progress=False)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in lamda_layers(adapted):
            layer.lamda_S.add_(0.5 * torch.randn(layer.lamda_S.shape, generator=g))
            layer.lamda_B.add_(0.5 * torch.randn(layer.lamda_B.shape, generator=g))
    save_adapter(adapted, tmp_path / "adapter", metadata={"base_model": str(llama_dir), "quantize": "nf4"})
    merged, _, source = load_merged(None, tmp_path / "adapter")
    assert source["quantize"] == "nf4" and not lamda_layers(merged)
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        adapted_only = adapted(input_ids=ids).logits
        for _, layer in lamda_layers(adapted):
            layer.lamda_S.zero_()
        at_zero = adapted(input_ids=ids).logits
    assert (adapted_only - at_zero).abs().max() > 100 * tol.fp32  # the trained S, B matter
    torch.testing.assert_close(got, want, atol=tol.fp32, rtol=0)


def test_classifier_adapter_on_a_bare_encoder_exports_its_head(tiny, tol, run_export, tmp_path):
    """MiniLM's case: the base folder is a bare `BertModel`; the adapter trains a new 3-way head on it.

    The export must rebuild the classifier the adapter was trained as (task and num_labels from the adapter),
    not what the base folder's config says (no head, 2 labels by default).
    """
    import transformers

    from lamda_edge import LaMDAConfig, save_adapter
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.load.loader import load_lamda_model

    tiny.save(tmp_path / "bare", "bert-encoder")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "bare")
    config = LaMDAConfig(rank=4, alpha=8.0, target_modules=("query", "value", "dense"),
                         modules_to_save=("classifier",))
    adapted = load_lamda_model(tmp_path / "bare", config, quantize=None, device="cpu", compute_dtype=torch.float32,
                               cache_dir=False, progress=False, task="sequence-classification", num_labels=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in lamda_layers(adapted):
            layer.lamda_S.add_(0.5 * torch.randn(layer.lamda_S.shape, generator=g))
        adapted.classifier.weight.add_(torch.randn(adapted.classifier.weight.shape, generator=g))
    save_adapter(adapted, tmp_path / "adapter", metadata={"base_model": str(tmp_path / "bare"), "quantize": None})
    assert json.loads((tmp_path / "adapter" / "lamda_adapter.json").read_text())["num_labels"] == 3

    report = run_export(tmp_path / "out", adapter=tmp_path / "adapter", int4=True)
    assert report["ok"] and report["kind"] == "encoder"
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "merged").eval()
    ids = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted.eval()(input_ids=ids).logits, merged(input_ids=ids).logits  # (2, 3)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, atol=tol.fp32, rtol=0)


def test_adapter_on_another_base_is_refused(tiny, run_export, tmp_path, llama_dir):
    _trained_adapter(tiny, llama_dir, tmp_path / "adapter")
    tiny.save(tmp_path / "other", "llama", seed=1)  # same shapes, other weights
    with pytest.raises(AdapterMismatchError):
        run_export(tmp_path / "out", adapter=tmp_path / "adapter", model=tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "other"]


def test_existing_output_is_refused_without_overwrite(run_export, tmp_path, llama_dir, monkeypatch):
    from lamda_edge.cli import main
    from lamda_edge.export import pipeline as export_mod

    def fake_build(options, tmp, report, log, stage=None):  # the folder handling only; the real build is tested above
        (tmp / "model.onnx").write_text("new")
        (tmp / "export-report.json").write_text("{}")

    monkeypatch.setattr(export_mod, "_build", fake_build)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        run_export(tmp_path / "out", model=llama_dir)
    assert main(["export", "--model", str(llama_dir), "--output", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["export", "--model", str(llama_dir), "--output", str(tmp_path / "out"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export-report.json", "model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder went, no temp folders


def test_unsupported_model_type_names_the_supported_ones(tiny, run_export, tmp_path):
    tiny.save(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ModelError, match="llama.*qwen2"):
        run_export(tmp_path / "out", model=tmp_path / "gpt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_validation_failure_lists_every_mismatch_and_writes_the_report(tiny, run_export, tmp_path, monkeypatch):
    from lamda_edge.export import graph as onnx_graph

    tiny.save(tmp_path / "bert", "bert")
    real_export = onnx_graph.export_encoder

    def export_a_perturbed_model(model, path):  # the ONNX graph no longer computes what PyTorch does
        with torch.no_grad():
            model.classifier.weight.add_(0.1)
        real_export(model, path)
        with torch.no_grad():
            model.classifier.weight.sub_(0.1)

    monkeypatch.setattr(onnx_graph, "export_encoder", export_a_perturbed_model)
    with pytest.raises(ExportValidationError) as err:
        run_export(tmp_path / "out", model=tmp_path / "bert")
    message = str(err.value)
    assert "B=2,T=7: logits" in message and "B=1,T=3: logits" in message and "2 check(s)" in message
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.export-report.json").read_text())
    assert report["ok"] is False and len(report["validation"]["mismatches"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "out.export-report.json"]


def test_bad_options_are_config_errors(tmp_path):
    from lamda_edge.export.pipeline import ExportOptions

    with pytest.raises(ConfigError, match="block_size.*power of two"):
        ExportOptions(output=tmp_path / "o", model=tmp_path, block_size=48)
    with pytest.raises(ConfigError, match="--adapter"):
        ExportOptions(output=tmp_path / "o")


def test_genai_fp32_matches_pytorch(tol, run_export, tmp_path, llama_dir):
    report = run_export(tmp_path / "out", model=llama_dir, format="genai", precision="fp32")
    v = report["validation"]
    assert report["ok"] and v["greedy_match"] and len(v["greedy_tokens_pytorch"]) > 0
    assert v["max_abs_logit_diff"] <= tol.fp32
    assert math.isclose(v["ppl_genai"], v["ppl_pytorch"], rel_tol=1e-4)
    assert (tmp_path / "out" / "genai_config.json").is_file() and (tmp_path / "out" / "merged").is_dir()
    assert report["versions"]["onnxruntime-genai"]


def test_int4_can_keep_the_tied_head_in_float_and_use_zero_points(tiny, run_export, tmp_path):
    """quantize_int4's non-default options (used by tools/int4_variants.py): the tied head's MatMul left as is."""
    import onnx

    from lamda_edge.export.quantize import quantize_int4

    tiny.save(tmp_path / "tied", "llama", tie=True)
    run_export(tmp_path / "out", model=tmp_path / "tied")
    src = tmp_path / "out" / "model.onnx"
    default = quantize_int4(src, tmp_path / "default.onnx")
    kept = quantize_int4(src, tmp_path / "kept.onnx", keep_tied_head=True, symmetric=False)
    assert default["MatMulNBits"] == kept["MatMulNBits"] + 1 and kept.get("MatMul", 0) == default.get("MatMul", 0) + 1
    zero_points = [n for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node
                   if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
    assert zero_points  # asymmetric blocks carry a zero point input


def test_the_export_bar_names_each_phase_as_it_starts(tiny, tmp_path, llama_dir, capsys):
    """A long export is never silent: the bar's line says which phase runs (merge, export, validate, int4 steps)."""
    from lamda_edge.export.pipeline import ExportOptions, export

    _trained_adapter(tiny, llama_dir, tmp_path / "adapter")
    export(ExportOptions(output=tmp_path / "out", adapter=tmp_path / "adapter", int4=True, int4_method="merged"),
           progress=True)
    shown = capsys.readouterr().err
    for phase in ("merging the adapter", "exporting model.onnx", "validating against PyTorch",
                  "int4: writing model.int4.onnx", "int4: perplexity and greedy agreement"):
        assert f"export: {phase}" in shown, phase


def test_a_folder_that_is_not_an_adapter_is_refused_before_any_work(tmp_path, capsys):
    """--adapter pointing at the wrong folder: the error comes first, with no progress bar and nothing written."""
    from lamda_edge.export.pipeline import ExportOptions, export

    (tmp_path / "runs" / "typo").mkdir(parents=True)
    with pytest.raises(ModelError, match="is not a lamda-edge adapter folder.*Fix: pass the folder"):
        export(ExportOptions(output=tmp_path / "out", adapter=tmp_path / "runs" / "typo"), progress=True)
    assert "phase" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
