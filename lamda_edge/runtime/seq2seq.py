"""Encoder-decoder generation with ONNX Runtime over the three graphs of `lamda_edge.export.seq2seq`.

    source ──> encoder_model ──> states ──> decoder_model (decoder start token) ──> logits, self past, cross past
                                              └──> decoder_with_past_model (one token, past) ──> pick ──> ...
                                                     ^_________________________________________________|

Greedy (argmax) decoding from the config's `decoder_start_token_id` until EOS or `max_new_tokens`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lamda_edge.errors import ModelError
from lamda_edge.files import read_json
from lamda_edge.runtime.session import session

ENCODER_FILE, DECODER_FILE, DECODER_PAST_FILE = "encoder_model.onnx", "decoder_model.onnx", \
    "decoder_with_past_model.onnx"


def is_seq2seq_folder(folder: Path) -> bool:
    return (Path(folder) / ENCODER_FILE).is_file()


class OnnxSeq2Seq:
    """An exported encoder-decoder folder on ONNX Runtime (`generate_ids`: greedy, token ids in and out)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        for name in (ENCODER_FILE, DECODER_FILE, DECODER_PAST_FILE):
            if not (self.folder / name).is_file():
                raise ModelError(f"{self.folder} holds no {name}. Fix: export the encoder-decoder again")
        config = read_json(self.folder / "config.json", ModelError, "export the model again")
        self.start = config.get("decoder_start_token_id")
        if self.start is None:
            raise ModelError(f"{self.folder / 'config.json'} has no decoder_start_token_id")
        self.eos = config.get("eos_token_id")
        self.encoder, self.decoder, self.decoder_past = (
            session(self.folder / name, threads) for name in (ENCODER_FILE, DECODER_FILE, DECODER_PAST_FILE))
        self.onnx_file = f"{ENCODER_FILE} + {DECODER_PAST_FILE}"
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))

    def generate_ids(self, source_ids: list[int], max_new_tokens: int = 64, stop=None) -> list[int]:
        """Greedy target ids (without the start token) for one source; stops after EOS (kept), the limit, or when
        `stop(new_ids)` returns true after a token."""
        ids = np.array([source_ids], dtype=np.int64)  # (1, S)
        mask = np.ones_like(ids)
        states = self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # (1, S, H)
        out = self.decoder.run(None, {"encoder_attention_mask": mask, "input_ids": np.array([[self.start]], np.int64),
                                      "encoder_hidden_states": states})
        names = [o.name for o in self.decoder.get_outputs()]
        past = {name.replace("present.", "past_key_values."): value for name, value in zip(names[1:], out[1:])}
        new: list[int] = []
        while True:
            token = int(out[0][0, -1].argmax())
            new.append(token)
            if token == self.eos or len(new) >= max_new_tokens or (stop is not None and stop(new)):
                return new
            out = self.decoder_past.run(None, {"encoder_attention_mask": mask,
                                               "input_ids": np.array([[token]], np.int64), **past})
            step_names = [o.name for o in self.decoder_past.get_outputs()]
            past.update({n.replace("present.", "past_key_values."): v for n, v in zip(step_names[1:], out[1:])})

    def generate(self, text: str, max_new_tokens: int = 64) -> str:
        ids = self.generate_ids(list(self.tokenizer(text)["input_ids"]), max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)
