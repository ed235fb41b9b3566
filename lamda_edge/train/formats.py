"""Dataset files in, the record dicts of `data.py` out: JSON Lines, JSON arrays, CSV, Parquet; Alpaca and ShareGPT.

    *.jsonl    one JSON object per line                          --> (line n, record)
    *.json     one array of objects (a file of one object per
               line is read as JSON Lines)                       --> (record n, record)
    *.csv      pyarrow.csv; a header row names the fields (it is
               row 1, as a spreadsheet shows it); the text fields
               stay strings ("007" is not 7), others are inferred --> (row n, record)
    *.parquet  pyarrow.parquet; nested lists of structs (chat
               turns) come through as lists of dicts             --> (row n, record)

    records --detect (the keys of the first record)--> native | alpaca | sharegpt --normalize--> data.py's records

native     today's shapes, which may mix in one file: {"text"}, {"prompt", "completion"}, {"messages"} (and a
           classifier's {"text", "label"} or a seq2seq {"source", "target"}, which their own readers check).
alpaca     {"instruction", "input"?, "output"} -> {"instruction", "input", "output"}. The prompt is the instruction,
           then a blank line and the input when there is one. With a chat template (the model's tokenizer has one),
           the prompt is the user turn and the output the assistant turn: the model is trained as it is asked at
           inference, loss on the assistant turn and its end-of-turn marker. Without one, the Stanford Alpaca prompt
           (`ALPACA_PROMPT`, "... ### Response:\\n") is the prompt and the output the completion, loss on the output
           and EOS. Either way, no loss on the prompt.
sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value"}]} -> {"messages": [{"role": "user"|
           "assistant"|"system", "content"}]}, then the chat path of `data.py` (loss on assistant turns).

A record's keys name one format; a first record whose keys name none, or more than one, is refused with the keys
found and the formats accepted. Alpaca and ShareGPT files hold one format throughout. Nothing is downloaded: pyarrow
reads local files only (`pip install 'lamda-edge[data]'` when it is missing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lamda_edge.errors import DataError, require

JSONL_SUFFIXES = (".jsonl", ".jsonlines")
JSON_SUFFIXES = (".json",)
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
RECORD_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
# fields that hold text in any record kind: a CSV reader keeps them as strings whatever they look like
TEXT_FIELDS = ("text", "text_pair", "prompt", "completion", "instruction", "input", "output", "source", "target")

# format -> (the keys that name it, its shape)
FORMATS = {
    "text": (("text",), '{"text": str}'),
    "prompt/completion": (("prompt", "completion"), '{"prompt": str, "completion": str}'),
    "messages": (("messages",), '{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}'),
    "alpaca": (("instruction", "output"), '{"instruction": str, "input": str (optional), "output": str}'),
    "sharegpt": (("conversations",), '{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}'),
}
ACCEPTED_SHAPES = ", ".join(f"{name} {shape}" for name, (_, shape) in FORMATS.items())
NATIVE = ("text", "prompt/completion", "messages")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n")


class Position(int):
    """Where a record sits in its file, printed with its unit: ``line 3``, ``record 3`` (JSON array), ``row 3``."""

    def __new__(cls, number: int, unit: str = "line"):
        self = super().__new__(cls, number)
        self.unit = unit
        return self

    def __str__(self) -> str:
        return f"{self.unit} {int(self)}"


def at(position: int) -> str:
    """``line 3`` for a plain line number, else the position as it prints (``row 3``, ``record 3``)."""
    return str(position) if isinstance(position, Position) else f"line {position}"


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[tuple[Position, Any]]:
    """The raw records of a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, each with its position.

    Raises:
        DataError: bad encoding, malformed JSON (named with its line) or CSV (named with its row), or a file pyarrow
            cannot read.
    """
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in JSON_SUFFIXES:
        return _read_json(path)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    return _read_parquet(path)


def _read_jsonl(path: Path) -> list[tuple[Position, Any]]:
    rows = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark is not JSON
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {line_no}: not valid UTF-8 ({exc}). Fix: re-save as UTF-8") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {line_no}: malformed JSON ({exc.msg} at column {exc.colno}). "
                    "Fix: each line must be one complete JSON object"
                ) from exc
            except RecursionError as exc:
                raise DataError(f"{path} line {line_no}: JSON nested too deeply to read. Fix: each line must be "
                                f"one flat object ({ACCEPTED_SHAPES})") from exc
            rows.append((Position(line_no), record))
    return rows


def _read_json(path: Path) -> list[tuple[Position, Any]]:
    """A JSON array of records; a file that holds one object per line (JSON Lines named .json) is read as such."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not JSON
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc}). Fix: re-save the file as UTF-8") from exc
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # one object per line: JSON Lines
            return _read_jsonl(path)
        raise DataError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno}). Fix: a .json "
                        "dataset is one array of records, [{...}, {...}], or one object per line") from exc
    except RecursionError as exc:
        raise DataError(f"{path}: JSON nested too deeply to read. Fix: records are flat objects "
                        f"({ACCEPTED_SHAPES})") from exc
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a JSON array of records, got {found}. Fix: put the records in one "
                        "top-level array, [{...}, {...}], or write one object per line (JSON Lines)")
    return [(Position(i, "record"), record) for i, record in enumerate(data, start=1)]


def _arrow_error(path: Path, exc: Exception) -> DataError:
    message = " ".join(str(exc).split())  # one line
    return DataError(f"{path}: cannot read it ({message}). Fix: check that the file is complete and of the type "
                     "its name says")


