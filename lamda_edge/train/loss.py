"""Chunked causal-LM cross-entropy: the full fp32 logits and their gradient never exist at once.

The output head of a language model turns `(B, T, H)` hidden states into `(B, T, V)` logits. In fp32 that is
`B * T * V * 4` bytes (192 MiB for SmolLM2-135M at batch 4 x 256), and a plain loss keeps the logits, their
softmax and their gradient alive around backward. Here the rows are cut into chunks of `chunk_rows`; each chunk
runs `lm_head -> fp32 logits -> cross-entropy (sum)` under a non-reentrant checkpoint, so forward keeps only the
scalar per chunk and backward recomputes one chunk's logits at a time (when all rows fit one chunk there is no
checkpoint: recomputing would cost a head matmul and save nothing at the peak):

    hidden (B, T, H) -> shift -> valid rows (N, H) -> [chunk (c, H) -> logits (c, V) fp32 -> CE sum] * ceil(N/c)
                                                     -> sum / number of valid labels

`causal_lm_loss(model, batch)` wires it into a transformers causal LM: it runs the model body (without the head),
then the chunked loss against the output embeddings (tied or not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.planner.memory import DEFAULT_CHUNK_ROWS

IGNORE_INDEX = -100
# Batch keys that the model body accepts; everything else (labels, lengths, ...) stays out of the forward call.
_BODY_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")
CHUNKED_SEQ2SEQ = ("bart", "mbart")  # encoder-decoders whose head is `lm_head(model.model(...)) + final_logits_bias`


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """Summed cross-entropy of one chunk, logits in fp32. hidden (c, H), weight (V, H), labels (c,).

    The matmul runs in the head's dtype (fp32 accumulation inside), as transformers does, so a bf16 head is
    never copied to fp32 (V x H x 4 bytes); the logits are upcast to fp32 before the softmax.
    """
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()  # (c, V) fp32
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    lm_head_bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    logit_softcap: float | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """Causal-LM cross-entropy computed `chunk_rows` rows at a time, each chunk checkpointed.

    Labels are aligned with the inputs as transformers does it: position `t` of `hidden_states` predicts
    `labels[:, t + 1]`; labels equal to -100 are ignored.

    Args:
        hidden_states: (B, T, H) last hidden states of the model body (any float dtype).
        lm_head_weight: (V, H) output head weight (tied to the input embeddings or not).
        labels: (B, T) token ids, -100 where no loss is taken.
        chunk_rows: rows (tokens) per chunk; the fp32 logits of one chunk are `chunk_rows x V x 4` bytes.
        lm_head_bias: optional (V,) bias of the output head.
        num_items_in_batch: divide the summed loss by this instead of the number of valid labels (gradient
            accumulation across micro-batches, as the transformers Trainer passes it).
        logit_softcap: apply `tanh(logits / cap) * cap` before the loss (Gemma-2 style final softcapping).
        shift: position t predicts `labels[:, t + 1]` (a causal LM); False: `labels[:, t]` (a seq2seq decoder, whose
            inputs are the labels shifted right already).

    Returns:
        The scalar mean loss in fp32 (0 with a graph attached when no label is valid).

    Raises:
        ConfigError: `chunk_rows` is not a positive integer.
        ModelError: the shapes of hidden states, head weight and labels do not agree.
    """
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ConfigError(f"`chunk_rows` should be a positive integer, got {chunk_rows!r}; try {DEFAULT_CHUNK_ROWS}")
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ModelError(
            f"chunked loss needs hidden states (B, T, H) and labels (B, T), got {tuple(hidden_states.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_states.shape[-1]:
        raise ModelError(
            f"lm_head weight should be (V, {hidden_states.shape[-1]}), got {tuple(lm_head_weight.shape)}"
        )
    cut = 1 if shift else 0
    hidden = hidden_states[:, :hidden_states.shape[1] - cut, :].reshape(-1, hidden_states.shape[-1])  # (N, H)
    targets = labels[:, cut:].reshape(-1).to(hidden.device)  # (N,), N = B * (T - cut)
    valid = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) rows that carry a label
    n_valid = valid.numel()
    if n_valid < targets.numel():  # drop padding / prompt rows: no logits are computed for them
        hidden = hidden.index_select(0, valid)  # (n, H)
        targets = targets.index_select(0, valid)  # (n,)
    if n_valid == 0:  # nothing to learn from: a zero that still has a graph (backward works, gradients are 0)
        return (hidden_states.sum() + lm_head_weight.sum()).float() * 0.0
    if n_valid <= chunk_rows:
        # one chunk: a checkpoint would recompute the head in backward for nothing: the loss's backward holds the
        # chunk's logits either way, so the step peak is not lower with it (tests/test_loss.py measures it)
        total = _chunk_loss_sum(hidden, lm_head_weight, lm_head_bias, targets, logit_softcap)
    else:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_valid, chunk_rows):
            part = checkpoint(
                _chunk_loss_sum,
                hidden[start : start + chunk_rows],
                lm_head_weight,
                lm_head_bias,
                targets[start : start + chunk_rows],
                logit_softcap,
                use_reentrant=False,
            )
            total = total + part
    if num_items_in_batch is not None:
        denominator = num_items_in_batch
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(total.device)
    else:
        denominator = max(n_valid, 1)
    return total / denominator


def _logit_softcap(config) -> float | None:
    """The final logit softcap of a transformers config, refusing logit transforms this loss does not apply."""
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ModelError(
                f"the model config sets `{name}`={value!r}, which the chunked loss does not apply; "
                "train this model with `chunk_rows=None` (the model's own loss)"
            )
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _own_loss(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """The model's own (unchunked) loss, normalized by `num_items_in_batch` when the Trainer gives it."""
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**inputs, labels=labels, use_cache=False, **kwargs).loss


