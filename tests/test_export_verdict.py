"""The export's verdict (lamda_edge/export/summary.py, the quality floor of validate.py): a graph that is not the
model is never reported ok, a re-quantized one is labelled so, and export-report.json leads with a short summary
(issue 18 items 4-5).

The faults are real graphs of another model put where the export expects its own: a low-bit graph quantized from a
different (confidently wrong) model's fp32 graph, and an onnxruntime-genai package whose config names a different
model's graph.
"""

from __future__ import annotations

import json
import shutil

import pytest

from lamda_edge.errors import ExportValidationError

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny, run_export):
    """(a tiny Llama folder, the export of another tiny Llama of the same shape: its model.onnx is 'wrong')."""
    root = tmp_path_factory.mktemp("verdict")
    tiny.save(root / "llama", "llama", seed=0)
    tiny.save(root / "other", "llama", seed=1, initializer_range=0.5)  # confident and wrong: perplexity explodes
    run_export(root / "other-onnx", model=root / "other")
    return root / "llama", root / "other-onnx"


def test_report_leads_with_a_summary(two_models, run_export, tmp_path, caplog):
    from lamda_edge.export.summary import summary_lines

    llama, _ = two_models
    report = run_export(tmp_path / "out", model=llama, int4=True)
    assert not [r for r in caplog.records if "torchvision" in r.getMessage()]  # the exporter's op-registry chatter
    on_disk = json.loads((tmp_path / "out" / "export-report.json").read_text())
    assert next(iter(on_disk)) == "summary" and on_disk["summary"] == report["summary"]
    s = report["summary"]
    assert s["ok"] is True and set(s["max_abs_diff"]) == {"logits", "present"}
    assert set(s["sizes_mb"]) == {"model.onnx", "model.int4.onnx"}
    assert {"pytorch", "onnx", "int4"} <= set(s["perplexity"]) and "greedy_agreement_int4" in s["token_agreement"]
    assert s["graphs"]["model.onnx"]["check"].startswith("equal to PyTorch")
    assert s["graphs"]["model.int4.onnx"]["check"].startswith("re-quantized (merged), not equal to PyTorch")
    assert s["generate_uses"] == "model.int4.onnx"
    lines = "\n".join(summary_lines(s))
    assert lines.startswith("export ok") and "re-quantized" in lines and "uses model.int4.onnx" in lines
    assert len(json.dumps(s)) < 2000  # short: the per-case details come after it


def test_a_lowbit_graph_of_another_model_is_never_ok(two_models, run_export, tmp_path, monkeypatch):
    from lamda_edge.export import lowbit
    from lamda_edge.export.quantize import quantize_int4

    llama, other = two_models

    def wrong_graph(src, dst, *args, **kwargs):  # quantize the other model's fp32 graph instead of ours
        return quantize_int4(other / "model.onnx", dst, *args, **kwargs)

    monkeypatch.setattr(lowbit, "quantize_int4", wrong_graph)
    with pytest.raises(ExportValidationError, match="held-out perplexity"):
        run_export(tmp_path / "out", model=llama, int4=True)
    failed = json.loads((tmp_path / "out.export-report.json").read_text())
    assert failed["summary"]["ok"] is False and failed["ok"] is False
    assert any("model.int4.onnx" in p for p in failed["summary"]["problems"])
    assert not (tmp_path / "out").exists()


def test_a_genai_package_of_another_graph_is_never_ok(two_models, run_export, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime_genai")
    from lamda_edge.export import genai_pack

    llama, other = two_models
    write_config = genai_pack.write_config

    def wrong_config(out, onnx_file, config, generation=None):  # onnxruntime-genai runs the other model's graph
        shutil.copy2(other / "model.onnx", out / "other.onnx")
        return write_config(out, "other.onnx", config, generation)

    monkeypatch.setattr(genai_pack, "write_config", wrong_config)
    with pytest.raises(ExportValidationError, match="onnxruntime-genai"):
        run_export(tmp_path / "out", model=llama, format="genai", precision="fp32")
    failed = json.loads((tmp_path / "out.export-report.json").read_text())
    assert failed["summary"]["ok"] is False and failed["summary"]["problems"]


@pytest.mark.parametrize("ppl, problems", [
    pytest.param((34.0, 45.3), 0, id="int4-cost-within-floor"),
    pytest.param((34.0, 60.0), 1, id="perplexity-1.8x"),
    pytest.param((34.0, float("nan")), 1, id="nan"),
    pytest.param((None, None), 0, id="classifier-no-perplexity"),
])
def test_requantized_floor(ppl, problems):
    from lamda_edge.export.validate import requantized_problems

    assert len(requantized_problems("model.int4.onnx", *ppl)) == problems
