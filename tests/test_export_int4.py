"""Issue 11: the low-bit graphs compute what was trained (lamda_edge/export/nf4.py, lowbit.py).

Tiny models (hidden 64, 2 layers) built here; the slow test uses the default SmolLM2-135M model.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lamda_edge.errors import ConfigError, ExportValidationError

FP32_RULE = (1e-4, 1e-4)  # the export's fp32 tolerance rule (atol, rtol), pipeline.TOLERANCE["fp32"]


pytestmark = pytest.mark.usefixtures("private_cache")


def _tokenizer():
    from conftest import chatml_tokenizer

    sentences = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
                 "what is twelve times seven? it is eighty four.", "water boils at one hundred degrees."]
    return chatml_tokenizer(sentences * 3, vocab_size=300)


def _save_base(folder, arch="qwen2", seed=0):
    import transformers

    tok = _tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    if arch == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **common))
    else:
        cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                              "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
        model = model_cls(cfg_cls(num_key_value_heads=2, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                  tie_word_embeddings=True, **common))
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _train_adapter(base_dir, adapter_dir, quantize, seed=6, task=None, num_labels=None, scale=0.5,
                   init="principal"):
    """An adapter whose S and B moved well away from the spectral init (as training would), saved."""
    from lamda_edge import LaMDAConfig, save_adapter
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.load.loader import load_lamda_model

    model = load_lamda_model(base_dir, LaMDAConfig(rank=4, alpha=8.0, init=init), quantize=quantize, device="cpu",
                             compute_dtype=torch.float32, cache_dir=False, progress=False, task=task,
                             num_labels=num_labels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lamda_layers(model):
            layer.lamda_S.add_(scale * torch.randn(layer.lamda_S.shape, generator=g))
            layer.lamda_B.add_(scale * torch.randn(layer.lamda_B.shape, generator=g))
    meta = {"base_model": str(base_dir), "quantize": quantize}
    save_adapter(model, adapter_dir, metadata=meta)
    return model


def _export(output, log=lambda *_: None, **kw):
    from lamda_edge.export.pipeline import ExportOptions, export

    return export(ExportOptions(output=output, **kw), log=log)


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """A Qwen2 (biases in q/k/v) adapter trained on an NF4 base, exported with --int4 (default method)."""
    import os

    root = tmp_path_factory.mktemp("nf4run")
    os.environ["LAMDA_EDGE_CACHE"] = str(root / "cache")
    base = _save_base(root / "base", "qwen2")
    _train_adapter(base, root / "adapter", "nf4")
    lines = []
    report = _export(root / "out", log=lines.append, adapter=root / "adapter", int4=True)
    return root, {**report, "log": lines}


# ---- tensor level: the NF4 packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 128), (96, 64), (7, 72), (3, 192)])  # odd d_in, a partial last block
def test_nf4_packing_is_bitsandbytes_dequantization(shape):
    """MatMulBnb4's B and absmax, taken from a bitsandbytes layer, dequantize to bitsandbytes' own weight exactly,
    and ONNX Runtime's MatMulBnb4 computes x W^T with that weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lamda_edge.adapters.bnb import dequantize_weight, quantize_nf4
    from lamda_edge.export.nf4 import NF4_QUANT_TYPE, nf4_dequantize, nf4_tensors

    torch.manual_seed(0)
    w = torch.randn(shape) * torch.linspace(0.1, 3.0, shape[1])  # columns of different scale
    layer = quantize_nf4(w, None, torch.float32, "cpu")
    codes, absmax, block = nf4_tensors(layer)
    want = dequantize_weight(layer).numpy()
    got = nf4_dequantize(codes, absmax, block, shape)
    assert codes.dtype == np.uint8 and codes.size == (shape[0] * shape[1] + 1) // 2
    np.testing.assert_array_equal(got, want)  # same codes, same expanded absmax: bit-identical weights
    assert np.abs(want - w.numpy()).max() > 1e-3  # it is a 4-bit weight, not the original

    n, k = shape
    node = helper.make_node("MatMulBnb4", ["x", "B", "absmax"], ["y"], domain="com.microsoft", K=k, N=n,
                            block_size=block, quant_type=NF4_QUANT_TYPE)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                              [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(absmax, "absmax")])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, k).numpy()
    y = sess.run(None, {"x": x})[0]
    exact = x.astype(np.float64) @ want.astype(np.float64).T
    assert np.abs(y - exact).max() <= 1e-5 * np.abs(exact).max() + 1e-6


