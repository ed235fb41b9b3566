"""The tasks lamda-edge trains, and how a transformers architecture name tells them apart (no dependencies)."""

from __future__ import annotations

from collections.abc import Iterable

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)


def task_of_architectures(names: Iterable[str]) -> str | None:
    """The task transformers architecture (or model class) names stand for, or None when none tells.

    Any `*ForSequenceClassification` -> 'sequence-classification'; else any `*ForCausalLM` or `*LMHeadModel` ->
    'causal-lm'.
    """
    names = list(names)
    if any(n.endswith("ForSequenceClassification") for n in names):
        return SEQUENCE_CLASSIFICATION
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return CAUSAL_LM
    return None
