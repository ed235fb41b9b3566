"""Tests for lamda_edge/train/formats.py: JSON arrays, CSV, Parquet, Alpaca and ShareGPT, read into the records of
data.py (token for token what the JSONL of the same records gives), bad rows named in one line, and a CLI run per
format on a tiny Llama."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from lamda_edge.errors import DataError, MissingDependencyError
from lamda_edge.train.data import IGNORE_INDEX, load_data
from lamda_edge.train.formats import alpaca_prompt

CORPUS = ["the cat sat on the mat and the dog ran to the park", "what is two plus three? the answer is five",
          "hello world, a small tokenizer for tests; numbers 0 1 2 3 4 5 6 7 8 9", "### Instruction: Response: Input:"]
# a comma, a quote, a line break, a digits-only field and surrounding spaces: what a CSV reader must keep as written
PAIRS = [{"prompt": "what is two plus three?", "completion": " five"},
         {"prompt": 'the cat, the "dog"', "completion": "007"},
         {"prompt": "hello\nworld ", "completion": " the dog ran"}]
CHATS = [[{"role": "user", "content": "two plus three?"}, {"role": "assistant", "content": "five"}],
         [{"role": "system", "content": "be short"}, {"role": "user", "content": "the cat?"},
          {"role": "assistant", "content": "sat, on the mat"}, {"role": "user", "content": "and the dog"},
          {"role": "assistant", "content": "ran"}]]
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}
pytestmark = pytest.mark.filterwarnings("error::lamda_edge.train.data.DataWarning")  # no example is cut here
ALPACA = [{"instruction": "add the numbers", "input": "two plus three", "output": "five"},
          {"instruction": "say hello", "input": "", "output": "hello world"}]


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny.tokenizer(CORPUS * 5, vocab_size=400)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template."""
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    return bare


def sharegpt(messages: list[dict]) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]}


