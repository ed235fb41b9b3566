"""The tasks lamda-edge trains, and how a transformers architecture name tells them apart (no dependencies)."""

from __future__ import annotations

from collections.abc import Iterable

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
SEQ2SEQ = "seq2seq"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION, SEQ2SEQ)
AUTO = "auto"


def task_of_architectures(names: Iterable[str]) -> str | None:
    """The task transformers architecture (or model class) names stand for, or None when none tells.

    Any `*ForSequenceClassification` -> 'sequence-classification'; else any `*ForCausalLM` or `*LMHeadModel` ->
    'causal-lm'. (An encoder-decoder is told by its config's `is_encoder_decoder`: `task_of_config`.)
    """
    names = list(names)
    if any(n.endswith("ForSequenceClassification") for n in names):
        return SEQUENCE_CLASSIFICATION
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return CAUSAL_LM
    return None


def task_of_config(config) -> str | None:
    """The task a transformers config stands for where it is unambiguous: a `*ForSequenceClassification`
    architecture -> 'sequence-classification', `is_encoder_decoder` -> 'seq2seq', else the architectures' rule."""
    archs = list(getattr(config, "architectures", None) or [])
    if task_of_architectures(archs) == SEQUENCE_CLASSIFICATION:
        return SEQUENCE_CLASSIFICATION
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    return task_of_architectures(archs)
