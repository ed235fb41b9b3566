"""Tests of lamda_edge/loss.py: the chunked causal-LM loss equals the plain one, and its step peak is lower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.planner.live_tensors import LiveTensorCounter
from lamda_edge.train.loss import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss


def _reference_loss(hidden, weight, labels, bias=None):
    """The unchunked loss, as transformers computes it (shift, fp32 logits, mean over valid labels)."""
    logits = F.linear(hidden[:, :-1], weight, bias).float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def _inputs(batch, seq, hidden, vocab, ignore_fraction, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).requires_grad_(True)
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_(True) if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignore_fraction] = IGNORE_INDEX
    return h, w, b, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize(
    "batch,seq,chunk_rows,ignore_fraction,bias",
    [
        pytest.param(2, 9, 4, 0.0, False, id="chunk-divides-not-16-rows"),
        pytest.param(3, 11, 7, 0.3, False, id="ignore-30pct-chunk-7"),
        pytest.param(2, 17, 1, 0.2, True, id="one-row-chunks-bias"),
        pytest.param(2, 9, 256, 0.0, False, id="single-chunk"),
        pytest.param(4, 8, 14, 0.5, True, id="ignore-half-chunk-divides-28"),
    ],
)
def test_chunked_loss_and_gradients_equal_unchunked(tol, batch, seq, chunk_rows, ignore_fraction, bias):
    h, w, b, labels = _inputs(batch, seq, 16, 37, ignore_fraction, bias)
    ref = _reference_loss(h, w, labels, b)
    ref_grads = _grads(ref, h, w, b)
    got = chunked_causal_lm_loss(h, w, labels, chunk_rows=chunk_rows, lm_head_bias=b)
    got_grads = _grads(got, h, w, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **tol.fp32_loss)
    for g_got, g_ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(g_got, g_ref, **tol.fp32_loss)


def test_ignored_positions_do_not_change_the_loss(tol):
    h, w, _, labels = _inputs(2, 10, 8, 23, 0.0, False)
    masked = labels.clone()
    masked[:, 1:4] = IGNORE_INDEX
    full = chunked_causal_lm_loss(h, w, labels, chunk_rows=3)
    part = chunked_causal_lm_loss(h, w, masked, chunk_rows=3)
    assert not torch.allclose(full, part)
    torch.testing.assert_close(part, _reference_loss(h, w, masked), **tol.fp32_loss)
    # the hidden states whose next label is ignored get no gradient
    (grad_h,) = _grads(part, h)
    assert torch.count_nonzero(grad_h[:, 0:3]) == 0
    assert torch.count_nonzero(grad_h[:, 3:-1]) > 0
    assert torch.count_nonzero(grad_h[:, -1]) == 0  # the last position predicts nothing


def test_all_labels_ignored_gives_zero_loss_with_graph():
    h, w, _, labels = _inputs(2, 6, 8, 11, 0.0, False)
    labels[:] = IGNORE_INDEX
    loss = chunked_causal_lm_loss(h, w, labels, chunk_rows=4)
    assert loss.item() == 0.0
    grad_h, grad_w = _grads(loss, h, w)
    assert torch.count_nonzero(grad_h) == 0 and torch.count_nonzero(grad_w) == 0


def test_num_items_in_batch_divides_the_sum(tol):
    h, w, _, labels = _inputs(2, 12, 8, 19, 0.25, False)
    n_valid = int((labels[:, 1:] != IGNORE_INDEX).sum())
    mean = chunked_causal_lm_loss(h, w, labels, chunk_rows=5)
    summed = chunked_causal_lm_loss(h, w, labels, chunk_rows=5, num_items_in_batch=torch.tensor(3 * n_valid))
    torch.testing.assert_close(summed * 3, mean, **tol.fp32_loss)


def test_bf16_hidden_states_give_fp32_loss_close_to_reference(tol):
    h, w, _, labels = _inputs(2, 9, 16, 29, 0.0, False)
    loss = chunked_causal_lm_loss(h.detach().bfloat16(), w.detach().bfloat16(), labels, chunk_rows=5)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _reference_loss(h, w, labels).detach(), **tol.bf16_loss)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        pytest.param({"chunk_rows": 0}, ConfigError, id="chunk-rows-zero"),
        pytest.param({"chunk_rows": 2.5}, ConfigError, id="chunk-rows-float"),
        pytest.param({"labels": torch.zeros(2, 5, dtype=torch.long)}, ModelError, id="labels-shape"),
        pytest.param({"lm_head_weight": torch.zeros(7, 5)}, ModelError, id="head-width"),
    ],
)
def test_bad_inputs_raise_typed_errors(kwargs, error):
    h, w, _, labels = _inputs(2, 6, 8, 7, 0.0, False)
    args = {"hidden_states": h, "lm_head_weight": w, "labels": labels, "chunk_rows": 4} | kwargs
    with pytest.raises(error):
        chunked_causal_lm_loss(**args)


def _tiny_llama(tiny, tie: bool, vocab: int = 512, hidden: int = 32):
    return tiny.model("llama", vocab=vocab, hidden=hidden, positions=256, tie_word_embeddings=tie).train()


def _batch(vocab, batch=2, seq=24, pad=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -pad:] = 0  # right padding on the first row
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("tie", [pytest.param(True, id="tied-embeddings"), pytest.param(False, id="separate-lm-head")])
def test_causal_lm_loss_matches_the_model_loss(tiny, tol, tie):
    model = _tiny_llama(tiny, tie, vocab=97)
    batch = _batch(97)
    ref = model(**batch).loss
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    ref_grads = torch.autograd.grad(ref, [head, emb] if not tie else [head])
    got = causal_lm_loss(model, batch, chunk_rows=7)
    got_grads = torch.autograd.grad(got, [head, emb] if not tie else [head])
    torch.testing.assert_close(got, ref, **tol.fp32_loss)
    for g_got, g_ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(g_got, g_ref, **tol.fp32_loss)
    # chunk_rows=None is the model's own loss
    torch.testing.assert_close(causal_lm_loss(model, batch, chunk_rows=None), ref)


def test_causal_lm_loss_needs_labels(tiny):
    model = _tiny_llama(tiny, True, vocab=31)
    batch = _batch(31)
    batch.pop("labels")
    with pytest.raises(ModelError, match="labels"):
        causal_lm_loss(model, batch)


def _step_peak(model, batch, chunk_rows) -> int:
    """Live tensor bytes at the peak of one training step (forward, backward), weights and batch registered."""
    model.zero_grad(set_to_none=True)
    counter = LiveTensorCounter().register(model, batch)
    with counter:
        loss = causal_lm_loss(model, batch, chunk_rows=chunk_rows)
        loss.backward()
    return counter.peak_bytes


def _lamda_model(tiny, base: str, vocab: int, tmp_path):
    """A tiny tied Llama: plain with a trainable q_proj, or LaMDA on an NF4 base through load_lamda_model."""
    model = _tiny_llama(tiny, tie=True, vocab=vocab)
    if base == "plain":
        model.requires_grad_(False)
        for layer in model.model.layers:  # a trainable part deep in the body, as with adapters
            layer.self_attn.q_proj.weight.requires_grad_(True)
        return model
    from lamda_edge import LaMDAConfig
    from lamda_edge.load.loader import load_lamda_model

    model.save_pretrained(str(tmp_path / "tiny"))
    return load_lamda_model(tmp_path / "tiny", LaMDAConfig(rank=4), quantize="nf4", device="cpu", cache_dir=False,
                            progress=False, gradient_checkpointing=True).train()


def test_chunked_loss_gives_the_adapter_gradients_of_the_plain_loss_on_nf4(tiny, tol, tmp_path):
    from lamda_edge.adapters import lamda_layers

    model = _lamda_model(tiny, "nf4", 97, tmp_path)
    batch = _batch(97)
    grads = {}
    for chunk_rows in (None, 5):
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, batch, chunk_rows=chunk_rows).backward()
        grads[chunk_rows] = {n: layer.lamda_S.grad.clone() for n, layer in lamda_layers(model)}
    assert grads[None]
    for name, grad in grads[None].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[5][name], grad, **tol.fp32_loss)


@pytest.mark.parametrize("base", [pytest.param("plain", id="plain"), pytest.param("nf4", id="lamda-nf4")])
def test_chunked_step_peak_is_below_the_unchunked_one(tiny, base, tmp_path):
    vocab = 512
    model = _lamda_model(tiny, base, vocab, tmp_path)
    batch = _batch(vocab, batch=4, seq=64, pad=0)
    logits_bytes = 4 * 63 * vocab * 4  # one fp32 copy of the shifted logits
    plain = _step_peak(model, batch, chunk_rows=None)
    chunked = _step_peak(model, batch, chunk_rows=32)
    # the plain step holds the logits, their softmax and their gradient; the chunked one at most 32 rows of them
    assert chunked < plain - logits_bytes, (plain, chunked, logits_bytes)


def test_causal_lm_loss_unwraps_a_peft_model(tiny):
    from peft import LoraConfig, get_peft_model

    from lamda_edge.train.loss import causal_lm_loss

    model = tiny.model("llama")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    expected = model(input_ids=ids, labels=ids).loss
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    torch.testing.assert_close(causal_lm_loss(peft_model, batch, chunk_rows=5), expected, atol=1e-5, rtol=1e-5)


def test_a_single_chunk_is_not_checkpointed_and_has_the_same_step_peak(tiny, tmp_path, monkeypatch):
    """All rows in one chunk: no checkpoint (no head recompute in backward), and the step peak is not above that
    of a checkpointed single chunk (measured here: a few KiB below it, the checkpoint's own saved input)."""
    from torch.utils.checkpoint import checkpoint

    from lamda_edge.train import loss as loss_mod

    vocab = 512
    model = _lamda_model(tiny, "nf4", vocab, tmp_path)
    batch = _batch(vocab, batch=2, seq=32)  # at most 62 labelled rows: one chunk of 256
    calls = []
    monkeypatch.setattr(loss_mod, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    plain_chunk = _step_peak(model, batch, chunk_rows=256)
    assert not calls
    _step_peak(model, batch, chunk_rows=8)  # several chunks: each checkpointed
    assert len(calls) >= 2
    real = loss_mod._chunk_loss_sum
    monkeypatch.setattr(loss_mod, "_chunk_loss_sum", lambda *a: checkpoint(real, *a, use_reentrant=False))
    checkpointed_chunk = _step_peak(model, batch, chunk_rows=256)
    assert plain_chunk <= checkpointed_chunk, (plain_chunk, checkpointed_chunk)


@pytest.mark.parametrize("per_example", [False, True], ids=["block-mask", "per-example-sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma2", "mistral", "qwen3"])
def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(tiny, tol, arch, per_example):
    """`packing: true`: one padding-free row with restarting position_ids = the padded batch, loss and grads, with
    transformers' block-diagonal mask and with the per-example causal SDPA (`packed_attention`)."""
    from lamda_edge import LaMDAConfig, apply_lamda
    from lamda_edge.train.data import PackingCollator, PaddingCollator
    from lamda_edge.train.packed_attention import packed_attention

    model = tiny.model(arch)
    apply_lamda(model, LaMDAConfig(rank=4, alpha=8.0))
    model.train()
    g = torch.Generator().manual_seed(3)
    features = []
    for n in (5, 12, 9):  # unequal lengths: the padded batch carries padding, the packed row none
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = IGNORE_INDEX  # a prompt without loss
        features.append({"input_ids": ids, "labels": labels})
    padded = PaddingCollator(pad_token_id=0)(features)
    packed = PackingCollator()(features)
    assert packed["input_ids"].shape == (1, 26) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == list(range(5)) + list(range(12)) + list(range(9))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batch):
        items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # what the Trainer passes
        loss = causal_lm_loss(model, batch, chunk_rows=7, num_items_in_batch=items)
        return loss, torch.autograd.grad(loss, trainable)

    want, want_grads = loss_and_grads(padded)
    before = model.config._attn_implementation
    with packed_attention(model, enabled=per_example, longest=12) as switched:
        assert switched == (per_example and arch != "gemma2")  # gemma2's window (4) keeps transformers' masks
        got, got_grads = loss_and_grads(packed)
    assert model.config._attn_implementation == before  # switched back
    torch.testing.assert_close(got, want, atol=tol.fp32, rtol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=tol.fp32, rtol=1e-5)
