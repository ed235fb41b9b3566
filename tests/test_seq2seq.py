"""Encoder-decoders (BART): adapters on the encoder's and decoder's attention (self and cross) and feed-forward
linears, step-0 / merge / save-load equality, the chunked loss on target tokens, `lamda-edge train` with the task
detected from the config, exact resume, the data refusals (exit 2), and `export`'s refusal naming what exports."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

WORDS = "the quick brown fox jumps over the lazy dog hello world how are you today".split()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("bart")
    tiny.save(folder, "bart", hidden=32, positions=32)
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Sources of 6 words, targets their first 3 (a toy 'summary')."""
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        words = rng.choices(WORDS, k=6)
        rows.append({"source": " ".join(words), "target": " ".join(words[:3])})
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapted(folder, moved: bool = False):
    from lamda_edge import LaMDAConfig
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.load.loader import load_lamda_model

    model = load_lamda_model(folder, LaMDAConfig(rank=4, alpha=8.0), quantize=None, device="cpu",
                             compute_dtype=torch.float32, progress=False, cache_dir=False)
    if moved:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, layer in lamda_layers(model):
                layer.lamda_S.add_(0.5 * torch.randn(layer.lamda_S.shape, generator=g))
                layer.lamda_B.add_(0.5 * torch.randn(layer.lamda_B.shape, generator=g))
    return model


def logits(model):
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(3, 100, (2, 9), generator=g), torch.randint(3, 100, (2, 5), generator=g)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits  # (2, 5, V)


def test_adapters_cover_encoder_and_decoder_and_step0_equals_the_base(bart_dir, tol):
    from transformers import AutoModelForSeq2SeqLM

    from lamda_edge.adapters import lamda_layers

    model = adapted(bart_dir)
    names = {name for name, _ in lamda_layers(model)}
    for part in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.fc2", "decoder.layers.0.self_attn.v_proj",
                 "decoder.layers.1.encoder_attn.k_proj", "decoder.layers.1.encoder_attn.out_proj",
                 "decoder.layers.0.fc1"):
        assert f"model.{part}" in names
    assert not any("lm_head" in name for name in names)
    tol.assert_outputs_close(logits(model), logits(AutoModelForSeq2SeqLM.from_pretrained(bart_dir).eval()))


def test_merge_and_save_load_with_the_fingerprint(bart_dir, tiny, tol, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from lamda_edge import load_adapter, merge_and_unload, save_adapter
    from lamda_edge.errors import AdapterMismatchError

    model = adapted(bart_dir, moved=True)
    want = logits(model)
    assert (want - logits(AutoModelForSeq2SeqLM.from_pretrained(bart_dir).eval())).abs().max() > 100 * tol.fp32
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "lamda_adapter.json").read_text())["task"] == "seq2seq"
    fresh = adapted(bart_dir)
    load_adapter(fresh, tmp_path / "adapter")
    tol.assert_outputs_close(logits(fresh), want)
    tol.assert_outputs_close(logits(merge_and_unload(model)), want)
    tiny.save(tmp_path / "other", "bart", seed=1, hidden=32, positions=32)
    with pytest.raises(AdapterMismatchError):
        load_adapter(adapted(tmp_path / "other"), tmp_path / "adapter")


def test_chunked_loss_equals_the_models_own_loss_on_target_tokens(bart_dir, pairs_file):
    from lamda_edge.train.loss import seq2seq_loss
    from lamda_edge.train.pairs import PairCollator, load_pairs
    from lamda_edge.train.recipe import _load_tokenizer

    tokenizer = _load_tokenizer(bart_dir)
    data = load_pairs(pairs_file, tokenizer, 32).train
    batch = PairCollator(tokenizer.pad_token_id)([data[i] for i in range(4)])
    assert (batch["labels"] == -100).any()  # padded targets: the loss skips them
    model = adapted(bart_dir, moved=True)
    chunked = seq2seq_loss(model, batch, chunk_rows=5)
    own = seq2seq_loss(model, batch, chunk_rows=None)
    torch.testing.assert_close(chunked, own, atol=1e-5, rtol=1e-5)


def run_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--quantize", "none",
            "--rank", "4", "--batch-size", "4", "--seq-len", "32", "--max-steps", "4", "--quiet", "save_steps=2",
            "save_total_limit=10", "eval_steps=2", "lr=5e-3", "precision=fp32", "eval_fraction=0.25", "dropout=0.1",
            *extra]


