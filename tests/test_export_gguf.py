"""Tests of `export --format gguf` (export/gguf_file.py, gguf_vocab.py, gguf_check.py, modelfile.py).

Every file written here is read back by a reader we did not write: transformers' GGUF loader (weights, tokenizer,
chat template) and the `gguf` package's GGUFReader (metadata, tensor types). Tiny models from conftest.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lamda_edge.errors import ConfigError, ExportValidationError, ModelError

pytestmark = pytest.mark.usefixtures("private_cache")


def _save(tiny, folder, arch):
    """A tiny `arch` folder whose embedding covers the tokenizer transformers loads back for it (Qwen's tokenizer
    class adds <|endoftext|>)."""
    from transformers import AutoTokenizer

    tiny.save(folder, arch)
    size = len(AutoTokenizer.from_pretrained(folder))
    tiny.save(folder, arch, vocab=size)
    return folder


def _trained_adapter(tiny, base_dir, adapter_dir):
    """apply_lamda on the saved base, move S and B away from their init, save the adapter; return the model."""
    from transformers import AutoModelForCausalLM

    from lamda_edge import LaMDAConfig, apply_lamda, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    apply_lamda(model, LaMDAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "down_proj")))
    tiny.move(model, seed=5)
    save_adapter(model, adapter_dir, metadata={"base_model": str(base_dir), "quantize": None})
    return model


def _read_back(gguf_path, tmp_path):
    """transformers' model and tokenizer from the GGUF file alone (copied into an empty folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(gguf_path, alone / gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(alone, gguf_file=gguf_path.name)