def test_bitsandbytes_cpu_layout_quirk_is_refused():
    """bitsandbytes 0.50's CPU kernel dequantizes an even d_in that is not a multiple of the block (80 vs 64) with
    other weights than its packed layout holds; the NF4 export refuses such a layer instead of writing a wrong
    graph."""
    from lamda_edge.adapters.bnb import dequantize_weight, quantize_nf4
    from lamda_edge.errors import ModelError
    from lamda_edge.export.nf4 import _check_layout, nf4_dequantize, nf4_tensors

    torch.manual_seed(0)
    w = torch.randn(96, 80)
    layer = quantize_nf4(w, None, torch.float32, "cpu")
    packed = nf4_tensors(layer)
    flat = nf4_dequantize(*packed, (96, 80))
    cpu = dequantize_weight(layer)
    if np.array_equal(flat, cpu.numpy()):
        pytest.skip("this bitsandbytes dequantizes (96, 80) in its packed layout")
    assert np.abs(flat - w.numpy()).mean() < np.abs(cpu.numpy() - w.numpy()).mean()  # the layout is the right one
    with pytest.raises(ModelError, match="differently from its packed layout"):
        _check_layout("layer", packed, cpu)


# ---- the as-trained int4 graph -------------------------------------------------------------------------------------


def test_int4_of_an_nf4_trained_adapter_is_the_trained_model(nf4_run):
    """The default --int4 of an NF4-trained adapter: MatMulBnb4 on bitsandbytes' codes + the fp32 LaMDA path, equal to
    the PyTorch NF4 model under the fp32 tolerance rule at prefill, decode and chunk shapes."""
    root, report = nf4_run
    q = report["int4"]
    assert q["method"] == "nf4" and q["ops"]["MatMulBnb4"] == 14  # 2 layers x 7 adapted linears
    parity = q["parity"]
    assert parity["mismatches"] == [] and len(parity["cases"]) == 15  # 3 cases x (logits + 4 presents)
    for case in parity["cases"]:
        assert case["max_abs_diff"] <= FP32_RULE[0] + FP32_RULE[1] * case["max_abs_torch"]
    assert abs(q["ppl_int4"] / q["ppl_pytorch"] - 1) < 1e-4
    assert q["greedy_agreement_int4"] == 1.0
    assert q["size_ratio"] < 1.0
    saved = json.loads((root / "out" / "export-report.json").read_text())
    assert saved["graphs"]["model.int4.onnx"]["size_bytes"] == saved["sizes_bytes"]["model.int4.onnx"]


def test_int4_graph_matches_the_nf4_model_independently(nf4_run):
    """The same check done here, not by the export: the graph vs `load_lamda_model(quantize='nf4')` + the adapter,
    and the LaMDA path matters (the graph with S zeroed would not pass)."""
    from lamda_edge import load_adapter
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.adapters.config import LaMDAConfig
    from lamda_edge.load.loader import load_lamda_model
    from lamda_edge.runtime.decoder import OnnxDecoder
    from lamda_edge.runtime.session import session

    root, _ = nf4_run
    cfg = json.loads((root / "adapter" / "lamda_adapter.json").read_text())
    model = load_lamda_model(root / "base", LaMDAConfig.from_dict(cfg["lamda_config"]), quantize="nf4",
                             device="cpu", compute_dtype=torch.float32, cache_dir=False, progress=False).eval()
    load_adapter(model, root / "adapter")
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
        for _, layer in lamda_layers(model):
            layer.lamda_S.zero_()
        without = model(input_ids=ids).logits[0].numpy()
    got = OnnxDecoder(session(root / "out" / "model.int4.onnx")).full_logits(ids)
    allowed = FP32_RULE[0] + FP32_RULE[1] * np.abs(want).max()
    assert np.abs(got - want).max() <= allowed
    assert np.abs(without - want).max() > 100 * allowed


