"""Activation offload (train/offload.py): the same loss and gradients as without it, what it moves to host memory,
and the device peak the memory model predicts for it, on real LaMDA steps of a tiny Llama on the CPU."""

from __future__ import annotations

import gc

import pytest
import torch

from lamda_edge.planner.live_tensors import LiveTensorCounter
from lamda_edge.planner.measure import build_model, measure
from lamda_edge.planner.memory import TrainSetup, estimate
from lamda_edge.planner.profiles import ModelShape
from lamda_edge.train.loss import causal_lm_loss
from lamda_edge.train.offload import ActivationOffload
from lamda_edge.train.trainer import LossModel

SHAPE = ModelShape(name="small", architecture="decoder", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                   tie_word_embeddings=True)


def _batch(b: int, t: int, padded: bool) -> dict:
    ids = torch.randint(0, SHAPE.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padded:
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0
        batch["attention_mask"] = mask
        batch["labels"] = batch["labels"].masked_fill(mask == 0, -100)
    return batch


def _loss_and_grads(setup: TrainSetup, offload: bool, batch: dict):
    model = build_model(SHAPE, setup, seed=3)
    for _, p in model.named_parameters():  # move S and B away from their init, so the gradients differ per tensor
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    context = ActivationOffload() if offload else None
    if context is None:
        loss = causal_lm_loss(model, batch, chunk_rows=setup.chunk_rows)
    else:
        with context:
            loss = causal_lm_loss(model, batch, chunk_rows=setup.chunk_rows)
    host = context.host_bytes if context else 0
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    value = loss.detach()
    del loss  # the graph: a checkpoint's saved inputs whose own node never runs are freed with it
    gc.collect()
    return value, grads, host, (context.host_bytes if context else 0)


@pytest.mark.parametrize(
    "ckpt,dtype,padded",
    [
        pytest.param(True, "fp32", True, id="ckpt-fp32-padded"),
        pytest.param(False, "fp32", False, id="no-ckpt-fp32"),
        pytest.param(True, "bf16", False, id="ckpt-bf16"),
    ],
)
def test_offload_gives_the_same_loss_and_gradients(ckpt, dtype, padded):
    setup = TrainSetup(batch_size=2, seq_len=48, rank=4, quantize=None, gradient_checkpointing=ckpt,
                       compute_dtype=dtype, chunk_rows=32, padding_mask=padded)
    batch = _batch(2, 48, padded)
    loss, grads, _, _ = _loss_and_grads(setup, False, batch)
    loss_off, grads_off, host_after_forward, host_after_backward = _loss_and_grads(setup, True, batch)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys() and len(grads) == 2 * 7 * SHAPE.num_hidden_layers
    for name in grads:
        assert torch.equal(grads[name], grads_off[name]), name
    assert host_after_forward > 0 and host_after_backward == 0  # held until backward, freed with the graph


def test_offloaded_bytes_are_the_checkpoint_inputs_and_the_loss_inputs():
    """With checkpointing, the host holds each block's input (N*h*e), the final norm's fp32 input and rsqrt, and the
    chunked loss's shifted hidden rows: what `estimate(...).host_offload_bytes` predicts."""
    setup = TrainSetup(batch_size=2, seq_len=64, rank=4, quantize=None, gradient_checkpointing=True,
                       compute_dtype="fp32", chunk_rows=32, padding_mask=False, activation_offload=True)
    _, _, host, _ = _loss_and_grads(setup, True, _batch(2, 64, False))
    predicted = estimate(SHAPE, setup).host_offload_bytes
    n, h = 2 * 64, SHAPE.hidden_size
    assert host >= SHAPE.num_hidden_layers * n * h * 4
    assert abs(host - predicted) / predicted < 0.10, (host, predicted)


@pytest.mark.parametrize(
    "dtype,padded",
    [pytest.param("fp32", True, id="fp32-padded"), pytest.param("bf16", False, id="bf16")],
)
def test_offload_lowers_the_measured_device_peak_as_predicted(dtype, padded):
    """The device peak (LiveTensorCounter; host copies are not counted) falls with offload, and the memory model
    predicts both within the planner's 10% worst-case target."""
    base = TrainSetup(batch_size=4, seq_len=128, rank=8, quantize=None, gradient_checkpointing=True,
                      compute_dtype=dtype, chunk_rows=256, padding_mask=padded)
    results = {}
    for offload in (False, True):
        setup = TrainSetup(**{**base.__dict__, "activation_offload": offload})
        got = measure(SHAPE, setup, steps=2)
        predicted = estimate(SHAPE, setup).tensor_peak_bytes
        results[offload] = got["measured_tensor_peak_bytes"]
        assert abs(predicted - results[offload]) / results[offload] < 0.10, (offload, predicted, results[offload])
        if offload:
            assert got["measured_host_offload_bytes"] > 0
    assert results[True] < results[False]


def test_loss_model_runs_the_forward_under_the_offload():
    setup = TrainSetup(batch_size=2, seq_len=32, rank=4, quantize=None, gradient_checkpointing=True,
                       compute_dtype="fp32", chunk_rows=16, padding_mask=False)
    model = LossModel(build_model(SHAPE, setup, seed=0), chunk_rows=16, activation_offload=True)
    batch = _batch(2, 32, False)
    counter = LiveTensorCounter()
    with counter:
        loss = model(**batch)["loss"]
    held = model.offload.host_bytes
    assert held > 0 and model.offload.offloaded_bytes == held
    loss.backward()
    assert model.offload.host_bytes < held
    del loss
    gc.collect()
    assert model.offload.host_bytes == 0
