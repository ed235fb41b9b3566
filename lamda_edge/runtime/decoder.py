"""The exported decoder graph fed by name: prefill and decode steps over the KV cache, and perplexity.

    ids (B, T), past (B, H_kv, P, D) ──> model.onnx ──> logits (B, T, V), present (B, H_kv, P+T, D)
"""

from __future__ import annotations

import numpy as np

from lamda_edge.errors import ConfigError, ModelError


class OnnxDecoder:
    """An ONNX Runtime session of the decoder graph, fed by name."""

    def __init__(self, sess):
        self.sess = sess
        self.inputs = {i.name: i for i in sess.get_inputs()}
        self.outputs = [o.name for o in sess.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        if "input_ids" not in self.inputs or not self.past_names:
            raise ModelError(f"{sorted(self.inputs)} are not the inputs of a decoder with a KV cache. "
                             "Fix: point --model at a folder written by `lamda-edge export` for a causal LM")
        shape = self.inputs[self.past_names[0]].shape  # [batch, H_kv, past, D]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.kv_dtype = np.float16 if "float16" in self.inputs[self.past_names[0]].type else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past keys/values (B, H_kv, 0, D), one per past input."""
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward pass: ids (B, T) after `past` (B, H_kv, P, D) -> logits (B, T, V), present (B, H_kv, P+T, D)."""
        batch, seq = ids.shape
        done = past[0].shape[2]
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, done + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(done, done + seq, dtype=np.int64), (batch, seq)).copy()}
        feeds.update(zip(self.past_names, past))
        out = self.sess.run(None, feeds)
        named = dict(zip(self.outputs, out))
        present = [named[n.replace("past_key_values.", "present.")] for n in self.past_names]
        return named["logits"], present

    def full_logits(self, ids) -> np.ndarray:
        """Logits (T, V) for one sequence of ids (1, T), in one prefill."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        logits, _ = self.step(ids, self.empty_past(1))
        return logits[0].astype(np.float32)


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean next-token cross-entropy) of logits (T, V) predicting ids[1:] (T,)."""
    logits = logits[:-1].astype(np.float64)  # (T-1, V)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def held_out_ids(tokenizer, text: str, model=None, max_tokens: int = 256):
    """Token ids (1, T) of `text` for perplexity, cut to `max_tokens` and the model's context."""
    import torch

    limit = min(max_tokens, getattr(getattr(model, "config", None), "max_position_embeddings", max_tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:limit]
    if len(ids) < 2:
        raise ConfigError(f"the held-out text gives {len(ids)} token(s); perplexity needs at least 2")
    return torch.tensor([ids])