def _fields(gguf_path) -> dict:
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    fields["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_adapter_exported_f16_reads_back_as_the_adapter_model(tiny, tol, run_export, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    base = _save(tiny, tmp_path / arch, arch)
    adapted = _trained_adapter(tiny, base, tmp_path / "adapter")
    report = run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="gguf", gguf_type="f16")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "export-report.json",
                                                                    "model.f16.gguf"]
    assert report["ok"] and report["validation"]["max_abs_logit_diff_f16_weights"] <= 1e-3

    back, _ = _read_back(tmp_path / "out" / "model.f16.gguf", tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got, before = (tiny.output(m, ids) for m in (adapted, back, plain))
    assert (want - before).abs().max() > 10 * tol.fp16  # the adapter moved the model: the check below means something
    torch.testing.assert_close(got, want, atol=tol.fp16, rtol=0)


@pytest.mark.parametrize("arch, gguf_arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                             ("qwen3", "qwen3")])
def test_each_family_writes_its_architecture_and_tokenizer(tiny, run_export, tmp_path, arch, gguf_arch):
    from transformers import AutoTokenizer

    from lamda_edge.export.gguf_vocab import pre_tokenizer_name

    base = _save(tiny, tmp_path / arch, arch)
    report = run_export(tmp_path / "out", model=base, format="gguf", gguf_type="q8_0")
    assert report["ok"] and abs(report["validation"]["rel_ppl_diff"]) <= 0.01
    fields = _fields(tmp_path / "out" / "model.q8_0.gguf")
    tokenizer = AutoTokenizer.from_pretrained(base)
    merges = json.loads((base / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["general.architecture"] == gguf_arch
    pre = pre_tokenizer_name(json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == pre
    assert pre == ("qwen2" if arch == "qwen2" else "gpt-2")  # transformers' Qwen2 tokenizer class splits as Qwen2
    assert len(fields["tokenizer.ggml.tokens"]) == tokenizer.vocab_size + len(tokenizer.added_tokens_decoder) - sum(
        1 for i in tokenizer.added_tokens_decoder if i < tokenizer.vocab_size)
    assert len(fields["tokenizer.ggml.merges"]) == len(merges)
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert set(fields["tensor_types"].values()) == {"Q8_0", "F32"}
    assert "output.weight" in fields["tensor_types"]  # untied head written; a tied one is not (next test)


def test_q4_0_is_smaller_keeps_embedding_and_head_at_q8_0_and_reports_its_quality(tiny, run_export, tmp_path):
    base = _save(tiny, tmp_path / "llama", "llama")
    q4 = run_export(tmp_path / "q4", model=base, format="gguf", gguf_type="q4_0")
    q8 = run_export(tmp_path / "q8", model=base, format="gguf", gguf_type="q8_0")
    types = _fields(tmp_path / "q4" / "model.q4_0.gguf")["tensor_types"]
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_0"
    assert q4["sizes_bytes"]["model.q4_0.gguf"] < q8["sizes_bytes"]["model.q8_0.gguf"]
    assert q4["ok"] and "not equal by design" in q4["validation"]["check"]
    assert q4["summary"]["perplexity"]["gguf"] == q4["validation"]["ppl_gguf"]


def test_a_tied_head_is_not_written_and_llama_cpp_reuses_the_embedding(tiny, run_export, tmp_path):
    from transformers import AutoTokenizer

    tiny.save(tmp_path / "tied", "llama", tie=True)
    size = len(AutoTokenizer.from_pretrained(tmp_path / "tied"))
    tiny.save(tmp_path / "tied", "llama", tie=True, vocab=size)
    report = run_export(tmp_path / "out", model=tmp_path / "tied", format="gguf", gguf_type="f16")
    assert report["ok"]
    assert "output.weight" not in _fields(tmp_path / "out" / "model.f16.gguf")["tensor_types"]


def test_the_tokenizer_and_chat_template_read_back_from_the_shipped_file(tiny, run_export, tmp_path):
    from transformers import AutoTokenizer

    base = _save(tiny, tmp_path / "llama", "llama")
    report = run_export(tmp_path / "out", model=base, format="gguf", gguf_type="q8_0", ship=tmp_path / "ship")
    assert report["ship"]["files"] == ["model.q8_0.gguf", "Modelfile"]  # the file carries tokenizer and template
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["Modelfile", "model.q8_0.gguf"]
    _, back = _read_back(tmp_path / "ship" / "model.q8_0.gguf", tmp_path)
    want = AutoTokenizer.from_pretrained(base)
    text = "what is twelve times seven? it is 84, or eighty four.\n  the lazy dog"
    assert back(text)["input_ids"] == want(text)["input_ids"]
    messages = [{"role": "user", "content": "hello"}]
    assert back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_wrong_rotary_layout_fails_the_check_and_lists_it(tiny, run_export, tmp_path, monkeypatch):
    """Without llama.cpp's q/k permutation transformers' reader un-permutes rows that were never permuted: the check
    must catch it."""
    from lamda_edge.export import gguf_file

    base = _save(tiny, tmp_path / "llama", "llama")
    monkeypatch.setattr(gguf_file, "permute_qk", lambda weight, n_head: weight)
    with pytest.raises(ExportValidationError, match="float16 weights"):
        run_export(tmp_path / "out", model=base, format="gguf", gguf_type="f16")
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.export-report.json").read_text())
    assert report["ok"] is False and report["validation"]["max_abs_logit_diff_f16_weights"] > 1e-3


def test_other_families_are_refused_naming_the_supported_ones(tiny, tmp_path, capsys):
    from lamda_edge.cli import main

    tiny.save(tmp_path / "gpt2", "gpt2")
    code = main(["export", "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out"), "--format", "gguf"])
    assert code == 2
    err = capsys.readouterr().err
    assert "llama, mistral, qwen2, qwen3" in err and "'gpt2'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_options_that_do_not_apply_to_a_gguf_file_are_config_errors(tmp_path):
    from lamda_edge.export.pipeline import ExportOptions

    with pytest.raises(ConfigError, match="drop --int8"):
        ExportOptions(output=tmp_path / "o", model=tmp_path, format="gguf", int8=True)
    with pytest.raises(ConfigError, match="gguf_type.*q4_k"):
        ExportOptions(output=tmp_path / "o", model=tmp_path, format="gguf", gguf_type="q4_k")


@pytest.mark.parametrize("pre, name", [
    pytest.param({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2", id="gpt-2"),
    pytest.param({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                        {"type": "ByteLevel", "use_regex": True}]}, "smollm",
                 id="smollm"),
    pytest.param({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                        {"type": "ByteLevel", "use_regex": True}]}, None,
                 id="digits-grouped"),
    pytest.param({"type": "Whitespace"}, None, id="whitespace"),
    pytest.param(None, None, id="none"),
])
def test_the_pre_tokenizer_name_comes_from_its_structure(pre, name):
    from lamda_edge.export.gguf_vocab import pre_tokenizer_name

    assert pre_tokenizer_name(pre) == name


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lamda_edge.export.gguf_vocab import read_bpe_tokenizer

    raw = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ModelError, match="WordPiece.*byte-level BPE"):
        read_bpe_tokenizer(tmp_path)


SMOL_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
             "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
             "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template, chatml, system", [
    pytest.param("chatml", True, None, id="chatml"),
    pytest.param(SMOL_LIKE, True, "You are a helpful assistant.", id="chatml-default-system"),
    pytest.param("{% for m in messages %}### {{ m['content'] }}\n{% endfor %}", False, None, id="other"),
])
def test_the_modelfile_translates_chatml_and_its_default_system_prompt(tiny, tmp_path, template, chatml, system):
    from lamda_edge.export.modelfile import write_modelfile

    tokenizer = tiny.tokenizer(["hello world"] * 3, vocab_size=280)
    if template != "chatml":
        tokenizer.chat_template = template
    info = write_modelfile(tmp_path / "Modelfile", "model.q8_0.gguf", tokenizer)
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./model.q8_0.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert ("TEMPLATE" in text.replace("# no TEMPLATE", "")) == chatml and info["system"] == system
    assert (f'SYSTEM """{system}"""' in text) == (system is not None)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_computes_the_logits_of_the_merged_model(tiny, run_export, tmp_path, arch):
    """A real llama.cpp build (llama-cpp-python, not a test dependency: skipped without it) loads the f16 file and
    computes what transformers computes at the same float16 weights: the tensor layout (the rotary permutation
    included), hyperparameters and tokenizer as llama.cpp reads them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_edge.export.gguf_check import F16_LOGIT_TOL, float16_rounded

    base = _save(tiny, tmp_path / arch, arch)
    run_export(tmp_path / "out", model=base, format="gguf", gguf_type="f16")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model.f16.gguf"), n_ctx=64, n_threads=1,
                          logits_all=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = "the quick brown fox jumps over the lazy dog, what is twelve times seven?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])  # (T, V)
    model = float16_rounded(AutoModelForCausalLM.from_pretrained(base).eval())
    want = tiny.output(model, torch.tensor([ids]))[0].numpy()
    assert np.abs(got - want).max() <= F16_LOGIT_TOL
