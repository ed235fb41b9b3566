"""Encoder-decoder (seq2seq) data: records `{"source", "target"}` -> encoder ids and target labels.

Records come from .jsonl, .json, .csv or .parquet files (`formats.py`).

    file --read_records (shape checked)--> records --tokenize source (+EOS) and target (+EOS)--> PairDataset
         source over the encoder limit (min(seq_len, max positions)): truncated or refused (`on_overflow`)
    PairDataset --PairCollator--> {"input_ids" (B, S), "attention_mask" (B, S), "labels" (B, T)}

The loss is taken on the target tokens only: the source goes to the encoder, the decoder sees the target shifted
right (the model's `decoder_start_token_id` first) and predicts every target token, EOS included. Padding in
`labels` is -100.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from lamda_edge.errors import ConfigError, DataError
from lamda_edge.train.data import (
    IGNORE_INDEX,
    DataWarning,
    held_out_records,
    read_task_records,
    require_fields,
)
from lamda_edge.train.formats import at

SHAPE = '{"source": str, "target": str}'


def check_record(record: Any, path: Path, line_no: int) -> None:
    """A seq2seq record: string `source` and `target`."""
    where = require_fields(record, path, line_no, ("source", "target"), "seq2seq (task=seq2seq)", SHAPE)
    for key in ("source", "target"):
        if not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens, ending in EOS (added when the tokenizer does not)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


class PairDataset(Dataset):
    """(source ids, target ids) pairs; item i: `input_ids` (S,), `attention_mask` (S,), `labels` (T,)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]]):
        self._pairs = pairs
        self.lengths = [len(s) for s, _ in pairs]

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source, target = self._pairs[index]
        return {"input_ids": torch.tensor(source, dtype=torch.long), "labels": torch.tensor(target, dtype=torch.long),
                "attention_mask": torch.ones(len(source), dtype=torch.long)}


class PairSplits(NamedTuple):
    train: PairDataset
    eval: PairDataset | None


def _limit(seq_len: int, max_source: int | None) -> int:
    return seq_len if max_source is None else min(seq_len, max_source)


def _tokenize(records, tokenizer, seq_len: int, max_source: int | None, source: str, on_overflow: str) -> PairDataset:
    limit = _limit(seq_len, max_source)
    eos = tokenizer.eos_token_id
    pairs, truncated = [], 0
    for line_no, record in records:
        src, tgt = encode(tokenizer, record["source"]), encode(tokenizer, record["target"])
        for name, ids, cap in (("source", src, limit), ("target", tgt, seq_len)):
            if len(ids) <= cap:
                continue
            if on_overflow == "error":
                which = ("the encoder's limit" if name == "source" and cap < seq_len else "seq_len") + f"={cap}"
                raise DataError(f"{source} {at(line_no)}: the {name} has {len(ids)} tokens, longer than {which}. "
                                "Fix: shorten it, raise seq_len (within the model's positions), or set "
                                "on_overflow=truncate")
            del ids[cap - 1:]  # keep the first cap - 1 tokens, then EOS
            ids.append(eos if eos is not None else ids[-1])
            truncated += 1
        pairs.append((src, tgt))
    if truncated:
        warnings.warn(f"{source}: {truncated} sources or targets were longer than their limit (source {limit}, "
                      f"target {seq_len} tokens) and were truncated. Pass on_overflow='error' to refuse",
                      DataWarning, stacklevel=3)
    return PairDataset(pairs)


def load_pairs(path: str | Path, tokenizer, seq_len: int, *, max_source: int | None = None,
               eval_path: str | Path | None = None, eval_fraction: float = 0.0, seed: int = 0,
               on_overflow: str = "truncate") -> PairSplits:
    """Load a seq2seq file (.jsonl, .json, .csv, .parquet) and its held-out part as `PairDataset`s.

    Args:
        max_source: the encoder's position limit (its `max_position_embeddings`); a source longer than
            min(seq_len, max_source) is truncated or refused.

    Raises:
        DataError: not a record file, a record missing `source` or `target`, an empty file, or an overflow refused.
    """
    path, records = read_task_records(path, eval_path, eval_fraction, on_overflow, check_record, "seq2seq", SHAPE)
    train, held = held_out_records(records, path, eval_path, eval_fraction, seed, check_record)
    options = dict(tokenizer=tokenizer, seq_len=seq_len, max_source=max_source, on_overflow=on_overflow)
    return PairSplits(_tokenize(train, source=str(path), **options),
                      None if held is None else _tokenize(held, source=str(eval_path or path), **options))


class PairCollator:
    """Pad sources with `pad_token_id` (mask 0) and targets with -100, each to its longest (a multiple of 8)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        if pad_token_id is None:
            raise ConfigError("`pad_token_id` is None. Fix: use tokenizer.pad_token_id or tokenizer.eos_token_id")
        self.pad_token_id, self.multiple = int(pad_token_id), int(pad_to_multiple_of or 1)

    def _width(self, rows) -> int:
        return math.ceil(max(len(r) for r in rows) / self.multiple) * self.multiple

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty batch")
        n, s, t = len(features), self._width([f["input_ids"] for f in features]), self._width(
            [f["labels"] for f in features])
        input_ids = torch.full((n, s), self.pad_token_id, dtype=torch.long)  # (B, S)
        attention_mask = torch.zeros((n, s), dtype=torch.long)  # (B, S)
        labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            input_ids[i, :len(f["input_ids"])] = f["input_ids"]
            attention_mask[i, :len(f["input_ids"])] = 1
            labels[i, :len(f["labels"])] = f["labels"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