def write(path: Path, rows: list) -> Path:
    """`rows` in the format `path`'s suffix names (.jsonl, .json, .csv, .parquet); a str row is written as is."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def examples(dataset) -> list[tuple[list[int], list[int]]]:
    return [(dataset[i]["input_ids"].tolist(), dataset[i]["labels"].tolist()) for i in range(len(dataset))]


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


# ----------------------------------------------------------------------------- the same records, any file


@pytest.mark.parametrize("name", ["d.json", "d.csv", "d.parquet"])
def test_prompt_completion_files_read_as_their_jsonl(tmp_path, tokenizer, name):
    reference = load_data(write(tmp_path / "ref.jsonl", PAIRS), tokenizer, seq_len=512)
    got = load_data(write(tmp_path / name, PAIRS), tokenizer, seq_len=512)
    assert got.train.stats.formats == {"prompt_completion": len(PAIRS)}
    assert examples(got.train) == examples(reference.train)


@pytest.mark.parametrize("name", ["d.json", "d.parquet"])
def test_chat_messages_files_read_as_their_jsonl(tmp_path, tokenizer, name):
    rows = [{"messages": m} for m in CHATS]
    reference = load_data(write(tmp_path / "ref.jsonl", rows), tokenizer, seq_len=512)
    got = load_data(write(tmp_path / name, rows), tokenizer, seq_len=512)
    assert got.train.stats.formats == {"messages": len(CHATS)}
    assert examples(got.train) == examples(reference.train)


def test_json_lines_named_json_is_read_as_json_lines(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", PAIRS).rename(tmp_path / "d.json")
    reference = load_data(write(tmp_path / "ref.jsonl", PAIRS), tokenizer, seq_len=512)
    assert examples(load_data(path, tokenizer, seq_len=512).train) == examples(reference.train)


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.parquet"])
def test_sharegpt_is_the_messages_path(tmp_path, tokenizer, name):
    reference = load_data(write(tmp_path / "ref.jsonl", [{"messages": m} for m in CHATS]), tokenizer, seq_len=512)
    got = load_data(write(tmp_path / name, [sharegpt(m) for m in CHATS]), tokenizer, seq_len=512)
    assert got.train.stats.formats == {"messages": len(CHATS)}
    assert examples(got.train) == examples(reference.train)
    ids, labels = examples(got.train)[1]
    assert trained_text(tokenizer, ids, labels) == "sat, on the mat<|im_end|>\nran<|im_end|>\n"


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.csv", "d.parquet"])
def test_alpaca_with_a_chat_template_is_one_exchange(tmp_path, tokenizer, name):
    """Instruction (a blank line, the input) as the user turn, the output as the assistant turn: loss on it alone."""
    got = load_data(write(tmp_path / name, ALPACA), tokenizer, seq_len=512)
    assert got.train.stats.formats == {"alpaca": len(ALPACA)}
    users = ["add the numbers\n\ntwo plus three", "say hello"]
    chats = [[{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
             for user, row in zip(users, ALPACA)]
    for (ids, labels), chat, row in zip(examples(got.train), chats, ALPACA):
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat, tokenize=False)
        assert trained_text(tokenizer, ids, labels) == row["output"] + "<|im_end|>\n"


def test_alpaca_without_a_chat_template_uses_the_alpaca_prompt(tmp_path, plain_tokenizer):
    rows = [ALPACA[0], {"instruction": "say hello", "output": "hello world"}]  # no input at all: as an empty one
    got = load_data(write(tmp_path / "d.json", rows), plain_tokenizer, seq_len=512)
    prompts = [alpaca_prompt(row) for row in ALPACA]
    assert "### Input:\ntwo plus three\n\n### Response:\n" in prompts[0] and "### Input" not in prompts[1]
    for (ids, labels), prompt, row in zip(examples(got.train), prompts, ALPACA):
        assert plain_tokenizer.decode(ids) == prompt + row["output"] + "<|im_end|>"
        assert trained_text(plain_tokenizer, ids, labels) == row["output"] + "<|im_end|>"


def test_classifier_csv_keeps_text_as_text_and_integer_labels(tmp_path, tokenizer):
    from lamda_edge.train.labels import load_labels

    rows = [{"text": "007", "label": 2}, {"text": "the cat, the dog", "label": 0}, {"text": "five", "label": 2}]
    splits = load_labels(write(tmp_path / "d.csv", rows), tokenizer, 32)
    assert splits.label_map.names == ("0", "1", "2") and not splits.label_map.strings
    assert [int(splits.train[i]["labels"]) for i in range(3)] == [2, 0, 2]
    assert tokenizer.decode(splits.train[0]["input_ids"]) == "007"


# ----------------------------------------------------------------------------- bad input, named in one line

BAD = [
    pytest.param("d.json", [ALPACA[0], {"instruction": "x", "input": ""}],
                 r"d\.json record 2: missing field 'output' \(found fields \['input', 'instruction'\]\)\. "
                 r"This file is Alpaca", id="alpaca-json-no-output"),
    pytest.param("d.jsonl", [ALPACA[0], ALPACA[1], {"instruction": "x", "input": 3, "output": "y"}],
                 r"d\.jsonl line 3: field 'input' must be a string, got int", id="alpaca-jsonl-input-type"),
    pytest.param("d.csv", [{"instruction": "x", "output": "y"}, {"instruction": "z", "output": None}],
                 None, id="alpaca-csv-ok-empty-output"),
    pytest.param("d.json", [sharegpt(CHATS[0]), {"conversations": [{"from": "bot", "value": "hi"}]}],
                 r"d\.json record 2: conversations\[0\] 'from' is 'bot'; accepted: human, user, gpt",
                 id="sharegpt-role"),
    pytest.param("d.jsonl", [sharegpt(CHATS[0]), sharegpt(CHATS[0][:1])],
                 r"d\.jsonl line 2: 'conversations' has no gpt turn", id="sharegpt-jsonl-no-gpt"),
    pytest.param("d.parquet", [sharegpt(CHATS[0]), {"conversations": []}],
                 r"d\.parquet row 2: 'conversations' must be a non-empty list", id="sharegpt-parquet-empty"),
    pytest.param("d.csv", [{"conversations": json.dumps(sharegpt(CHATS[0])["conversations"])}],
                 r"d\.csv row 2: 'conversations' must be a non-empty list .* got a string \(a CSV cell holds text",
                 id="sharegpt-csv"),
    pytest.param("d.csv", [{"messages": json.dumps(CHATS[0])}],
                 r"d\.csv row 2: 'messages' must be a non-empty list .* got a string \(a CSV cell", id="messages-csv"),
    pytest.param("d.parquet", [{"text": "a"}, {"text": None}],
                 r"d\.parquet row 2: field 'text' must be a string, got null", id="parquet-null-text"),
    pytest.param("d.csv", ["prompt,completion", "a,b", "c,d,e"],
                 r"d\.csv row 3: 3 fields where the header has 2 \('c,d,e'\)", id="csv-extra-field"),
    pytest.param("d.csv", [{"question": "a", "answer": "b"}],
                 r"d\.csv row 2: no accepted field \(found fields \['answer', 'question'\]\)\. Accepted formats: text "
                 r".*alpaca .*sharegpt", id="csv-unknown-columns"),
    pytest.param("d.json", [{"instruction": "a", "output": "b", "text": "c"}],
                 r"record 1: the fields \['instruction', 'output', 'text'\] fit more than one format: text \(text\), "
                 r"alpaca \(instruction, output\)", id="ambiguous"),
    pytest.param("d.json", ['[{"text": "a"},', ' {"text": }]'],
                 r"d\.json: malformed JSON \(Expecting value at line 2 column 11\)", id="json-malformed"),
    pytest.param("d.json", ['{"data": [{"text": "a"}]}'],
                 r"expected a JSON array of records, got an object with keys \['data'\]", id="json-object"),
    pytest.param("d.parquet", ["not a parquet file"], r"d\.parquet: cannot read it \(.*magic bytes",
                 id="parquet-not-parquet"),
]


def write_bad(path: Path, rows: list) -> Path:
    if rows and isinstance(rows[0], str):  # raw lines
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        return path
    return write(path, rows)


@pytest.mark.parametrize("name, rows, pattern", BAD)
def test_bad_records_are_named_in_one_line(tmp_path, tokenizer, name, rows, pattern):
    path = write_bad(tmp_path / name, rows)
    if pattern is None:  # a CSV cell left empty is an empty string, not a missing value
        assert len(load_data(path, tokenizer, seq_len=512).train) == 2
        return
    with pytest.raises(DataError, match=pattern) as caught:
        load_data(path, tokenizer, seq_len=512)
    assert "\n" not in str(caught.value)


def test_missing_pyarrow_names_the_extra(tmp_path, tokenizer, monkeypatch):
    import sys

    path = write(tmp_path / "d.csv", PAIRS)
    monkeypatch.setitem(sys.modules, "pyarrow.csv", None)  # as if pyarrow were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'lamda-edge\[data\]'"):
        load_data(path, tokenizer, seq_len=512)


# ----------------------------------------------------------------------------- the CLI: a run per format, bad rows

TRAIN = ["--quantize", "none", "--rank", "4", "--batch-size", "4", "--seq-len", "128", "--max-steps", "2", "--quiet",
         "lr=5e-3", "precision=fp32", "dropout=0.0", "eval_fraction=0"]


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory, tiny_run):
    """A tiny Llama folder and 24 prompt/completion rows of its words, as records and as chat messages."""
    root = tmp_path_factory.mktemp("formats-cli")
    rows = [json.loads(line) for line in tiny_run.data(root / "rows.jsonl", n=24).read_text().splitlines()]
    chats = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
             for r in rows]
    return tiny_run.model_dir(root / "model"), rows, chats


def train_cli(model: Path, data: Path, out: Path) -> dict:
    """`lamda-edge train` on `data`; the adapter's tensors."""
    from safetensors.torch import load_file

    from lamda_edge.cli import main

    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out), *TRAIN]) == 0
    return load_file(str(out / "lamda_adapter.safetensors"))