def test_int4_of_an_nf4_trained_random_residual_adapter_is_the_trained_model(tmp_path, monkeypatch):
    """init="random-residual": the base's frozen low-rank part rides in the graph in fp32 beside MatMulBnb4, so the
    --int4 graph is the NF4-trained model under the fp32 rule, and without that part it would not be."""
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.runtime.decoder import OnnxDecoder
    from lamda_edge.runtime.session import session

    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path / "cache"))
    base = _save_base(tmp_path / "base", "qwen2")
    model = _train_adapter(base, tmp_path / "adapter", "nf4", init="random-residual").eval()
    report = _export(tmp_path / "out", adapter=tmp_path / "adapter", int4=True)
    q = report["int4"]
    assert q["method"] == "nf4" and q["ops"]["MatMulBnb4"] == 14 and q["parity"]["mismatches"] == []
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
        for _, layer in lamda_layers(model):
            assert layer.frozen_rank == 4
            layer.frozen_U = None
            layer.frozen_Vt = None
        without = model(input_ids=ids).logits[0].numpy()
    got = OnnxDecoder(session(tmp_path / "out" / "model.int4.onnx")).full_logits(ids)
    allowed = FP32_RULE[0] + FP32_RULE[1] * np.abs(want).max()
    assert np.abs(got - want).max() <= allowed
    assert np.abs(without - want).max() > 100 * allowed


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    """A Llama adapter trained on a full-precision base, exported with each residual method and with --int8."""
    import os

    root = tmp_path_factory.mktemp("fprun")
    os.environ["LAMDA_EDGE_CACHE"] = str(root / "cache")
    base = _save_base(root / "base", "llama")
    _train_adapter(base, root / "adapter", None)
    reports, logs = {}, {}
    for m in ("nf4", "nbits", "merged"):
        logs[m] = []
        reports[m] = _export(root / m, log=logs[m].append, adapter=root / "adapter", int4=True, int4_method=m)
    logs["int8"] = []
    reports["int8"] = _export(root / "int8", log=logs["int8"].append, adapter=root / "adapter", int8=True)
    return root, {m: {**r, "log": logs[m]} for m, r in reports.items()}


def test_int4_of_a_full_precision_adapter_says_why_it_is_not_the_trained_model(fp_run, nf4_run):
    """--int4 on an adapter trained on a full-precision base: a note before the work names the cause and the fixes
    (--int8; train on the NF4 base); an NF4-trained adapter and --int8 get none."""
    _, reports = fp_run
    for method in ("nf4", "nbits", "merged"):
        notes = [line for line in reports[method]["log"] if line.startswith("note:")]
        assert len(notes) == 1 and "trained on a full-precision base (quantize: none)" in notes[0]
        assert "Fix: --int8" in notes[0] and "--quantize nf4" in notes[0]
    assert not [line for line in reports["int8"]["log"] + nf4_run[1]["log"] if line.startswith("note:")]


def test_a_failed_quality_floor_of_a_full_precision_adapter_names_the_fix(fp_run, tmp_path, monkeypatch):
    """When the 4-bit graph of a full-precision adapter fails the quality floor, the error says why and what to do
    (the floor itself is forced here; the default job's adapter fails it for real: docs/benchmarks.md)."""
    from lamda_edge.export import lowbit

    root, _ = fp_run
    monkeypatch.setattr(lowbit, "requantized_problems", lambda graph, *ppl: [f"{graph}: perplexity too high"])
    with pytest.raises(ExportValidationError) as error:
        _export(tmp_path / "out", adapter=root / "adapter", int4=True)
    message = str(error.value)
    assert "model.int4.onnx: perplexity too high" in message and "Fix: --int8" in message
    assert not (tmp_path / "out").exists()


def test_full_precision_adapter_keeps_the_low_rank_path_exact(fp_run):
    """A full-precision-trained adapter: only the residual is quantized (nf4 and nbits), and the graph is closer to the
    PyTorch adapter than today's merged round-to-nearest int4."""
    from lamda_edge.export.lowbit import FULL_PRECISION_AUTO, resolve_method

    root, reports = fp_run
    diffs = {m: reports[m]["int4"]["max_abs_logit_diff_int4"] for m in ("nf4", "nbits", "merged")}
    assert all(reports[m]["int4"]["method"] == m for m in diffs)
    assert reports["nbits"]["int4"]["ops"]["MatMulNBits"] == 14
    assert "GatherBlockQuantized" in reports["merged"]["int4"]["ops"]
    nf4 = json.loads((root / "nf4" / "export-report.json").read_text())["int4"]
    assert nf4["parity"]["mismatches"] == [] and "NF4-quantized" in nf4["parity"]["against"]
    assert diffs["nf4"] < diffs["merged"] and diffs["nbits"] < diffs["merged"]
    assert resolve_method("auto", root / "adapter", None) == FULL_PRECISION_AUTO
    assert resolve_method("auto", root / "adapter", "nf4") == "nf4"
    assert resolve_method("auto", None, None) == "merged"


