"""Local datasets -> token batches for causal-LM fine-tuning.

Accepted files (local only; nothing is ever fetched from a hub; `formats.py` reads all but .txt):

    *.jsonl, *.json (an array), *.csv, *.parquet: records in one of these shapes (the three native ones may mix):
             {"text": "..."}                                   loss on every token
             {"prompt": "...", "completion": "..."}            loss on the completion only
             {"messages": [{"role": "user", "content": "..."},
                           {"role": "assistant", "content": "..."}, ...]}
                                                               tokenizer's chat template; loss on assistant turns
             Alpaca {"instruction", "input"?, "output"}        chat template's user/assistant turns when the
                                                               tokenizer has one, else the Alpaca prompt; loss on
                                                               the output only
             ShareGPT {"conversations": [{"from", "value"}]}   mapped onto "messages"
    *.txt    plain text, tokenized as one stream and cut into blocks of `seq_len` tokens

    file --read--> records --split (seeded)--> tokenize --pack text / truncate--> TokenDataset
    TokenDataset --PaddingCollator--> {"input_ids", "attention_mask", "labels"}  (B, T), T = max len rounded up to 8
    TokenDataset --PackingCollator--> {"input_ids", "position_ids", "labels"}    (1, sum of the B lengths), no padding

Labels are -100 wherever no loss is taken (prompt, non-assistant turns, padding). Plain-text
records are packed into `seq_len` blocks with EOS between documents; the other shapes are one
example each, truncated to `seq_len` with one summarizing warning (or refused with
``on_overflow="error"``). With transformers' Trainer, pass the datasets and a `PaddingCollator`;
``TrainingArguments(train_sampling_strategy="group_by_length")`` groups similar lengths (our items
are dicts with ``input_ids``).
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from lamda_edge.errors import ConfigError, DataError
from lamda_edge.train import formats
from lamda_edge.train.formats import ACCEPTED_SHAPES, JSONL_SUFFIXES, PARQUET_SUFFIXES, RECORD_SUFFIXES, at

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".text", ".md")
OVERFLOW_POLICIES = ("truncate", "error")


class DataWarning(UserWarning):
    """A dataset was usable but changed on the way in (sequences truncated or dropped)."""


@dataclass
class DataStats:
    """What loading a dataset did; the training summary can print it."""

    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    packed_documents: int = 0
    formats: dict[str, int] = field(default_factory=dict)


class TokenDataset(Dataset):
    """A list of tokenized examples; item i is a dict of 1-d `torch.long` tensors.

    Keys: ``input_ids`` (T,), ``labels`` (T,) with -100 where no loss is taken, ``attention_mask`` (T,)
    of ones (padding is added by `PaddingCollator`). ``lengths`` lists every T for length grouping.
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], stats: DataStats | None = None):
        self._examples = examples
        self.lengths = [len(ids) for ids, _ in examples]
        self.stats = stats or DataStats(examples=len(examples))

    def __len__(self) -> int:
        return len(self._examples)

    def mean_loss_tokens(self, sample: int = 4096) -> float:
        """Tokens per example that a causal LM's loss takes (labels not -100 after the one-token shift), averaged over
        at most `sample` evenly spaced examples; 0 for an empty set."""
        if not self._examples:
            return 0.0
        picked = self._examples[:: math.ceil(len(self._examples) / sample)]  # at most `sample` of them
        return sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in picked) / len(picked)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = self._examples[index]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),  # (T,)
            "labels": torch.tensor(labels, dtype=torch.long),  # (T,)
            "attention_mask": torch.ones(len(ids), dtype=torch.long),  # (T,)
        }