def assert_same_adapter(got: dict, expected: dict, what: str) -> None:
    import torch

    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{what}: {len(different)} adapter tensors differ from the JSONL run's, e.g. {different[0]}"


def test_cli_trains_each_format_as_its_jsonl(tmp_path, cli_world):
    """Every file trains from the CLI and gives, bit for bit, the adapter of the JSONL of the same records: CSV,
    Parquet and a JSON array of prompt/completion rows; Alpaca (.json) and ShareGPT (.json, .jsonl) of the same
    exchanges against their chat messages."""
    import torch

    model, rows, chats = cli_world
    alpaca = [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in rows]
    pair_files = [write(tmp_path / name, rows) for name in ("d.json", "d.csv", "d.parquet")]
    shared = [sharegpt(c) for c in chats]
    chat_files = [write(tmp_path / "alpaca.json", alpaca), write(tmp_path / "sharegpt.json", shared),
                  write(tmp_path / "sharegpt.jsonl", shared)]
    pair_ref = train_cli(model, write(tmp_path / "pairs.jsonl", rows), tmp_path / "ref-pairs")
    messages = [{"messages": c} for c in chats]
    chat_ref = train_cli(model, write(tmp_path / "chat.jsonl", messages), tmp_path / "ref-chat")
    assert any(not torch.equal(pair_ref[k], chat_ref[k]) for k in pair_ref)  # the adapter does depend on the data
    for files, reference in ((pair_files, pair_ref), (chat_files, chat_ref)):
        for path in files:
            assert_same_adapter(train_cli(model, path, tmp_path / f"run-{path.name}"), reference, path.name)


