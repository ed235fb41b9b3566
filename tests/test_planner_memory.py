"""The memory model: per-block saved bytes counted exactly, monotone in batch/seq, and close to a real step."""

from __future__ import annotations

import pytest

from lamda_edge.errors import ConfigError
from lamda_edge.planner.memory import TrainSetup, estimate, nf4_bytes, saved_per_token
from lamda_edge.planner.profiles import ModelShape, get_model

TOLERANCE = 0.10  # the planner's worst-case target (docs/planner-accuracy.md); the median target is 5%


def tiny(h=64, inter=160, layers=2, heads=4, kv=2, vocab=256) -> ModelShape:
    return ModelShape(name="tiny", architecture="decoder", hidden_size=h, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=h // heads, vocab_size=vocab, tie_word_embeddings=True)


def _saved_by_forward(model, batch) -> int:
    """Bytes that the chunked loss's forward leaves live for backward, counted by LiveTensorCounter."""
    from lamda_edge.planner.live_tensors import LiveTensorCounter
    from lamda_edge.train.loss import causal_lm_loss

    counter = LiveTensorCounter().register(model, batch)
    start = counter.current_bytes
    with counter:
        loss = causal_lm_loss(model, batch, chunk_rows=256)
        saved = counter.current_bytes - start
    del loss
    return saved


def _saved_after_forward(layers: int, quantize, padded: bool) -> int:
    """Live bytes after a forward without checkpointing, above weights and batch (counted)."""
    import torch

    from lamda_edge.planner.measure import build_model

    setup = TrainSetup(batch_size=2, seq_len=32, rank=4, quantize=quantize, gradient_checkpointing=False,
                       compute_dtype="fp32")
    model = build_model(tiny(layers=layers), setup)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padded:
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][0, 24:] = 0
    return _saved_by_forward(model, batch)


@pytest.mark.parametrize("quantize", [pytest.param(None, id="plain"), pytest.param("nf4", id="nf4")])
@pytest.mark.parametrize("padded", [pytest.param(False, id="no-mask"), pytest.param(True, id="padding-mask")])
def test_saved_bytes_per_block_match_the_op_by_op_count(quantize, padded):
    per_block = _saved_after_forward(2, quantize, padded) - _saved_after_forward(1, quantize, padded)
    setup = TrainSetup(batch_size=2, seq_len=32, rank=4, quantize=quantize, compute_dtype="fp32",
                       padding_mask=padded)
    assert per_block == saved_per_token(tiny(), setup, [4] * 7) * setup.tokens


def test_nf4_bytes_match_bitsandbytes():
    import torch

    from lamda_edge.adapters.bnb import quantize_nf4
    from lamda_edge.planner.live_tensors import LiveTensorCounter

    layer = quantize_nf4(torch.randn(96, 64), None)
    assert LiveTensorCounter().register(layer).current_bytes == nf4_bytes(96 * 64, double_quant=True)


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ("smollm2-135m", "llama-3.1-8b", "llama-2-70b")])
@pytest.mark.parametrize("ckpt", [pytest.param(True, id="ckpt"), pytest.param(False, id="no-ckpt")])
def test_more_batch_or_seq_never_predicts_less(name, ckpt):
    shape = get_model(name)
    prev = 0
    for batch, seq in [(1, 128), (1, 256), (2, 256), (2, 512), (4, 512), (4, 1024), (8, 1024)]:
        est = estimate(shape, TrainSetup(batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt))
        assert est.tensor_peak_bytes >= prev
        assert sum(est.breakdown.values()) == est.tensor_peak_bytes
        prev = est.tensor_peak_bytes


def test_quantizing_and_checkpointing_and_chunking_each_save_memory():
    shape = get_model("llama-3.1-8b")
    base = TrainSetup(batch_size=2, seq_len=1024)
    peak = estimate(shape, base).tensor_peak_bytes
    for change in ({"quantize": None}, {"gradient_checkpointing": False}, {"chunk_rows": None}):
        assert estimate(shape, TrainSetup(**{**base.__dict__, **change})).tensor_peak_bytes > peak, change
    frozen_b = estimate(shape, TrainSetup(**{**base.__dict__, "b_trainable": False}))
    assert frozen_b.trainable_params < estimate(shape, base).trainable_params


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(TrainSetup(batch_size=4, seq_len=64, rank=8, quantize="nf4", compute_dtype="bf16"),
                     id="nf4-bf16-ckpt"),
        pytest.param(TrainSetup(batch_size=4, seq_len=64, rank=8, quantize=None, compute_dtype="fp32",
                                gradient_checkpointing=False), id="plain-fp32-no-ckpt"),
    ],
)
def test_predicted_peak_is_close_to_a_measured_step(setup):
    from lamda_edge.planner.measure import measure

    shape = tiny(h=128, inter=384, layers=2, vocab=512)
    measured = measure(shape, setup, steps=2)["measured_tensor_peak_bytes"]
    predicted = estimate(shape, setup).tensor_peak_bytes
    assert abs(predicted - measured) / measured <= TOLERANCE, (predicted, measured)