def _read_csv(path: Path) -> list[tuple[Position, Any]]:
    pa = require("pyarrow", extra="data")
    csv = require("pyarrow.csv", extra="data")
    bad = []

    def on_invalid_row(row) -> str:  # keep the first bad row to name it, then stop
        bad.append(row)
        return "error"

    try:
        table = csv.read_csv(path, read_options=csv.ReadOptions(use_threads=False),  # in order: rows are numbered
                             parse_options=csv.ParseOptions(invalid_row_handler=on_invalid_row),
                             convert_options=csv.ConvertOptions(column_types=dict.fromkeys(TEXT_FIELDS, pa.string())))
    except pa.ArrowInvalid as exc:
        if bad:
            row = bad[0]
            text = row.text if len(row.text) <= 60 else row.text[:57] + "..."
            fields = f"{row.actual_columns} field" + ("" if row.actual_columns == 1 else "s")
            raise DataError(f"{path} row {row.number}: {fields} where the header has "
                            f"{row.expected_columns} ({text!r}). Fix: quote a field that holds a comma, or give the "
                            "row every column") from exc
        if "Empty CSV file" in str(exc):
            return []
        raise _arrow_error(path, exc) from exc
    # the header is row 1, the first record row 2 (as a spreadsheet numbers them)
    return [(Position(i, "row"), record) for i, record in enumerate(table.to_pylist(), start=2)]


def _read_parquet(path: Path) -> list[tuple[Position, Any]]:
    pa = require("pyarrow", extra="data")
    parquet = require("pyarrow.parquet", extra="data")
    try:
        table = parquet.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise _arrow_error(path, exc) from exc
    return [(Position(i, "row"), record) for i, record in enumerate(table.to_pylist(), start=1)]


# ----------------------------------------------------------------------------- detecting and converting


def detect(record: Any, path: Path, position: int) -> str:
    """The format family the keys of (the first) `record` name: ``native``, ``alpaca`` or ``sharegpt``.

    Raises:
        DataError: the keys name no format, or more than one (named with the keys found and the formats accepted).
    """
    if not isinstance(record, dict):
        return "native"  # the native check names what it got
    named = [name for name, (keys, _) in FORMATS.items() if any(key in record for key in keys)]
    families = {"native" if name in NATIVE else name for name in named}
    where, found = f"{path} {at(position)}", sorted(record)
    if not named:
        raise DataError(f"{where}: no accepted field (found fields {found}). Accepted formats: {ACCEPTED_SHAPES}")
    if len(families) > 1:
        which = ", ".join(f"{name} ({', '.join(k for k in FORMATS[name][0] if k in record)})" for name in named)
        raise DataError(f"{where}: the fields {found} fit more than one format: {which}. Fix: keep the fields of one "
                        f"format. Accepted formats: {ACCEPTED_SHAPES}")
    return families.pop()


def normalize(rows: list[tuple[int, Any]], path: Path) -> tuple[list[tuple[int, Any]], str]:
    """(records, their family): Alpaca and ShareGPT records as data.py's record dicts, each one checked on the way;
    native records as they are (data.py checks them)."""
    if not rows:
        return rows, "native"
    family = detect(rows[0][1], path, rows[0][0])
    if family == "alpaca":
        return [(pos, alpaca_record(record, f"{path} {at(pos)}")) for pos, record in rows], family
    if family == "sharegpt":
        return [(pos, sharegpt_record(record, f"{path} {at(pos)}")) for pos, record in rows], family
    return rows, family


def kind(value: Any) -> str:
    """A value's type as an error message names it (``null (an empty cell)`` for None)."""
    return "null (an empty cell)" if value is None else type(value).__name__


def list_kind(value: Any) -> str:
    """What a field that should hold a list holds instead; a string gets the hint that CSV cells cannot hold lists."""
    if isinstance(value, str):
        return "a string (a CSV cell holds text, not a list of turns: use .json, .jsonl or .parquet)"
    return kind(value)


def alpaca_record(record: Any, where: str) -> dict[str, str]:
    """An Alpaca record checked and reduced to ``{"instruction", "input", "output"}`` (a missing input is "")."""
    shape = FORMATS["alpaca"][1]
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}. This file is Alpaca: {shape}")
    for key in ("instruction", "output"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} (found fields {sorted(record)}). This file is Alpaca "
                            f"(its first record): {shape}")
    text = {"input": "" if record.get("input") is None else record["input"]}
    text.update({key: record[key] for key in ("instruction", "output")})
    for key, value in text.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {kind(value)}")
    return {"instruction": text["instruction"], "input": text["input"], "output": text["output"]}


def sharegpt_record(record: Any, where: str) -> dict[str, list[dict[str, str]]]:
    """A ShareGPT record checked and mapped onto ``{"messages": [{"role", "content"}, ...]}``."""
    shape = FORMATS["sharegpt"][1]
    if not isinstance(record, dict) or "conversations" not in record:
        found = f"fields {sorted(record)}" if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no 'conversations' (found {found}). This file is ShareGPT (its first record): "
                        f"{shape}")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects, got "
                        f"{list_kind(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise DataError(f"{where}: conversations[{i}] 'from' is {got!r}; accepted: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{i}] 'value' must be a string, got {kind(turn.get('value'))}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'conversations' has no gpt turn, so there is nothing to train on")
    return {"messages": messages}


def alpaca_prompt(record: dict[str, str]) -> str:
    """The Stanford Alpaca prompt of a record (for a tokenizer without a chat template)."""
    template = ALPACA_PROMPT_WITH_INPUT if record["input"] else ALPACA_PROMPT
    return template.format(instruction=record["instruction"], input=record["input"])


def alpaca_messages(record: dict[str, str]) -> list[dict[str, str]]:
    """A record as one chat exchange: the instruction (and input) as the user turn, the output as the assistant's."""
    user = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
