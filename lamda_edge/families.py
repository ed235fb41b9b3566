"""The model families: which transformers model types export to ONNX, and what `plan` says about the rest
(no dependencies: the planner reads it without torch). The README's table of families says the same.

    family           trains (task)                      exports (ONNX, parity-checked)
    decoders         causal-lm                          llama, mistral, qwen2, qwen3, gemma2, phi3
    classifiers      sequence-classification            bert, roberta, deberta-v2 (DeBERTa-v3)
    encoder-decoder  seq2seq                            bart (encoder + decoder graphs with a KV cache, fp32)
"""

from __future__ import annotations

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
ENCODER_TYPES = ("bert", "roberta", "deberta-v2")
SEQ2SEQ_TYPES = ("bart",)
EXPORTED = (f"causal LMs of types {', '.join(DECODER_TYPES)}, sequence classifiers of types "
            f"{', '.join(ENCODER_TYPES)} and encoder-decoders of types {', '.join(SEQ2SEQ_TYPES)}")


def export_support(model_type: str | None, architecture: str) -> tuple[bool, str | None]:
    """(exportable, a note when it is not) for a model of `model_type` planned as `architecture`
    ('decoder', 'encoder', 'encoder-decoder')."""
    types = {"decoder": DECODER_TYPES, "encoder": ENCODER_TYPES, "encoder-decoder": SEQ2SEQ_TYPES}[architecture]
    if model_type in types:
        return True, None
    if model_type is None:
        return False, f"model type unknown to the planner; exported: {EXPORTED}"
    return False, f"model type {model_type!r} has no ONNX mapping; trains, but exported are only {EXPORTED}"