def test_partial_checkpointing_sits_between_none_and_all():
    """Each checkpointed block keeps its input instead of its saved set: the peak falls as blocks are added."""
    shape = tiny(h=128, inter=384, layers=4, vocab=512)
    base = TrainSetup(batch_size=4, seq_len=64, rank=8, quantize=None, compute_dtype="fp32")
    none = estimate(shape, TrainSetup(**{**base.__dict__, "gradient_checkpointing": False})).tensor_peak_bytes
    peaks = [estimate(shape, TrainSetup(**{**base.__dict__, "checkpoint_layers": k})).tensor_peak_bytes
             for k in (1, 2, 3, 4)]
    assert none > peaks[0] > peaks[1] > peaks[2] > peaks[3]
    assert peaks[3] == estimate(shape, base).tensor_peak_bytes  # 4 of 4 blocks = all of them


@pytest.mark.parametrize("layers", [1, 3])
def test_partial_checkpointing_peak_is_close_to_a_measured_step(layers):
    """The lowest `layers` of 4 blocks checkpointed (enable_gradient_checkpointing(model, layers)), measured."""
    from lamda_edge.load.loader import checkpointed_blocks
    from lamda_edge.planner.measure import build_model, measure

    shape = tiny(h=128, inter=384, layers=4, vocab=512)
    setup = TrainSetup(batch_size=4, seq_len=64, rank=8, quantize=None, compute_dtype="fp32",
                       checkpoint_layers=layers)
    flags = [block.gradient_checkpointing for block in checkpointed_blocks(build_model(shape, setup))]
    assert flags == [True] * layers + [False] * (4 - layers)
    measured = measure(shape, setup, steps=2)["measured_tensor_peak_bytes"]
    predicted = estimate(shape, setup).tensor_peak_bytes
    assert abs(predicted - measured) / measured <= TOLERANCE, (predicted, measured)


@pytest.mark.parametrize("checkpointing", [pytest.param(False, id="no-ckpt"), pytest.param(True, id="ckpt")])
def test_encoder_decoder_peak_is_close_to_a_measured_step(tmp_path, checkpointing):
    """BART (post-LayerNorm, SDPA, dropout 0.1, cross-attention): the planner's estimate against a real step of the
    seq2seq loss, counted by the live-tensor counter (`plan --measure` on a local BART config)."""
    from transformers import BartConfig

    from lamda_edge.planner.measure import measure

    BartConfig(vocab_size=512, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=384, decoder_ffn_dim=384,
               max_position_embeddings=128).save_pretrained(tmp_path)
    shape = get_model(str(tmp_path))
    assert shape.architecture == "encoder-decoder"
    setup = TrainSetup(batch_size=8, seq_len=128, rank=8, quantize=None, compute_dtype="fp32",
                       gradient_checkpointing=checkpointing)
    measured = measure(shape, setup, steps=2)["measured_tensor_peak_bytes"]
    predicted = estimate(shape, setup).tensor_peak_bytes
    assert abs(predicted - measured) / measured <= TOLERANCE, (predicted, measured)


# ---- PEFT LoRA / QLoRA (method="lora"), priced for `plan`'s comparison (issue 27) ----------------------------------


def _peft_model(shape, setup):
    """PEFT LoRA / QLoRA with PEFT's defaults on random weights of `shape` (tools/_bench_common.peft_lora)."""
    import sys
    from pathlib import Path

    import torch
    from transformers import LlamaForCausalLM

    from lamda_edge.planner.measure import llama_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import _bench_common as bc

    torch.manual_seed(0)
    dtype = bc.DTYPES[setup.compute_dtype]
    model = LlamaForCausalLM(llama_config(shape)).to(dtype)
    return bc.peft_lora(model, setup.rank, setup.quantize, dtype, "cpu", setup.gradient_checkpointing,
                        setup.checkpoint_layers)