def test_int8_is_closer_than_int4(fp_run):
    """--int8: MatMulNBits bits=8 on the residual, the LaMDA path in fp32; well under int4's error."""
    root, reports = fp_run
    q8, q4 = reports["int8"]["int8"], reports["nbits"]["int4"]
    assert q8["method"] == "nbits8" and q8["ops"]["MatMulNBits"] == 14
    assert (root / "int8" / "model.int8.onnx").is_file() and not (root / "int8" / "model.int4.onnx").exists()
    assert q8["max_abs_logit_diff_int8"] < q4["max_abs_logit_diff_int4"] / 4
    assert abs(q8["ppl_int8"] / q8["ppl_pytorch"] - 1) < 0.005
    assert q4["size_ratio"] < q8["size_ratio"] < 1.0


def test_the_int8_quantizer_logs_no_line_per_node(fp_run, tmp_path, caplog):
    """ONNX Runtime's MatMulNBits quantizer logs every node it skips at INFO (3,000 lines for SmolLM2): silenced."""
    import logging

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.NOTSET)  # as on import
    caplog.set_level(logging.INFO)
    _export(tmp_path / "out", adapter=fp_run[0] / "adapter", int8=True)
    assert not [r for r in caplog.records if r.name.startswith("onnxruntime") and r.levelno < logging.ERROR]


def test_generate_defaults_to_the_int8_graph_of_an_int8_export(fp_run):
    """`generate` without --onnx-file runs the low-bit graph the export wrote (int8 here), as the summary says."""
    from lamda_edge.runtime.generate import load_generator

    root, reports = fp_run
    assert reports["int8"]["summary"]["generate_uses"] == "model.int8.onnx"
    assert load_generator(root / "int8").onnx_file == "model.int8.onnx"
    assert load_generator(root / "int8", onnx_file="model.onnx").onnx_file == "model.onnx"


def test_int8_without_adapter_quantizes_the_graph(tmp_path):
    base = _save_base(tmp_path / "base", "llama")
    r = _export(tmp_path / "out", model=base, int8=True)
    assert r["int8"]["method"] == "merged-nbits8" and r["int8"]["ops"]["MatMulNBits"] > 0
    assert abs(r["int8"]["ppl_int8"] / r["int8"]["ppl_pytorch"] - 1) < 0.005