def test_trains_from_the_cli_and_resumes_exactly(bart_dir, pairs_file, tmp_path):
    """task detected from the config (is_encoder_decoder); a run resumed from its step-2 checkpoint ends bitwise
    equal to the uninterrupted run."""
    from safetensors.torch import load_file

    from lamda_edge.cli import main

    out = tmp_path / "run"
    assert main(run_args(bart_dir, pairs_file, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "seq2seq" and metrics["global_step"] == 4
    assert [e["step"] for e in metrics["eval"]] == [0, 2, 4] and all("eval_perplexity" in e for e in metrics["eval"])
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    (resumed / "lamda_adapter.safetensors").unlink()
    assert main(["train", "--output", str(resumed), "--resume", "--quiet"]) == 0
    want, got = (load_file(str(folder / "lamda_adapter.safetensors")) for folder in (out, resumed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    "rows, extra, expected",
    [
        pytest.param([{"source": "the fox", "target": "fox"}, {"source": "the dog"}], [],
                     "line 2: missing field 'target'", id="missing-target"),
        pytest.param([{"source": " ".join(WORDS * 3), "target": "fox"}] * 2, ["on_overflow=error"],
                     "longer than the encoder's limit=32", id="source-over-encoder-limit"),
    ],
)
def test_bad_seq2seq_data_exits_2(bart_dir, tmp_path, capsys, rows, extra, expected):
    from lamda_edge.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(run_args(bart_dir, data, tmp_path / "out", "--seq-len", "64", *extra)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_low_bit_export_of_an_encoder_decoder_is_refused(bart_dir, run_export, tmp_path):
    from lamda_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="fp32 ONNX graphs only"):
        run_export(tmp_path / "out", model=bart_dir, int8=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_parity_of_every_graph_and_onnx_greedy_equals_pytorch(bart_dir, tol, tmp_path, run_export, capsys):
    """encoder, decoder and decoder-with-past graphs under optimum's names, each output equal to PyTorch; greedy
    generation over them equals transformers' greedy generate token for token; `lamda-edge generate` runs it."""
    from lamda_edge import save_adapter
    from lamda_edge.cli import main
    from lamda_edge.runtime.seq2seq import OnnxSeq2Seq

    model = adapted(bart_dir, moved=True)
    save_adapter(model, tmp_path / "adapter", metadata={"base_model": str(bart_dir), "quantize": None})
    report = run_export(tmp_path / "out", adapter=tmp_path / "adapter")
    assert report["ok"] and report["kind"] == "seq2seq" and not report["validation"]["mismatches"]
    diffs = report["validation"]["max_abs_diff"]
    assert {"last_hidden_state", "logits", "present.0.decoder.key", "present.1.encoder.value"} <= set(diffs)
    assert max(diffs.values()) <= tol.fp32
    assert set(report["summary"]["graphs"]) == {"encoder_model.onnx", "decoder_model.onnx",
                                                "decoder_with_past_model.onnx"}
    onnx = OnnxSeq2Seq(tmp_path / "out")
    eos = model.config.eos_token_id
    for seed in (0, 1):
        source = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = model.generate(source, attention_mask=torch.ones_like(source), max_new_tokens=8, do_sample=False,
                                  num_beams=1, min_length=0, no_repeat_ngram_size=0, forced_eos_token_id=None,
                                  forced_bos_token_id=None, eos_token_id=eos)[0, 1:].tolist()
        assert onnx.generate_ids(source[0].tolist(), max_new_tokens=8) == want
    assert main(["generate", "--model", str(tmp_path / "out"), "--prompt", "the quick brown fox",
                 "--max-new-tokens", "4"]) == 0
    assert "greedy" in capsys.readouterr().err
    # what to ship: the three graphs, config and tokenizer; the shipped folder generates alone, as the export does
    from lamda_edge.export.ship import ship

    shipped = ship(tmp_path / "out", tmp_path / "ship")
    assert shipped == report["summary"]["ship"]["files"] and "merged" not in shipped
    assert {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json"} <= set(shipped)
    want = OnnxSeq2Seq(tmp_path / "out").generate("the quick brown fox", max_new_tokens=4)
    os.replace(tmp_path / "out", tmp_path / "out-moved")
    assert OnnxSeq2Seq(tmp_path / "ship").generate("the quick brown fox", max_new_tokens=4) == want


def test_run_with_progress_reports_perplexity_and_the_fp32_export(bart_dir, pairs_file, tmp_path, capsys):
    """Without --quiet: the summary gives the held-out perplexity and names the encoder-decoder's export (fp32)."""
    from lamda_edge.cli import main

    out = tmp_path / "run"
    assert main([a for a in run_args(bart_dir, pairs_file, out) if a != "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "(perplexity " in captured.out
    assert f"next: lamda-edge export --adapter {out} --output {out}-onnx\n" in captured.out