def _peft_saved_after_forward(layers: int, setup: TrainSetup) -> int:
    import torch


    model = _peft_model(tiny(layers=layers), setup)
    ids = torch.randint(0, 256, (setup.batch_size, setup.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][0, -8:] = 0
    return _saved_by_forward(model, batch)


@pytest.mark.parametrize("quantize", [pytest.param(None, id="lora"), pytest.param("nf4", id="qlora")])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_peft_saved_bytes_per_block_match_the_op_by_op_count(quantize, dtype):
    """LoRA keeps each layer's input x (fp32: shared by q/k/v and gate/up; bf16: one fp32 cast per layer) and A x;
    QLoRA's fp32 upcast makes every activation fp32 whatever the compute dtype."""
    setup = TrainSetup(batch_size=2, seq_len=32, rank=4, quantize=quantize, compute_dtype=dtype,
                       gradient_checkpointing=False, method="lora")
    per_block = _peft_saved_after_forward(2, setup) - _peft_saved_after_forward(1, setup)
    priced = TrainSetup(**{**setup.__dict__, "compute_dtype": "fp32"}) if setup.peft_upcast else setup
    assert per_block == saved_per_token(tiny(), priced, [4] * 7) * setup.tokens


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(TrainSetup(batch_size=4, seq_len=64, rank=8, quantize="nf4", compute_dtype="bf16",
                                method="lora"), id="qlora-bf16-ckpt"),
        pytest.param(TrainSetup(batch_size=4, seq_len=64, rank=8, quantize="nf4", compute_dtype="fp32",
                                checkpoint_layers=1, padding_mask=False, method="lora"), id="qlora-fp32-1-of-2"),
        pytest.param(TrainSetup(batch_size=4, seq_len=64, rank=8, quantize=None, compute_dtype="fp32",
                                gradient_checkpointing=False, method="lora"), id="lora-fp32-no-ckpt"),
    ],
)
def test_peft_predicted_peak_is_close_to_a_measured_step(setup):
    from lamda_edge.planner.measure import measure

    shape = tiny(h=128, inter=384, layers=2, vocab=512)
    measured = measure(shape, setup, steps=2, model=_peft_model(shape, setup))["measured_tensor_peak_bytes"]
    predicted = estimate(shape, setup).tensor_peak_bytes
    assert abs(predicted - measured) / measured <= TOLERANCE, (predicted, measured)


def test_lora_prices_more_than_lamda_at_the_same_settings():
    """Same job, same rank: LoRA trains A and B (more gradients and AdamW state) and keeps d-dim inputs where LaMDA
    keeps r-dim ones; QLoRA's upcast doubles a bf16 run's activations and unquantized weights."""
    shape = get_model("llama-3.1-8b")
    for ckpt in (True, False):
        ours = TrainSetup(batch_size=2, seq_len=1024, gradient_checkpointing=ckpt)
        theirs = TrainSetup(**{**ours.__dict__, "method": "lora"})
        a, b = estimate(shape, ours), estimate(shape, theirs)
        assert b.tensor_peak_bytes > a.tensor_peak_bytes and b.trainable_params > a.trainable_params
        assert b.resident["embeddings"] == 2 * a.resident["embeddings"]  # bf16 -> fp32
    assert saved_per_token(shape, theirs, [16] * 7) > saved_per_token(shape, ours, [16] * 7)
    with pytest.raises(ConfigError, match="method"):
        TrainSetup(method="qlora")


def test_random_residual_frozen_term_is_priced_as_the_layers_hold_it():
    """The hybrid init keeps the principal part as two fp32 buffers per layer; the planner counts what is built."""
    from dataclasses import replace

    from lamda_edge.planner.measure import build_model

    shape = tiny()
    setup = TrainSetup(batch_size=2, seq_len=32, rank=4, quantize="nf4", compute_dtype="fp32", init="random-residual")
    model = build_model(shape, setup)
    held = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
               if name.endswith(("frozen_U", "frozen_Vt")))
    assert held > 0
    assert estimate(shape, setup).resident["lamda_frozen_term"] == held
    principal = estimate(shape, replace(setup, init="principal"))
    assert "lamda_frozen_term" not in principal.resident
    assert estimate(shape, setup).tensor_peak_bytes == principal.tensor_peak_bytes + held