class DataSplits(NamedTuple):
    """The training set and the held-out set (None when no held-out data was asked for)."""

    train: TokenDataset
    eval: TokenDataset | None


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path, check=None) -> list[tuple[int, dict[str, Any]]]:
    """Read a dataset file into ``(position, record)`` pairs, validating each record's shape.

    ``.jsonl``, ``.json``, ``.csv`` and ``.parquet`` files are read by `formats.py` (positions print as ``line 3``,
    ``record 3`` or ``row 3``); without a `check`, Alpaca and ShareGPT records become the records below. A ``.txt``
    file becomes one record ``{"text": <whole file>}`` at line 1. `check(record, path, position)` validates a record
    (default: the causal-LM shapes; `labels.py` and `pairs.py` pass their own).

    Raises:
        DataError: missing file, unsupported suffix, bad encoding, malformed JSON or CSV, or a record of no
            accepted shape; the message names the file and the line (record, row).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist (or is not a file). Fix: pass a local "
                        f"{', '.join(RECORD_SUFFIXES + TEXT_SUFFIXES[:1])} file")
    suffix = path.suffix.lower()
    if suffix not in RECORD_SUFFIXES + TEXT_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix!r}. Fix: use JSON Lines ({', '.join(JSONL_SUFFIXES)}), a JSON "
            f"array (.json), CSV (.csv), Parquet ({', '.join(PARQUET_SUFFIXES)}) or plain text "
            f"({', '.join(TEXT_SUFFIXES)})"
        )
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 text ({exc}). Fix: re-save the file as UTF-8") from exc
        return [(1, {"text": text})] if text.strip() else []
    records = formats.read_rows(path)
    if check is None:
        records, family = formats.normalize(records, path)
        if family != "native":  # Alpaca and ShareGPT records were checked as they were converted
            return records
    for position, record in records:
        (check or _check_record)(record, path, position)
    return records


def record_format(record: dict[str, Any]) -> str:
    """The shape of a validated record: ``"messages"``, ``"prompt_completion"``, ``"alpaca"`` or ``"text"``."""
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" not in record and "instruction" in record:
        return "alpaca"
    return "text"


def _check_record(record: Any, path: Path, line_no: int) -> None:
    where = f"{path} {at(line_no)}"
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise DataError(f"{where}: expected a JSON object, got {kind}. Accepted shapes: {ACCEPTED_SHAPES}")
    found = sorted(record)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got "
                            f"{formats.list_kind(messages)}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise DataError(f"{where}: messages[{i}] has no string 'role'. Accepted shapes: {ACCEPTED_SHAPES}")
            if not isinstance(message.get("content"), str):
                raise DataError(f"{where}: messages[{i}] has no string 'content' (found keys {sorted(message)})")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to train on")
        return
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(
                    f"{where}: missing field {key!r} (found fields {found}). Accepted shapes: {ACCEPTED_SHAPES}"
                )
            if not isinstance(record[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {formats.kind(record[key])}")
        return
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {formats.kind(record['text'])}")
        return
    raise DataError(f"{where}: no accepted field (found fields {found}). Accepted shapes: {ACCEPTED_SHAPES}")


# ----------------------------------------------------------------------------- tokenizing


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(BOS ids to put before a sequence, EOS ids to put after one), as the tokenizer defines them."""
    bos_id = tokenizer.bos_token_id
    added = list(tokenizer("", add_special_tokens=True)["input_ids"])  # what the tokenizer itself prepends
    bos = [bos_id] if bos_id is not None and added[:1] == [bos_id] else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Tokens of ``prompt + completion + EOS``; labels -100 on the prompt (and on a BOS)."""
    bos, eos = _special_ids(tokenizer)
    prompt_ids = bos + _encode(tokenizer, prompt)
    completion_ids = _encode(tokenizer, completion) + eos
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Tokens of ``text + EOS``; loss on every token."""
    bos, eos = _special_ids(tokenizer)
    ids = bos + _encode(tokenizer, text) + eos
    return ids, list(ids)


