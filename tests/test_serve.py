"""Tests of lamda_edge/serve.py: ONNX Runtime generation (plain export and onnxruntime-genai) against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.runtime.decoder import perplexity
from lamda_edge.runtime.generate import OnnxGenerator, load_generator, pick

PROMPTS = [pytest.param("hello world, how are you?", id="hello"),
           pytest.param("what is twelve times seven?", id="arithmetic")]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny, run_export):
    """A tiny Llama with a tied lm_head (as SmolLM2), exported as plain ONNX (fp32 + int4) and genai fp32."""
    root = tmp_path_factory.mktemp("serve")
    tiny.save(root / "base", "llama", seed=3, tie=True)
    run_export(root / "onnx", model=root / "base", int4=True)
    run_export(root / "genai", model=root / "base", format="genai", precision="fp32")
    return root


def transformers_greedy(folder, ids: list[int], eos: set[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("fmt", [pytest.param("onnx", id="plain-onnx"), pytest.param("genai", id="genai")])
def test_greedy_equals_transformers_generate(exported, fmt, prompt):
    gen = load_generator(exported / fmt, onnx_file="model.onnx" if fmt == "onnx" else None)
    ids = gen.encode(prompt)
    assert "<|im_start|>assistant" in gen.tokenizer.decode(ids)  # the chat template was applied
    want = transformers_greedy(exported / "onnx" / "merged", ids, gen.eos)
    result = gen.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert len(want) >= 5 and result.token_ids == want
    assert result.prompt_tokens == len(ids) and result.tokens_per_s > 0


def test_int4_is_the_default_graph_and_streams_its_text(exported):
    import onnx

    ops = [n.op_type for n in onnx.load(str(exported / "onnx" / "model.int4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 15 and ops.count("GatherBlockQuantized") == 1  # the tied head is 4-bit too
    gen = load_generator(exported / "onnx")
    assert isinstance(gen, OnnxGenerator) and gen.onnx_file == "model.int4.onnx"
    pieces = []
    result = gen.generate("hello world", max_new_tokens=12, on_text=pieces.append)
    assert len(result.token_ids) == 12 or result.stopped_by == "eos"
    assert "".join(pieces) == result.text == gen.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_generation_stops_at_eos(exported):
    gen = load_generator(exported / "onnx", onnx_file="model.onnx")
    first = gen.generate("hello world", max_new_tokens=3).token_ids[0]
    gen.eos = {first}
    result = gen.generate("hello world", max_new_tokens=10)
    assert result.token_ids == [first] and result.stopped_by == "eos"


@pytest.mark.parametrize("fmt", [pytest.param("onnx", id="plain-onnx"), pytest.param("genai", id="genai")])
def test_a_stop_predicate_ends_generation_after_its_token(exported, fmt):
    gen = load_generator(exported / fmt, onnx_file="model.onnx" if fmt == "onnx" else None)
    gen.eos = set()  # only the predicate or the budget can end it
    full = gen.generate("hello world", max_new_tokens=8).token_ids
    seen = []
    result = gen.generate("hello world", max_new_tokens=8, stop=lambda new: seen.append(list(new)) or len(new) == 3)
    assert result.token_ids == full[:3] and result.stopped_by == "stop"
    assert seen == [full[:1], full[:2], full[:3]]  # asked after every token, with all new tokens so far


def test_sampling_is_seeded_and_top_p_narrows_it(exported):
    gen = load_generator(exported / "onnx", onnx_file="model.onnx")
    runs = [gen.generate("hello", max_new_tokens=10, temperature=1.5, top_p=1.0, seed=s).token_ids for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    greedy = gen.generate("hello", max_new_tokens=10).token_ids
    nucleus = gen.generate("hello", max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=1).token_ids
    assert nucleus == greedy  # a vanishing top-p keeps only the most likely token


def test_pick():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    assert pick(logits, 0.0, 1.0, rng) == 1
    assert {pick(logits, 1.0, 1.0, rng) for _ in range(200)} == {0, 1, 2, 3}
    assert {pick(logits, 1.0, 0.6, rng) for _ in range(200)} == {1, 2}  # p(1)+p(2) ~ 0.96, p(1) ~ 0.50 < 0.6


def test_perplexity_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(9, 17, generator=g), torch.randint(0, 17, (9,), generator=g)
    want = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).exp().item()
    assert perplexity(logits.numpy(), ids.numpy()) == pytest.approx(want, rel=1e-6)


def test_cli_generate_streams_and_reports_speed(exported, capsys):
    from lamda_edge.cli import main

    assert main(["generate", "--model", str(exported / "genai"), "--prompt", "hello", "--max-new-tokens", "6"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "prompt tokens" in err
    assert main(["generate", "--model", str(exported / "onnx"), "--prompt", "hi", "--max-new-tokens", "0"]) == 2


def test_bad_folders(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        load_generator(tmp_path / "missing")
    (tmp_path / "merged").mkdir()
    with pytest.raises(ModelError, match="model.onnx"):
        load_generator(tmp_path)