def causal_lm_loss(
    model: torch.nn.Module,
    batch: dict,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of a transformers causal LM on a batch, with the chunked head + cross-entropy.

    Runs the model body (`model.<base_model_prefix>`, e.g. `model.model` for Llama) to get the last hidden
    states, then `chunked_causal_lm_loss` against the output embeddings (`model.get_output_embeddings()`, which
    is `lm_head`, tied to the input embeddings or not). With `chunk_rows=None` it calls the model's own loss.

    Args:
        model: a transformers `*ForCausalLM` (plain, 4-bit, LaMDA-adapted, or wrapped by PEFT).
        batch: `input_ids`, `labels` and optionally `attention_mask`, `position_ids` (tensors).
        chunk_rows: rows per chunk, or None for the unchunked loss of the model itself.
        num_items_in_batch: see `chunked_causal_lm_loss`.

    Returns:
        The scalar loss.

    Raises:
        ModelError: the model has no body/output head this function understands, or `labels` is missing.
    """
    if "labels" not in batch:
        raise ModelError(f"the batch has no `labels` (keys: {sorted(batch)}); the data collator must add them")
    inputs = {k: v for k, v in batch.items() if k in _BODY_KEYS and v is not None}
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: its transformers model (with the adapters inside)
        model = model.get_base_model()
    if chunk_rows is None:
        return _own_loss(model, inputs, batch["labels"], num_items_in_batch)
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ModelError(
            f"{type(model).__name__} has no model body `{prefix}` and output head with a weight; the chunked loss "
            "works with transformers *ForCausalLM models; use `chunk_rows=None`"
        )
    softcap = _logit_softcap(model.config)
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    return chunked_causal_lm_loss(
        hidden,
        head.weight,
        batch["labels"],
        chunk_rows=chunk_rows,
        lm_head_bias=getattr(head, "bias", None),
        num_items_in_batch=num_items_in_batch,
        logit_softcap=softcap,
    )


def seq2seq_loss(
    model: torch.nn.Module,
    batch: dict,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of a transformers encoder-decoder (BART-like) on `input_ids`/`attention_mask` -> `labels`, on the target
    tokens only, with the chunked head + cross-entropy over the decoder's vocabulary.

    The decoder reads the labels shifted right (`prepare_decoder_input_ids_from_labels`); the body `model.model`
    gives the decoder's last hidden states (B, T, H), and the head adds BART's `final_logits_bias`. Models without
    that body (T5 scales its hidden states before the head), or `chunk_rows=None`, use the model's own loss.
    """
    if "labels" not in batch:
        raise ModelError(f"the batch has no `labels` (keys: {sorted(batch)}); the data collator must add them")
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}
    body = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if chunk_rows is None or body is None or getattr(model.config, "model_type", None) not in CHUNKED_SEQ2SEQ:
        return _own_loss(model, inputs, labels, num_items_in_batch)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)  # (B, T)
    hidden = body(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    bias = getattr(model, "final_logits_bias", None)
    if getattr(head, "bias", None) is not None:
        bias = head.bias if bias is None else head.bias + bias.view(-1)
    return chunked_causal_lm_loss(hidden, head.weight, labels, chunk_rows=chunk_rows,
                                  lm_head_bias=None if bias is None else bias.view(-1),
                                  num_items_in_batch=num_items_in_batch, shift=False)