def tokenize_alpaca(tokenizer, record: dict[str, str]) -> tuple[list[int], list[int]]:
    """An Alpaca record as one chat exchange when the tokenizer has a chat template (labels on the assistant turn),
    else as the Stanford Alpaca prompt and the output as its completion (see `formats.py`)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenize_messages(tokenizer, formats.alpaca_messages(record))
    return tokenize_prompt_completion(tokenizer, formats.alpaca_prompt(record), record["output"])


def tokenize_messages(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Tokens of a conversation rendered with the tokenizer's chat template; labels only on assistant turns.

    Each assistant turn's character span is found by rendering the conversation incrementally:
    the span runs from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
    ``render(messages[:i + 1])`` (so it includes the template's end-of-turn marker). Tokens whose
    characters lie inside a span get labels. If the template is not prefix-stable, the assistant
    content is searched for in the full text instead.

    Raises:
        DataError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat 'messages' need a tokenizer with a chat template, and this one has none. "
            "Fix: use a model whose tokenizer_config.json/chat_template.jinja defines one, or use prompt/completion"
        )

    def render(msgs, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    spans = []  # [(start char, end char)] of assistant turns in `full`
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], generation_prompt=True) if i else None
        through = render(messages[: i + 1])
        stable = before is not None and full.startswith(through) and through.startswith(before)
        if stable and len(through) > len(before):
            spans.append((len(before), len(through)))
        else:  # a first turn, or a template that is not prefix-stable: find the content (and its end marker)
            start = full.find(message["content"], cursor)
            if start < 0:
                raise DataError("could not locate an assistant turn in the chat template's output")
            end = start + len(message["content"])
            eos = tokenizer.eos_token
            if eos and full.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
        cursor = spans[-1][1]
    return _label_spans(tokenizer, full, spans)


def _label_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize `text` and keep labels on the tokens inside `spans` (character ranges)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
    if offsets is None:  # slow tokenizer: tokenize the pieces between span edges and concatenate
        ids, labels, pos = [], [], 0
        for start, end in spans:
            outside = _encode(tokenizer, text[pos:start]) if start > pos else []
            inside = _encode(tokenizer, text[start:end])
            ids += outside + inside
            labels += [IGNORE_INDEX] * len(outside) + inside
            pos = end
        rest = _encode(tokenizer, text[pos:]) if pos < len(text) else []
        return ids + rest, labels + [IGNORE_INDEX] * len(rest)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (tok_start, tok_end) in enumerate(offsets):
        middle = (tok_start + tok_end) / 2 if tok_end > tok_start else tok_start
        if any(start <= middle < end for start, end in spans):
            labels[k] = ids[k]
    return ids, labels


def pack_documents(docs: list[list[int]], seq_len: int, eos_id: int | None) -> list[list[int]]:
    """Concatenate documents with EOS between them and cut the stream into blocks of `seq_len` tokens.

    The last block may be shorter (the collator pads it). A document longer than `seq_len` simply
    continues into the next block.
    """
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if eos_id is not None and (not doc or doc[-1] != eos_id):
            stream.append(eos_id)
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def build_dataset(
    records: list[tuple[int, dict[str, Any]]],
    tokenizer,
    seq_len: int,
    *,
    source: str = "dataset",
    on_overflow: str = "truncate",
    pack: bool | None = None,
) -> TokenDataset:
    """Tokenize validated records into a `TokenDataset`.

    Args:
        records: ``(line number, record)`` pairs from `read_records`.
        tokenizer: a transformers tokenizer (fast tokenizers give exact chat label spans).
        seq_len: the longest example, in tokens.
        source: the file name, for messages.
        on_overflow: ``"truncate"`` (keep the first `seq_len` tokens; one `DataWarning` counts them)
            or ``"error"`` (a `DataError` names the first line that is too long).
        pack: pack ``text`` records into `seq_len` blocks with EOS separators. None (default) packs them;
            False keeps one example per text record (then the overflow policy applies to them too).

    Raises:
        DataError: empty result, or a sequence longer than `seq_len` with ``on_overflow="error"``.
    """
    _check_options(on_overflow, seq_len)
    pack = True if pack is None else pack
    stats = DataStats()
    longest = 0  # tokens of the longest example, for the hints
    examples: list[tuple[list[int], list[int]]] = []
    docs: list[list[int]] = []
    for line_no, record in records:
        shape = record_format(record)
        stats.formats[shape] = stats.formats.get(shape, 0) + 1
        if shape == "messages":
            ids, labels = tokenize_messages(tokenizer, record["messages"])
        elif shape == "prompt_completion":
            ids, labels = tokenize_prompt_completion(tokenizer, record["prompt"], record["completion"])
        elif shape == "alpaca":
            ids, labels = tokenize_alpaca(tokenizer, record)
        elif pack:
            bos, eos = _special_ids(tokenizer)
            docs.append(bos + _encode(tokenizer, record["text"]) + eos)
            continue
        else:
            ids, labels = tokenize_text(tokenizer, record["text"])
        longest = max(longest, len(ids))
        if len(ids) > seq_len:
            if on_overflow == "error":
                raise DataError(
                    f"{source} {at(line_no)}: {len(ids)} tokens, longer than seq_len={seq_len}. Fix: raise "
                    f"seq_len to {len(ids)} (if the model's context allows it), shorten this example, or set "
                    "on_overflow=truncate to cut it"
                )
            ids, labels = ids[:seq_len], labels[:seq_len]
            stats.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped += 1  # nothing left to learn from (the prompt alone filled seq_len)
            continue
        examples.append((ids, labels))
    if docs:
        stats.packed_documents = len(docs)
        eos_id = tokenizer.eos_token_id
        examples.extend((block, list(block)) for block in pack_documents(docs, seq_len, eos_id))
    if stats.truncated:
        dropped = f"; {stats.dropped} of them kept no trained tokens and were dropped" if stats.dropped else ""
        warnings.warn(
            f"{source}: {stats.truncated} of {len(records)} examples were longer than seq_len={seq_len} tokens "
            f"and were truncated{dropped}. Raise seq_len to keep them whole, or pass on_overflow='error' to refuse",
            DataWarning,
            stacklevel=2,
        )
    if not examples and stats.truncated:
        raise DataError(
            f"{source}: no examples to train on: in all {stats.dropped} of them the prompt fills seq_len={seq_len} "
            f"tokens, so no completion token is left to learn (the longest example has {longest} tokens). Fix: "
            "raise seq_len (if the model's context allows it) or shorten the prompts")
    if not examples:
        raise DataError(f"{source}: no examples to train on. Fix: add records ({ACCEPTED_SHAPES})")
    stats.examples = len(examples)
    stats.tokens = sum(len(ids) for ids, _ in examples)
    stats.label_tokens = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in examples)
    return TokenDataset(examples, stats)


def _check_options(on_overflow: str, seq_len: int | None = None, eval_fraction: float = 0.0) -> None:
    """The data options every reader shares (`seq_len` where the reader takes it)."""
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise ConfigError(f"`seq_len` should be an integer >= 2, got {seq_len!r}")
    if on_overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"`on_overflow` should be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
    if not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction < 1.0 or math.isnan(eval_fraction):
        raise ConfigError(f"`eval_fraction` should be in [0, 1), got {eval_fraction!r}")


def require_fields(record: Any, path: Path, line_no: int, fields: tuple[str, ...], task: str, shape: str) -> str:
    """Check that a record of a `task` run is an object holding `fields`; returns "<path> <position>"."""
    where = f"{path} {at(line_no)}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}. Accepted shape: {shape}")
    for key in fields:
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} (found fields {sorted(record)}). A {task} run reads "
                            f"{shape}")
    return where


def read_task_records(path, eval_path, eval_fraction: float, on_overflow: str, check, task: str,
                      shape: str) -> tuple[Path, list]:
    """Check a task run's options and files (classification, seq2seq) and read its training records:
    (path, records). `task` names the run in errors ("a seq2seq run reads ...")."""
    _check_options(on_overflow, eval_fraction=eval_fraction)
    path = Path(path)
    for file in (path, eval_path):
        if file is not None and Path(file).suffix.lower() not in RECORD_SUFFIXES:
            raise DataError(f"{file}: a {task} run reads records ({', '.join(RECORD_SUFFIXES)}) of {shape}")
    records = read_records(path, check=check)
    if not records:
        raise DataError(f"{path}: the dataset is empty. Fix: add records ({shape})")
    return path, records


def held_out_records(records: list, path, eval_path, eval_fraction: float, seed: int,
                     check=None) -> tuple[list, list | None]:
    """(train, held-out) records of a task (classification, seq2seq): the records of `eval_path` when given,
    else a seeded `eval_fraction` of `records`, else none held out (None)."""
    if eval_path is not None:
        held = read_records(eval_path, check=check)
        if not held:
            raise DataError(f"{eval_path}: the held-out dataset is empty")
        return records, held
    if not eval_fraction:
        return records, None
    if len(records) < 2:
        raise DataError(f"{path}: only 1 record; too few to hold some out. Fix: add records or pass an eval file")
    return _split(records, eval_fraction, seed)


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then (train, held-out) with at least one held-out item."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(items) * fraction))
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return [items[i] for i in kept], [items[i] for i in held]


def load_data(
    path: str | Path,
    tokenizer,
    seq_len: int,
    *,
    eval_path: str | Path | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    on_overflow: str = "truncate",
    pack: bool | None = None,
) -> DataSplits:
    """Load a local dataset file (and its held-out part) as token datasets.

    Args:
        path: a ``.jsonl`` file (text, prompt/completion or chat messages) or a ``.txt`` file.
        tokenizer: the model's tokenizer.
        seq_len: the longest example, in tokens (the block size of packed text).
        eval_path: an explicit held-out file in the same formats; then `eval_fraction` must be 0.
        eval_fraction: hold out this fraction (0 <= f < 1) of the records (of the blocks, for ``.txt``),
            chosen by a seeded shuffle; 0 means no held-out set.
        seed: the seed of the held-out split.
        on_overflow: ``"truncate"`` or ``"error"`` for examples longer than `seq_len` (see `build_dataset`).
        pack: pack plain-text records into `seq_len` blocks (default) or keep one example per record
            (a ``.txt`` file is always cut into blocks).

    Returns:
        `DataSplits(train, eval)`; ``eval`` is None when no held-out data was asked for.

    Raises:
        DataError: a file problem (named with its line), an empty dataset, or a refused overflow.
        ConfigError: invalid `seq_len`, `eval_fraction` or `on_overflow`.
    """
    _check_options(on_overflow, seq_len, eval_fraction)
    if eval_path is not None and eval_fraction:
        raise ConfigError(
            f"both an eval file ({eval_path}) and `eval_fraction`={eval_fraction} were given. Fix: pass only one"
        )
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the dataset is empty. Fix: add records ({ACCEPTED_SHAPES})")
    is_text_file = path.suffix.lower() in TEXT_SUFFIXES
    options = {"on_overflow": on_overflow, "pack": True if is_text_file else pack}  # a .txt is always cut in blocks
    if eval_path is not None:
        eval_records = read_records(eval_path)
        if not eval_records:
            raise DataError(f"{eval_path}: the held-out dataset is empty")
        train = build_dataset(records, tokenizer, seq_len, source=str(path), **options)
        return DataSplits(train, build_dataset(eval_records, tokenizer, seq_len, source=str(eval_path), **options))
    if not eval_fraction:
        return DataSplits(build_dataset(records, tokenizer, seq_len, source=str(path), **options), None)
    if is_text_file:  # one stream: split its blocks
        full = build_dataset(records, tokenizer, seq_len, source=str(path), **options)
        if len(full) < 2:
            raise DataError(f"{path}: only {len(full)} block of {seq_len} tokens; too little text to hold some out")
        train_ex, eval_ex = _split(full._examples, eval_fraction, seed)
        return DataSplits(TokenDataset(train_ex), TokenDataset(eval_ex))
    if len(records) < 2:
        raise DataError(f"{path}: only 1 record; too few to hold some out. Fix: add records or pass an eval file")
    train_records, eval_records = _split(records, eval_fraction, seed)
    return DataSplits(
        build_dataset(train_records, tokenizer, seq_len, source=str(path), **options),
        build_dataset(eval_records, tokenizer, seq_len, source=f"{path} (held-out part)", **options),
    )


# ----------------------------------------------------------------------------- batching


class PaddingCollator:
    """Pad a list of `TokenDataset` items to the longest in the batch, rounded up to a multiple of 8.

    Returns ``input_ids`` (B, T) padded with `pad_token_id`, ``attention_mask`` (B, T) with 0 on padding,
    ``labels`` (B, T) with -100 on padding. Right padding (what training wants).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8, max_length: int | None = None):
        if pad_token_id is None:
            raise ConfigError("`pad_token_id` is None. Fix: use tokenizer.pad_token_id or tokenizer.eos_token_id")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of or 1)
        self.max_length = max_length

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int = 8) -> PaddingCollator:
        """A collator that pads with the tokenizer's pad token (its EOS when it has none)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad, pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty batch")
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        longest = max(len(r) for r in rows)
        width = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:
            width = max(longest, min(width, self.max_length))
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        for i, (row, feature) in enumerate(zip(rows, features)):
            n = len(row)
            input_ids[i, :n] = row
            row_labels = feature.get("labels")
            labels[i, :n] = row if row_labels is None else torch.as_tensor(row_labels, dtype=torch.long)
            mask = feature.get("attention_mask")
            attention_mask[i, :n] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
        labels[attention_mask == 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackingCollator:
    """Concatenate a batch's examples into one padding-free row (`packing: true` in the run config).

    Returns ``input_ids`` (1, N), ``position_ids`` (1, N) restarting at 0 for each example, and ``labels`` (1, N)
    with -100 on each example's first token (no example predicts the next one's start). There is no attention
    mask: transformers 5 reads the restarts in `position_ids` and attends only within each example (a
    block-diagonal causal mask, or flash-attention's variable-length kernel on CUDA); `packed_attention(model)`
    (train/packed_attention.py, what `train` uses) runs causal SDPA on each example's slice instead, without the
    row's N x N mask. The loss equals the padded batch's: the same tokens predict the same labels, summed over the
    same count.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty batch")
        ids, positions, labels = [], [], []
        for feature in features:
            row = torch.as_tensor(feature["input_ids"], dtype=torch.long)  # (T_i,)
            row_labels = feature.get("labels")
            row_labels = row.clone() if row_labels is None else torch.as_tensor(row_labels, dtype=torch.long)
            mask = feature.get("attention_mask")
            if mask is not None:
                keep = torch.as_tensor(mask, dtype=torch.bool)
                row, row_labels = row[keep], row_labels[keep]
            row_labels[:1] = IGNORE_INDEX  # the previous example's last token must not learn to predict this one
            ids.append(row)
            labels.append(row_labels)
            positions.append(torch.arange(len(row), dtype=torch.long))
        return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None],
                "labels": torch.cat(labels)[None]}
