"""Classification with ONNX Runtime: an exported sequence classifier's graph, its tokenizer and its class names.

    text [, text_pair] ──> tokenizer ──> model.onnx (input_ids, attention_mask[, token_type_ids]) ──> logits (B, C)
                                                                              ──> softmax ──> (label, probability)

The export folder holds `model.onnx` (and `model.int4.onnx` or `model.int8.onnx`, run by default when present), the
tokenizer and config.json,
whose `id2label` names the classes (written from the adapter's label map when the run trained on string labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.files import read_json
from lamda_edge.runtime.session import DEFAULT_GRAPHS, default_graph, session


@dataclass
class Prediction:
    """One text's class: its name, id, probability, and every class's probability by name."""

    label: str
    label_id: int
    probability: float
    probabilities: dict[str, float] = field(default_factory=dict)


class OnnxClassifier:
    """An exported classifier folder loaded for ONNX Runtime (`classify` a list of texts)."""

    def __init__(self, folder: str | Path, onnx_file: str | None = None):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"--model {folder} is not a folder. Fix: pass the output folder of `lamda-edge export`")
        name = onnx_file or default_graph(self.folder)
        if name is None or not (self.folder / name).is_file():
            raise ModelError(f"{self.folder} holds no {onnx_file or ' / '.join(DEFAULT_GRAPHS)}. Fix: export a "
                             "classifier there with `lamda-edge export`")
        config = read_json(self.folder / "config.json", ModelError, "export the classifier again")
        self.onnx_file = name
        self.session = session(self.folder / name)
        self.input_names = [i.name for i in self.session.get_inputs()]
        if "past_key_values.0.key" in self.input_names or "encoder_hidden_states" in self.input_names:
            raise ModelError(f"{self.folder / name} is a generator, not a classifier. Fix: use `lamda-edge generate`")
        id2label = config.get("id2label") or {}
        self.labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the tokenizer of {self.folder}: {exc}") from exc

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """Logits (B, C) of `texts` (with `pairs` as the second segment of each, GLUE-style)."""
        enc = self.tokenizer(texts, pairs, padding=True, return_tensors="np")
        feeds = {name: enc[name].astype(np.int64) if name in enc else np.zeros_like(enc["input_ids"], np.int64)
                 for name in self.input_names}
        return self.session.run(["logits"], feeds)[0]

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        """The most probable class of each text, with the softmax over all classes."""
        if pairs is not None and len(pairs) != len(texts):
            raise ConfigError(f"{len(texts)} texts but {len(pairs)} text pairs. Fix: give one pair per text")
        logits = self.logits(texts, pairs).astype(np.float64)  # (B, C)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        names = self.labels if len(self.labels) == probs.shape[1] else [f"LABEL_{i}" for i in range(probs.shape[1])]
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(Prediction(names[best], best, float(row[best]), dict(zip(names, map(float, row)))))
        return out
