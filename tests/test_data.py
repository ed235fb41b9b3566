"""Tests for lamda_edge/data.py: every file shape, every error with its line, truncation, packing, padding."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lamda_edge.errors import ConfigError, DataError
from lamda_edge.train.data import (
    IGNORE_INDEX,
    DataWarning,
    PaddingCollator,
    TokenDataset,
    build_dataset,
    load_data,
    pack_documents,
    read_records,
    tokenize_messages,
)

CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "what is two plus three? the answer is five",
    "hello world, a small tokenizer for tests; numbers 0 1 2 3 4 5 6 7 8 9",
]


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny.tokenizer(CORPUS * 5, vocab_size=400)


def write_jsonl(path, rows) -> str:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


# ----------------------------------------------------------------------------- formats


def test_text_records_are_packed_with_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}, {"text": "the dog ran"}])
    train, held = load_data(path, tokenizer, seq_len=64)
    assert held is None
    assert len(train) == 1  # two short documents, one block
    item = train[0]
    expected = tokenizer("the cat sat")["input_ids"] + [tokenizer.eos_token_id]
    expected += tokenizer("the dog ran")["input_ids"] + [tokenizer.eos_token_id]
    assert item["input_ids"].tolist() == expected
    assert item["labels"].tolist() == expected
    assert item["attention_mask"].tolist() == [1] * len(expected)
    assert train.stats.packed_documents == 2


def test_text_records_unpacked_one_example_each(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}, {"text": "the dog ran"}])
    train, _ = load_data(path, tokenizer, seq_len=64, pack=False)
    assert len(train) == 2
    assert tokenizer.decode(train[1]["input_ids"]) == "the dog ran<|im_end|>"


def test_prompt_completion_labels_only_on_completion(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "what is two plus three?", "completion": " five"}])
    train, _ = load_data(path, tokenizer, seq_len=64)
    item = train[0]
    n_prompt = len(tokenizer("what is two plus three?")["input_ids"])
    assert item["labels"][:n_prompt].tolist() == [IGNORE_INDEX] * n_prompt
    assert trained_text(tokenizer, item["input_ids"].tolist(), item["labels"].tolist()) == " five<|im_end|>"


@pytest.mark.parametrize(
    "messages, expected",
    [
        pytest.param(
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat"}],
            ["the cat<|im_end|>\n"],
            id="one-turn",
        ),
        pytest.param(
            [
                {"role": "system", "content": "be short"},
                {"role": "user", "content": "two plus three?"},
                {"role": "assistant", "content": "five"},
                {"role": "user", "content": "and the dog?"},
                {"role": "assistant", "content": "the dog ran"},
            ],
            ["five<|im_end|>\n", "the dog ran<|im_end|>\n"],
            id="system-two-turns",
        ),
    ],
)
def test_chat_labels_only_on_assistant_turns(tokenizer, messages, expected):
    ids, labels = tokenize_messages(tokenizer, messages)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_text(tokenizer, ids, labels) == "".join(expected)
    # the user text is never trained on
    assert "hello" not in trained_text(tokenizer, ids, labels)


def test_chat_labels_without_prefix_stable_template(tiny, tokenizer):
    """A template that renders differently as the conversation grows (a turn count up front), and an
    assistant-first conversation, fall back to locating each assistant content in the full text."""
    import copy

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = "{{ messages | length }} turns\n" + tiny.CHATML
    messages = [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "two plus three?"},
        {"role": "assistant", "content": "five"},
    ]
    ids, labels = tokenize_messages(odd, messages)
    assert trained_text(odd, ids, labels) == "hello<|im_end|>five<|im_end|>"


def test_chat_file_loads(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "five"}]}]
    train, _ = load_data(write_jsonl(tmp_path / "chat.jsonl", rows), tokenizer, seq_len=64)
    assert train.stats.formats == {"messages": 1}
    assert trained_text(tokenizer, train[0]["input_ids"].tolist(), train[0]["labels"].tolist()) == "five<|im_end|>\n"


def test_chat_without_template_is_a_data_error(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        tokenize_messages(bare, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_txt_file_split_into_blocks(tmp_path, tokenizer):
    text = " ".join(CORPUS * 4)
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    train, _ = load_data(path, tokenizer, seq_len=16, pack=False)  # a .txt is cut into blocks regardless
    stream = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert [len(train[i]["input_ids"]) for i in range(len(train) - 1)] == [16] * (len(train) - 1)
    assert torch.cat([train[i]["input_ids"] for i in range(len(train))]).tolist() == stream


def test_txt_held_out_blocks(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text(" ".join(CORPUS * 4), encoding="utf-8")
    whole, _ = load_data(path, tokenizer, seq_len=16)
    train, held = load_data(path, tokenizer, seq_len=16, eval_fraction=0.2, seed=0)
    assert len(train) + len(held) == len(whole) and len(held) == round(len(whole) * 0.2)


def test_pack_documents_cuts_stream():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6]], seq_len=4, eos_id=0)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [0]]


# ----------------------------------------------------------------------------- held-out split


def test_eval_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"prompt": f"number {i}", "completion": f" {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_data(path, tokenizer, seq_len=32, eval_fraction=0.25, seed=3)
    b = load_data(path, tokenizer, seq_len=32, eval_fraction=0.25, seed=3)
    c = load_data(path, tokenizer, seq_len=32, eval_fraction=0.25, seed=4)

    def texts(ds):
        return {tokenizer.decode(ds[i]["input_ids"]) for i in range(len(ds))}

    assert (len(a.train), len(a.eval)) == (15, 5)
    assert texts(a.eval) == texts(b.eval)
    assert texts(a.eval) != texts(c.eval)
    assert not texts(a.eval) & texts(a.train)


def test_explicit_eval_file(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}])
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"text": "the dog"}, {"text": "the mat"}])
    train, held = load_data(train_path, tokenizer, seq_len=32, eval_path=eval_path, pack=False)
    assert (len(train), len(held)) == (1, 2)
    with pytest.raises(ConfigError, match="only one"):
        load_data(train_path, tokenizer, seq_len=32, eval_path=eval_path, eval_fraction=0.1)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "rows, pattern",
    [
        pytest.param([{"text": "ok"}, '{"text": "broken', {"text": "ok"}], r"d\.jsonl line 2: malformed JSON", id="json"),  # noqa: E501
        pytest.param([{"text": "ok"}, {"text": "ok"}, {"foo": 1, "bar": 2}], r"line 3: no accepted field \(found fields \['bar', 'foo'\]\).*prompt", id="no-field"),  # noqa: E501
        pytest.param([{"prompt": "a"}], r"line 1: missing field 'completion' \(found fields \['prompt'\]\)", id="no-completion"),  # noqa: E501
        pytest.param([{"text": 3}], r"line 1: field 'text' must be a string", id="text-type"),
        pytest.param(["[1, 2]"], r"line 1: expected a JSON object, got list", id="not-object"),
        pytest.param([{"messages": [{"role": "user", "content": "a"}]}], r"line 1: .*no assistant turn", id="no-assistant"),  # noqa: E501
        pytest.param([{"messages": [{"role": "user"}]}], r"line 1: messages\[0\] has no string 'content'", id="no-content"),  # noqa: E501
    ],
)
def test_record_errors_name_file_and_line(tmp_path, tokenizer, rows, pattern):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=pattern):
        load_data(path, tokenizer, seq_len=32)


def test_blank_lines_keep_line_numbers(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match="line 4"):
        read_records(path)


@pytest.mark.parametrize(
    "content, suffix",
    [pytest.param("", ".jsonl", id="empty-jsonl"), pytest.param("\n  \n", ".jsonl", id="blank-jsonl"),
     pytest.param("   \n", ".txt", id="blank-txt")],
)
def test_empty_dataset(tmp_path, tokenizer, content, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_data(path, tokenizer, seq_len=32)


def test_missing_file_and_bad_suffix(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nope.jsonl", tokenizer, seq_len=32)
    (tmp_path / "d.xlsx").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'.*\.json.*\.csv.*\.parquet"):
        load_data(tmp_path / "d.xlsx", tokenizer, seq_len=32)


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"seq_len": 1}, id="seq_len"), pytest.param({"seq_len": 8, "on_overflow": "drop"}, id="overflow"),
     pytest.param({"seq_len": 8, "eval_fraction": 1.0}, id="fraction")],
)
def test_bad_options_are_config_errors(tmp_path, tokenizer, kwargs):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError):
        load_data(path, tokenizer, **kwargs)


# ----------------------------------------------------------------------------- overflow


def long_rows():
    long = " ".join(["the cat sat on the mat"] * 10)
    return [{"prompt": "two plus three?", "completion": " five"}, {"prompt": "hi", "completion": long},
            {"prompt": long, "completion": " five"}, {"prompt": "hi", "completion": long}]


def test_overflow_truncates_with_one_warning(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", long_rows())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _ = load_data(path, tokenizer, seq_len=24)
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "3 of 4 examples were longer than seq_len=24" in message
    assert "1 of them kept no trained tokens and were dropped" in message
    assert len(train) == 3 and max(train.lengths) == 24
    assert (train.stats.truncated, train.stats.dropped) == (3, 1)


def test_overflow_error_names_the_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", long_rows())
    with pytest.raises(DataError, match=r"d\.jsonl line 2: \d+ tokens, longer than seq_len=24"):
        load_data(path, tokenizer, seq_len=24, on_overflow="error")


def test_fitting_data_gives_no_warning(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", long_rows()[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_data(path, tokenizer, seq_len=24)


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    "lengths, width",
    [
        pytest.param([3, 5], 8, id="to-8"),
        pytest.param([9, 2, 16], 16, id="exact-16"),
        pytest.param([17], 24, id="to-24"),
    ],
)
def test_collator_pads_to_multiple_of_8(lengths, width):
    feats = [{"input_ids": list(range(1, n + 1)), "labels": [IGNORE_INDEX] + list(range(2, n + 1))} for n in lengths]
    batch = PaddingCollator(pad_token_id=0)(feats)
    assert batch["input_ids"].shape == (len(lengths), width)
    for row, n in enumerate(lengths):
        assert batch["input_ids"][row, :n].tolist() == list(range(1, n + 1))
        assert batch["input_ids"][row, n:].eq(0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row, 0] == IGNORE_INDEX
        assert batch["labels"][row, 1:n].tolist() == list(range(2, n + 1))
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()


def test_collator_on_dataset_items(tmp_path, tokenizer):
    rows = [{"prompt": "hi", "completion": " five"}, {"prompt": "what is two plus three?", "completion": " five"}]
    train, _ = load_data(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, seq_len=64)
    batch = PaddingCollator.for_tokenizer(tokenizer)([train[0], train[1]])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"].sum().item() == sum(train.lengths)
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == train.stats.label_tokens


def test_trainer_consumes_dataset_with_collator(tiny, tmp_path, tokenizer):
    """A tiny Llama trains for two steps on our dataset through transformers' Trainer with length grouping."""
    from transformers import Trainer, TrainingArguments

    rows = [{"prompt": f"number {i} plus one?", "completion": f" {i + 1}"} for i in range(16)]
    train, held = load_data(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, seq_len=32, eval_fraction=0.25)
    model = tiny.model("llama", vocab=len(tokenizer), hidden=32, positions=2048).train()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                             train_sampling_strategy="group_by_length", report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held,
                      data_collator=PaddingCollator.for_tokenizer(tokenizer), processing_class=tokenizer)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_token_dataset_items_are_long_tensors():
    ds = TokenDataset([([5, 6, 7], [IGNORE_INDEX, 6, 7])])
    item = ds[0]
    keys = ("input_ids", "labels", "attention_mask")
    assert {k: v.dtype for k, v in item.items()} == dict.fromkeys(keys, torch.long)
    assert ds.lengths == [3]


def test_build_dataset_refuses_all_masked(tokenizer):
    long = " ".join(["the cat sat on the mat"] * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError, match="no examples"):
            build_dataset([(1, {"prompt": long, "completion": " five"})], tokenizer, seq_len=8)


def test_mean_loss_tokens_counts_what_the_shifted_loss_takes():
    """The tokens per example a causal LM's loss takes (they scale S's and B's default rates, docs/method.md)."""
    from lamda_edge.train.data import IGNORE_INDEX, TokenDataset

    prompt_completion = ([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4])  # 2: the completion
    plain_text = ([5, 6, 7], [5, 6, 7])  # 2: the first token is never predicted
    assert TokenDataset([prompt_completion, plain_text]).mean_loss_tokens() == 2.0
    assert TokenDataset([prompt_completion] * 10 + [plain_text] * 10).mean_loss_tokens(sample=5) == 2.0
    assert TokenDataset([]).mean_loss_tokens() == 0.0