CLI_BAD = [
    pytest.param("alpaca.json", [ALPACA[0], {"instruction": "x"}], "alpaca.json record 2: missing field 'output'",
                 id="alpaca-json"),
    pytest.param("sharegpt.json", [sharegpt(CHATS[0]), {"conversations": [{"from": "human", "value": 1}]}],
                 "sharegpt.json record 2: conversations[0] 'value' must be a string, got int", id="sharegpt-json"),
    pytest.param("sharegpt.jsonl", [sharegpt(CHATS[0]), '{"conversations": [}'],
                 "sharegpt.jsonl line 2: malformed JSON", id="sharegpt-jsonl"),
    pytest.param("d.csv", ["prompt,completion", "a,b", '"c,d'], "d.csv row 3: 1 field where the header has 2",
                 id="csv-open-quote"),
    pytest.param("d.parquet", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
                 "d.parquet row 2: field 'completion' must be a string, got null", id="parquet"),
]


@pytest.mark.parametrize("name, rows, expected", CLI_BAD)
def test_cli_bad_rows_exit_2_in_one_line(tmp_path, capsys, cli_world, name, rows, expected):
    from lamda_edge.cli import main

    model, _, _ = cli_world
    data = write_bad(tmp_path / name, rows)
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lamda-edge train: error: ") and "Traceback" not in err
    assert expected in err


@pytest.mark.slow
def test_alpaca_on_the_default_model_trains_on_the_output_turn(tmp_path):
    """SmolLM2's own chat template: the full text is its rendering of the exchange, the trained text the output and
    its end-of-turn marker."""
    from transformers import AutoTokenizer

    from lamda_edge.demo.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(progress=False))
    got = load_data(write(tmp_path / "d.json", ALPACA), tokenizer, seq_len=512)
    for (ids, labels), row in zip(examples(got.train), ALPACA):
        user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat, tokenize=False)
        assert trained_text(tokenizer, ids, labels) == row["output"] + "<|im_end|>\n"