def test_classifier_adapter_exports_as_trained(tmp_path):
    """An encoder classifier trained on an NF4 base: the int4 graph passes parity with the NF4 model."""
    base = _save_base(tmp_path / "base", "bert")
    _train_adapter(base, tmp_path / "adapter", "nf4", task="sequence-classification", num_labels=3)
    r = _export(tmp_path / "out", adapter=tmp_path / "adapter", int4=True, ship=tmp_path / "ship")
    assert r["int4"]["method"] == "nf4" and r["int4"]["parity"]["mismatches"] == []
    assert r["int4"]["agreement_int4"] == 1.0
    # the summary speaks of classes, not tokens or a decoder's cases, and `classify` runs the int4 graph
    from lamda_edge.export.summary import summary_lines
    from lamda_edge.runtime.classify import OnnxClassifier

    text = "\n".join(summary_lines(r["summary"]))
    assert "greedy" not in text and "prefill" not in text and "classes (argmax) 100% of PyTorch's" in text
    assert "`lamda-edge classify` uses model.int4.onnx by default" in text
    assert OnnxClassifier(tmp_path / "out").onnx_file == "model.int4.onnx"
    assert OnnxClassifier(tmp_path / "out", onnx_file="model.onnx").onnx_file == "model.onnx"
    # --ship: the int4 graph, config and tokenizer only; the shipped folder classifies alone, as the export does
    shipped = sorted(p.name for p in (tmp_path / "ship").iterdir())
    assert shipped == sorted(r["summary"]["ship"]["files"]) and "model.int4.onnx" in shipped
    assert "model.onnx" not in shipped and "merged" not in shipped
    texts = ["the quick brown fox", "hello world"]
    os.replace(tmp_path / "out", tmp_path / "out-moved")
    assert OnnxClassifier(tmp_path / "ship").classify(texts) == OnnxClassifier(tmp_path / "out-moved").classify(texts)


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_int4_and_int8_together_is_a_config_error(tmp_path):
    from lamda_edge.cli import main

    with pytest.raises(ConfigError, match="choose one"):
        _export(tmp_path / "out", model=tmp_path, int4=True, int8=True)
    assert main(["export", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--int4", "--int8"]) == 2
    assert not (tmp_path / "o").exists()


def test_int4_on_an_unmapped_model_type_lists_the_supported_ones(tmp_path, capsys):
    import transformers

    from lamda_edge.cli import main

    tok = _tokenizer()
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    assert main(["export", "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "o"), "--int4"]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "llama, mistral, qwen2, qwen3" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_residual_methods_need_an_adapter(tmp_path):
    base = _save_base(tmp_path / "base", "llama")
    with pytest.raises(ConfigError, match="without --adapter"):
        _export(tmp_path / "out", model=base, int4=True, int4_method="nf4")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_parity_failure_writes_nothing_but_the_report(tmp_path, monkeypatch):
    """A graph that does not compute the trained model is refused: nothing half-written, the report beside it."""
    from lamda_edge.export import nf4

    base = _save_base(tmp_path / "base", "llama")
    _train_adapter(base, tmp_path / "adapter", "nf4")
    monkeypatch.setattr(nf4, "NF4_QUANT_TYPE", 0)  # the graph reads the codes as FP4: what a wrong attribute gives
    with pytest.raises(ExportValidationError, match="NF4 model as trained"):
        _export(tmp_path / "out", adapter=tmp_path / "adapter", int4=True)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.export-report.json").read_text())["int4"]["parity"]["mismatches"]


# ---- the default model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_nf4_adapter_int4_within_half_a_percent(tmp_path):
    """SmolLM2-135M with an NF4-trained adapter: the fp32 export validates, and --int4's perplexity on held-out text
    is within 0.5% of the PyTorch NF4 model's (and passes the fp32 tolerance rule against it)."""
    from lamda_edge.demo.default_model import default_model_path

    base = default_model_path()
    _train_adapter(base, tmp_path / "adapter", "nf4", scale=0.02)  # moved, yet still a language model
    r = _export(tmp_path / "out", adapter=tmp_path / "adapter", int4=True)
    q = r["int4"]
    assert r["ok"] and q["method"] == "nf4" and q["parity"]["mismatches"] == []
    assert abs(q["ppl_int4"] / q["ppl_pytorch"] - 1) < 0.005
    assert q["greedy_agreement_int4"] >= 0.9
    assert q["size_ratio"] <= 0.35


# ---- onnxruntime-genai ---------------------------------------------------------------------------------------------


def test_genai_packages_the_as_trained_graph(nf4_run, tmp_path):
    """--format genai: our as-trained int4 graph, packaged; onnxruntime_genai.Model loads it and its greedy tokens
    equal `lamda-edge generate`'s (OnnxGenerator over the same graph)."""
    og = pytest.importorskip("onnxruntime_genai")
    from lamda_edge.runtime.generate import OnnxGenerator, load_generator

    root, _ = nf4_run
    r = _export(tmp_path / "g", adapter=root / "adapter", format="genai")  # --precision auto: int4 (NF4-trained)
    g = r["genai"]
    assert r["ok"] and g["graph"] == "model.int4.onnx" and r["int4"]["method"] == "nf4"
    assert g["greedy_match"] and len(g["greedy_tokens_genai"]) > 0
    config = json.loads((tmp_path / "g" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.int4.onnx"
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    model = og.Model(str(tmp_path / "g"))  # loads as it is
    assert model is not None
    prompt = [5, 17, 42, 9]
    want = OnnxGenerator(tmp_path / "g", "model.int4.onnx").generate("", max_new_tokens=8, prompt_ids=prompt,
                                                                   ignore_eos=True).token_ids
    got = load_generator(tmp_path / "g").generate("", max_new_tokens=8, prompt_ids=prompt, ignore_eos=True).token_ids
    assert got == want
    assert abs(g["ppl_genai"] / g["ppl_onnx"] - 1) < 1e-3
