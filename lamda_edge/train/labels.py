"""Sequence-classification data: records `{"text", "label"[, "text_pair"]}` -> token examples with one class id each.

Records come from .jsonl, .json, .csv or .parquet files (`formats.py`).

    file --read_records (shape checked)--> records --LabelMap (ints as given, strings sorted)--> class ids
         --tokenizer(text[, text_pair]) (over seq_len: truncated or refused, `on_overflow`)--> LabelDataset
    LabelDataset --LabelCollator--> {"input_ids" (B, T), "attention_mask" (B, T)[, "token_type_ids"], "labels" (B,)}

Labels are all integers (class ids as given, `num_labels` = the largest + 1) or all strings (ids in sorted order).
The map is saved with the adapter (`labels`: the class names by id) and written into the merged model's config as
`id2label` / `label2id`, so an exported classifier names its classes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from lamda_edge.errors import ConfigError, DataError
from lamda_edge.train.data import (
    DataWarning,
    held_out_records,
    read_task_records,
    require_fields,
)
from lamda_edge.train.formats import at

SHAPE = '{"text": str, "label": int or str} (GLUE-style pairs add "text_pair": str)'


@dataclass(frozen=True)
class LabelMap:
    """Class names by id: `names[i]` is the name of class i (`str(i)` for integer labels)."""

    names: tuple[str, ...]
    strings: bool  # the data's labels are strings (else integer ids)

    @classmethod
    def from_labels(cls, labels: list, source: str) -> LabelMap:
        ints = [label for label in labels if isinstance(label, int) and not isinstance(label, bool)]
        strs = [label for label in labels if isinstance(label, str)]
        if ints and strs:
            raise DataError(f"{source}: labels mix integers ({ints[0]!r}) and strings ({strs[0]!r}). Fix: use one "
                            "kind for every record")
        if strs:
            return cls(tuple(sorted(set(strs))), True)
        if min(ints) < 0:
            raise DataError(f"{source}: integer labels are class ids >= 0, got {min(ints)}")
        return cls(tuple(str(i) for i in range(max(ints) + 1)), False)

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def id_of(self, label, where: str) -> int:
        if self.strings:
            if label not in self.names:
                raise DataError(f"{where}: label {label!r} is not among the training labels {list(self.names)}. "
                                "Fix: use one of those, or add examples of it to the training data")
            return self.names.index(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.num_labels:
            raise DataError(f"{where}: label {label!r} should be an integer class id in [0, {self.num_labels})")
        return label

    def to_json(self) -> dict:
        return {"names": list(self.names), "strings": self.strings}

    @classmethod
    def from_json(cls, data: dict) -> LabelMap:
        return cls(tuple(data["names"]), bool(data["strings"]))


def check_record(record: Any, path: Path, line_no: int) -> None:
    """A classification record: a string `text`, an int or string `label`, optionally a string `text_pair`."""
    where = require_fields(record, path, line_no, ("text", "label"), "classification (task=sequence-classification)",
                           SHAPE)
    if not isinstance(record["text"], str):
        raise DataError(f"{where}: field 'text' must be a string, got {type(record['text']).__name__}")
    if "text_pair" in record and not isinstance(record["text_pair"], str):
        raise DataError(f"{where}: field 'text_pair' must be a string, got {type(record['text_pair']).__name__}")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{where}: field 'label' must be an integer class id or a string, got {label!r}")


class LabelDataset(Dataset):
    """Tokenized examples with one class id each; item i is a dict of torch tensors (`labels` a 0-d long)."""

    def __init__(self, examples: list[dict[str, list[int]]], labels: list[int], label_map: LabelMap):
        self._examples, self._labels, self.label_map = examples, labels, label_map
        self.lengths = [len(e["input_ids"]) for e in examples]

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {k: torch.tensor(v, dtype=torch.long) for k, v in self._examples[index].items()}  # (T,) each
        item["labels"] = torch.tensor(self._labels[index], dtype=torch.long)  # ()
        return item


class LabelSplits(NamedTuple):
    train: LabelDataset
    eval: LabelDataset | None
    label_map: LabelMap


def _tokenize(records, tokenizer, seq_len: int, label_map: LabelMap, source: str, on_overflow: str) -> LabelDataset:
    examples, labels, truncated = [], [], 0
    for line_no, record in records:
        pair = record.get("text_pair")
        enc = tokenizer(record["text"], pair, add_special_tokens=True)
        if len(enc["input_ids"]) > seq_len:
            if on_overflow == "error":
                raise DataError(f"{source} {at(line_no)}: {len(enc['input_ids'])} tokens, longer than "
                                f"seq_len={seq_len}. Fix: raise seq_len, shorten it, or set on_overflow=truncate")
            enc = tokenizer(record["text"], pair, add_special_tokens=True, truncation=True, max_length=seq_len)
            truncated += 1
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        examples.append({k: list(enc[k]) for k in keys})
        labels.append(label_map.id_of(record["label"], f"{source} {at(line_no)}"))
    if truncated:
        warnings.warn(f"{source}: {truncated} of {len(records)} examples were longer than seq_len={seq_len} tokens "
                      "and were truncated. Raise seq_len to keep them whole, or pass on_overflow='error' to refuse",
                      DataWarning, stacklevel=3)
    return LabelDataset(examples, labels, label_map)


def load_labels(path: str | Path, tokenizer, seq_len: int, *, eval_path: str | Path | None = None,
                eval_fraction: float = 0.0, seed: int = 0, on_overflow: str = "truncate") -> LabelSplits:
    """Load a classification file (.jsonl, .json, .csv, .parquet) and its held-out part as `LabelDataset`s with one
    `LabelMap`.

    The map is read from the training records (all of them, before a held-out fraction is split off); held-out
    labels must be among them.

    Raises:
        DataError: not a record file, a record missing `text` or `label`, mixed label kinds, an unknown held-out
            label, an empty file, or an example over `seq_len` with on_overflow='error'.
    """
    path, records = read_task_records(path, eval_path, eval_fraction, on_overflow, check_record, "classification",
                                      SHAPE)
    label_map = LabelMap.from_labels([r["label"] for _, r in records], str(path))
    train, held = held_out_records(records, path, eval_path, eval_fraction, seed, check_record)
    options = dict(tokenizer=tokenizer, seq_len=seq_len, label_map=label_map, on_overflow=on_overflow)
    return LabelSplits(_tokenize(train, source=str(path), **options),
                       None if held is None else _tokenize(held, source=str(eval_path or path), **options),
                       label_map)


class LabelCollator:
    """Pad token fields to the longest in the batch (rounded up to a multiple of 8): `input_ids` with `pad_token_id`,
    `attention_mask` and `token_type_ids` with 0; stack `labels` (B,). Right padding."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        if pad_token_id is None:
            raise ConfigError("`pad_token_id` is None. Fix: use tokenizer.pad_token_id or tokenizer.eos_token_id")
        self.pad_token_id, self.multiple = int(pad_token_id), int(pad_to_multiple_of or 1)

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        width = math.ceil(longest / self.multiple) * self.multiple
        batch = {}
        for key in (k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features[0]):
            fill = self.pad_token_id if key == "input_ids" else 0
            out = torch.full((len(features), width), fill, dtype=torch.long)  # (B, T)
            for i, f in enumerate(features):
                out[i, :len(f[key])] = f[key]
            batch[key] = out
        if "attention_mask" not in batch:
            batch["attention_mask"] = (torch.arange(width)[None, :] <
                                       torch.tensor([len(f["input_ids"]) for f in features])[:, None]).long()
        batch["labels"] = torch.stack([f["labels"] for f in features])  # (B,)
        return batch
